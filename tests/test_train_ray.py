"""End to end: `zeroray train` on an embedded Ray cluster, 2 workers, real DeepSpeed ZeRO on gloo."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from launcher.ray_launch import launch
from trainer.errors import ZerorayError
from trainer.spec import load_spec

pytestmark = pytest.mark.slow


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ZeRO-3 train → crash → resume with equal losses runs against S3 in test_remote_runs.py; ZeRO-2 runs, real
# kills and resumes are in test_faults.py.


def test_relaunch_of_a_finished_run_and_of_another_model(ray_local, tiny_config):
    spec = load_spec(tiny_config, ["trainer.max_steps=3", "trainer.warmup_steps=1", "output.name=short"])
    first = launch(spec, announce=lambda s: None)
    # DeepSpeed copies zero_to_fp32.py (weights_only=False loads) beside the checkpoints; zeroray removes it.
    assert not list((first.run.root / "checkpoints").rglob("*.py"))
    # No Ray Datasets and no dashboard on this cluster, so neither a DatasetManager nor a PlacementGroupCleaner
    # actor (launcher/ray_trainer.py says why).
    import ray

    started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PlacementGroupCleaner"}, started
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
    # Both ranks break; Ray reports those it saw fail by its next poll, which may be either or both.
    ranks = set(re.findall(r"^  rank (\d+) on node \S+ \(\w+\): \w+: ", message, re.M))
    assert ranks and ranks <= {"0", "1"}, message
    for rank in ranks:
        assert f"rank_{rank}.log" in message
    assert "Traceback" not in message
