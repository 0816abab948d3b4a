"""The baseline Llama-style decoder: shapes, causality, parameter count, FLOPs, bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.llama import HCLLMConfig, LlamaConfig


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return models.build(LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **kw))


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    model = tiny()
    ids = torch.randint(0, 97, (3, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 16, 97)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, :12], b[0, :12])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_parameter_count_matches_the_architecture(tie, kv_heads):
    cfg = LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, tie_embeddings=tie)
    model = models.build(cfg)
    d, v, kv = 32, 97, (kv_heads or 4) * 8
    hidden = cfg.mlp_hidden
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * hidden + 2 * d  # q,o + k,v + swiglu + 2 norms
    expected = v * d * (1 if tie else 2) + 2 * per_layer + d
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - v * d


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4),
        LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, tie_embeddings=False, n_kv_heads=2),
        LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, moe={"num_experts": 4, "top_k": 2}),
        HCLLMConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, rate=4, dynamic=True),
    ],
    ids=["llama", "llama-untied-gqa", "llama-moe", "hc_llm-dhc4"],
)
def test_flops_per_token_matches_counted_matmuls(config, monkeypatch):
    """PyTorch's FlopCounterMode counts every matmul, einsum and SDPA of a real forward+backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.layers import moe

    # It counts torch._grouped_mm as if every row passed through every expert: count the per-expert loop
    # the grouped matmuls replace (the same arithmetic) instead.
    monkeypatch.setitem(moe._GROUPED_MM, (torch.float32, "cpu"), False)
    torch.manual_seed(0)
    model = models.build(config)
    batch, seq = 2, 16
    ids = torch.randint(0, 97, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # The CPU SDPA kernel has no FLOP formula in the counter: attention scores are the analytic
    # 12·L·d·seq term (QKᵀ and AV, forward and backward, not halved for causality).
    assert not any("attention" in op for op in counts), counts
    counted = sum(counts.values()) / (batch * seq)
    attention = 12 * config.n_layers * config.d_model * seq
    assert model.flops_per_token(seq) - attention == pytest.approx(counted, rel=1e-6)


def test_bf16_forward_is_close_to_fp32():
    model = tiny()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
        low = model.to(torch.bfloat16)(ids, labels=ids).loss
    assert low.dtype == torch.float32  # the loss is computed in fp32
    assert abs(ref.item() - low.item()) < 0.05


def test_sequence_longer_than_max_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_weight_decay_groups_cover_each_parameter_once():
    model = tiny()
    groups = model.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
