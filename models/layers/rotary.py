"""Rotary position embeddings (RoFormer), applied to queries and keys."""

from __future__ import annotations

import torch


class Rotary:
    """Computes cos/sin tables in fp32 and caches them per (device, length).

    Deliberately not an nn.Module buffer: DeepSpeed casts every floating buffer of the model to
    bf16, and bf16 angles lose whole positions beyond a few hundred tokens.
    """

    def __init__(self, head_dim: int, theta: float):
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self._cache: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, length)
        if key not in self._cache:
            # Built on the CPU explicitly: the model may have been created under a meta-device context
            # (transformers' from_pretrained), and these tables are not weights that get loaded.
            dims = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
            inv_freq = 1.0 / (self.theta ** (dims / self.head_dim))
            angles = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)
            self._cache[key] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; rotates pairs (x[..., :half], x[..., half:]) in fp32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)
