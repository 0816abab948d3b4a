"""The mixture-of-experts layer: routing, capacity, losses, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers.moe import MoEConfig, MoELayer


def layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(d_model=16, hidden=24, cfg=MoEConfig(**{"num_experts": 4, "top_k": 2, **kw}))


def reference(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the sort-and-group dispatch must reproduce (dropless)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = F.linear(tokens.float(), moe.router.weight.float()).softmax(-1)
    gate, expert = probs.topk(moe.cfg.top_k, dim=-1)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for g, e in zip(gate[t], expert[t], strict=True):
            h = F.silu(tokens[t] @ moe.w_gate[e]) * (tokens[t] @ moe.w_up[e])
            out[t] += g * (h @ moe.w_down[e])
    return out.reshape(x.shape)


def test_dropless_dispatch_equals_the_per_token_reference():
    moe = layer()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-5, atol=1e-6)
    assert moe.calls[-1].dropped_fraction.item() == 0.0
    assert moe.calls[-1].tokens_per_expert.sum().item() == 3 * 7 * 2


def test_capacity_drops_second_choices_first():
    moe = layer(capacity_factor=0.25)
    x = torch.randn(4, 8, 16)
    y = moe(x)
    t, k = 32, 2
    capacity = moe.capacity(t)
    assert capacity == 4  # ceil(0.25 · 32 · 2 / 4)
    choices = F.linear(x.reshape(-1, 16), moe.router.weight).softmax(-1).topk(k, dim=-1).indices
    first = torch.bincount(choices[:, 0], minlength=4).clamp(max=capacity)
    second = torch.minimum(torch.bincount(choices[:, 1], minlength=4), capacity - first)
    assert torch.equal(moe.calls[-1].tokens_per_expert, first + second)  # first choices claimed the room first
    assert moe.calls[-1].dropped_fraction.item() == pytest.approx(1 - (first + second).sum().item() / (t * k))
    assert moe.calls[-1].dropped_fraction.item() > 0
    # A token whose choices were all dropped passes nothing through the layer.
    kept_tokens = set()
    for i in range(4):
        for col in (0, 1):
            picked = (choices[:, col] == i).nonzero().flatten().tolist()
            room = capacity if col == 0 else capacity - first[i].item()
            kept_tokens.update(picked[: max(room, 0)])
    dropped = [tok for tok in range(t) if tok not in kept_tokens]
    assert dropped and all(y.reshape(-1, 16)[tok].abs().sum() == 0 for tok in dropped)


def test_losses_follow_their_formulas():
    moe = layer(aux_loss_coef=0.01, z_loss_coef=1e-3)
    x = torch.randn(2, 10, 16)
    moe(x)
    logits = F.linear(x.reshape(-1, 16), moe.router.weight)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices.flatten()
    f = torch.bincount(chosen, minlength=4).float() / chosen.numel()
    expected_lb = 0.01 * 4 * (f * probs.mean(0)).sum()
    expected_z = 1e-3 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(moe.calls[-1].aux_losses["load_balance"], expected_lb)
    torch.testing.assert_close(moe.calls[-1].aux_losses["router_z"], expected_z)
    # Perfectly uniform routing gives a load-balancing loss of exactly α.
    uniform = torch.full((4,), 0.25)
    assert (0.01 * 4 * (uniform * uniform).sum()).item() == pytest.approx(0.01)


def test_every_expert_and_the_router_get_gradients():
    moe = layer()
    x = torch.randn(4, 16, 16, requires_grad=True)
    y = moe(x)
    (y.pow(2).mean() + sum(moe.calls[-1].aux_losses.values())).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_router_math_stays_fp32_under_bf16():
    moe = layer().to(torch.bfloat16)
    y = moe(torch.randn(2, 8, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in moe.calls[-1].aux_losses.values())


def test_top_k_larger_than_experts_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)


def test_a_layer_called_several_times_sums_its_losses_and_load():
    """A shared layer (WideNet) is called once per depth: each use adds its losses and its tokens."""
    from models.layers.moe import collect_routing

    torch.manual_seed(0)
    moe = MoELayer(16, 24, MoEConfig(num_experts=4, top_k=2))
    xs = [torch.randn(2, 5, 16) for _ in range(3)]
    singles = []
    for x in xs:
        moe.reset()
        moe(x)
        singles.append(collect_routing([moe]))
    moe.reset()
    for x in xs:
        moe(x)
    aux, stats = collect_routing([moe])
    for key in ("load_balance", "router_z"):
        torch.testing.assert_close(aux[key], sum(s[0][key] for s in singles))
    assert torch.equal(stats["moe/tokens_per_expert"], sum(s[1]["moe/tokens_per_expert"] for s in singles))
    assert stats["moe/tokens_per_expert"].sum().item() == 3 * 2 * 5 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_expert_matmuls_equal_the_reference_loop(dtype):
    """torch._grouped_mm (no host sync, one kernel per weight) against the per-expert loop it replaces,
    forward and gradients; an expert that receives no rows included."""
    from models.layers.moe import _grouped_mm_works, experts_swiglu, experts_swiglu_reference

    if not _grouped_mm_works(dtype, torch.device("cpu")):
        pytest.skip("this torch has no CPU grouped matmul")
    torch.manual_seed(0)
    e, d, h = 4, 16, 32
    counts = torch.tensor([5, 0, 9, 2])
    rows = torch.randn(int(counts.sum()), d, dtype=dtype, requires_grad=True)
    weights = [torch.randn(e, d, h, dtype=dtype, requires_grad=True), torch.randn(e, d, h, dtype=dtype, requires_grad=True),
               torch.randn(e, h, d, dtype=dtype, requires_grad=True)]
    outs, grads = [], []
    for fn in (experts_swiglu, experts_swiglu_reference):
        out = fn(rows, counts, *weights)
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append([t.grad.float().clone() for t in (rows, *weights)])
        for t in (rows, *weights):
            t.grad = None
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **tol)
