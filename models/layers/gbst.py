"""Gradient-based subword tokenization (GBST, Charformer §2): bytes in, soft "subwords" out.

For every byte position the layer builds M candidate embeddings — the mean of the non-overlapping
block of size b = 1..M that holds the position — scores each candidate with one shared linear map
d → 1, takes a softmax over the M block sizes, and mixes the candidates with those weights. The
mixed sequence is then mean-pooled by `downsample` (d_s), so the Transformer that follows sees
⌈L/d_s⌉ positions. A 1-D convolution over positions runs first: strided blocks alone only ever see
offsets that are multiples of b, the convolution lets each position know its neighbours (the paper's
"Considering offsets"). It looks both ways, which is why GBST only ever feeds an encoder.

Padding never leaks into real positions: padded inputs are zeroed before the convolution (so a
real byte next to padding sees the zeros the convolution's own padding would give it), and every
mean divides by the number of real positions it covers (a block with none is 0). A padded batch
row therefore gives its real positions exactly what the unpadded sequence gives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class GBSTOutput(NamedTuple):
    hidden: torch.Tensor
    """[batch, ⌈L/d_s⌉, d]: the downsampled latent subwords."""
    mask: torch.Tensor
    """[batch, ⌈L/d_s⌉] bool: a downsampled position is real if any of its bytes is."""
    block_weights: torch.Tensor
    """[batch, L, M] fp32: each byte position's softmax over the block sizes 1..M."""


def masked_block_mean(x: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the real positions of each non-overlapping block of `size` along dim 1.

    x [batch, L, d], mask [batch, L] bool → ([batch, ⌈L/size⌉, d], [batch, ⌈L/size⌉] bool: the block
    holds a real position). The last block may be partial; blocks without a real position are 0.
    """
    b, length, d = x.shape
    blocks = -(-length // size)
    tail = blocks * size - length
    x = F.pad(x * mask.unsqueeze(-1).to(x.dtype), (0, 0, 0, tail))
    counts = F.pad(mask, (0, tail)).view(b, blocks, size).sum(-1)
    sums = x.view(b, blocks, size, d).sum(2)
    return sums / counts.clamp(min=1).unsqueeze(-1).to(x.dtype), counts > 0


def _to_bytes(per_block: torch.Tensor, size: int, length: int) -> torch.Tensor:
    """[batch, blocks, …] → [batch, length, …]: each block's value at each of its `size` bytes."""
    return per_block.repeat_interleave(size, dim=1)[:, :length]


class GBST(nn.Module):
    """`forward(x, mask)`: x [batch, L, d] byte embeddings, mask [batch, L] (1/True = real byte) or None."""

    def __init__(self, d_model: int, max_block_size: int = 4, downsample: int = 2,
                 conv_kernel: int | None = None, score_calibration: bool = False):
        super().__init__()
        self.max_block_size, self.downsample = max_block_size, downsample
        self.score_calibration = score_calibration
        kernel = conv_kernel or max_block_size
        # Zero padding that keeps the length; an even kernel gets the extra zero on the right
        # (PyTorch's padding="same" rule, padded by hand: "same" warns for even kernels).
        self.conv_padding = ((kernel - 1) // 2, kernel // 2)
        self.conv = nn.Conv1d(d_model, d_model, kernel, bias=False)
        # One scorer shared by every block size (the paper's F_R); no bias: a constant shift is
        # the same for all M candidates and cancels in their softmax.
        self.score = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> GBSTOutput:
        b, length, _ = x.shape
        real = torch.ones(b, length, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        x = x * real.unsqueeze(-1).to(x.dtype)
        x = self.conv(F.pad(x.transpose(1, 2), self.conv_padding)).transpose(1, 2)

        # blocks[i]: the means of the blocks of size i + 1. M is small: a loop over block sizes, not positions.
        blocks = [masked_block_mean(x, real, size)[0] for size in range(1, self.max_block_size + 1)]
        # Each block is scored once, and its score repeated to every byte of the block.
        scores = [_to_bytes(self.score(pooled).squeeze(-1), i + 1, length) for i, pooled in enumerate(blocks)]
        weights = self.block_weights(torch.stack(scores, dim=-1), real)  # [b, L, M]
        # Accumulated size by size rather than stacked: no [b, L, M, d] tensor.
        mixed = sum(weights[..., i, None].to(x.dtype) * _to_bytes(pooled, i + 1, length)
                    for i, pooled in enumerate(blocks))
        hidden, hidden_mask = masked_block_mean(mixed, real, self.downsample)
        return GBSTOutput(hidden, hidden_mask, weights)

    def block_weights(self, scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Softmax over the block sizes in fp32 (scores [b, L, M]); with score calibration the
        paper's eq. 5, P̂ = softmax(P Pᵀ) P, lets positions with similar block preferences agree.
        Padded positions are left out of the calibration's keys."""
        weights = scores.float().softmax(-1)
        if self.score_calibration:
            affinity = weights @ weights.transpose(1, 2)  # [b, L, L]
            affinity = affinity.masked_fill(~real[:, None, :], torch.finfo(affinity.dtype).min)
            weights = affinity.softmax(-1) @ weights
        return weights
