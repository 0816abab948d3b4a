"""Manifold-constrained hyper-connections (mHC; Xie et al., DeepSeek, arXiv 2512.24880).

The hidden state is n streams x ∈ R^{n×C}; around a sub-layer F (with its own pre-norm, Eq. 3):
    x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l)
with the mappings computed from the flattened streams (Eq. 7–8):
    x′ = RMSNorm(vec(x_l)) ∈ R^{1×nC}                     (its gain absorbed in φ, as the paper's kernels do)
    H̃_pre = α_pre·(x′φ_pre) + b_pre,   H̃_post = α_post·(x′φ_post) + b_post,
    H̃_res = α_res·mat(x′φ_res) + b_res,   φ ∈ R^{nC×(n²+2n)} = [φ_pre | φ_post | φ_res]
    H_pre = σ(H̃_pre),   H_post = 2σ(H̃_post),   H_res = Sinkhorn–Knopp(H̃_res)
Sinkhorn–Knopp (Eq. 9): M⁽⁰⁾ = exp(H̃_res), M⁽ᵗ⁾ = T_r(T_c(M⁽ᵗ⁻¹⁾)), H_res = M⁽ᵗᵐᵃˣ⁾ (t_max = 20 in
the paper, `sinkhorn_iters`): columns then rows normalised, so the rows of H_res sum to 1 exactly and
the columns to within the iteration's convergence; entries ≥ 0. Convergence is fast for logits of
order one and slow (sublinear) for saturated ones: 20 iterations leave a max column-sum error of
~1e-3 (median over matrices) for logits of std 1 around the initial H_res, up to ~1 for logits of std
30 (tests/test_mhc.py; `hc/res_col_error_mean` in the metrics shows it for a run). `dynamic=False` keeps the biases only (token-independent mappings, the
static ablation).

Initialisation. The paper gives α = 0.01 (Table 5) and not the rest; we take φ = 0 (as HC's W = 0),
b_post = 0 (H_post = 1, HC's B = 1), H_pre = 0.9 on stream k mod n and 0.1/(n−1) on the others (the
k-th connection reads mostly its own stream, as HC's A_m = e_{k mod n}; σ cannot reach 0 or 1), and
H_res = 0.9·I + 0.1/(n−1)·(J − I) (doubly stochastic, near HC's A_r = I, away from Sinkhorn's
saturation). At step 0 the network is then exactly the Pre-Norm residual one: the n streams start
equal (the embedding copied), a row-stochastic H_res keeps equal streams equal, H_pre sums to 1 so F
sees x itself, and H_post = 1 adds F(x) to every stream. The asymmetric H_pre is what lets the streams
differ later: with a stream-symmetric initialisation they would stay equal forever.

Speed: the width is one autograd Function, as DHC's: the RMSNorm is divided out after the matmul
(paper §4.3.1: x′φ = (x φ)/r), the n²+2n projections are one matmul, the mixing is one bmm over the
per-token [H_preᵀ | H_resᵀ], the fp32 copy of the streams and Sinkhorn's iterates are recomputed in
backward instead of kept (§4.3.2), and Sinkhorn's backward is the exact adjoint of its iterations.
Sinkhorn runs on a [n, n, T] copy of the logits (tokens innermost: each normalisation is a few
vectorised passes, 8× faster than on [T, n, n]), in place in the forward, into one preallocated buffer
in the backward. tests/test_mhc.py checks it against the equations written out plainly with autograd.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.hyper_connections import (
    HyperConnection,
    MixingRecord,
    StaticWidth,
    _fp32,
    no_weight_decay,
    per_token_mix_grads,
)

_TINY = 1e-30  # floor of exp(H̃_res): a row whose logits all underflow would make Sinkhorn divide 0 by 0
INIT_DIAGONAL = 0.9  # H_res and H_pre at initialisation: this much on the connection's own stream


def initial_biases(rate: int, index: int) -> torch.Tensor:
    """[b_pre | b_post | b_res] (n + n + n²) giving the initial mappings of the module docstring."""
    n, k = rate, index % rate
    off = (1 - INIT_DIAGONAL) / (n - 1) if n > 1 else 0.0
    pre = torch.full((n,), math.log(off / (1 - off)) if n > 1 else 0.0)
    pre[k] = math.log(INIT_DIAGONAL / (1 - INIT_DIAGONAL))
    # exp(b_res) = c·I + (J − I): one normalisation makes it c/(c + n − 1) on the diagonal.
    res = torch.eye(n) * math.log(INIT_DIAGONAL / off) if n > 1 else torch.zeros(1, 1)
    return torch.cat([pre, torch.zeros(n), res.flatten()])


# ---- Sinkhorn–Knopp ---------------------------------------------------------------------------------
# The iterations run on [n, n, T] (row i, column j, token t: tokens innermost). Each normalisation is
# then a sum of n contiguous [·, T] rows and one broadcast division, vectorised over tokens; on the
# [T, n, n] layout the same sums reduce over 4-element strided runs and cost ~8× more per op (CPU,
# T = 2048, n = 4). The public functions take and return the usual [..., n, n].


def _exp_shifted(logits: torch.Tensor) -> torch.Tensor:
    """exp(H̃_res) with each column's max subtracted first (no overflow): the first T_c divides that
    column scaling out exactly, so the iterates are those of exp(H̃_res) itself."""
    return torch.exp(logits - logits.amax(0, keepdim=True)).clamp_min_(_TINY)


def _sinkhorn_last(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """H_res = T_r(T_c(…T_r(T_c(exp(logits)))…)), `iters` times, on [n, n, T]; no autograd."""
    m = _exp_shifted(logits)
    for _ in range(iters):
        m.div_(m.sum(0, keepdim=True))  # T_c: every column sums to 1
        m.div_(m.sum(1, keepdim=True))  # T_r: every row sums to 1
    return m


def _sinkhorn_backward_last(logits: torch.Tensor, iters: int, grad: torch.Tensor) -> torch.Tensor:
    """∂loss/∂logits from ∂loss/∂H_res, on [n, n, T]: the iterates are recomputed, then each
    normalisation Y = X / s (s = Σ X along the normalised dim) is undone in reverse:
    ∂X = (∂Y − Σ ∂Y∘Y) / s; finally exp′ = exp (the subtracted max has no gradient: T_c removes it).
    The iterates go into one preallocated buffer and the reverse pass reuses one temporary: fresh
    [n, n, T] tensors (128 KiB at T = 2048) made each step cost 5× the arithmetic on CPU."""
    m0 = _exp_shifted(logits)
    ys = torch.empty((2 * iters, *logits.shape), dtype=m0.dtype, device=m0.device)
    sums, m = [], m0
    for k in range(2 * iters):
        s = m.sum(k % 2, keepdim=True)  # T_c (dim 0) then T_r (dim 1)
        m = torch.div(m, s, out=ys[k])
        sums.append(s)
    grad, tmp = grad.clone(), torch.empty_like(m0)
    for k in reversed(range(2 * iters)):
        grad.sub_(torch.mul(grad, ys[k], out=tmp).sum(k % 2, keepdim=True)).div_(sums[k])
    return grad.mul_(m0)


def _tokens_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """[..., n, n] → [n, n, T] (a copy), and the leading shape to restore."""
    n = x.shape[-1]
    return x.reshape(-1, n, n).permute(1, 2, 0).contiguous(), x.shape[:-2]


def _tokens_first(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    n = x.shape[0]
    return x.permute(2, 0, 1).reshape(*lead, n, n)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """H_res = Sinkhorn–Knopp(logits) over the last two dims (Eq. 9: M⁽⁰⁾ = exp(H̃_res),
    M⁽ᵗ⁾ = T_r(T_c(M⁽ᵗ⁻¹⁾)), `iters` = t_max times), no autograd."""
    last, lead = _tokens_last(logits)
    return _tokens_first(_sinkhorn_last(last, iters), lead)


def sinkhorn_backward(logits: torch.Tensor, iters: int, grad: torch.Tensor) -> torch.Tensor:
    """The exact adjoint of `sinkhorn`'s iterations: ∂loss/∂logits from ∂loss/∂H_res ([..., n, n])."""
    last, lead = _tokens_last(logits)
    return _tokens_first(_sinkhorn_backward_last(last, iters, _tokens_last(grad)[0]), lead)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class SinkhornKnopp(torch.autograd.Function):
    """`sinkhorn` with autograd: only the logits are saved (the iterates are recomputed)."""

    @staticmethod
    @_fp32
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return sinkhorn(_at_least_fp32(logits), iters)

    @staticmethod
    @_fp32
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        wide = _at_least_fp32(logits)
        return sinkhorn_backward(wide, ctx.iters, grad.to(wide.dtype)).to(logits.dtype), None


