"""The baseline decoder every other model is compared to: Llama-style, nanoGPT-sized code.

Pre-norm residual blocks (RMSNorm), rotary positions, SwiGLU MLP, causal SDPA attention,
grouped-query attention, tied or untied embeddings. Free of any parallelism: DeepSpeed wraps it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.layers.attention import CausalSelfAttention
from models.layers.mlp import SwiGLU, swiglu_hidden_size
from models.layers.norms import RMSNorm
from models.output import ModelOutput
from models.registry import register


class LlamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden_size(self.d_model, self.mlp_multiple_of)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size is 0: resolve it from the tokenizer before building the model")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2 / OLMo: scale the projections that write into the residual stream by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds model.max_seq_len {self.config.max_seq_len}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            # Cross-entropy in fp32: bf16 log-softmax over a large vocabulary loses the small terms.
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ModelOutput(loss=loss, logits=logits)

    # ---- accounting -------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen = {id(p): p for p in self.parameters()}  # tied weights count once
        total = sum(p.numel() for p in seen.values())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × matmul parameters + attention scores (PaLM appendix B).

        Matmul parameters are every Linear weight, the output projection included (it is a matmul
        even when tied); the input embedding is a lookup and costs nothing.
        """
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 12 * cfg.n_layers * cfg.d_model * seq_len
        return 6.0 * matmul + attention

    def param_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT's rule: decay every matrix (embeddings included), never norms or biases."""
        unique = {id(p): p for p in self.parameters() if p.requires_grad}.values()
        return [
            {"params": [p for p in unique if p.dim() >= 2], "weight_decay": weight_decay, "name": "decay"},
            {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"},
        ]


register("llama", LlamaConfig, LlamaModel, "Llama-style decoder (RMSNorm, RoPE, SwiGLU, SDPA): the baseline")
