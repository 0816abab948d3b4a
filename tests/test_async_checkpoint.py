"""Checkpoints published in the background (trainer.async_checkpoint), and what goes wrong with them: a
publication that fails, one cut short by a crash, a drain notice with no time for a checkpoint. Real
DeepSpeed on 2 ranks under torchrun; the drain notices come from tests/notice_runner.py, a notice source
of the test's own through the trainer's seam (the Ray path is tests/test_faults.py's drain test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.checkpoint import CheckpointStore

RUNNER = REPO / "tests" / "notice_runner.py"


def torchrun(config: Path, overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", str(RUNNER),
           str(config), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), **(env or {})})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path) -> list[dict]:
    return json.loads((run / "status.json").read_text())["checkpoints"].get("events", [])


def logged_at(line: str) -> float:
    """The time of a rank log line ("2026-12-06 04:03:34,100 rank0 …")."""
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


@pytest.mark.slow
def test_background_publication_trains_on_and_bad_checkpoints_leave_the_last_good_one_latest(tiny_config, tmp_path):
    """Checkpoints every 2 steps, each publication 0.6 s slower than it is (a slow upload). First launch: the
    publication of step 4 fails on rank 1 (an injected "no space left on device"), rank 1 is killed right
    after step 7 while step 6's publication is in flight. Second launch: resumes from step 2, the last good
    one, and gets a drain notice with 0.5 s to go: no time for a checkpoint. Each is in the log and in
    status.json; the steps trained again repeat their losses; the run ends with its final checkpoint."""
    run = tmp_path / "runs" / "async"
    base = ["trainer.precision=fp32", "trainer.max_steps=10", "trainer.checkpoint_every=2", "output.keep_last=8",
            "output.name=async", "debug.checkpoint_delay_s=0.6", "debug.step_delay_s=0.2"]
    first = torchrun(tiny_config, [*base, "debug.fail_checkpoint_at_steps=[4]", "debug.fail_rank=1",
                                   "debug.fail_at_steps=[7]", "debug.fail_mode=kill"])
    assert first.returncode != 0, "rank 1 was killed"
    log = (run / "logs" / "rank_0.log").read_text().splitlines()
    published_2 = next(logged_at(line) for line in log if "checkpoint at step 2 (periodic)" in line)
    steps_1 = records(run)
    assert next(r for r in steps_1 if r["step"] == 3)["time"] < published_2, "step 3 trained while 2 was published"
    failed = [e for e in events(run) if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [4] and "[Errno 28]" in failed[0]["message"]
    assert "`latest` stays step_00000002" in failed[0]["message"]
    assert any("Training goes on" in line for line in log)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run / "checkpoints" / "step_00000004").exists(), "the failed checkpoint is removed"
    assert [r["step"] for r in steps_1] == list(range(1, 8))

    second = torchrun(tiny_config, base, env={"ZR_NOTICE_AT": "2", "ZR_NOTICE_DEADLINE_S": "0.5"})
    assert second.returncode == 0, second.stderr[-3000:]
    steps_2 = records(run)[len(steps_1):]
    assert [r["step"] for r in steps_2] == list(range(3, 11)), "resumed from step 2, the last good checkpoint"
    for r in steps_2[:5]:  # steps 3-7, trained twice
        assert r["loss"] == steps_1[r["step"] - 1]["loss"]
    kinds = {e["event"]: e for e in events(run)}
    assert kinds["checkpoint_interrupted"]["step"] == 6 and "resuming from step_00000002" in \
        kinds["checkpoint_interrupted"]["message"]
    no_time = kinds["drain_no_time"]
    assert no_time["seconds_left"] < 1 and "no time for a checkpoint" in no_time["message"]
    assert no_time["latest"] is not None and no_time["latest"] < no_time["step"]
    assert f"{no_time['latest'] + 1}-{no_time['step']} will be trained again" in no_time["message"] or \
        f"step {no_time['step']} will be trained again" in no_time["message"]
    assert "no time for a checkpoint" in (run / "logs" / "rank_0.log").read_text()
    status = json.loads((run / "status.json").read_text())["checkpoints"]
    assert status["latest"]["step"] == 10 and status["in_progress"] is None
    assert CheckpointStore(run / "checkpoints").latest().step == 10


def test_the_launchers_status_keeps_the_trainers_checkpoint_notes(tmp_path):
    """status.json: the driver writes the run's state, rank 0 the `checkpoints` section; neither drops the
    other's. A checkpoint begun and never published is reported when the next attempt starts."""
    from launcher.ray_launch import write_status
    from trainer.checkpoint_notes import CheckpointNotes
    from trainer.storage import RunDir

    run = RunDir(tmp_path)
    notes = CheckpointNotes(run, rank=0)
    write_status(run, "running", 1.0)
    notes.started(6, "drain")
    CheckpointNotes(run, rank=1).started(7, "periodic")  # only rank 0 writes
    write_status(run, "running", 2.0)  # a relaunch
    notes.check_interrupted(resumed=4)
    status = json.loads(run.status.read_text())
    assert status["status"] == "running" and status["started"] == 2.0
    [event] = status["checkpoints"]["events"]
    assert (event["event"], event["step"], event["reason"]) == ("checkpoint_interrupted", 6, "drain")
    assert "resuming from step_00000004" in event["message"] and status["checkpoints"]["in_progress"] is None
    notes.started(8, "periodic")
    notes.check_interrupted(resumed=8)  # it was published after all: nothing to say
    write_status(run, "finished", 2.0)
    assert len(json.loads(run.status.read_text())["checkpoints"]["events"]) == 1
