"""Hyper-connections (Zhu et al., "Hyper-Connections", ICLR 2025), in place of a residual connection.

The hidden state is n streams H ∈ R^{n×d}. Around a sub-layer T (with its own pre-norm):
    width:  h₀ = A_mᵀ H        (the sub-layer's input: a mix of the streams)
            H′ = A_rᵀ H        (the streams carried past the sub-layer)
    depth:  Ĥ = Bᵀ T(h₀)ᵀ + H′  (the sub-layer's output added to each stream with weight B_j)
Static (SHC): A_m ∈ R^n, A_r ∈ R^{n×n}, B ∈ R^n are learned parameters.
Dynamic (DHC): H̄ = norm(H);  A_m(H) = s_α ∘ tanh(H̄ W_m) + A_m,  A_r(H) = s_α ∘ tanh(H̄ W_r) + A_r,
               B(H) = s_β ∘ tanh(H̄ W_β)ᵀ + B,  W_* initialised to 0 and s_α = s_β = 0.01.
Initialisation of the k-th hyper-connection: A_m = e_{k mod n}, A_r = I, B = 1, which makes the
network equal to a Pre-Norm residual one at step 0. All mixing runs in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.norms import RMSNorm


def no_weight_decay(p: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that must not be decayed whatever its shape (read by param_groups)."""
    p._no_weight_decay = True  # type: ignore[attr-defined]
    return p


class HyperConnection(nn.Module):
    def __init__(self, d_model: int, rate: int, index: int, dynamic: bool):
        super().__init__()
        n = rate
        self.rate, self.dynamic = n, dynamic
        a_m = torch.zeros(n, 1)
        a_m[index % n] = 1.0
        # Column 0 is A_m, columns 1..n are A_r: one matrix so both mixes are one einsum.
        self.static_alpha = no_weight_decay(nn.Parameter(torch.cat([a_m, torch.eye(n)], dim=1)))  # [n, n+1]
        self.static_beta = no_weight_decay(nn.Parameter(torch.ones(n)))
        if dynamic:
            self.norm = RMSNorm(d_model)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(d_model, n + 1))  # [W_m | W_r], decayed
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(d_model, 1))  # W_β, decayed
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), 0.01))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), 0.01))

    def width(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [..., n, d] → (sub-layer input [..., d], carried streams [..., n, d] fp32, B [..., n])."""
        h = streams.float()
        alpha, beta = self.static_alpha.float(), self.static_beta.float()
        if self.dynamic:
            normed = self.norm(streams).float()
            alpha = self.dynamic_alpha_scale.float() * torch.tanh(normed @ self.dynamic_alpha_fn.float()) + alpha
            beta = self.dynamic_beta_scale.float() * torch.tanh(normed @ self.dynamic_beta_fn.float()).squeeze(-1) + beta
        mixed = torch.einsum("...im,...id->...md", alpha, h)  # [..., n+1, d]
        return mixed[..., 0, :].to(streams.dtype), mixed[..., 1:, :], beta

    def macs_per_token(self, d_model: int) -> int:
        """Matmul multiply-adds of one token: the width mix and the dynamic projections (the depth
        connection is an element-wise multiply-add)."""
        n = self.rate
        macs = n * (n + 1) * d_model  # [A_m | A_r]ᵀ H
        if self.dynamic:
            macs += n * d_model * (n + 2)  # H̄ [W_m | W_r | W_β]
        return macs

    @staticmethod
    def depth(out: torch.Tensor, carried: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Add the sub-layer output [..., d] to every stream with weight B_j → [..., n, d]."""
        return (beta.unsqueeze(-1) * out.float().unsqueeze(-2) + carried).to(out.dtype)
