"""WideNet (Xue et al., "Go Wider Instead of Deeper", AAAI 2022).

One attention block and one mixture-of-experts layer are shared by all L layers (ALBERT-style
parameter sharing, with the FFN widened into experts); every layer keeps its own two LayerNorms,
which is what lets the shared weights serve different depths. Paper defaults: 4 experts, top-2,
capacity factor 1.2, load-balancing α = 0.01, no router z-loss. The auxiliary loss is summed over
all L uses of the shared MoE layer.

The paper's baselines are the same network with either half of the idea taken away, so they are
options here rather than other families: `share: false` gives every layer its own attention and
FFN (ViT-MoE / an unshared MoE Transformer), `moe: null` makes the FFN one dense SwiGLU of an
expert's size (ALBERT when shared; a plain Transformer of the same depth, ViT / BERT, when not).

`widenet` is the paper's NLP setting: a bidirectional encoder trained with masked language
modelling. `widenet_decoder` is the same network with causal attention, trained as a language model.
Deviations, on purpose: rotary positions instead of learned ones and SwiGLU experts instead of GELU
FFNs, so that WideNet compares with zeroray's other models on equal terms.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.family import FamilyConfig, ModelFamily
from models.layers.attention import Attention, KVCache
from models.layers.mlp import SwiGLU, swiglu_hidden_size
from models.layers.moe import MoEConfig, MoELayer, collect_routing, load_statistics
from models.layers.norms import LayerNorm
from models.output import ModelOutput
from models.parameters import init_normal
from models.registry import register

PAPER_MOE = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.2, aux_loss_coef=0.01, z_loss_coef=0.0)


class WideNetConfig(FamilyConfig):
    objectives: ClassVar[tuple[str, ...]] = ("mlm",)
    supports_activation_checkpointing: ClassVar[bool] = True
    supports_moe: ClassVar[bool] = True
    causal: ClassVar[bool] = False

    name: Literal["widenet"] = Field("widenet", description="Model family; `zeroray models` lists them.")
    vocab_size: int = Field(0, ge=0, description="Tokens in the vocabulary; 0 = from the tokenizer and the objective.")
    d_model: int = Field(256, ge=8, description="Hidden width.")
    n_layers: int = Field(
        6, ge=1, description="Depth: layers (uses of the shared attention + FFN when share), each with its own norms."
    )
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    mlp_multiple_of: int = Field(
        64, ge=1, description="The SwiGLU hidden size of each expert (or of the dense FFN) is rounded up to this."
    )
    max_seq_len: int = Field(512, ge=8, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="Rotary base frequency.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation.")
    moe: MoEConfig | None = Field(
        PAPER_MOE,
        description="The MoE FFN (paper: 4 experts, top-2, capacity 1.2); null = one dense SwiGLU FFN the size "
        "of one expert (hidden ≈ 8/3·d_model rounded up to mlp_multiple_of), the dense baseline.",
    )
    share: bool = Field(
        True,
        description="One attention + FFN shared by all layers (WideNet); false = each layer has its own "
        "(with moe: an unshared MoE Transformer; with moe null: a plain Transformer of the same depth).",
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> WideNetConfig:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even size (rotary)"
            )
        return self

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size of each expert, or of the dense FFN: every expert is a whole FFN (as
        in the paper), not a slice of one, so the dense baseline's FFN is one expert."""
        if self.moe is not None and self.moe.expert_hidden:
            return self.moe.expert_hidden
        return swiglu_hidden_size(self.d_model, self.mlp_multiple_of)


class WideNetDecoderConfig(WideNetConfig):
    objectives: ClassVar[tuple[str, ...]] = ("causal",)
    causal: ClassVar[bool] = True

    name: Literal["widenet_decoder"] = Field("widenet_decoder", description="Model family; `zeroray models` lists them.")

    @property
    def kv_cache_layers(self) -> int:
        return self.cacheable(self.n_layers)  # one cache layer per depth, shared weights or not


