"""WideNet: shared attention + MoE across depths, per-layer norms, aux summed over uses, FLOPs per use."""

from __future__ import annotations

import pytest
import torch

import models
from models.widenet import WideNetConfig, WideNetDecoderConfig

V = 101


def tiny(n_layers=3, cls=WideNetConfig, **kw):
    return cls(vocab_size=V, d_model=32, n_heads=4, n_layers=n_layers, max_seq_len=64, **kw)


def test_weights_are_shared_and_norms_are_per_layer():
    shallow, deep = models.build(tiny(2)), models.build(tiny(6))
    per_layer_norms = 2 * 2 * 32  # two LayerNorms (weight + bias) per layer
    assert deep.num_parameters() - shallow.num_parameters() == 4 * per_layer_norms
    assert len(deep.attn_norms) == len(deep.moe_norms) == 6
    cfg = deep.config.moe
    assert (cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.aux_loss_coef) == (4, 2, 1.2, 0.01)
    per_expert = 3 * 32 * deep.config.expert_hidden
    assert deep.num_parameters() - deep.num_active_parameters() == 2 * per_expert


def test_aux_loss_is_summed_over_every_use_of_the_shared_moe():
    torch.manual_seed(0)
    model = models.build(tiny(4))
    ids = torch.randint(0, V, (2, 16))
    out = model(ids, labels=ids)
    assert len(model.moe.calls) == 4
    per_use = [c.aux_losses["load_balance"] for c in model.moe.calls]
    torch.testing.assert_close(out.aux_losses["load_balance"], torch.stack(per_use).sum())
    assert out.aux_losses["load_balance"] > 3 * 0.01  # four uses, each ≥ α at best balance
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    torch.testing.assert_close(out.loss, ce + sum(out.aux_losses.values()))
    assert model.step_statistics()["moe/tokens_per_expert"].sum().item() == 4 * 2 * 16 * 2 - round(
        4 * 2 * 16 * 2 * model.step_statistics()["moe/dropped_fraction"].item())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = models.build(tiny(3))
    ids = torch.randint(0, V, (2, 16))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("cls, causal", [(WideNetConfig, False), (WideNetDecoderConfig, True)])
def test_encoder_sees_both_ways_and_decoder_only_the_past(cls, causal):
    torch.manual_seed(0)
    model = models.build(tiny(2, cls)).eval()
    ids = torch.randint(0, V, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V
    same_past = torch.allclose(model(ids).logits[0, :-1], model(changed).logits[0, :-1])
    assert same_past == causal


def forward_backward_saving(model, ids) -> int:
    """Runs forward + backward; returns how many tensors autograd kept for the backward."""
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return len(packed)


def test_activation_checkpointing_gives_the_same_gradients_and_counts_each_use_once():
    torch.manual_seed(0)
    plain = models.build(tiny(3))
    recomputed = models.build(tiny(3))
    recomputed.load_state_dict(plain.state_dict())
    recomputed.enable_activation_checkpointing()
    ids = torch.randint(0, V, (2, 16))
    saved = [forward_backward_saving(m, ids) for m in (plain, recomputed)]
    assert saved[1] < saved[0] / 2, saved  # the layers' activations were not kept
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert torch.equal(plain.step_statistics()["moe/tokens_per_expert"],
                       recomputed.step_statistics()["moe/tokens_per_expert"])


def test_flops_per_token_counts_every_use():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = tiny(3, moe={"num_experts": 4, "top_k": 2, "capacity_factor": 0.0, "z_loss_coef": 0.0})
    model = models.build(cfg)
    batch, seq = 2, 16
    ids = torch.randint(0, V, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (batch * seq)
    attention = 12 * cfg.n_layers * cfg.d_model * seq  # CPU SDPA is not counted by FlopCounterMode
    assert model.flops_per_token(seq) - attention == pytest.approx(counted, rel=1e-6)
    one_layer = models.build(tiny(1, moe=cfg.moe))
    assert model.flops_per_token(seq) > 2.5 * (one_layer.flops_per_token(seq) - 6 * V * 32)
