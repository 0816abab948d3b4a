"""Multi-head (grouped-query) attention on top of PyTorch SDPA: causal or bidirectional
self-attention with rotary positions, or cross-attention to an encoder's output; the
per-document mask of packed causal rows; and the key/value cache of decoding."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.rotary import Rotary, apply_rotary


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [batch, seq] (tokens of one document share an id) → bool [batch, 1, seq, seq]:
    query i sees key j iff j ≤ i and both belong to the same document. No position reset is needed
    with it: rotary scores depend only on the query–key distance, which packing does not change."""
    seq = segment_ids.shape[1]
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()).unsqueeze(1)


class KVCache(Protocol):
    """What causal self-attention needs of a key/value cache while decoding: `transformers`' own
    DynamicCache has exactly this interface (generate() builds one for the exported wrappers), so the
    layers use it as it is and need no `transformers` import. Keys are stored after rotary."""

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    """`forward(x)`: self-attention (rotary positions when rope_theta is set).
    `forward(x, memory=enc)`: cross-attention; keys/values from `memory`, no rotary (the two
    sequences' positions are unrelated). `key_padding_mask` [batch, keys], True = a real key.
    `attn_mask` bool [batch, 1, queries, keys], True = may attend, replaces the causal mask (it
    must include causality itself, as `document_causal_mask` does; with a cache it covers the cached
    keys too: [batch, 1, queries, past + queries]).
    `forward(x, cache=c, layer_idx=i)`: causal self-attention that appends this call's keys and values
    to layer i of the cache and attends to all of them; x holds the tokens after the cached ones (their
    rotary positions continue from the cache's length)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 rope_theta: float | None = 10000.0, causal: bool = True, bias: bool = False):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.causal = n_heads, n_kv_heads, causal
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.rotary = Rotary(self.head_dim, rope_theta) if rope_theta else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        source = x if memory is None else memory
        s = source.shape[1]
        if cache is not None and (memory is not None or not self.causal):
            raise ValueError("a key/value cache is for causal self-attention only")
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None and memory is None:
            cos, sin = self.rotary.tables(past + t, x.device)
            cos, sin = cos[past:], sin[past:]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
            s = k.shape[2]
        causal = self.causal and memory is None and attn_mask is None
        if causal and past:  # SDPA's is_causal aligns its mask top-left; queries after a cache need bottom-right
            attn_mask = None if t == 1 else torch.ones(t, s, dtype=torch.bool, device=x.device).tril(past)[None, None]
            causal = False  # (one new token sees every cached key)
        mask = attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :].bool()  # [b, 1, 1, s], broadcast over heads/queries
            mask = padding if mask is None else mask & padding
        if mask is not None and causal:  # SDPA takes either is_causal or a mask: fold causality into the mask
            mask = mask & torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
            causal = False
        # SDPA picks flash / memory-efficient kernels on GPU and a fused CPU kernel here.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

