"""WideNet (Xue et al., "Go Wider Instead of Deeper", AAAI 2022).

One attention block and one mixture-of-experts layer are shared by all L layers (ALBERT-style
parameter sharing, with the FFN widened into experts); every layer keeps its own two LayerNorms,
which is what lets the shared weights serve different depths. Paper defaults: 4 experts, top-2,
capacity factor 1.2, load-balancing α = 0.01, no router z-loss. The auxiliary loss is summed over
all L uses of the shared MoE layer.

`widenet` is the paper's NLP setting: a bidirectional encoder trained with masked language
modelling. `widenet_decoder` is the same network with causal attention, trained as a language model.
Deviations, on purpose: rotary positions instead of learned ones and SwiGLU experts instead of GELU
FFNs, so that WideNet compares with zeroray's other models on equal terms.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers.attention import Attention
from models.layers.mlp import swiglu_hidden_size
from models.layers.moe import MoEConfig, MoELayer, collect_routing
from models.layers.norms import LayerNorm
from models.output import ModelOutput, token_cross_entropy
from models.parameters import count_parameters, decay_param_groups
from models.registry import register

PAPER_MOE = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.2, aux_loss_coef=0.01, z_loss_coef=0.0)


class WideNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    objectives: ClassVar[tuple[str, ...]] = ("mlm",)
    causal: ClassVar[bool] = False

    name: Literal["widenet"] = Field("widenet", description="Model family; `zeroray models` lists them.")
    vocab_size: int = Field(0, ge=0, description="Tokens in the vocabulary; 0 = from the tokenizer and the objective.")
    d_model: int = Field(256, ge=8, description="Hidden width.")
    n_layers: int = Field(6, ge=1, description="Depth: uses of the shared attention + MoE block, each with its own norms.")
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    mlp_multiple_of: int = Field(64, ge=1, description="Each expert's SwiGLU hidden size is rounded up to this.")
    max_seq_len: int = Field(512, ge=8, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="Rotary base frequency.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation.")
    moe: MoEConfig = Field(PAPER_MOE, description="The shared MoE layer (paper: 4 experts, top-2, capacity 1.2).")

    @model_validator(mode="after")
    def _shapes_fit(self) -> WideNetConfig:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even size (rotary)"
            )
        return self

    @property
    def expert_hidden(self) -> int:
        """Every expert is a whole FFN (as in the paper), not a slice of one."""
        return self.moe.expert_hidden or swiglu_hidden_size(self.d_model, self.mlp_multiple_of)


class WideNetDecoderConfig(WideNetConfig):
    objectives: ClassVar[tuple[str, ...]] = ("causal",)
    causal: ClassVar[bool] = True

    name: Literal["widenet_decoder"] = Field("widenet_decoder", description="Model family; `zeroray models` lists them.")


class WideNet(nn.Module):
    def __init__(self, cfg: WideNetConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size is 0: resolve it from the tokenizer before building the model")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, rope_theta=cfg.rope_theta, causal=cfg.causal)
        self.moe = MoELayer(cfg.d_model, cfg.expert_hidden, cfg.moe)
        self.attn_norms = nn.ModuleList(LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        self.moe_norms = nn.ModuleList(LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        for module in (self.embed, self.attn.q_proj, self.attn.k_proj, self.attn.v_proj):
            nn.init.normal_(module.weight, std=cfg.init_std)
        # The shared projections write into the residual stream L times: scale them like a depth-L stack.
        nn.init.normal_(self.attn.o_proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        nn.init.normal_(self.moe.router.weight, std=cfg.init_std)
        nn.init.normal_(self.moe.w_down, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.activation_checkpointing = False

    def enable_activation_checkpointing(self) -> None:
        self.activation_checkpointing = True

    def _layer(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norms[depth](x))
        return x + self.moe(self.moe_norms[depth](x))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds model.max_seq_len {self.config.max_seq_len}")
        self.moe.reset()
        x = self.embed(input_ids)
        for depth in range(self.config.n_layers):
            if self.activation_checkpointing and self.training:
                # Non-reentrant: with weights shared across depths the reentrant variant makes ZeRO-2
                # see a gradient computed twice for one partition (DeepSpeed #988).
                x = checkpoint(self._layer, x, depth, use_reentrant=False)
            else:
                x = self._layer(x, depth)
        logits = self.lm_head(self.norm(x))
        # Summed over all L uses of the shared MoE; snapshot before any recomputation can add calls.
        aux, self._statistics = collect_routing([self.moe])
        loss = None
        if labels is not None:
            loss = token_cross_entropy(logits, labels) + sum(aux.values())
        return ModelOutput(loss=loss, logits=logits, aux_losses=aux)

    def step_statistics(self) -> dict[str, torch.Tensor]:
        return getattr(self, "_statistics", {})

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "embed.weight"}

    # ---- accounting -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return count_parameters(self)  # the shared blocks once

    def num_active_parameters(self) -> int:
        return self.num_parameters() - self.moe.inactive_parameters()

    def flops_per_token(self, seq_len: int) -> float:
        """6 × multiply-adds per token, counting every one of the L uses of the shared blocks:
        attention projections, router, top_k experts; plus the output projection once and the
        attention scores (QKᵀ and AV, 12·L·d·seq)."""
        cfg = self.config
        attn = sum(m.weight.numel() for m in self.attn.modules() if isinstance(m, nn.Linear))
        router = self.moe.router.weight.numel()
        macs = cfg.n_layers * (attn + router + self.moe.expert_macs_per_token()) + self.lm_head.weight.numel()
        return 6.0 * macs + 12 * cfg.n_layers * cfg.d_model * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (embedding, projections, experts), not norms."""
        return decay_param_groups(self, weight_decay)


register("widenet", WideNetConfig, WideNet,
         "WideNet encoder (MLM): one attention + one MoE layer shared by all layers, per-layer LayerNorms")
register("widenet_decoder", WideNetDecoderConfig, WideNet,
         "WideNet as a causal decoder: the shared attention + MoE stack with causal attention")
