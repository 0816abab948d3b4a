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

Kinds: `build_connection("hc", ...)` is this module's HC (static or dynamic); `build_connection("mhc", ...)`
the manifold-constrained variant of models/layers/mhc.py, a subclass with the same width/depth interface
(width → (h₀, H′, B), then the shared `depth`), so a Block does not know which kind it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
    `static` [n, n+2] = [A_m | A_r | B] as used (mHC: the mapping of its static biases alone; it may be
    a function computing it, so that only logged steps pay for it); `mixing` [..., n, n+2] the per-token
    total (static + dynamic), None for a static connection. Every kind writes the carried streams as
    H′ = A_rᵀH, so A_rᵀ is the residual mapping H_res of mHC's notation."""

    static: torch.Tensor | Callable[[], torch.Tensor]
    mixing: torch.Tensor | None

    def static_mixing(self) -> torch.Tensor:
        return self.static() if callable(self.static) else self.static


class HyperConnection(nn.Module):
    """HC around one sub-layer. Called as a module (`conn(streams)` = `width`, so that ZeRO-3 gathers the
    parameters for it), then `depth`. Subclasses (mHC) override `_build`, `width`, `macs_per_token`."""

    def __init__(self, d_model: int, rate: int, index: int, dynamic: bool):
        super().__init__()
        self.rate, self.dynamic = rate, dynamic
        # One record per call since the last `reset()` (the model snapshots them after its forward,
        # so an activation-checkpoint recomputation does not count twice; as models/layers/moe.py).
        self.calls: list[MixingRecord] = []
        self._build(d_model, index)

    def _build(self, d_model: int, index: int) -> None:
        n, dynamic = self.rate, self.dynamic
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

    def reset(self) -> None:
        self.calls = []

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.width(streams)

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


def per_token_mix_grads(g_h0, g_carried, g_mixing, h: torch.Tensor, mixing: torch.Tensor):
    """Backward of a per-token mix [h₀ | H′] = Mᵀ H (M = mixing[..., :n+1], `mixing` [T, n, n+2] with the
    depth weights last): (∂H through the mix [T, n, d], ∂mixing [T, n, n+2], the mix's share added to the
    gradient `mixing` itself received). Shared by the dynamic HC and mHC widths."""
    tokens, n, d = h.shape
    g_mixed = _mixed_grad(g_h0, g_carried, torch.Size((tokens, n + 1, d)), h)
    g_h = torch.bmm(mixing[..., : n + 1], g_mixed)
    g_coef = torch.zeros_like(mixing) if g_mixing is None else g_mixing.reshape(tokens, n, n + 2).clone()
    g_coef[..., : n + 1] += torch.bmm(h, g_mixed.transpose(1, 2))
    return g_h, g_coef


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
        g_h, g_coef = per_token_mix_grads(g_h0, g_carried, g_mixing, h, mixing)  # ∂H, ∂[A_m | A_r | B]
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


_STATISTICS = ("alpha", "beta", "static_alpha_abs", "static_beta_abs", "dynamic_alpha_abs", "dynamic_beta_abs",
               "res_row_error", "res_col_error")


