"""The same trainer under other launchers: the `zeroray` console script and torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export_check import check_export

pytestmark = pytest.mark.slow

LINE = re.compile(r"^step=(\d+)/(\d+) loss=([\d.]+) lr=(\S+) tokens_per_s=(\d+) eta_s=(\d+)$")


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_zeroray_train_cli_zero0_prints_parseable_progress_and_a_summary(tiny_config, tmp_path):
    zeroray = shutil.which("zeroray", path=str(Path(sys.executable).parent)) or "zeroray"
    proc = subprocess.run(
        [zeroray, "train", str(tiny_config), "trainer.zero_stage=0", "trainer.max_steps=4", "trainer.warmup_steps=1",
         "trainer.checkpoint_every=0", "output.name=cli", "--progress-interval", "0"],
        capture_output=True, text=True, env=_env(tmp_path), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [LINE.match(line) for line in proc.stderr.splitlines() if line.startswith("step=")]
    assert progress and all(progress), proc.stderr[-2000:]
    assert [int(m.group(1)) for m in progress] == [1, 2, 3, 4]  # log_every=1, interval 0: every record
    run = tmp_path / "runs" / "cli"
    assert f"run directory: {run}" in proc.stdout
    assert "first optimizer step" in proc.stdout
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    # ZeRO-0 checkpoints export too, through the console script.
    exported = subprocess.run([zeroray, "export", str(run), "--hf", str(tmp_path / "hf")],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]
    last_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    check_export(run, tmp_path / "hf", last_loss, exported=True)


def test_torchrun_runs_the_same_trainer_with_zero1(tiny_config, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer", str(tiny_config),
           "trainer.zero_stage=1", "trainer.max_steps=6", "trainer.warmup_steps=1", "output.name=torchrun"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 6" in proc.stdout
    run = tmp_path / "runs" / "torchrun"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
