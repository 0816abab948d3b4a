"""Decoder-only LLMs: the Llama-style baseline and its hyper-connection variant, dense or MoE.

`llama`: pre-norm residual blocks (RMSNorm), rotary positions, SwiGLU MLP, causal SDPA attention,
grouped-query attention, tied or untied embeddings — the baseline every other model is compared to.
`hc_llm`: the same blocks with every residual connection replaced by hyper-connections.
Either takes `moe:` to replace each MLP with a mixture of experts (OLMoE-style), and packed rows'
`segment_ids` to keep attention within each document.
Free of any parallelism: DeepSpeed wraps it.
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
from models.layers.attention import Attention, KVCache, document_causal_mask
from models.layers.hyper_connections import HyperConnection, build_connection, mixing_statistics
from models.layers.mlp import SwiGLU, swiglu_hidden_size
from models.layers.moe import MoEConfig, MoELayer, collect_routing, load_statistics
from models.layers.norms import RMSNorm
from models.output import ModelOutput
from models.parameters import init_normal
from models.registry import register


class LlamaConfig(FamilyConfig):
    objectives: ClassVar[tuple[str, ...]] = ("causal",)
    supports_segment_ids: ClassVar[bool] = True
    supports_activation_checkpointing: ClassVar[bool] = True
    supports_moe: ClassVar[bool] = True

    name: Literal["llama"] = Field("llama", description="Model family; `zeroray models` lists them.")
    vocab_size: int = Field(0, ge=0, description="Tokens in the vocabulary; 0 = take it from the data's tokenizer.")
    d_model: int = Field(256, ge=8, description="Width of the residual stream.")
    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (grouped-query attention); default n_heads.")
    mlp_multiple_of: int = Field(64, ge=1, description="SwiGLU hidden size is rounded up to this multiple.")
    max_seq_len: int = Field(2048, ge=8, description="Longest sequence the model accepts.")
    rope_theta: float = Field(10000.0, gt=0, description="Rotary base frequency.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output projection.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation.")
    moe: MoEConfig | None = Field(None, description="Replace every MLP with a mixture of experts (null = dense).")

    @model_validator(mode="after")
    def _shapes_fit(self) -> LlamaConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads = {self.d_model // self.n_heads} must be even for rotary")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        return self

    @property
    def kv_cache_layers(self) -> int:
        return self.cacheable(self.n_layers)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden_size(self.d_model, self.mlp_multiple_of)

    @property
    def expert_hidden(self) -> int:
        """Each expert's hidden size: by default top_k experts hold as many weights as the dense MLP."""
        assert self.moe is not None
        return self.moe.expert_hidden or max(1, self.mlp_hidden // self.moe.top_k)

    @property
    def hc_rate(self) -> int:
        return 0  # plain residual connections


class HCLLMConfig(LlamaConfig):
    name: Literal["hc_llm"] = Field("hc_llm", description="Model family; `zeroray models` lists them.")
    rate: int = Field(4, ge=1, description="Expansion rate n: the number of hidden streams.")
    connection: Literal["hc", "mhc"] = Field(
        "hc", description="`hc`: hyper-connections (Zhu et al., ICLR 2025); `mhc`: manifold-constrained "
        "hyper-connections (Xie et al., arXiv 2512.24880): H_res projected onto the doubly stochastic "
        "matrices by Sinkhorn-Knopp, H_pre = sigmoid, H_post = 2 sigmoid.")
    dynamic: bool = Field(True, description="Input-dependent mixing weights: DHC (false = SHC) for `hc`, "
                          "the paper's mHC (false = its biases only) for `mhc`.")
    sinkhorn_iters: int = Field(20, ge=1, description="Sinkhorn-Knopp iterations projecting mHC's H_res "
                                "(the paper's t_max); `mhc` only.")

    @property
    def hc_rate(self) -> int:
        return self.rate


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta, causal=True)
        self.mlp_norm = RMSNorm(cfg.d_model)
        if cfg.moe is None:
            self.mlp: nn.Module = SwiGLU(cfg.d_model, cfg.mlp_hidden)
        else:
            self.mlp = MoELayer(cfg.d_model, cfg.expert_hidden, cfg.moe)
        self.hyper = cfg.hc_rate > 0
        if self.hyper:  # the k-th hyper-connection: k = 2·layer (attention), 2·layer + 1 (MLP)
            self.hc_attn, self.hc_mlp = (
                build_connection(cfg.connection, cfg.d_model, cfg.hc_rate, k, cfg.dynamic, cfg.sinkhorn_iters)
                for k in (2 * index, 2 * index + 1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        if not self.hyper:
            x = x + self.attn(self.attn_norm(x), attn_mask=attn_mask, cache=cache, layer_idx=layer_idx)
            return x + self.mlp(self.mlp_norm(x))
        h, carried, beta = self.hc_attn(x)  # a module call: ZeRO-3 gathers its parameters
        x = HyperConnection.depth(self.attn(self.attn_norm(h), attn_mask=attn_mask, cache=cache, layer_idx=layer_idx),
                                  carried, beta)
        h, carried, beta = self.hc_mlp(x)
        return HyperConnection.depth(self.mlp(self.mlp_norm(h)), carried, beta)


class LlamaModel(ModelFamily):
    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(partial(init_normal, std=cfg.init_std))
        # GPT-2 / OLMo: scale the projections that write into the residual stream by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.activation_checkpointing = False

    @property
    def hyper_connections(self) -> list[HyperConnection]:
        """In order: the k-th hyper-connection (attention of layer k // 2, or its MLP)."""
        return [m for m in self.modules() if isinstance(m, HyperConnection)]

    def enable_activation_checkpointing(self) -> None:
        self.activation_checkpointing = True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> ModelOutput:
        """`segment_ids` [batch, seq]: tokens of one packed document share an id; each token then
        attends only to earlier tokens of its own document (None: plain causal attention).
        `cache` (decoding): input_ids are the tokens after the cached ones, whose keys and values each
        layer appends to the cache; segment_ids then cover the cached tokens too [batch, past + seq].
        Every other part of the network (hyper-connections, MoE routing) works per token, so the
        logits are those of the whole sequence's forward at the new positions."""
        past = cache.get_seq_length(0) if cache is not None else 0
        if past + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + input_ids.shape[1]} tokens exceeds model.max_seq_len "
                             f"{self.config.max_seq_len}")
        mask = None
        if segment_ids is not None:
            expected = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(segment_ids.shape) != expected or segment_ids.is_floating_point():
                raise ValueError(f"segment_ids must be integer ids shaped {expected} (the cached tokens and "
                                 f"input_ids), got {segment_ids.dtype} {tuple(segment_ids.shape)}")
            mask = document_causal_mask(segment_ids)[:, :, past:]  # built once, shared by every layer
        hyper = self.hyper_connections
        for layer in (*self.moe_layers, *hyper):
            layer.reset()
        x = self.embed(input_ids)
        rate = self.config.hc_rate
        if rate:  # the embedding is copied into the n streams
            x = x.unsqueeze(-2).expand(*x.shape[:-1], rate, x.shape[-1])
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                # Non-reentrant: works with ZeRO-2/3 hooks and with inputs that need no gradient.
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if rate:  # the streams are summed (in fp32, without an fp32 copy of them) before the final norm
            x = x.sum(-2, dtype=torch.float32).to(self.embed.weight.dtype)
        logits = self.lm_head(self.norm(x))
        # Snapshot now: a recomputed forward (activation checkpointing) must not count twice.
        aux, self._statistics = collect_routing(self.moe_layers)
        self._mixing_records = [list(c.calls) for c in hyper]
        return ModelOutput(loss=self.loss(logits, labels, aux), logits=logits, aux_losses=aux or None)

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "embed.weight"} if self.config.tie_embeddings else {}

    def step_statistics(self) -> dict[str, torch.Tensor]:
        """Statistics of the last forward pass, by metric name. The trainer sums them over ranks,
        and averages those whose name ends in `_mean` or `fraction`. The hyper-connection ones are
        reduced here, from the last forward's records, so steps that are not logged pay nothing."""
        return {**getattr(self, "_statistics", {}), **load_statistics(self.moe_layers),
                **mixing_statistics(getattr(self, "_mixing_records", []))}

    # ---- accounting -------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × multiply-adds per token + attention scores (PaLM appendix B).

        Multiply-adds: every Linear weight (the output projection included, it is a matmul even when
        tied; the input embedding is a lookup), top_k experts of each MoE layer, and the
        hyper-connections' mixing. Attention: QKᵀ and AV, 12·L·d·seq, not halved for causality.
        """
        cfg = self.config
        macs = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        macs += sum(m.expert_macs_per_token() for m in self.moe_layers)
        macs += sum(m.macs_per_token(cfg.d_model) for m in self.modules() if isinstance(m, HyperConnection))
        attention = 12 * cfg.n_layers * cfg.d_model * seq_len
        return 6.0 * macs + attention


register("llama", LlamaConfig, LlamaModel, "Llama-style decoder (RMSNorm, RoPE, SwiGLU, SDPA), dense or MoE: the baseline")
register("hc_llm", HCLLMConfig, LlamaModel, "the baseline decoder with hyper-connections (static, dynamic or manifold-constrained), dense or MoE")