# ---- the connection ---------------------------------------------------------------------------------


def _mapping_columns(pre: torch.Tensor, res: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """[..., n, n+2] = [H_preᵀ | H_resᵀ | H_postᵀ]: the [A_m | A_r | B] layout HC's width and depth use."""
    return torch.cat([pre.unsqueeze(-1), res.transpose(-1, -2), post.unsqueeze(-1)], dim=-1)


def static_mapping(bias: torch.Tensor, rate: int, iters: int) -> torch.Tensor:
    """[n, n+2] mapping of the biases alone (the static part, with autograd)."""
    n = rate
    pre, post, res = bias[:n], bias[n : 2 * n], bias[2 * n :].view(1, n, n)
    return _mapping_columns(torch.sigmoid(pre), SinkhornKnopp.apply(res, iters)[0], 2 * torch.sigmoid(post))


class ManifoldHyperConnection(HyperConnection):
    """mHC around one sub-layer: `conn(streams)` → (H_pre x [..., d] in the streams' dtype, H_res x
    [..., n, d] fp32, H_post [..., n] fp32), then the shared `HyperConnection.depth`."""

    def __init__(self, d_model: int, rate: int, index: int, dynamic: bool = True, sinkhorn_iters: int = 20):
        super().__init__(d_model, rate, index, dynamic)
        self.sinkhorn_iters = sinkhorn_iters

    def _build(self, d_model: int, index: int) -> None:
        n = self.rate
        self.bias = no_weight_decay(nn.Parameter(initial_biases(n, index)))  # [b_pre | b_post | b_res]
        if self.dynamic:
            self.phi = nn.Parameter(torch.zeros(n * n + 2 * n, n * d_model))  # [φ_pre | φ_post | φ_res]ᵀ, decayed
            self.alpha = nn.Parameter(torch.full((3,), 0.01))  # α_pre, α_post, α_res (paper: init 0.01)
            self.eps = 1e-6

    def width(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, iters = self.rate, self.sinkhorn_iters
        bias = self.bias.float()
        if not self.dynamic:
            mapping = static_mapping(bias, n, iters)  # [n, n+2]
            h0, carried = StaticWidth.apply(streams, mapping[:, : n + 1])
            self.calls.append(MixingRecord(mapping.detach(), None))
            return h0, carried, mapping[:, n + 1]
        a = self.alpha.float()  # (α_pre, α_post, α_res), one per entry of [H̃_pre | H̃_post | H̃_res]
        alpha = torch.cat([a[0:1].expand(n), a[1:2].expand(n), a[2:3].expand(n * n)])
        h0, carried, mixing = ManifoldWidth.apply(streams, self.phi.float(), alpha, bias, self.eps, iters)
        static = partial(_static_record, bias.detach().clone(), n, iters)
        self.calls.append(MixingRecord(static, mixing.detach()))
        return h0, carried, mixing[..., n + 1]

    def macs_per_token(self, d_model: int) -> int:
        """The width mix [H_preᵀ | H_resᵀ]ᵀ x, and (dynamic) the projections x φ: Sinkhorn, the
        sigmoids and the depth connection are element-wise."""
        n = self.rate
        macs = n * (n + 1) * d_model
        if self.dynamic:
            macs += n * d_model * (n * n + 2 * n)
        return macs


def _static_record(bias: torch.Tensor, rate: int, iters: int) -> torch.Tensor:
    with torch.no_grad():
        return static_mapping(bias, rate, iters)


class ManifoldWidth(torch.autograd.Function):
    """mHC width. Inputs: streams [..., n, d]; phi [n²+2n, n·d]; alpha [n²+2n] (α_pre ×n, α_post ×n,
    α_res ×n²); bias [n²+2n]; eps of the RMSNorm; Sinkhorn iterations. Outputs: H_pre x [..., d] in the
    streams' dtype, H_res x [..., n, d] fp32, and the per-token [H_preᵀ | H_resᵀ | H_postᵀ]
    [..., n, n+2] fp32 (its last column is the depth weights)."""

    @staticmethod
    @_fp32
    def forward(ctx, streams, phi, alpha, bias, eps: float, iters: int):
        *lead, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()  # [T, n, d]
        tokens = h.shape[0]
        flat = h.reshape(tokens, n * d)  # a copy only for the expanded embedding
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1).square_().div_(n * d).add_(eps))  # [T]
        raw = F.linear(flat, phi)  # x φ: [T, n²+2n]
        logits = torch.addcmul(bias, raw * inv_rms.unsqueeze(-1), alpha)  # H̃ = α·(x′φ) + b
        res_logits = logits[:, 2 * n :].t().contiguous().view(n, n, tokens)  # H̃_res[i, j] at [i, j, t]
        mixing = torch.empty(tokens, n, n + 2, device=h.device)  # [H_preᵀ | H_resᵀ | H_postᵀ]
        mixing[..., 0] = torch.sigmoid(logits[:, :n])
        mixing[..., n + 1] = torch.sigmoid(logits[:, n : 2 * n]).mul_(2)
        mixing[..., 1 : n + 1] = _sinkhorn_last(res_logits, iters).permute(2, 1, 0)
        mixed = torch.bmm(mixing[..., : n + 1].transpose(1, 2), h)  # [T, n+1, d]
        ctx.save_for_backward(streams, phi, alpha, raw, inv_rms, res_logits, mixing)
        ctx.eps, ctx.iters = eps, iters
        return (mixed[:, 0].to(streams.dtype).view(*lead, d), mixed[:, 1:].view(*lead, n, d),
                mixing.view(*lead, n, n + 2))

    @staticmethod
    @_fp32
    def backward(ctx, g_h0, g_carried, g_mixing):
        streams, phi, alpha, raw, inv_rms, res_logits, mixing = ctx.saved_tensors
        *_, n, d = streams.shape
        h = streams.reshape(-1, n, d).float()
        tokens = h.shape[0]
        g_h, g_coef = per_token_mix_grads(g_h0, g_carried, g_mixing, h, mixing)  # ∂x, ∂[H_preᵀ | H_resᵀ | H_postᵀ]
        pre, post = mixing[..., 0], mixing[..., n + 1]
        g_logits = torch.empty(tokens, n * n + 2 * n, device=h.device)
        g_logits[:, :n] = g_coef[..., 0] * pre * (1 - pre)  # σ′ = σ(1 − σ)
        g_logits[:, n : 2 * n] = g_coef[..., n + 1] * post * (1 - post / 2)  # (2σ)′ = 2σ(1 − σ)
        g_res = g_coef[..., 1 : n + 1].permute(2, 1, 0).contiguous()  # ∂H_res[i, j] at [i, j, t]
        g_logits[:, 2 * n :] = _sinkhorn_backward_last(res_logits, ctx.iters, g_res).view(n * n, tokens).t()
        scaled = raw * inv_rms.unsqueeze(-1)  # x′φ
        g_bias, g_alpha = g_logits.sum(0), (g_logits * scaled).sum(0)
        g_z = g_logits * alpha
        g_raw = g_z * inv_rms.unsqueeze(-1)
        flat = h.reshape(tokens, n * d)
        g_phi = g_raw.t() @ flat  # [n²+2n, n·d]
        # ∂x through x φ; not addmm_: FlopCounterMode counts addmm only
        g_flat = torch.addmm(g_h.view(tokens, n * d), g_raw, phi)
        # ∂x through 1/r: d(ms + eps)^-½ / dx = -(ms + eps)^-3/2 · x / (n·d)
        g_inv = (g_z * raw).sum(-1)
        g_flat.addcmul_(flat, (g_inv * inv_rms.pow(3)).unsqueeze(-1), value=-1.0 / (n * d))
        return g_flat.to(streams.dtype).view(streams.shape), g_phi, g_alpha, g_bias, None, None
