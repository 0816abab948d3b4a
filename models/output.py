"""What every model's forward returns, so the trainer needs no knowledge of the family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput as HFModelOutput


@dataclass
class ModelOutput(HFModelOutput):
    """A `transformers` ModelOutput (a dict underneath): DeepSpeed ZeRO-3 walks dict outputs to
    hook its parameter release, and `transformers` users expect this type from a model."""

    loss: torch.Tensor | None = None
    """Total training loss: the objective plus every auxiliary loss already weighted."""
    logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    """Auxiliary losses (already included in `loss`), reported separately in the metrics."""


IGNORE_INDEX = -100
"""Label of positions without a target (PyTorch's and transformers' convention), everywhere in zeroray;
data_pipelines.objectives.IGNORE writes it into batches (tests/test_model_contract.py checks they agree)."""


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (−100 = none), in fp32: a bf16 log-softmax over
    a large vocabulary loses the small terms."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
