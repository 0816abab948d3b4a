"""Manifold-constrained hyper-connections (mHC; Xie et al., arXiv 2512.24880) against the paper's equations.

The references here are the paper's equations written out with plain autograd ops (Eq. 7–9):
    x′ = RMSNorm(vec(x)),  H̃_pre = α_pre·(x′φ_pre) + b_pre,  H̃_post = α_post·(x′φ_post) + b_post,
    H̃_res = α_res·mat(x′φ_res) + b_res,  H_pre = σ(H̃_pre),  H_post = 2σ(H̃_post),
    H_res = Sinkhorn–Knopp(H̃_res): M⁽⁰⁾ = exp(H̃_res), M⁽ᵗ⁾ = T_r(T_c(M⁽ᵗ⁻¹⁾)),
    x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import models
from models.layers.hyper_connections import HyperConnection
from models.layers.mhc import ManifoldHyperConnection, SinkhornKnopp, sinkhorn
from models.llama import HCLLMConfig, LlamaConfig

SHAPE = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
MOE = {"num_experts": 4, "top_k": 2}


def reference_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Eq. 9 as written: exp, then `iters` times a column normalisation followed by a row one."""
    m = logits.exp()
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)  # T_c
        m = m / m.sum(-1, keepdim=True)  # T_r
    return m


def reference_width(conn: ManifoldHyperConnection, streams: torch.Tensor):
    """Eq. 7–8 and the width half of Eq. 3: (H_pre x, H_res x, H_post, H_res)."""
    n, iters = conn.rate, conn.sinkhorn_iters
    x = streams.float()
    b = conn.bias.float()
    b_pre, b_post, b_res = b[:n], b[n : 2 * n], b[2 * n :].view(n, n)
    if conn.dynamic:
        vec = x.flatten(-2)  # vec(x) ∈ R^{nC}
        normed = vec * torch.rsqrt(vec.square().mean(-1, keepdim=True) + conn.eps)
        proj = normed @ conn.phi.float().t()  # x′ [φ_pre | φ_post | φ_res]
        a_pre, a_post, a_res = conn.alpha.float()
        pre = torch.sigmoid(a_pre * proj[..., :n] + b_pre)
        post = 2 * torch.sigmoid(a_post * proj[..., n : 2 * n] + b_post)
        res = reference_sinkhorn(a_res * proj[..., 2 * n :].unflatten(-1, (n, n)) + b_res, iters)
    else:
        pre, post, res = torch.sigmoid(b_pre), 2 * torch.sigmoid(b_post), reference_sinkhorn(b_res, iters)
    h0 = torch.einsum("...i,...id->...d", pre, x)
    carried = torch.einsum("...ij,...jd->...id", res, x)
    return h0.to(streams.dtype), carried, post, res


def reference_depth(out: torch.Tensor, carried: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return (carried + post.unsqueeze(-1) * out.float().unsqueeze(-2)).to(out.dtype)


def mhc(**kw) -> HCLLMConfig:
    return HCLLMConfig(**{**SHAPE, "rate": 4, "connection": "mhc", **kw})


def perturbed_connection(dynamic: bool, d: int = 16, scale: float = 0.3) -> ManifoldHyperConnection:
    torch.manual_seed(0)
    conn = ManifoldHyperConnection(d, rate=4, index=1, dynamic=dynamic)
    with torch.no_grad():  # away from the initialisation, where the dynamic part is zero
        for p in conn.parameters():
            p.add_(torch.randn_like(p) * scale)
        if dynamic:
            conn.alpha.abs_()
            conn.phi.mul_(3)  # so that the dynamic logits are of order one
    return conn


def assert_doubly_stochastic(h: torch.Tensor, tol: float = 1e-5) -> None:
    assert torch.isfinite(h).all() and (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(h.shape[:-1], dtype=h.dtype), rtol=0, atol=tol)
    torch.testing.assert_close(h.sum(-2), torch.ones(h.shape[:-1], dtype=h.dtype), rtol=0, atol=tol)


# ---- the projection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, iters", [(0.3, 20), (1.0, 100), (1.0, 20)])
def test_sinkhorn_projection_is_doubly_stochastic(scale, iters):
    """Rows and columns sum to 1 within 1e-5, entries ≥ 0. For logits of std 1 the paper's t_max = 20
    is enough for almost every matrix (the few slow ones are held to 1e-2 here; the column error is
    what `hc/res_col_error_mean` reports)."""
    torch.manual_seed(0)
    logits = torch.randn(4096, 4, 4) * scale
    h = sinkhorn(logits, iters)
    torch.testing.assert_close(h, reference_sinkhorn(logits.double(), iters).float(), rtol=1e-5, atol=1e-6)
    if (scale, iters) == (1.0, 20):
        assert_doubly_stochastic(h, tol=1e-2)
        col_error = (h.sum(-2) - 1).abs().amax(-1)
        assert (col_error <= 1e-5).float().mean() > 0.97
    else:
        assert_doubly_stochastic(h)


@pytest.mark.parametrize("scale", [10.0, 100.0, 1e4])
def test_sinkhorn_survives_large_logits(scale):
    """exp of the raw logits would overflow (e^100 > fp32's max): no NaN/inf, entries in [0, 1], rows
    exact (the last step is T_r); the columns converge, but slowly: near-0/1 entries make Sinkhorn's
    convergence sublinear (std 10: column errors ~1e-3 after even 2000 iterations)."""
    torch.manual_seed(0)
    logits = torch.randn(1024, 4, 4) * scale
    h = sinkhorn(logits, 20)
    assert torch.isfinite(h).all() and (h >= 0).all() and (h <= 1 + 1e-6).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(1024, 4), rtol=0, atol=1e-5)
    col_error = lambda m: (m.sum(-2) - 1).abs().sum(-1)  # noqa: E731
    assert (col_error(sinkhorn(logits, 200)) <= col_error(h) + 1e-5).all()  # Sinkhorn's L1 error never grows
    assert torch.isfinite(sinkhorn(torch.full((2, 4, 4), 1e30), 20)).all()


