"""Hyper-connection LLMs against the Pre-Norm residual baseline they generalise."""

from __future__ import annotations

import pytest
import torch

import models
from models.layers.hyper_connections import HyperConnection
from models.llama import HCLLMConfig, LlamaConfig

SHAPE = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)


def pair(rate: int, dynamic: bool, **kw):
    torch.manual_seed(0)
    base = models.build(LlamaConfig(**SHAPE, **kw))
    hc = models.build(HCLLMConfig(**SHAPE, rate=rate, dynamic=dynamic, **kw))
    result = hc.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all("hc_" in k for k in result.missing_keys)
    return base, hc


def test_initialisation_follows_the_paper():
    hc = models.build(HCLLMConfig(**SHAPE, rate=4, dynamic=True))
    for layer, block in enumerate(hc.blocks):
        for k, conn in ((2 * layer, block.hc_attn), (2 * layer + 1, block.hc_mlp)):
            a_m, a_r = conn.static_alpha[:, 0], conn.static_alpha[:, 1:]
            assert torch.equal(a_m, torch.nn.functional.one_hot(torch.tensor(k % 4), 4).float())
            assert torch.equal(a_r, torch.eye(4)) and torch.equal(conn.static_beta, torch.ones(4))
            assert conn.dynamic_alpha_fn.abs().sum() == 0 and conn.dynamic_beta_fn.abs().sum() == 0
            assert conn.dynamic_alpha_scale.item() == pytest.approx(0.01)
            assert conn.dynamic_beta_scale.item() == pytest.approx(0.01)


def test_static_rate_one_equals_the_baseline_exactly():
    base, hc = pair(1, dynamic=False)
    ids = torch.randint(0, 97, (2, 24))
    assert torch.equal(base(ids).logits, hc(ids).logits)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("moe", [None, {"num_experts": 4, "top_k": 2}])
def test_rate_four_equals_the_baseline_after_the_stream_sum(dynamic, moe):
    base, hc = pair(4, dynamic, moe=moe)
    # The n equal streams sum to n·x; the final RMSNorm removes n exactly once its ε is scaled by n².
    hc.norm.eps = base.norm.eps * 16
    ids = torch.randint(0, 97, (2, 24))
    torch.testing.assert_close(hc(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_static_rate_one_trains_exactly_like_the_baseline_with_its_matrices_frozen():
    base, hc = pair(1, dynamic=False)
    for name, p in hc.named_parameters():  # frozen at the identity, SHC×1 is a residual network
        p.requires_grad_("hc_" not in name)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (base, hc)]
    for _ in range(3):
        ids = torch.randint(0, 97, (4, 24))
        losses = []
        for model, opt in zip((base, hc), opts, strict=True):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]


def test_first_step_gradients_of_shared_weights_match_the_baseline():
    base, hc = pair(4, dynamic=True)
    hc.norm.eps = base.norm.eps * 16
    ids = torch.randint(0, 97, (2, 24))
    for m in (base, hc):
        m(ids, labels=ids).loss.backward()
    hc_params = dict(hc.named_parameters())
    for name, p in base.named_parameters():
        torch.testing.assert_close(hc_params[name].grad, p.grad, rtol=1e-4, atol=1e-6)
    for name, p in hc.named_parameters():  # the hyper-connections learn from step one
        if "hc_" in name:
            assert p.grad is not None, name


def test_static_matrices_are_not_decayed_and_dynamic_weights_are():
    hc = models.build(HCLLMConfig(**SHAPE, rate=4, dynamic=True))
    decay, no_decay = (set(map(id, g["params"])) for g in hc.param_groups(0.1))
    for name, p in hc.named_parameters():
        if name.endswith(("static_alpha", "static_beta")):
            assert id(p) in no_decay, name
        if name.endswith(("dynamic_alpha_fn", "dynamic_beta_fn")):
            assert id(p) in decay, name