def mixing_statistics(records: list[list[MixingRecord]]) -> dict[str, torch.Tensor]:
    """The hyper-connections' weights in the last forward, from each connection's records (in model
    order; a connection called several times averages its calls). Averages over tokens and entries:
    `hc/alpha_mean` the width weights [A_m | A_r], `hc/beta_mean` the depth weights B (static +
    dynamic); `hc/static_{alpha,beta}_abs_mean` |the static parts|; `hc/dynamic_{alpha,beta}_abs_mean`
    |the dynamic parts| (DHC: s ∘ tanh(H̄W); mHC: the mapping minus that of its biases alone), dynamic
    connections only. `hc/{alpha,beta}_per_connection_mean` list them per connection.

    The residual mapping H_res = A_rᵀ (carried streams H′ = H_res H), what mHC constrains:
    `hc/res_{row,col}_error_mean`: max_i |Σ_j H_res[i, j] − 1| (rows: the forward gain) and the same for
    columns (the backward gain), per token and connection, averaged — 0 for a doubly stochastic H_res
    (mHC: rows exact, columns within Sinkhorn–Knopp's convergence). `hc/composite_gain_{forward,
    backward}_mean`: the mHC paper's Amax gain magnitude of the composite mapping over the whole depth,
    C = H_res⁽ᴷ⁻¹⁾ ⋯ H_res⁽⁰⁾: max |row sum| (forward) and max |column sum| (backward) of C per token,
    averaged over tokens (paper: ≈ 1.6 for mHC, up to ≈ 3000 for HC at 27B); and
    `hc/composite_gain_{forward,backward}_per_connection_mean` the same for the composite from each
    connection k to the last, C_k = H_res⁽ᴷ⁻¹⁾ ⋯ H_res⁽ᵏ⁾ (the paper's Fig. 3b / 7b)."""
    if not any(records):
        return {}
    used = [calls for calls in records if calls]
    table = torch.stack([torch.stack([_call_means(r) for r in calls]).mean(0) for calls in used])
    stats = {f"hc/{name}_mean": column.mean() for name, column in zip(_STATISTICS, table.unbind(1), strict=True)}
    stats["hc/alpha_per_connection_mean"], stats["hc/beta_per_connection_mean"] = table[:, 0], table[:, 1]
    if all(r.mixing is None for calls in records for r in calls):
        del stats["hc/dynamic_alpha_abs_mean"], stats["hc/dynamic_beta_abs_mean"]
    forward, backward = _composite_gains([_residual_mapping(calls[-1]) for calls in used])
    stats["hc/composite_gain_forward_mean"], stats["hc/composite_gain_backward_mean"] = forward[0], backward[0]
    stats["hc/composite_gain_forward_per_connection_mean"] = forward
    stats["hc/composite_gain_backward_per_connection_mean"] = backward
    return stats


def _residual_mapping(record: MixingRecord) -> torch.Tensor:
    """H_res = A_rᵀ of one call: [tokens, n, n] (a static one: [1, n, n])."""
    n = record.static_mixing().shape[0]
    mixing = record.static_mixing() if record.mixing is None else record.mixing
    return mixing.reshape(-1, n, n + 2)[..., 1 : n + 1].transpose(-1, -2).float()


def _composite_gains(mappings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax gains (forward: max |row sum|, backward: max |column sum|, averaged over tokens) of the
    suffix products C_k = H⁽ᴷ⁻¹⁾ ⋯ H⁽ᵏ⁾ for every k, from the per-token mappings in depth order."""
    tokens = max(m.shape[0] for m in mappings)
    composite = None
    forward, backward = [], []
    for mapping in reversed(mappings):
        composite = mapping.expand(tokens, -1, -1) if composite is None else composite @ mapping
        forward.append(composite.sum(-1).abs().amax(-1).mean())
        backward.append(composite.sum(-2).abs().amax(-1).mean())
    return torch.stack(forward[::-1]), torch.stack(backward[::-1])


def _call_means(record: MixingRecord) -> torch.Tensor:
    """One call's statistics, in the order of _STATISTICS."""
    static = record.static_mixing()
    n = static.shape[0]
    if record.mixing is None:
        total, dynamic = static, torch.zeros_like(static)
    else:  # per entry, averaged over tokens
        per_token = record.mixing.reshape(-1, n, n + 2)
        total, dynamic = per_token.mean(0), (per_token - static).abs().mean(0)
    h_res = _residual_mapping(record)  # [tokens, n, n]
    row_error = (h_res.sum(-1) - 1).abs().amax(-1).mean()
    col_error = (h_res.sum(-2) - 1).abs().amax(-1).mean()
    return torch.stack([total[:, : n + 1].mean(), total[:, n + 1].mean(),
                        static[:, : n + 1].abs().mean(), static[:, n + 1].abs().mean(),
                        dynamic[:, : n + 1].mean(), dynamic[:, n + 1].mean(), row_error, col_error])


def build_connection(kind: str, d_model: int, rate: int, index: int, dynamic: bool,
                     sinkhorn_iters: int = 20) -> HyperConnection:
    """The k-th (`index`) connection of a model: `hc` (Zhu et al.) or `mhc` (models/layers/mhc.py)."""
    if kind == "hc":
        return HyperConnection(d_model, rate, index, dynamic)
    if kind == "mhc":
        from models.layers.mhc import ManifoldHyperConnection

        return ManifoldHyperConnection(d_model, rate, index, dynamic, sinkhorn_iters)
    raise ValueError(f"unknown hyper-connection kind {kind!r} (hc, mhc)")