def test_sinkhorn_backward_is_the_adjoint_of_its_iterations():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: SinkhornKnopp.apply(x, 7), (logits,))
    grad = torch.randn(3, 4, 4, dtype=torch.float64)
    want, = torch.autograd.grad(reference_sinkhorn(logits, 20), logits, grad)
    got, = torch.autograd.grad(SinkhornKnopp.apply(logits, 20), logits, grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_composite_mapping_stays_bounded_across_32_layers():
    """The product of 32 doubly stochastic H_res is doubly stochastic (the paper's §3: the set is closed
    under multiplication), so its gain stays ~1; unconstrained HC matrices near I compound."""
    torch.manual_seed(0)
    tokens, n = 256, 4
    composite_m, composite_hc = torch.eye(n).expand(tokens, n, n), torch.eye(n).expand(tokens, n, n)
    for _ in range(32):
        h_res = sinkhorn(torch.randn(tokens, n, n), 20)
        composite_m = h_res @ composite_m
        composite_hc = (torch.eye(n) + 0.3 * torch.randn(tokens, n, n)) @ composite_hc
    gain = lambda c, dim: c.sum(dim).abs().amax(-1)  # noqa: E731  Amax gain: max |row sum| / |column sum|
    assert gain(composite_m, -1).max() <= 1 + 1e-5 and gain(composite_m, -2).max() <= 1 + 1e-2
    assert (composite_m >= 0).all()
    assert gain(composite_hc, -1).median() > 10 and gain(composite_hc, -2).median() > 10


# ---- the connection against the equations -------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_width_equals_the_reference_in_fp32(dynamic):
    """ManifoldWidth (one autograd Function, Sinkhorn's adjoint by hand) against Eq. 7–9 with autograd:
    forward and the gradients of the streams, φ, α, b and a sub-layer, through both outputs and H_post."""
    conn = perturbed_connection(dynamic)
    sublayer = torch.nn.Linear(16, 16)
    streams = torch.randn(2, 5, 4, 16, requires_grad=True)
    inputs = [streams, *conn.parameters(), *sublayer.parameters()]
    results = []
    for width, depth in ((conn, HyperConnection.depth), (lambda s: reference_width(conn, s)[:3], reference_depth)):
        h0, carried, post = width(streams)
        out = depth(torch.tanh(sublayer(h0)), carried, post)
        loss = (out * torch.linspace(-1, 1, 16)).square().sum() + post.sin().sum()
        results.append((h0, carried, post, torch.autograd.grad(loss, inputs)))
    *got, got_grads = results[0]
    *want, want_grads = results[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(got_grads, want_grads, ["streams", *dict(conn.named_parameters()), "w", "b"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    if dynamic:  # the check is not comparing near-constants: the mapping varies by token
        h_res = reference_width(conn, streams)[3]
        assert (h_res - h_res.mean((0, 1))).abs().max() > 1e-2


def test_mixing_runs_in_fp32_under_bf16_and_autocast():
    conn = perturbed_connection(True)
    streams = torch.randn(2, 5, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h0, carried, post = conn(streams)
    _, ref_carried, ref_post, _ = reference_width(conn, streams)
    assert carried.dtype == post.dtype == torch.float32
    torch.testing.assert_close(carried, ref_carried, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, ref_post, rtol=1e-5, atol=1e-5)
    conn = conn.to(torch.bfloat16)
    h0, carried, post = conn(streams.to(torch.bfloat16))
    assert h0.dtype == torch.bfloat16 and carried.dtype == torch.float32 and post.dtype == torch.float32
    assert HyperConnection.depth(h0, carried, post).dtype == torch.bfloat16


def test_initial_mappings():
    """H_pre sums to 1 (it reads mostly stream k mod n), H_post = 1, H_res doubly stochastic near I,
    φ = 0 and α = 0.01 (the paper's Table 5)."""
    model = models.build(mhc())
    for k, conn in enumerate(model.hyper_connections):
        _, _, post, res = reference_width(conn, torch.randn(3, 4, 32))
        pre = torch.sigmoid(conn.bias[:4])
        torch.testing.assert_close(pre.sum(), torch.tensor(1.0))
        assert pre.argmax() == k % 4
        torch.testing.assert_close(post, torch.ones(3, 4))
        assert_doubly_stochastic(res)
        assert (res.diagonal(dim1=-2, dim2=-1) > 0.85).all()
        assert conn.phi.abs().sum() == 0 and torch.equal(conn.alpha, torch.full((3,), 0.01))


# ---- the network -----------------------------------------------------------------------------------------


def pair(dynamic: bool, **kw):
    torch.manual_seed(0)
    base = models.build(LlamaConfig(**SHAPE, **kw))
    net = models.build(mhc(dynamic=dynamic, **kw))
    result = net.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all("hc_" in k for k in result.missing_keys)
    return base, net


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_at_initialisation_mhc_is_the_pre_norm_residual_network(dynamic, moe):
    base, net = pair(dynamic=dynamic, moe=moe)
    net.norm.eps = base.norm.eps * 16  # the 4 equal streams sum to 4x; the final RMSNorm removes the 4
    ids = torch.randint(0, 97, (2, 24))
    torch.testing.assert_close(net(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_every_parameter_gets_a_gradient_after_a_few_steps(moe):
    """At step 0 α and b_res get none, by the equations (x′φ = 0; with equal streams ∂H_res is constant
    along each row, which Sinkhorn's row normalisation removes); after a few steps every parameter does."""
    torch.manual_seed(0)
    model = models.build(mhc(moe=moe))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 16))
        out = model(ids, labels=ids)
        if moe:
            assert set(out.aux_losses) == {"load_balance", "router_z"}
        out.loss.backward()
        losses.append(out.loss.item())
        if len(losses) < 3:
            opt.step()
            opt.zero_grad()
    assert all(math.isfinite(x) for x in losses)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for conn in model.hyper_connections:  # the streams now differ: H_res moved off its initial value
        assert conn.bias.grad[8:].abs().sum() > 0


def test_static_biases_are_not_decayed_and_phi_is():
    model = models.build(mhc())
    decay, no_decay = (set(map(id, g["params"])) for g in model.param_groups(0.1))
    for name, p in model.named_parameters():
        if name.endswith(("hc_attn.bias", "hc_mlp.bias", ".alpha")):
            assert id(p) in no_decay, name
        if name.endswith(".phi"):
            assert id(p) in decay, name


def test_flops_per_token_matches_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build(mhc(n_layers=2))
    ids = torch.randint(0, 97, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (2 * 16)
    assert model.flops_per_token(16) - 12 * 2 * 32 * 16 == pytest.approx(counted, rel=1e-6)


# ---- statistics --------------------------------------------------------------------------------------------


def recorded_streams(model) -> list[torch.Tensor]:
    seen = []
    for conn in model.hyper_connections:
        def width(streams, _original=conn.width):
            seen.append(streams.detach())
            return _original(streams)
        conn.width = width
    return seen


def test_statistics_report_the_constraint_and_the_composite_gain():
    torch.manual_seed(0)
    model = models.build(mhc())
    with torch.no_grad():
        for conn in model.hyper_connections:
            conn.phi.normal_(0, 1.0)
            conn.alpha.fill_(0.1)  # dynamic logits of order one
    seen = recorded_streams(model)
    ids = torch.randint(0, 97, (2, 24))
    model(ids, labels=ids).loss.backward()
    stats = model.step_statistics()
    with torch.no_grad():
        h_res = [reference_width(c, s)[3].reshape(-1, 4, 4) for c, s in zip(model.hyper_connections, seen, strict=True)]
    assert len(h_res) == 6
    assert stats["hc/res_row_error_mean"] < 1e-6  # the last Sinkhorn step is T_r: rows are exact
    col = torch.stack([(h.sum(-2) - 1).abs().amax(-1).mean() for h in h_res]).mean()
    torch.testing.assert_close(stats["hc/res_col_error_mean"], col, rtol=1e-3, atol=1e-7)
    assert 0 < stats["hc/res_col_error_mean"] < 1e-2
    # The composite from connection k to the last: C_k = H_res⁽⁵⁾ ⋯ H_res⁽ᵏ⁾, per token.
    forward, backward = [], []
    for k in range(6):
        c = h_res[k]
        for h in h_res[k + 1 :]:
            c = h @ c
        forward.append(c.sum(-1).abs().amax(-1).mean())
        backward.append(c.sum(-2).abs().amax(-1).mean())
    torch.testing.assert_close(stats["hc/composite_gain_forward_per_connection_mean"], torch.stack(forward),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["hc/composite_gain_backward_per_connection_mean"], torch.stack(backward),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["hc/composite_gain_forward_mean"], forward[0])
    assert abs(stats["hc/composite_gain_backward_mean"] - 1) < 0.05
    assert stats["hc/dynamic_alpha_abs_mean"] > 1e-3  # the dynamic part is measured against the biases'


def test_the_models_command_lists_the_mhc_config(capsys):
    from launcher.cli import main
    from launcher.model_table import CONFIGS
    from trainer.spec import load_spec

    assert main(["models", "--json"]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["hc_llm_mhc_tiny.yaml"]
    spec = load_spec(CONFIGS / "hc_llm_mhc_tiny.yaml", ["data.tokenizer=bytes", f"model.vocab_size={row['vocab_size']}"])
    assert spec.model.connection == "mhc" and spec.model.sinkhorn_iters == 20
    with torch.device("meta"):
        model = models.build(spec.model)
    assert row["params"] == model.num_parameters() == row["active_params"]
    assert row["flops_per_token"] == model.flops_per_token(spec.data.seq_len)
    # The same decoder as DHC×4's; per connection, mHC: φ (n²+2n)·nC, b n²+2n, α 3; DHC: the norm's C,
    # [W_m | W_r | W_β] C·(n+2), [A_m | A_r] n(n+1), B n, s_α, s_β.
    mhc_conn, dhc_conn = 24 * 4 * 256 + 24 + 3, 256 + 256 * 6 + 4 * 5 + 4 + 2
    assert row["params"] - rows["hc_llm_tiny.yaml"]["params"] == 2 * 4 * (mhc_conn - dhc_conn)


def test_remote_code_export_gives_the_same_logits(tmp_path):
    """What `zeroray export` writes for hc_llm (no native transformers class): the wrapper's weights and
    the remote-code files; transformers loads it back (trust_remote_code) into the same function."""
    from transformers import AutoModelForCausalLM

    from launcher.export import REMOTE_CODE
    from models.hf import ZerorayConfig, wrapper_for

    cfg = mhc()
    model = perturbed_model(cfg)
    wrapper, auto = wrapper_for(cfg.name)
    hf = wrapper(ZerorayConfig(zeroray_model=cfg.model_dump(mode="json"), auto_map={
        "AutoConfig": "configuration_zeroray.ZerorayConfig", auto.__name__: f"modeling_zeroray.{wrapper.__name__}"}))
    result = hf.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(model.tied_parameters())
    hf.save_pretrained(tmp_path)
    for name, text in REMOTE_CODE.items():
        (tmp_path / name).write_text(text)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.model.config.connection == "mhc"
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(ids).logits)


def perturbed_model(cfg):
    torch.manual_seed(0)
    model = models.build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hc_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


# ---- through the launcher (Ray, DeepSpeed) ------------------------------------------------------------------


@pytest.mark.slow
def test_mhc_trains_under_zero3_and_exports(ray_local, tiny_config, tmp_path):
    """2 workers, ZeRO-3 (every connection's φ, α, b partitioned and gathered for its call), the mHC
    statistics in the metrics, text samples of two prompts at each evaluation (every rank decodes them
    with the KV cache: ZeRO-3 gathers the weights of each forward), and the remote-code export giving the
    trained model's logits."""
    from tests.export_check import check_export
    from tests.test_train_families import falls, train

    recs, result = train(tiny_config, [
        "model={name: hc_llm, connection: mhc, rate: 4, d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 64}",
        "trainer.zero_stage=3", "trainer.max_steps=16", "trainer.checkpoint_every=0", "output.name=mhc-zero3",
        'eval.sample_prompts=["From: ", "def "]', "eval.sample_tokens=6", "eval.every=8",
    ])
    assert falls(recs, 0.3), [r["loss"] for r in recs]
    sampled = {r["step"]: r["eval/samples"] for r in recs if "eval/samples" in r}
    assert sorted(sampled) == [8, 16], sorted(sampled)
    for samples in sampled.values():
        assert [s["prompt"] for s in samples] == ["From: ", "def "] and all(isinstance(s["text"], str) for s in samples)
    for r in recs:
        assert r["hc/res_row_error_mean"] < 1e-5 and r["hc/res_col_error_mean"] < 1e-2
        assert len(r["hc/composite_gain_backward_per_connection_mean"]) == 4
    check_export(result.run.root, tmp_path / "hf", last_loss=recs[-1]["loss"])