def test_mixing_runs_in_fp32_under_bf16():
    conn = HyperConnection(8, rate=4, index=0, dynamic=True).to(torch.bfloat16)
    streams = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)
    h, carried, beta = conn.width(streams)
    assert h.dtype == torch.bfloat16 and carried.dtype == torch.float32 and beta.dtype == torch.float32
    assert HyperConnection.depth(h, carried, beta).dtype == torch.bfloat16


@pytest.mark.parametrize("dynamic", [False, True])
def test_every_parameter_of_the_moe_hc_model_gets_a_gradient(dynamic):
    torch.manual_seed(0)
    model = models.build(HCLLMConfig(**SHAPE, rate=4, dynamic=dynamic, moe={"num_experts": 4, "top_k": 2}))
    ids = torch.randint(0, 97, (4, 24))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"load_balance", "router_z"}
    out.loss.backward()
    # At step 0 the dynamic scales get no gradient by design (W = 0, tanh(0) = 0); one step later they do.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- the optimised width/depth against the formulation they replace ----------------------------------


def reference_width(conn: HyperConnection, streams: torch.Tensor):
    """The straightforward formulation: normalise, project, tanh, one einsum for both mixes."""
    h = streams.float()
    alpha, beta = conn.static_alpha.float(), conn.static_beta.float()
    if conn.dynamic:
        normed = conn.norm(streams).float()
        alpha = conn.dynamic_alpha_scale * torch.tanh(normed @ conn.dynamic_alpha_fn) + alpha
        beta = conn.dynamic_beta_scale * torch.tanh(normed @ conn.dynamic_beta_fn).squeeze(-1) + beta
    mixed = torch.einsum("...im,...id->...md", alpha, h)
    return mixed[..., 0, :].to(streams.dtype), mixed[..., 1:, :], beta, alpha


