"""The contract every model family implements: a config that declares what the family can do, and a
module with the shared chassis.

The config side (`FamilyConfig`) is what the run spec validates against; its declarations are class
values, so a spec is checked without importing a family's network (transformers-based families import
theirs lazily, through the registry). The module side (`ModelFamily`) is what the trainer, the metrics,
the export and the bench call; it holds the parts every family shares: the vocabulary guard, decay
groups, parameter counting, the token loss plus the auxiliary losses.

Adding a family — the checklist:
1. A config class deriving `FamilyConfig`: `name: Literal["yourname"]`, a `vocab_size` field (0 = from
   the tokenizer), its own fields with descriptions (`zeroray config show` and docs/configuration.md
   read them), and the declarations: `objectives` (data.objective.kind values it trains on, the first
   is its default), `supports_segment_ids` (its forward takes `segment_ids` and masks attention by
   document), `supports_activation_checkpointing`, `supports_moe` (it has a `moe` field), and where the
   family decodes with a key/value cache the property `kv_cache_layers` (its causal forward, or an
   encoder–decoder's `decode`, then takes `cache`, a models.layers.attention.KVCache, and only the
   tokens after the cached ones).
2. A module class deriving `ModelFamily`: `__init__(cfg)` calls `super().__init__(cfg)` first (the
   vocabulary guard), builds, then initialises; `forward(**batch) -> ModelOutput` with `loss` computed
   by `self.loss(logits, labels, aux)`; `flops_per_token(seq_len)`; override `tied_parameters`,
   `step_statistics`, `enable_activation_checkpointing`, `param_groups` where the family differs.
3. `register("yourname", YourConfig, YourModule or "models.yours:YourModule", "one line")` at the end
   of the module, and the module imported in models/__init__.py.
4. A tiny config in configs/ and the family in tests/test_model_contract.py's coverage (it checks
   every registered family's declarations against what its module does).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from models.output import IGNORE_INDEX, token_cross_entropy
from models.parameters import count_parameters, decay_param_groups

__all__ = ["IGNORE_INDEX", "FamilyConfig", "ModelFamily"]


class FamilyConfig(BaseModel):
    """A family's section of the run spec (`model:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objectives: ClassVar[tuple[str, ...]] = ("causal",)
    supports_segment_ids: ClassVar[bool] = False
    supports_activation_checkpointing: ClassVar[bool] = False
    supports_moe: ClassVar[bool] = False

    name: str
    vocab_size: int

    @property
    def moe_config(self):
        """The MoE section when the family has one and it is set, else None."""
        return getattr(self, "moe", None) if self.supports_moe else None

    @property
    def sequence_limit(self) -> int | None:
        """The longest sequence the model accepts (None: no limit)."""
        return getattr(self, "max_seq_len", None)

    @property
    def kv_cache_layers(self) -> int:
        """Layers of keys and values a decoding cache holds; 0: this model decodes without one (each
        step runs the whole prefix). Families that take a cache return `cacheable(depth)`."""
        return 0

    def cacheable(self, layers: int) -> int:
        """`layers`, or 0 when an MoE drops tokens by capacity: which tokens are dropped depends on every
        token of the forward, so decoding one token at a time would not give the whole sequence's logits."""
        moe = self.moe_config
        return 0 if moe is not None and moe.capacity_factor > 0 else layers


class ModelFamily(nn.Module):
    """The module side: `models.build(config)` returns one."""

    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size is 0: resolve it from the tokenizer before building the model")
        self.config = cfg

    def loss(self, logits: torch.Tensor, labels: torch.Tensor | None,
             aux: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The objective's token cross-entropy (fp32) plus every auxiliary loss (already weighted)."""
        if labels is None:
            return None
        loss = token_cross_entropy(logits, labels)
        return loss + sum(aux.values()) if aux else loss

    @property
    def moe_layers(self) -> list[nn.Module]:
        """Each distinct MoE layer once. Looked up on every use: expert parallelism swaps the layers for
        their sharded versions after the model is built."""
        from models.layers.moe import MoELayer

        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def after_optimizer_step(self) -> None:
        """Called by the trainer on every rank once after each optimizer step (all its micro-batches
        done, before the step's metrics and checkpoint). With MoE layers a collective: their load over
        the step is summed over ranks and each expert bias is updated (models.layers.moe.end_step)."""
        layers = self.moe_layers
        if layers:
            from models.layers.moe import end_step

            end_step(layers)

    def enable_activation_checkpointing(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support activation checkpointing")

    def tied_parameters(self) -> dict[str, str]:
        """Each shared parameter's later name → the name it is stored under."""
        return {}

    def step_statistics(self) -> dict[str, torch.Tensor]:
        """Statistics of the last forward pass, by metric name (summed over ranks by the trainer)."""
        return getattr(self, "_statistics", {})

    def input_embedding(self) -> nn.Embedding | None:
        return getattr(self, "embed", None)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, tied and shared ones once; optionally without the input embedding."""
        total = count_parameters(self)
        embedding = self.input_embedding()
        return total - embedding.weight.numel() if exclude_embeddings and embedding is not None else total

    def num_active_parameters(self) -> int:
        """Parameters a token passes through: only top_k of each MoE layer's experts."""
        return self.num_parameters() - sum(m.inactive_parameters() for m in self.moe_layers)

    def flops_per_token(self, seq_len: int) -> float:
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Matrices decay, norms and biases do not (models.parameters.matrices_decay)."""
        return decay_param_groups(self, weight_decay)
