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


# ZeRO-3 only: ZeRO-2 runs, real kills and resumes are in test_faults.py.
@pytest.mark.parametrize("stage", [3])
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
    assert "training failed before its first step" in message
    assert "rank 0 on node " in message and "rank_0.log" in message
    assert "Traceback" not in message
