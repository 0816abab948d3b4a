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

Speed. The mixing touches n copies of the hidden state with tiny matrices, so on its own it is all
memory traffic and small-kernel overhead. The width connection is one autograd Function that keeps
the number of passes over the [tokens, n, d] streams low: the RMSNorm of the dynamic path is folded
into the projection (H̄W = (H (g∘W)) / rms(H), so the normed streams are never materialised),
[W_m | W_r | W_β] is one matmul, the fp32 copy of the streams is recomputed in backward instead of
being saved (memory: only the bf16 streams stay alive), and the backward adds its three
contributions to ∂H inside the ops that make them (addmm, addcmul_). The depth connection writes its
bf16 result directly. Same math and the same matmuls (so `macs_per_token` still holds);
tests/test_hyper_connections.py checks it against the straightforward formulation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.norms import RMSNorm


def no_weight_decay(p: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that must not be decayed whatever its shape (read by param_groups)."""
    p._no_weight_decay = True  # type: ignore[attr-defined]
    return p


@dataclass
class MixingRecord:
    """What one call of a hyper-connection leaves for the statistics (detached, no host sync).
    `static` [n, n+2] = [A_m | A_r | B] as used; `mixing` [..., n, n+2] the per-token total
    (static + dynamic), None for a static connection."""

    static: torch.Tensor
    mixing: torch.Tensor | None


class HyperConnection(nn.Module):
    def __init__(self, d_model: int, rate: int, index: int, dynamic: bool):
        super().__init__()
        n = rate
        self.rate, self.dynamic = n, dynamic
        a_m = torch.zeros(n, 1)
        a_m[index % n] = 1.0
        # Column 0 is A_m, columns 1..n are A_r: one matrix so both mixes are one matmul.
        self.static_alpha = no_weight_decay(nn.Parameter(torch.cat([a_m, torch.eye(n)], dim=1)))  # [n, n+1]
        self.static_beta = no_weight_decay(nn.Parameter(torch.ones(n)))
        if dynamic:
            self.norm = RMSNorm(d_model)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(d_model, n + 1))  # [W_m | W_r], decayed
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(d_model, 1))  # W_β, decayed
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), 0.01))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), 0.01))
        # One record per call since the last `reset()` (the model snapshots them after its forward,
        # so an activation-checkpoint recomputation does not count twice; as models/layers/moe.py).
        self.calls: list[MixingRecord] = []

    def reset(self) -> None:
        self.calls = []

    def width(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [..., n, d] → (sub-layer input [..., d], carried streams [..., n, d] fp32, B [..., n])."""
        n = self.rate
        # [A_m | A_r | B]: the parameters are only read here, inside the module's call, where
        # ZeRO-3 has them gathered.
        static = torch.cat([self.static_alpha, self.static_beta.unsqueeze(-1)], dim=1).float()  # [n, n+2]
        if self.dynamic:
            # RMSNorm's gain folded into the projection: (H/rms ∘ g) W = (H (g∘W)) / rms.
            proj = torch.cat([self.dynamic_alpha_fn, self.dynamic_beta_fn], dim=1).float()
            proj = (proj * self.norm.weight.float().unsqueeze(-1)).t().contiguous()  # [n+2, d]
            scale = torch.cat([self.dynamic_alpha_scale.expand(n + 1), self.dynamic_beta_scale]).float()
            h0, carried, mixing = DynamicWidth.apply(streams, static, proj, scale, self.norm.eps)
            self.calls.append(MixingRecord(static.detach(), mixing.detach()))
            return h0, carried, mixing[..., n + 1]
        h0, carried = StaticWidth.apply(streams, static[:, : n + 1])
        self.calls.append(MixingRecord(static.detach(), None))
        return h0, carried, static[:, n + 1]

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
        return Depth.apply(out, carried, beta)


class Depth(torch.autograd.Function):
    """Ĥ = B ⊗ out + H′ computed in fp32 (type promotion: no fp32 copy of `out`) and written
    straight in `out`'s dtype (no fp32 result to cast)."""

    @staticmethod
    def forward(ctx, out, carried, beta):
        result = torch.empty(carried.shape, dtype=out.dtype, device=out.device)
        torch.addcmul(carried, beta.unsqueeze(-1), out.unsqueeze(-2), out=result)
        ctx.save_for_backward(out, beta)
        return result

    @staticmethod
    def backward(ctx, g):
        out, beta = ctx.saved_tensors
        g32 = g.float()  # = ∂H′
        g_out = None
        if ctx.needs_input_grad[0]:  # Σ_j B_j ∂Ĥ_j, one multiply-add per stream (n is small)
            g_out = g32[..., 0, :] * beta[..., 0:1]
            for j in range(1, g32.shape[-2]):
                g_out.addcmul_(g32[..., j, :], beta[..., j : j + 1])
            g_out = g_out.to(out.dtype)
        g_beta = (g32 * out.unsqueeze(-2)).sum(-1).sum_to_size(beta.shape) if ctx.needs_input_grad[2] else None
        return g_out, g32, g_beta


def _fp32(method):
    """Run a Function's forward/backward with autocast off: the mixing stays fp32 under
    torch.autocast too (it would make the matmuls bf16)."""

    @functools.wraps(method)
    def wrapped(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)

    return wrapped


def _mixed_grad(g_h0: torch.Tensor | None, g_carried: torch.Tensor | None, shape: torch.Size,
                like: torch.Tensor) -> torch.Tensor:
    """∂ of the [T, n+1, d] mix from the gradients of its two outputs (either may be unused)."""
    g = torch.empty(shape, dtype=torch.float32, device=like.device)
    g[:, 0] = 0 if g_h0 is None else g_h0.reshape(shape[0], shape[2])
    g[:, 1:] = 0 if g_carried is None else g_carried.reshape(shape[0], shape[1] - 1, shape[2])
    return g


class StaticWidth(torch.autograd.Function):
    """SHC width: [h₀ | H′] = [A_m | A_r]ᵀ H for every token, in fp32; the fp32 copy of H is
    recomputed in backward rather than kept."""

    @staticmethod
    @_fp32
    def forward(ctx, streams: torch.Tensor, alpha: torch.Tensor):
        *lead, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()
        # bmm with the matrix broadcast over tokens: torch.matmul would fold the tokens into one
        # mm over transposed copies of H and of the result.
        mixed = torch.bmm(alpha.t().expand(h.shape[0], n + 1, n), h)  # [T, n+1, d]
        ctx.save_for_backward(streams, alpha)
        return mixed[:, 0].to(streams.dtype).view(*lead, d), mixed[:, 1:].view(*lead, n, d)

    @staticmethod
    @_fp32
    def backward(ctx, g_h0, g_carried):
        streams, alpha = ctx.saved_tensors
        *_, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()
        g_mixed = _mixed_grad(g_h0, g_carried, torch.Size((h.shape[0], n + 1, d)), h)
        g_h = torch.bmm(alpha.expand(h.shape[0], n, n + 1), g_mixed) if ctx.needs_input_grad[0] else None
        # Per token H g_mixedᵀ, then summed over tokens (no transposed copies of H and g_mixed).
        g_alpha = torch.bmm(h, g_mixed.transpose(1, 2)).sum(0) if ctx.needs_input_grad[1] else None
        return (None if g_h is None else g_h.to(streams.dtype).view(streams.shape)), g_alpha


class DynamicWidth(torch.autograd.Function):
    """DHC width. Inputs: streams [..., n, d]; static [n, n+2] = [A_m | A_r | B]; proj [n+2, d] =
    (g∘[W_m | W_r | W_β])ᵀ with g the RMSNorm gain; scale [n+2] = (s_α ×(n+1), s_β); eps of the norm.
    Outputs: h₀ [..., d] in the streams' dtype, H′ [..., n, d] fp32, and the per-token
    [A_m | A_r | B] [..., n, n+2] fp32 (its last column is the depth weights)."""

    @staticmethod
    @_fp32
    def forward(ctx, streams, static, proj, scale, eps: float):
        *lead, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()  # [T, n, d]
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(h, dim=-1).square_().div_(d).add_(eps))  # [T, n]
        raw = F.linear(h, proj)  # H (g∘W): [T, n, n+2]
        t = torch.tanh(raw * inv_rms.unsqueeze(-1))
        mixing = torch.addcmul(static, t, scale)  # [A_m | A_r | B] per token
        mixed = torch.bmm(mixing[..., : n + 1].transpose(1, 2), h)  # [T, n+1, d]
        ctx.save_for_backward(streams, proj, scale, raw, inv_rms, t, mixing)
        return (mixed[:, 0].to(streams.dtype).view(*lead, d), mixed[:, 1:].view(*lead, n, d),
                mixing.view(*lead, n, n + 2))

    @staticmethod
    @_fp32
    def backward(ctx, g_h0, g_carried, g_mixing):
        streams, proj, scale, raw, inv_rms, t, mixing = ctx.saved_tensors
        *_, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()
        tokens = h.shape[0]
        g_mixed = _mixed_grad(g_h0, g_carried, torch.Size((tokens, n + 1, d)), h)
        g_h = torch.bmm(mixing[..., : n + 1], g_mixed)  # ∂H through the mix: [T, n, d]
        g_coef = torch.zeros_like(mixing) if g_mixing is None else g_mixing.reshape(tokens, n, n + 2).clone()
        g_coef[..., : n + 1] += torch.bmm(h, g_mixed.transpose(1, 2))  # ∂[A_m | A_r] per token
        g_static = g_coef.sum(0)
        g_scale = (g_coef * t).sum((0, 1))
        g_z = g_coef * scale * (1 - t * t)  # through tanh
        g_raw = g_z * inv_rms.unsqueeze(-1)
        g_proj = g_raw.reshape(-1, n + 2).t() @ h.reshape(-1, d)  # [n+2, d]
        # ∂H through H (g∘W); not addmm_: FlopCounterMode counts addmm only
        g_h = torch.addmm(g_h.view(-1, d), g_raw.reshape(-1, n + 2), proj).view(tokens, n, d)
        # ∂H through 1/rms: d(ms + eps)^-½ / dH = -(ms + eps)^-3/2 · H / d
        g_inv = (g_z * raw).sum(-1)
        g_h.addcmul_(h, (g_inv * inv_rms.pow(3)).unsqueeze(-1), value=-1.0 / d)
        return g_h.to(streams.dtype).view(streams.shape), g_static, g_proj, g_scale, None


