"""WideNet: shared attention + MoE across depths, per-layer norms, aux summed over uses, FLOPs per use;
its baselines by option: unshared layers (`share: false`) and a dense FFN (`moe: null`)."""

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
    per_expert = 3 * 32 * deep.config.ffn_hidden
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


# The paper's comparison: WideNet, an unshared MoE Transformer, and dense Transformers (ALBERT shared, plain not).
VARIANTS = {"widenet": {}, "unshared-moe": {"share": False}, "dense": {"share": False, "moe": None},
            "albert": {"moe": None}}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    model = models.build(tiny(3, **variant))
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


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_activation_checkpointing_gives_the_same_gradients_and_counts_each_use_once(variant):
    torch.manual_seed(0)
    plain = models.build(tiny(3, **variant))
    recomputed = models.build(tiny(3, **variant))
    recomputed.load_state_dict(plain.state_dict())
    recomputed.enable_activation_checkpointing()
    ids = torch.randint(0, V, (2, 16))
    saved = [forward_backward_saving(m, ids) for m in (plain, recomputed)]
    assert saved[1] < saved[0] / 2, saved  # the layers' activations were not kept
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    if variant.get("moe", "paper") is not None:
        assert torch.equal(plain.step_statistics()["moe/tokens_per_expert"],
                           recomputed.step_statistics()["moe/tokens_per_expert"])


DROPLESS = {"num_experts": 4, "top_k": 2, "capacity_factor": 0.0, "z_loss_coef": 0.0}


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("moe", [DROPLESS, None], ids=["moe", "dense"])
def test_flops_per_token_counts_every_use(share, moe, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from models.layers import moe as moe_layer

    # FlopCounterMode counts torch._grouped_mm as if every row passed through every expert: count the
    # per-expert loop the grouped matmuls replace (the same arithmetic).
    monkeypatch.setitem(moe_layer._GROUPED_MM, (torch.float32, "cpu"), False)
    torch.manual_seed(0)
    cfg = tiny(3, moe=moe, share=share)
    model = models.build(cfg)
    batch, seq = 2, 16
    ids = torch.randint(0, V, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (batch * seq)
    attention = 12 * cfg.n_layers * cfg.d_model * seq  # CPU SDPA is not counted by FlopCounterMode
    assert model.flops_per_token(seq) - attention == pytest.approx(counted, rel=1e-6)
    one_layer = models.build(tiny(1, moe=cfg.moe, share=share))
    assert model.flops_per_token(seq) > 2.5 * (one_layer.flops_per_token(seq) - 6 * V * 32)


def test_unshared_layers_each_have_their_own_weights_and_moe():
    """share: false — L attentions and L MoE layers, each called once; the aux loss sums the L layers."""
    torch.manual_seed(0)
    shared, unshared = models.build(tiny(4)), models.build(tiny(4, share=False))
    attention = 4 * 32 * 32
    moe = 32 * 4 + 4 * 3 * 32 * shared.config.ffn_hidden  # router + 4 experts
    assert unshared.num_parameters() - shared.num_parameters() == 3 * (attention + moe)
    assert len(unshared.moe_layers) == 4 and len({id(m) for m in unshared.attn}) == 4
    inactive = 2 * 3 * 32 * shared.config.ffn_hidden  # two of four experts, per layer
    assert unshared.num_parameters() - unshared.num_active_parameters() == 4 * inactive
    ids = torch.randint(0, V, (2, 16))
    out = unshared(ids, labels=ids)
    assert [len(m.calls) for m in unshared.moe_layers] == [1, 1, 1, 1]
    per_layer = [m.calls[0].aux_losses["load_balance"] for m in unshared.moe_layers]
    torch.testing.assert_close(out.aux_losses["load_balance"], torch.stack(per_layer).sum())


def test_dense_ffn_is_one_expert_and_has_no_routing():
    """moe: null — one SwiGLU FFN of an expert's size (8/3·d rounded up to mlp_multiple_of), no aux
    losses, every parameter active."""
    torch.manual_seed(0)
    cfg = tiny(3, share=False, moe=None)
    dense, moe = models.build(cfg), models.build(tiny(3, share=False))
    assert cfg.ffn_hidden == 128  # 8/3 · 32 = 85 → 128
    assert dense.mlp[0].gate_proj.weight.shape == moe.moe[0].w_gate.shape[1:][::-1]
    assert dense.num_parameters() == dense.num_active_parameters()
    assert moe.num_parameters() - dense.num_parameters() == 3 * (32 * 4 + 3 * 3 * 32 * 128)  # router + 3 more experts
    ids = torch.randint(0, V, (2, 16))
    out = dense(ids, labels=ids)
    assert out.aux_losses is None and dense.step_statistics() == {}
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten()))


def test_baselines_come_from_overrides_and_expert_parallelism_needs_the_moe(tiny_config):
    from trainer.errors import SpecError
    from trainer.spec import load_spec

    base = ["model={name: widenet, d_model: 64, n_heads: 4, max_seq_len: 64}", "data.objective={kind: mlm}"]
    spec = load_spec(tiny_config, [*base, "model.share=false", "model.moe=null"])
    assert spec.model.share is False and spec.model.moe is None
    with pytest.raises(SpecError, match="has no MoE layers"):
        load_spec(tiny_config, [*base, "model.moe=null", "trainer.expert_parallel=2"])


@pytest.mark.parametrize("variant", [VARIANTS["dense"], VARIANTS["unshared-moe"]], ids=["dense", "unshared-moe"])
def test_baselines_export_to_transformers_with_the_same_logits(variant, tmp_path):
    """What `zeroray export` does with a checkpoint's weights: the wrapper saves them, transformers
    loads them back into the same module (tied embedding, per-layer lists)."""
    from transformers import AutoModelForMaskedLM

    from models.hf import ZerorayConfig, wrapper_for

    torch.manual_seed(0)
    cfg = tiny(2, **variant)
    model = models.build(cfg).eval()
    wrapper, _ = wrapper_for(cfg.name)
    hf = wrapper(ZerorayConfig(zeroray_model=cfg.model_dump(mode="json")))
    result = hf.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(model.tied_parameters())
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(ids).logits)
