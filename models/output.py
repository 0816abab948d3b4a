"""What every model's forward returns, so the trainer needs no knowledge of the family."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ModelOutput(dict):
    """`loss`, `logits` and `aux_losses` as keys and as attributes. A dict: DeepSpeed ZeRO-3 walks dict outputs
    (in place) to hook its parameter release. zeroray's own rather than `transformers`' ModelOutput, which
    behaves the same here: importing `transformers` costs about 0.5 s of CPU in the driver and in every rank,
    and the trainer needs nothing else of it; the exported models return `transformers`' own output types
    (models/hf.py, models/hf_native.py)."""

    def __init__(self, loss: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                 aux_losses: dict[str, torch.Tensor] | None = None):
        super().__init__(loss=loss, logits=logits, aux_losses=aux_losses)

    @property
    def loss(self) -> torch.Tensor | None:
        """Total training loss: the objective plus every auxiliary loss already weighted."""
        return self["loss"]

    @property
    def logits(self) -> torch.Tensor | None:
        return self["logits"]

    @property
    def aux_losses(self) -> dict[str, torch.Tensor] | None:
        """Auxiliary losses (already included in `loss`), reported separately in the metrics."""
        return self["aux_losses"]


IGNORE_INDEX = -100
"""Label of positions without a target (PyTorch's and transformers' convention), everywhere in zeroray;
data_pipelines.objectives.IGNORE writes it into batches (tests/test_model_contract.py checks they agree)."""


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (−100 = none), in fp32: a bf16 log-softmax over
    a large vocabulary loses the small terms."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
