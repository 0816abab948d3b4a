"""End to end: `zeroray train` on an embedded Ray cluster, 2 workers, real DeepSpeed ZeRO on gloo."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.errors import ZerorayError
from launcher.ray_launch import launch
from launcher.spec import load_spec
from tests.export_check import check_export
from trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 3])
def test_train_then_resume_after_a_crash_gives_the_same_losses(ray_local, tiny_config, tmp_path, stage):
    spec = load_spec(tiny_config, [f"trainer.zero_stage={stage}", f"output.name=zero{stage}"])
    result = launch(spec, announce=lambda s: None)
    run = result.run.root
    full = records(run)
    assert [r["step"] for r in full] == list(range(1, 13))
    first3, last3 = (sum(r["loss"] for r in part) / 3 for part in (full[:3], full[-3:]))
    assert last3 < first3 - 0.25, "the loss falls"
    assert result.last["step"] == 12
    assert result.ray_checkpoint == str(run / "checkpoints" / "step_00000012")  # registered with Ray Train
    assert all(r["precision"] in ("bf16", "fp32") for r in full)
    store = CheckpointStore(run / "checkpoints", 0, 2)
    assert [c.step for c in store.published()] == [6, 12]
    assert (run / "checkpoints" / "step_00000012" / "spec.yaml").is_file()
    assert (run / "spec.yaml").is_file()

    # The run dies right after its step-6 checkpoint: step 12 never landed.
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    (run / "checkpoints" / "latest").write_text("step_00000006\n")
    again = launch(spec, announce=lambda s: None)
    resumed = records(run)[len(full):]
    assert [r["step"] for r in resumed] == list(range(7, 13)), "resumes at the saved step"
    for before, after in zip(full[6:], resumed, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-5)
        assert after["lr"] == pytest.approx(before["lr"])
    assert again.last["step"] == 12
    check_export(run, tmp_path / "hf", last_loss=resumed[-1]["loss"])


def test_relaunch_of_a_finished_run_and_of_another_model(ray_local, tiny_config):
    spec = load_spec(tiny_config, ["trainer.max_steps=3", "trainer.warmup_steps=1", "output.name=short"])
    launch(spec, announce=lambda s: None)
    said: list[str] = []
    result = launch(spec, announce=said.append)
    assert result.last is None and "already reached step 3" in said[-1]
    other = load_spec(tiny_config, ["trainer.max_steps=3", "trainer.warmup_steps=1", "output.name=short",
                                    "model.d_model=32"])
    with pytest.raises(ZerorayError, match="different model section"):
        launch(other, announce=lambda s: None)
    moved = launch(other, fresh=True, announce=said.append)
    assert "moved the previous run" in said[-2] or any("moved the previous run" in s for s in said)
    assert moved.last["step"] == 3
    assert len(list(moved.run.root.parent.glob("short.old-*"))) == 1


def test_worker_failure_is_explained_with_rank_and_log(ray_local, tiny_config, tmp_path):
    # A tokenizer that breaks after the driver's check: workers fail while building the stream.
    spec = load_spec(tiny_config, ["output.name=broken"])
    bad = tmp_path / "broken-tokenizer.json"
    shutil.copy(spec.data.tokenizer, bad)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"tokenizer": str(bad)})})
    from launcher import ray_launch

    real_preflight = ray_launch.preflight_data

    def preflight_then_break(s):
        real_preflight(s)
        bad.write_text("{ not json")

    ray_launch.preflight_data = preflight_then_break
    try:
        with pytest.raises(ZerorayError) as err:
            launch(spec, announce=lambda s: None)
    finally:
        ray_launch.preflight_data = real_preflight
    message = str(err.value)
    assert "rank 0:" in message and "rank_0.log" in message
    assert "Traceback" not in message


@pytest.mark.parametrize("stage", [3])  # MoE under ZeRO-2: WideNet and expert-parallel tests
def test_moe_hyper_connection_llm_trains_under_zero(ray_local, tiny_config, stage):
    spec = load_spec(tiny_config, [
        "model.name=hc_llm", "model.rate=4", "model.dynamic=true",
        "model.moe={num_experts: 4, top_k: 2, capacity_factor: 1.25}",
        f"trainer.zero_stage={stage}", "trainer.max_steps=8", "trainer.checkpoint_every=0",
        f"output.name=hc-moe-{stage}",
    ])
    result = launch(spec, announce=lambda s: None)
    recs = records(result.run.root)
    assert recs[-1]["loss"] < recs[0]["loss"]
    for r in recs:
        assert r["aux/load_balance"] > 0 and r["aux/router_z"] > 0
        assert 0 <= r["moe/dropped_fraction"] < 1
        # every routed assignment of the last micro-batch, over 2 layers and 2 ranks, is counted once
        routed = sum(r["moe/tokens_per_expert"])
        assert routed == pytest.approx(2 * 2 * 4 * 32 * 2 * (1 - r["moe/dropped_fraction"]), rel=1e-4)


def test_resume_on_fewer_then_more_workers_continues_the_same_run(ray_local, tiny_config):
    """2 → 1 → 2 workers (a lost node, then capacity back): the global batch stays 8 rows (gradient
    accumulation makes up for the missing worker), ZeRO-2's partitioned optimizer state goes through
    DeepSpeed's universal checkpoint, every data stream continues where it stopped, and the losses
    are those of the uninterrupted run."""
    base = ["trainer.precision=fp32", "trainer.max_steps=8", "trainer.checkpoint_every=2", "output.keep_last=8",
            "output.name=elastic"]
    spec = load_spec(tiny_config, base)
    run = launch(spec, announce=lambda s: None).run.root
    reference = {r["step"]: r["loss"] for r in records(run)}
    checkpoints = run / "checkpoints"

    def rewind(step: int) -> None:  # the run died right after this checkpoint
        for later in range(step + 2, 9, 2):
            shutil.rmtree(checkpoints / f"step_{later:08d}", ignore_errors=True)
        (checkpoints / "latest").write_text(f"step_{step:08d}\n")

    rewind(4)
    with pytest.raises(ZerorayError, match="trainer.grad_accum_steps=2"):
        launch(load_spec(tiny_config, [*base, "cluster.workers=1"]), announce=lambda s: None)
    seen = len(records(run))
    launch(load_spec(tiny_config, [*base, "cluster.workers=1", "trainer.grad_accum_steps=2"]), announce=lambda s: None)
    one_worker = records(run)[seen:]
    assert [r["step"] for r in one_worker] == [5, 6, 7, 8]
    assert CheckpointStore(checkpoints, 0, 1).latest().world_size == 1

    rewind(6)
    seen = len(records(run))
    launch(spec, announce=lambda s: None)
    two_again = records(run)[seen:]
    assert [r["step"] for r in two_again] == [7, 8]
    for r in one_worker + two_again:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4), r["step"]
    assert not (checkpoints / "universal").exists(), "the conversion is removed once loaded"