_STATISTICS = ("alpha", "beta", "static_alpha_abs", "static_beta_abs", "dynamic_alpha_abs", "dynamic_beta_abs")


def mixing_statistics(records: list[list[MixingRecord]]) -> dict[str, torch.Tensor]:
    """The hyper-connections' weights in the last forward, from each connection's records (in model
    order; a connection called several times averages its calls). Averages over tokens and entries:
    `hc/alpha_mean` the width weights [A_m | A_r], `hc/beta_mean` the depth weights B (static +
    dynamic); `hc/static_{alpha,beta}_abs_mean` |the static parts|; `hc/dynamic_{alpha,beta}_abs_mean`
    |s ∘ tanh(H̄W)|, DHC only. `hc/{alpha,beta}_per_connection_mean` list them per connection."""
    if not any(records):
        return {}
    table = torch.stack([torch.stack([_call_means(r) for r in calls]).mean(0) for calls in records if calls])
    stats = {f"hc/{name}_mean": column.mean() for name, column in zip(_STATISTICS, table.unbind(1), strict=True)}
    stats["hc/alpha_per_connection_mean"], stats["hc/beta_per_connection_mean"] = table[:, 0], table[:, 1]
    if all(r.mixing is None for calls in records for r in calls):
        del stats["hc/dynamic_alpha_abs_mean"], stats["hc/dynamic_beta_abs_mean"]
    return stats


def _call_means(record: MixingRecord) -> torch.Tensor:
    """One call's statistics, in the order of _STATISTICS."""
    static = record.static
    n = static.shape[0]
    if record.mixing is None:
        total, dynamic = static, torch.zeros_like(static)
    else:  # per entry, averaged over tokens
        per_token = record.mixing.reshape(-1, n, n + 2)
        total, dynamic = per_token.mean(0), (per_token - static).abs().mean(0)
    return torch.stack([total[:, : n + 1].mean(), total[:, n + 1].mean(),
                        static[:, : n + 1].abs().mean(), static[:, n + 1].abs().mean(),
                        dynamic[:, : n + 1].mean(), dynamic[:, n + 1].mean()])