def reference_depth(out: torch.Tensor, carried: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return (beta.unsqueeze(-1) * out.float().unsqueeze(-2) + carried).to(out.dtype)


def perturbed_connection(dynamic: bool, d: int = 16) -> HyperConnection:
    torch.manual_seed(0)
    conn = HyperConnection(d, rate=4, index=1, dynamic=dynamic)
    with torch.no_grad():  # away from the initialisation, where the dynamic part is zero
        for p in conn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return conn


@pytest.mark.parametrize("dynamic", [False, True])
def test_optimised_connection_equals_the_reference_in_fp32(dynamic):
    conn = perturbed_connection(dynamic)
    sublayer = torch.nn.Linear(16, 16)
    streams = torch.randn(2, 5, 4, 16, requires_grad=True)
    inputs = [streams, *conn.parameters(), *sublayer.parameters()]
    results = []
    for width, depth in ((conn.width, HyperConnection.depth),
                         (lambda s: reference_width(conn, s)[:3], reference_depth)):
        h0, carried, beta = width(streams)
        out = depth(torch.tanh(sublayer(h0)), carried, beta)
        # beta also feeds the loss directly, so its gradient path is checked on its own too
        loss = (out * torch.linspace(-1, 1, 16)).square().sum() + beta.sin().sum()
        results.append((out, torch.autograd.grad(loss, inputs)))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixing_stays_fp32_under_autocast():
    conn = perturbed_connection(True)
    streams = torch.randn(2, 5, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h0, carried, beta = conn.width(streams)
    ref_h0, ref_carried, ref_beta, _ = reference_width(conn, streams)  # fp32, no autocast
    assert carried.dtype == beta.dtype == torch.float32
    torch.testing.assert_close(carried, ref_carried, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(beta, ref_beta, rtol=1e-5, atol=1e-5)


# ---- mixing statistics --------------------------------------------------------------------------------


def recorded_streams(model) -> list[torch.Tensor]:
    """Wrap every connection's width to keep the streams it received (in model order)."""
    seen = []
    for conn in model.hyper_connections:
        def width(streams, _conn=conn, _original=conn.width):
            seen.append(streams.detach())
            return _original(streams)
        conn.width = width
    return seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_mixing_statistics_match_a_hand_computation_and_survive_checkpointing(dynamic):
    torch.manual_seed(0)
    model = models.build(HCLLMConfig(**SHAPE, rate=4, dynamic=dynamic))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hc_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    seen = recorded_streams(model)
    ids = torch.randint(0, 97, (2, 24))
    model(ids, labels=ids).loss.backward()
    stats = model.step_statistics()
    assert len(seen) == 2 * SHAPE["n_layers"]
    alphas, betas, dyn_alpha, dyn_beta, h_res = [], [], [], [], []
    with torch.no_grad():
        for conn, streams in zip(model.hyper_connections, seen, strict=True):
            *_, beta, alpha = reference_width(conn, streams)
            alpha, beta = alpha.expand(2, 24, 4, 5), beta.expand(2, 24, 4)
            alphas.append(alpha.mean())
            betas.append(beta.mean())
            dyn_alpha.append((alpha - conn.static_alpha).abs().mean())
            dyn_beta.append((beta - conn.static_beta).abs().mean())
            h_res.append(alpha[..., 1:].transpose(-1, -2).reshape(-1, 4, 4))  # H′ = A_rᵀH: H_res = A_rᵀ
        # The residual mapping's row/column-sum errors, and the Amax gains of the composite from each
        # connection k to the last, C_k = H_res⁽ᴷ⁻¹⁾ ⋯ H_res⁽ᵏ⁾ (max |row sum|, max |column sum|).
        row_error = torch.stack([(h.sum(-1) - 1).abs().amax(-1).mean() for h in h_res]).mean()
        col_error = torch.stack([(h.sum(-2) - 1).abs().amax(-1).mean() for h in h_res]).mean()
        forward, backward = [], []
        for k in range(len(h_res)):
            c = h_res[k]
            for h in h_res[k + 1 :]:
                c = h @ c
            forward.append(c.sum(-1).abs().amax(-1).mean())
            backward.append(c.sum(-2).abs().amax(-1).mean())
        static_alpha = torch.stack([c.static_alpha.abs().mean() for c in model.hyper_connections]).mean()
        static_beta = torch.stack([c.static_beta.abs().mean() for c in model.hyper_connections]).mean()
    expected = {
        "hc/alpha_mean": torch.stack(alphas).mean(), "hc/beta_mean": torch.stack(betas).mean(),
        "hc/static_alpha_abs_mean": static_alpha, "hc/static_beta_abs_mean": static_beta,
        "hc/alpha_per_connection_mean": torch.stack(alphas), "hc/beta_per_connection_mean": torch.stack(betas),
        "hc/res_row_error_mean": row_error, "hc/res_col_error_mean": col_error,
        "hc/composite_gain_forward_mean": forward[0], "hc/composite_gain_backward_mean": backward[0],
        "hc/composite_gain_forward_per_connection_mean": torch.stack(forward),
        "hc/composite_gain_backward_per_connection_mean": torch.stack(backward),
    }
    assert row_error > 1e-2 and col_error > 1e-2  # unconstrained: the sums drift from 1
    if dynamic:
        expected["hc/dynamic_alpha_abs_mean"] = torch.stack(dyn_alpha).mean()
        expected["hc/dynamic_beta_abs_mean"] = torch.stack(dyn_beta).mean()
        assert expected["hc/dynamic_alpha_abs_mean"] > 1e-4  # the check is not comparing zeros
    assert set(stats) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # Activation checkpointing: the backward runs every connection once more; the statistics come
    # from the snapshot taken at the end of the forward, so they are the same.
    model.enable_activation_checkpointing()
    model(ids, labels=ids).loss.backward()
    assert all(len(conn.calls) == 2 for conn in model.hyper_connections)
    assert all(len(calls) == 1 for calls in model._mixing_records)
    for name, value in model.step_statistics().items():
        torch.testing.assert_close(value, stats[name], msg=name)
