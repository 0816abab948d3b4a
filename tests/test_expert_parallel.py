"""Expert parallelism (`trainer.expert_parallel`): experts split over ranks, tokens exchanged with
all-to-all, and the same training as without it.

One torchrun launch (2 ranks, gloo) runs this file as the worker: the real trainer trains one tiny
MoE llama on the same data with every expert on every rank (the reference) and with the experts
split over the 2 ranks under ZeRO-0, -2 and -3 (and WideNet, whose one MoE layer serves every
depth), then resumes the ZeRO-3 run from its middle checkpoint. The tests compare what those runs
wrote: metrics, checkpoints, exported weights.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import models
from models.layers.expert_parallel import ExpertParallelMoE, shard_experts
from models.layers.moe import MoELayer
from models.llama import LlamaConfig
from models.widenet import WideNetConfig
from tests.conftest import metrics_records, torchrun_module, write_config
from trainer.errors import SpecError
from trainer.safe_load import load_file
from trainer.spec import load_spec

MOE = "model.moe={num_experts: 4, top_k: 2, capacity_factor: 1.0}"
COMMON = ["trainer.precision=fp32", "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.checkpoint_every=2",
          "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2"]
WIDENET = "model={name: widenet_decoder, d_model: 64, n_layers: 3, n_heads: 4, max_seq_len: 64}"
RUNS = {  # output.name → overrides; each reference before the runs compared with it
    "ep1": [MOE, "trainer.zero_stage=2"],
    "ep2_z2": [MOE, "trainer.zero_stage=2", "trainer.expert_parallel=2", "trainer.activation_checkpointing=true"],
    "ep2_z3": [MOE, "trainer.zero_stage=3", "trainer.expert_parallel=2"],
    "ep2_z0": [MOE, "trainer.zero_stage=0", "trainer.expert_parallel=2"],
    # WideNet: one MoE layer called at every depth (capacity 1.2, so tokens are dropped).
    "widenet_ep1": [WIDENET, "trainer.zero_stage=2"],
    "widenet_ep2": [WIDENET, "trainer.zero_stage=2", "trainer.expert_parallel=2"],
}
COMPARED = {"ep1": ("ep2_z2", "ep2_z3", "ep2_z0"), "widenet_ep1": ("widenet_ep2",)}
RESUMED = "ep2_z3_resumed"  # ep2_z3 again from its step-2 checkpoint


# ---- without processes ----------------------------------------------------------------------


def test_shard_experts_keeps_this_ranks_slice_of_the_same_weights():
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32,
                      moe={"num_experts": 4, "top_k": 2})
    torch.manual_seed(0)
    dense = models.build(cfg)
    torch.manual_seed(0)
    sharded = models.build(cfg)
    assert shard_experts(sharded, ep_size=2, ep_rank=1) == 3
    assert len(sharded.moe_layers) == 3 and all(isinstance(m, ExpertParallelMoE) for m in sharded.moe_layers)
    for plain, ep in zip(dense.moe_layers, sharded.moe_layers, strict=True):
        assert (ep.num_experts, ep.num_local_experts, ep.ep_group_name) == (4, 2, "ep_size_2")
        for theirs, ours in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
            torch.testing.assert_close(getattr(ep.experts, ours), getattr(plain, theirs)[2:4], rtol=0, atol=0)
            assert getattr(ep.experts, ours).allreduce is False
        torch.testing.assert_close(ep.router.weight, plain.router.weight, rtol=0, atol=0)
        assert ep.router.weight.allreduce is True
    rest = {n: p for n, p in dense.named_parameters() if ".mlp." not in n}
    assert all(torch.equal(p, dict(sharded.named_parameters())[n]) for n, p in rest.items())
    # WideNet's one shared layer, used at every depth, is swapped once.
    widenet = models.build(WideNetConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    assert shard_experts(widenet, ep_size=4, ep_rank=0) == 1 and isinstance(widenet.moe, ExpertParallelMoE)
    assert widenet.moe.experts.w1.shape[0] == 1


def test_expert_parallel_layer_refuses_uneven_splits():
    layer = MoELayer(8, 12, LlamaConfig(moe={"num_experts": 6}).moe)
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible"):
        ExpertParallelMoE(layer, ep_size=4, ep_rank=0)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["trainer.expert_parallel=2"], "model 'llama' has no MoE layers; set model.moe"),
        ([MOE, "trainer.expert_parallel=2", "cluster.workers=3"],
         "cluster.workers (3) must be a multiple of trainer.expert_parallel (2)"),
        (["model.moe={num_experts: 6}", "trainer.expert_parallel=4", "cluster.workers=4"],
         "model.moe.num_experts (6) must be divisible by trainer.expert_parallel (4)"),
        (["trainer.expert_parallel=0"], "trainer.expert_parallel"),
    ],
)
def test_spec_refuses_expert_parallelism_that_cannot_split(tiny_config, overrides, fragment):
    with pytest.raises(SpecError) as err:
        load_spec(tiny_config, overrides)
    assert fragment in str(err.value)


def test_spec_accepts_expert_parallelism_on_moe_models(tiny_config):
    for stage in (0, 1, 2, 3):
        spec = load_spec(tiny_config, [MOE, "trainer.expert_parallel=2", f"trainer.zero_stage={stage}"])
        assert spec.trainer.expert_parallel == 2
    widenet = load_spec(tiny_config, ["model={name: widenet, d_model: 64, n_heads: 4, max_seq_len: 64}",
                                      "data.objective={kind: mlm}", "trainer.expert_parallel=2"])
    assert widenet.model.moe.num_experts == 4


# ---- two ranks ------------------------------------------------------------------------------


def _worker(config: str) -> None:
    """Runs under torchrun: every run of RUNS, then the resumed copy of ep2_z3."""
    import torch.distributed as dist

    from trainer.checkpoint import CheckpointError
    from trainer.loop import train

    for name, overrides in RUNS.items():
        train(load_spec(config, [*COMMON, *overrides, f"output.name={name}"]))
    spec = load_spec(config, [*COMMON, *RUNS["ep2_z3"], f"output.name={RESUMED}"])
    if dist.get_rank() == 0:  # the run as it was at step 2: its first checkpoint and two records
        done, resumed = spec.output.run_dir.with_name("ep2_z3"), spec.output.run_dir
        shutil.copytree(done, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")
        (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
        records = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
        (resumed / "metrics.jsonl").write_text("\n".join(records) + "\n")
    dist.barrier()
    train(spec)
    try:  # the finished ep2_z3 run again, with every expert on every rank
        train(load_spec(config, [*COMMON, MOE, "trainer.zero_stage=3", "output.name=ep2_z3"]))
    except CheckpointError as err:
        if dist.get_rank() == 0:
            (spec.output.run_dir.parent / "refused.txt").write_text(str(err))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> Path:

    tmp = tmp_path_factory.mktemp("ep")
    config = write_config(tmp / "ep.yaml", small_corpus, tmp / "runs")
    torchrun_module("tests.test_expert_parallel", str(config), timeout=400)
    return tmp / "runs"


def _records(runs: Path, name: str) -> list[dict]:
    return metrics_records(runs / name)


@pytest.mark.slow
@pytest.mark.parametrize("unsplit", COMPARED)
def test_split_experts_train_like_unsplit_ones(runs, unsplit):
    reference = _records(runs, unsplit)
    assert [r["step"] for r in reference] == [1, 2, 3, 4]
    for name in COMPARED[unsplit]:
        recs = _records(runs, name)
        for ours, ref in zip(recs, reference, strict=True):
            assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (name, ours["step"])
            for aux in ("aux/load_balance", "aux/router_z"):
                assert ours[aux] == pytest.approx(ref[aux], rel=1e-4), (name, aux, ours["step"])
            if ours["grad_norm"] is not None:  # DeepSpeed does not report it at ZeRO-0 in fp32
                assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (name, ours["step"])
        # Routing statistics are the global per-expert counts, summed over ranks as before.
        assert recs[0]["moe/tokens_per_expert"] == reference[0]["moe/tokens_per_expert"]
        assert recs[0]["moe/dropped_fraction"] == pytest.approx(reference[0]["moe/dropped_fraction"])
        assert len(recs[0]["moe/tokens_per_expert"]) == 4
        layers = 1 if name.startswith("widenet") else 2
        assert f"expert parallelism: {layers} MoE layer(s) split over 2 ranks" in (
            runs / name / "logs" / "rank_1.log").read_text()


@pytest.mark.slow
def test_each_rank_holds_half_the_experts(runs):
    """DeepSpeed's own record of the parameter shapes each rank optimised."""
    step = runs / "ep2_z3" / "checkpoints" / "step_00000004"
    for rank in (0, 1):
        states = load_file(step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        shapes = {n: tuple(s) for group in states["param_shapes"] for n, s in group.items()}
        assert shapes["blocks.0.mlp.experts.w1"][0] == 2 and shapes["blocks.1.mlp.experts.w2"][0] == 2
        assert "blocks.0.mlp.w_gate" not in shapes
        assert states["ds_autoep_layers"][0]["global_expert_start"] == 2 * rank
    reference = load_file(runs / "ep1" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")
    assert reference["module"]["blocks.0.mlp.w_gate"].shape[0] == 4
    # ZeRO-2: one file per expert, written by the rank that holds it.
    assert len(list((runs / "ep2_z2" / "checkpoints" / "step_00000004").glob("layer_*_expert_*"))) == 2 * 4


@pytest.mark.slow
def test_resume_continues_identically(runs):
    straight, resumed = _records(runs, "ep2_z3"), _records(runs, RESUMED)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed[2:], straight[2:], strict=True):
        for key in ("loss", "grad_norm", "aux/load_balance", "moe/tokens_per_expert"):
            assert ours[key] == theirs[key], (key, ours["step"])


@pytest.mark.slow
def test_resuming_with_another_expert_parallel_size_is_refused(runs):
    assert "written with trainer.expert_parallel=2 but this run has 1" in (runs / "refused.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("unsplit", COMPARED)
def test_export_stacks_the_experts_into_the_plain_model(runs, unsplit):
    from launcher.export import consolidated_state_dict, find_checkpoint

    ckpt, spec = find_checkpoint(runs / unsplit, None)
    reference = consolidated_state_dict(ckpt, spec)
    for name in COMPARED[unsplit]:
        ckpt, spec = find_checkpoint(runs / name, None)
        assert spec.trainer.expert_parallel == 2
        state = consolidated_state_dict(ckpt, spec)
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=5e-6, msg=f"{name}: {key}")


if __name__ == "__main__":
    _worker(sys.argv[1])
