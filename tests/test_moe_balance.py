"""MoE balancing without the loss (DeepSeek-V3's expert bias, arXiv 2408.15664), the sequence-level
balance loss, shared experts (DeepSeekMoE), and the per-layer load statistics.

Fast tests check the equations on one layer or a tiny model. The slow ones run the real trainer under
torchrun with 2 ranks (gloo), ZeRO-2 and -3 and expert parallelism, and compare what the runs wrote:
losses of a run resumed from its middle checkpoint against the uninterrupted run, the bias of every
rank after every step, the bias in the checkpoint and in the export.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers.moe import MoEConfig, MoELayer, collect_routing, end_step, load_statistics
from models.llama import LlamaConfig
from models.widenet import WideNetConfig
from tests.conftest import metrics_records, torchrun_module, write_config
from trainer.safe_load import load_file


def layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(d_model=16, hidden=24, cfg=MoEConfig(**{"num_experts": 4, "top_k": 2, **kw}))


def reference(moe: MoELayer, x: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Token by token: the given experts, weighted by their *unbiased* router probabilities."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = F.linear(tokens.float(), moe.router.weight.float()).softmax(-1)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for e in selection[t]:
            h = F.silu(tokens[t] @ moe.w_gate[e]) * (tokens[t] @ moe.w_up[e])
            out[t] = out[t] + probs[t, e] * (h @ moe.w_down[e])
    return out.reshape(x.shape)


def train_forward(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """What a model does around its MoE layers in one training forward."""
    moe.reset()
    y = moe(x)
    collect_routing([moe])
    return y


# ---- the config ------------------------------------------------------------------------------


def test_config_validates_and_round_trips():
    assert MoEConfig(balance="bias").bias_update_rate == 1e-3
    with pytest.raises(ValueError, match="aux_loss_coef is 0; use balance: bias"):
        MoEConfig(balance="both", aux_loss_coef=0)
    with pytest.raises(ValueError, match="balance"):
        MoEConfig(balance="loss")
    with pytest.raises(ValueError):
        MoEConfig(shared_experts=-1)
    with pytest.raises(ValueError):
        MoEConfig(balance="bias", bias_update_rate=0)
    cfg = MoEConfig(balance="both", aux_loss_coef=1e-4, aux_loss_scope="sequence", bias_update_rate=1e-2)
    assert MoEConfig(**cfg.model_dump(mode="json")) == cfg  # resolved specs are parsed again from their dump
    assert MoEConfig(**MoEConfig(balance="bias").model_dump()).uses_aux_loss is False


def test_the_bias_is_a_persistent_fp32_buffer_only_when_balancing_by_bias():
    assert "expert_bias" not in layer().state_dict()
    moe = layer(balance="bias").to(torch.bfloat16)
    assert moe.state_dict()["expert_bias"].dtype == torch.float32  # 1e-3 steps need fp32
    assert "step_load" not in moe.state_dict()  # zero between steps, when checkpoints are written
    assert not any(n.endswith("expert_bias") for n, _ in moe.named_parameters())


def test_losses_follow_the_balance_mode():
    x = torch.randn(2, 6, 16)
    for balance, keys in (("aux_loss", {"load_balance", "router_z"}), ("bias", {"router_z"}),
                          ("both", {"load_balance", "router_z"})):
        moe = layer(balance=balance)
        moe(x)
        assert set(moe.calls[-1].aux_losses) == keys, balance


def test_sequence_level_balance_loss_follows_deepseek_v3():
    """L = α Σᵢ fᵢ Pᵢ per sequence, fᵢ = E/(K·T) Σₜ 1(i ∈ topk(t)), Pᵢ = mean over the sequence's tokens
    of the router probability; averaged over sequences (eqs. 17-20 of arXiv 2412.19437)."""
    moe = layer(aux_loss_coef=0.1, aux_loss_scope="sequence")
    x = torch.randn(3, 10, 16)
    moe(x)
    e, k, s = 4, 2, 10
    expected = []
    for seq in x:
        probs = F.linear(seq, moe.router.weight).softmax(-1)
        chosen = probs.topk(k, dim=-1).indices
        f = e / (k * s) * torch.stack([(chosen == i).any(-1).float().sum() for i in range(e)])
        expected.append((f * probs.mean(0)).sum())
    torch.testing.assert_close(moe.calls[-1].aux_losses["load_balance"], 0.1 * torch.stack(expected).mean())


# ---- the bias: selection, not gradient ---------------------------------------------------------


def test_the_bias_changes_selection_but_the_weights_and_gradients_are_the_unbiased_ones():
    moe = layer(balance="bias")
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    probs = F.linear(x.reshape(-1, 16), moe.router.weight).softmax(-1)
    biased = (probs + moe.expert_bias).topk(2, dim=-1).indices
    unbiased = probs.topk(2, dim=-1).indices
    assert not torch.equal(biased.sort(-1).values, unbiased.sort(-1).values), "the bias must change some choices"

    params = [moe.router.weight, moe.w_gate, moe.w_up, moe.w_down]
    y_ours, y_ref = moe(x), reference(moe, x, biased)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    ours = torch.autograd.grad(y_ours.square().sum(), params)
    theirs = torch.autograd.grad(y_ref.square().sum(), params)
    for a, b, name in zip(ours, theirs, ("router", "w_gate", "w_up", "w_down"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not moe.expert_bias.requires_grad


def test_a_bias_that_keeps_the_selection_changes_nothing_in_the_gradient():
    """The same bias on every expert selects as no bias does: output and every gradient are equal to
    those of the layer without a bias (the z-loss included)."""
    plain, biased = layer(), layer(balance="bias")
    biased.load_state_dict({**plain.state_dict(), "expert_bias": torch.full((4,), 0.7)})
    x = torch.randn(3, 5, 16)
    results = []
    for moe in (plain, biased):
        y = moe(x)
        loss = y.square().mean() + moe.calls[-1].aux_losses["router_z"]
        results.append((y.detach(), torch.autograd.grad(loss, list(moe.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bias_update_follows_the_sign_of_the_load_error():
    moe = layer(balance="bias", bias_update_rate=0.01)
    x = torch.randn(4, 8, 16)
    train_forward(moe, x)
    train_forward(moe, x)  # two micro-batches of one step: both counted
    load = moe.step_load[0].clone()
    assert load.sum().item() == 2 * 32 * 2
    end_step([moe])
    expected = 0.01 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(moe.expert_bias, expected)
    assert moe.step_load.sum().item() == 0, "the next step counts from zero"
    assert torch.equal(moe.last_step_load[0], load)


def test_repeated_updates_balance_a_skewed_router():
    """Router weights pulled toward expert 0: nearly every token picks it (max ÷ mean load ≈ 3.9). Bias
    updates alone (router frozen, γ = 2e-3) bring max ÷ mean under 1.25 within 200 updates, and it stays
    under 1.2 after (the sign update oscillates by about γ around balance)."""
    torch.manual_seed(0)
    moe = MoELayer(16, 24, MoEConfig(num_experts=8, top_k=2, balance="bias", bias_update_rate=2e-3))
    direction = torch.randn(16)
    with torch.no_grad():
        moe.router.weight[0] += 2.0 * direction / direction.norm()
    x = torch.randn(16, 32, 16) * 0.5 + direction / direction.norm()

    ratios = []
    for _ in range(300):
        train_forward(moe, x)
        end_step([moe])
        ratios.append(load_statistics([moe])["moe/layer_0/max_load_over_mean"].item())
    assert ratios[0] > 3.0, ratios[0]  # skewed at the start: expert 0 takes most tokens
    settled = next(i for i, r in enumerate(ratios) if r < 1.25)
    assert settled < 200, settled
    assert max(ratios[settled + 20:]) < 1.2, ratios[-10:]
    assert moe.expert_bias[0] < 0 and moe.expert_bias.abs().max() > 0.1


# ---- shared experts ------------------------------------------------------------------------------


def test_shared_experts_see_every_token_even_those_dropped_by_capacity():
    moe = layer(shared_experts=2, capacity_factor=0.25)
    assert moe.shared.gate_proj.out_features == 2 * 24
    x = torch.randn(4, 8, 16)
    y = moe(x)
    assert moe.calls[-1].dropped_fraction.item() > 0
    routed_only = y - moe.shared(x)
    dropped = routed_only.reshape(-1, 16).abs().sum(-1) == 0
    assert dropped.any(), "some tokens lost all their routed experts"
    per_token = y.reshape(-1, 16)
    assert (per_token.abs().sum(-1) > 0).all(), "every token has the shared experts' output"
    # ... and the shared weights get gradient from every token, one token at a time.
    for t in range(per_token.shape[0]):
        g = torch.autograd.grad(moe(x).reshape(-1, 16)[t].sum(), moe.shared.down_proj.weight)[0]
        assert g.abs().sum() > 0, t


def test_shared_experts_count_as_active_parameters_and_flops():
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    plain = models.build(LlamaConfig(**base, moe={"num_experts": 4, "top_k": 2}))
    shared = models.build(LlamaConfig(**base, moe={"num_experts": 4, "top_k": 2, "shared_experts": 1}))
    h = plain.config.expert_hidden
    extra = 2 * 3 * 32 * h  # two layers × one SwiGLU of the expert size
    assert shared.num_active_parameters() - plain.num_active_parameters() == extra
    assert shared.flops_per_token(32) - plain.flops_per_token(32) == 6 * extra
    wbase = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
    wplain = models.build(WideNetConfig(**wbase))
    wshared = models.build(WideNetConfig(**wbase, moe={"num_experts": 4, "top_k": 2, "shared_experts": 1,
                                                      "capacity_factor": 1.2}))
    wh = wplain.config.ffn_hidden
    assert wshared.flops_per_token(32) - wplain.flops_per_token(32) == 6 * 3 * (3 * 32 * wh)  # used at 3 depths


# ---- in a model: counting, statistics, export --------------------------------------------------------


def tiny_llama(**moe) -> models.ModelFamily:
    torch.manual_seed(0)
    return models.build(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                    moe={"num_experts": 4, "top_k": 2, **moe}))


def test_load_is_counted_once_per_training_forward_and_not_in_evaluation():
    model = tiny_llama(balance="bias")
    model.enable_activation_checkpointing()  # the recomputed forward in backward must not count again
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for moe in model.moe_layers:
        assert moe.step_load[0].sum().item() == 2 * 16 * 2
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(moe.step_load[0].sum().item() == 2 * 16 * 2 for moe in model.moe_layers)


def test_per_layer_statistics_after_a_step():
    model = tiny_llama(balance="both", bias_update_rate=0.01, capacity_factor=1.0, shared_experts=1)
    ids = torch.randint(0, 64, (4, 16))
    model(input_ids=ids, labels=ids)
    assert "moe/layer_0/max_load_over_mean" not in model.step_statistics()  # no step finished yet
    model.after_optimizer_step()
    stats = model.step_statistics()
    for i in range(2):
        assert stats[f"moe/layer_{i}/max_load_over_mean"] >= 1
        assert 0 <= stats[f"moe/layer_{i}/dropped_fraction"] < 1
        # every expert moved by ±γ, unless its load was exactly the mean
        assert 0 < stats[f"moe/layer_{i}/bias_abs_mean"] <= 0.01 + 1e-9
    assert {"moe/tokens_per_expert", "moe/dropped_fraction", "moe/max_load_over_mean"} <= set(stats)
    # The trainer averages names ending in _mean / fraction over ranks (they are the same everywhere).
    assert all(k.endswith(("_mean", "fraction")) for k in stats if k.startswith("moe/layer_"))


def test_models_without_moe_take_the_step_hook_as_a_no_op():
    model = models.build(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    model.after_optimizer_step()


def test_shared_experts_export_to_qwen2_moe_exactly_and_the_bias_keeps_remote_code():
    from models.hf_native import build_native, native_class_name

    assert native_class_name(tiny_llama(balance="bias").config) is None
    assert native_class_name(tiny_llama(balance="both").config) is None
    ours = tiny_llama(shared_experts=2).eval()
    assert native_class_name(ours.config) == "Qwen2MoeForCausalLM"
    hf = build_native(ours.config, ours.state_dict())
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_expert_parallel_layer_keeps_the_bias_and_shared_experts():
    from models.layers.expert_parallel import ExpertParallelMoE, shard_experts

    model = tiny_llama(balance="bias", shared_experts=1)
    with torch.no_grad():
        model.blocks[0].mlp.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
    dense = model.blocks[0].mlp
    shard_experts(model, 2, 1)
    sharded = model.blocks[0].mlp
    assert isinstance(sharded, ExpertParallelMoE)
    assert torch.equal(sharded.expert_bias, torch.tensor([0.1, -0.1, 0.2, 0.0]))
    assert sharded.shared is dense.shared
    assert {"blocks.0.mlp.expert_bias", "blocks.0.mlp.shared.down_proj.weight"} <= set(model.state_dict())


# ---- two ranks under the real trainer --------------------------------------------------------------

MOE = ("model.moe={num_experts: 4, top_k: 2, capacity_factor: 1.0, balance: both, bias_update_rate: 0.01, "
       "aux_loss_coef: 0.001, aux_loss_scope: sequence, shared_experts: 1}")
COMMON = ["trainer.precision=fp32", "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.checkpoint_every=2",
          "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2", MOE]
RUNS = {
    "z2": ["trainer.zero_stage=2"],
    "z3": ["trainer.zero_stage=3"],
    "ep2_z2": ["trainer.zero_stage=2", "trainer.expert_parallel=2"],
}
RESUMED = "z2_resumed"  # z2 again from its step-2 checkpoint


def _record_biases(name: str, runs: Path):
    """Patch the step hook in this worker process: after each step, keep every layer's bias; written to
    runs/<name>/bias_rank<r>.pt when the run ends."""
    import torch.distributed as dist

    from models.family import ModelFamily

    original, seen = ModelFamily.after_optimizer_step, []

    def recording(self):
        original(self)
        seen.append(torch.stack([m.expert_bias.detach().clone() for m in self.moe_layers]))

    ModelFamily.after_optimizer_step = recording
    return lambda: (torch.save(torch.stack(seen), runs / name / f"bias_rank{dist.get_rank()}.pt"),
                    setattr(ModelFamily, "after_optimizer_step", original))


def _worker(config: str) -> None:
    import torch.distributed as dist

    from trainer.loop import train
    from trainer.spec import load_spec

    for name, overrides in RUNS.items():
        spec = load_spec(config, [*COMMON, *overrides, f"output.name={name}"])
        done = _record_biases(name, spec.output.run_dir.parent)
        train(spec)
        done()
    spec = load_spec(config, [*COMMON, *RUNS["z2"], f"output.name={RESUMED}"])
    if dist.get_rank() == 0:  # the run as it was at step 2: its first checkpoint and two records
        straight, resumed = spec.output.run_dir.with_name("z2"), spec.output.run_dir
        shutil.copytree(straight, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")
        (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
        records = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
        (resumed / "metrics.jsonl").write_text("\n".join(records) + "\n")
        for f in resumed.glob("bias_rank*.pt"):
            f.unlink()
    dist.barrier()
    done = _record_biases(RESUMED, spec.output.run_dir.parent)
    train(spec)
    done()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> Path:

    tmp = tmp_path_factory.mktemp("balance")
    config = write_config(tmp / "balance.yaml", small_corpus, tmp / "runs")
    torchrun_module("tests.test_moe_balance", str(config), timeout=500)
    return tmp / "runs"


def _records(runs: Path, name: str) -> list[dict]:
    return metrics_records(runs / name)


def _biases(runs: Path, name: str, rank: int) -> torch.Tensor:
    return torch.load(runs / name / f"bias_rank{rank}.pt")  # [steps, layers, experts]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RUNS, RESUMED])
def test_the_bias_is_the_same_on_every_rank_after_every_step(runs, name):
    first, second = _biases(runs, name, 0), _biases(runs, name, 1)
    assert first.shape == (2 if name == RESUMED else 4, 2, 4)
    assert torch.equal(first, second)
    assert first[-1].abs().sum() > 0, "the bias moved"
    # each step moves each expert by ±γ or 0 (loads are integers: the sign is exact)
    steps = torch.diff(torch.cat([torch.zeros(1, 2, 4), first]) if name != RESUMED else first, dim=0)
    assert torch.all(torch.isclose(steps.abs(), torch.tensor(0.01)) | (steps == 0))


@pytest.mark.slow
def test_resume_continues_identically_and_the_bias_is_in_the_checkpoint(runs):
    straight, resumed = _records(runs, "z2"), _records(runs, RESUMED)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed[2:], straight[2:], strict=True):
        for key in ("loss", "grad_norm", "aux/load_balance", "moe/tokens_per_expert", "moe/max_load_over_mean",
                    "moe/layer_1/bias_abs_mean"):
            assert ours[key] == theirs[key], (key, ours["step"])
    assert torch.equal(_biases(runs, RESUMED, 0), _biases(runs, "z2", 0)[2:])
    for step in (2, 4):
        states = load_file(runs / "z2" / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt")
        for i in range(2):
            assert torch.equal(states["module"][f"blocks.{i}.mlp.expert_bias"], _biases(runs, "z2", 0)[step - 1, i])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z3", "ep2_z2"])
def test_zero3_and_expert_parallelism_train_like_zero2(runs, name):
    reference, recs = _records(runs, "z2"), _records(runs, name)
    for ours, ref in zip(recs, reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), ours["step"]
        assert ours["moe/tokens_per_expert"] == ref["moe/tokens_per_expert"], ours["step"]
        for i in range(2):
            for stat in ("max_load_over_mean", "dropped_fraction", "bias_abs_mean"):
                key = f"moe/layer_{i}/{stat}"
                assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (key, ours["step"])
    torch.testing.assert_close(_biases(runs, name, 0), _biases(runs, "z2", 0), rtol=0, atol=1e-7)


@pytest.mark.slow
def test_statistics_are_in_the_records(runs):
    last = _records(runs, "z2")[-1]
    for i in range(2):
        assert last[f"moe/layer_{i}/max_load_over_mean"] >= 1
        assert 0 <= last[f"moe/layer_{i}/dropped_fraction"] < 1
        assert last[f"moe/layer_{i}/bias_abs_mean"] > 0
    assert "aux/load_balance" in last and "aux/router_z" in last


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2", "z3", "ep2_z2"])
def test_a_bias_model_exports_with_remote_code(runs, name, tmp_path):
    from launcher.export import consolidated_state_dict, find_checkpoint
    from tests.export_check import check_export

    ckpt, spec = find_checkpoint(runs / name, None)
    state = consolidated_state_dict(ckpt, spec)
    torch.testing.assert_close(state["blocks.0.mlp.expert_bias"], _biases(runs, name, 0)[-1, 0])
    check_export(runs / name, tmp_path / "export", _records(runs, name)[-1]["loss"])
    assert json.loads((tmp_path / "export" / "zeroray_export.json").read_text())["remote_code"]


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.slow
def test_a_resume_on_another_worker_count_keeps_the_bias(runs, tmp_path):
    """z2 (2 workers) resumed from its step-2 checkpoint on 1 worker: DeepSpeed's universal checkpoint
    carries parameters and optimizer state only; trainer.resume restores the buffers, so step 3's bias is
    the 2-worker run's (one sign step from step 2's, not from zero)."""
    resumed = runs / "z2_one_worker"
    shutil.copytree(runs / "z2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    overrides = [o for o in COMMON if not o.startswith("trainer.grad_accum_steps")]  # derived on a range
    torchrun_module("trainer", str(runs.parent / "balance.yaml"), *overrides, *RUNS["z2"], "output.name=z2_one_worker",
                    "trainer.max_steps=3", "cluster.workers=[1, 2]", "trainer.global_batch_size=8", nproc=1, timeout=300)
    states = load_file(resumed / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")
    straight = _biases(runs, "z2", 0)
    for i in range(2):
        torch.testing.assert_close(states["module"][f"blocks.{i}.mlp.expert_bias"], straight[2, i], rtol=0, atol=1e-7)