class WideNet(ModelFamily):
    """`attn` and the FFN (`moe`, or `mlp` when dense) are single modules used at every depth when
    shared, and ModuleLists with one module per depth when not."""

    def __init__(self, cfg: WideNetConfig):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)

        def attention() -> nn.Module:
            return Attention(cfg.d_model, cfg.n_heads, rope_theta=cfg.rope_theta, causal=cfg.causal)

        def ffn() -> nn.Module:
            if cfg.moe is None:
                return SwiGLU(cfg.d_model, cfg.ffn_hidden)
            return MoELayer(cfg.d_model, cfg.ffn_hidden, cfg.moe)

        def per_depth(make) -> nn.Module:
            return make() if cfg.share else nn.ModuleList(make() for _ in range(cfg.n_layers))

        self.attn = per_depth(attention)
        if cfg.moe is None:
            self.mlp = per_depth(ffn)
        else:
            self.moe = per_depth(ffn)
        self.attn_norms = nn.ModuleList(LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        # The FFN's norms, dense or MoE (named for WideNet's MoE: checkpoints keep their names).
        self.moe_norms = nn.ModuleList(LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.apply(partial(init_normal, std=cfg.init_std))
        # Projections that write into the residual stream are used L times, shared or not:
        # scale them like a depth-L stack (GPT-2 / OLMo).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.activation_checkpointing = False

    def _at(self, modules: nn.Module, depth: int) -> nn.Module:
        return modules if self.config.share else modules[depth]

    def enable_activation_checkpointing(self) -> None:
        self.activation_checkpointing = True

    def _layer(self, x: torch.Tensor, depth: int, cache: KVCache | None = None) -> torch.Tensor:
        # The cache's layer is the depth: a shared attention module keeps L layers of keys and values.
        x = x + self._at(self.attn, depth)(self.attn_norms[depth](x), cache=cache, layer_idx=depth)
        ffn = self._at(self.mlp if self.config.moe is None else self.moe, depth)
        return x + ffn(self.moe_norms[depth](x))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """`cache` (the decoder, while decoding): input_ids are the tokens after the cached ones."""
        if cache is not None and not self.config.causal:
            raise ValueError("a key/value cache needs the causal decoder (model.name widenet_decoder)")
        past = cache.get_seq_length(0) if cache is not None else 0
        if past + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + input_ids.shape[1]} tokens exceeds model.max_seq_len "
                             f"{self.config.max_seq_len}")
        for layer in self.moe_layers:
            layer.reset()
        x = self.embed(input_ids)
        for depth in range(self.config.n_layers):
            if self.activation_checkpointing and self.training:
                # Non-reentrant: with weights shared across depths the reentrant variant makes ZeRO-2
                # see a gradient computed twice for one partition (DeepSpeed #988).
                x = checkpoint(self._layer, x, depth, use_reentrant=False)
            else:
                x = self._layer(x, depth, cache)
        logits = self.lm_head(self.norm(x))
        # Summed over all L uses of the shared MoE (or over the L unshared ones); snapshot before any
        # recomputation can add calls.
        aux, self._statistics = collect_routing(self.moe_layers)
        return ModelOutput(loss=self.loss(logits, labels, aux), logits=logits, aux_losses=aux or None)

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "embed.weight"}

    def step_statistics(self) -> dict[str, torch.Tensor]:
        """The last forward's routing statistics and the last step's per-layer load (moe.load_statistics)."""
        return {**getattr(self, "_statistics", {}), **load_statistics(self.moe_layers)}

    # ---- accounting (parameters: the shared blocks once, ModelFamily.num_parameters) ------------
    def flops_per_token(self, seq_len: int) -> float:
        """6 × multiply-adds per token, counting each of the L layers whether its weights are shared
        or not: attention projections, and the dense FFN or the router + shared + top_k experts; plus the
        output projection once and the attention scores (QKᵀ and AV, 12·L·d·seq)."""
        cfg = self.config

        def linear_weights(module: nn.Module) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

        macs = self.lm_head.weight.numel()
        for depth in range(cfg.n_layers):
            macs += linear_weights(self._at(self.attn, depth))
            if cfg.moe is None:
                macs += linear_weights(self._at(self.mlp, depth))
            else:
                moe = self._at(self.moe, depth)
                macs += linear_weights(moe) + moe.expert_macs_per_token()  # router, shared experts
        return 6.0 * macs + 12 * cfg.n_layers * cfg.d_model * seq_len


register("widenet", WideNetConfig, WideNet,
         "WideNet encoder (MLM): one attention + one MoE layer shared by all layers, per-layer LayerNorms")
register("widenet_decoder", WideNetDecoderConfig, WideNet,
         "WideNet as a causal decoder: the shared attention + MoE stack with causal attention")
