"""The same trainer under other launchers: the `zeroray` console script and torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export_check import check_export

pytestmark = pytest.mark.slow

LINE = re.compile(r"^step=(\d+)/(\d+) loss=([\d.]+) lr=(\S+) tokens_per_s=(\d+)(?: mfu=(\S+))?(?: eval/loss=([\d.]+))? "
                  r"eta_s=(\d+)$")


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_zeroray_cli_trains_exports_lists_resumes_and_plots(tiny_config, small_corpus, tmp_path, monkeypatch):
    """`zeroray train` (ZeRO-0: progress lines, evaluation on the held-out split, MFU, memory per rank, the
    MLflow and TensorBoard trackers), then `zeroray export`, `zeroray runs`, `zeroray resume` (the finished
    run trained further) and `zeroray plot`, all as subprocesses of the console script."""
    zeroray = shutil.which("zeroray", path=str(Path(sys.executable).parent)) or "zeroray"
    proc = subprocess.run(
        [zeroray, "train", str(tiny_config), "trainer.zero_stage=0", "trainer.max_steps=4", "trainer.warmup_steps=1",
         "trainer.checkpoint_every=0", "output.name=cli", "--progress-interval", "0",
         "data.loader_workers=1",  # the one end-to-end run with a loader process (tiny_config reads in-process)
         f"eval.sources=[{{path: {small_corpus / 'val'}}}]", "eval.every=3", "eval.batches=1",
         "output.trackers=[tensorboard, mlflow]"],
        capture_output=True, text=True, env=_env(tmp_path), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [LINE.match(line) for line in proc.stderr.splitlines() if line.startswith("step=")]
    assert progress and all(progress), proc.stderr[-2000:]
    assert [int(m.group(1)) for m in progress] == [1, 2, 3, 4]  # log_every=1, interval 0: every record
    assert [m.group(7) is not None for m in progress] == [False, False, True, True]  # eval every 3 and at the end
    run = tmp_path / "runs" / "cli"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 4]
    for r in records:
        assert 0 < r["mfu"] <= 1 and float(progress[r["step"] - 1].group(6)) == pytest.approx(r["mfu"], rel=1e-2)
        assert len(r["memory/peak_gb"]) == 2 and all(0.05 < gb < 64 for gb in r["memory/peak_gb"])
    assert records[-1]["eval/perplexity"] == pytest.approx(math.exp(records[-1]["eval/loss"]))
    assert records[-1]["data/documents"] > 0
    # MLflow's file store in the run directory holds the same records (read with its own client).
    from mlflow.tracking import MlflowClient

    from launcher.trackers import scalars

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    for name in ("loss", "eval/loss", "mfu", "memory/peak_gb/1"):
        expected = {r["step"]: scalars(r)[name] for r in records if name in scalars(r)}
        assert {m.step: m.value for m in client.get_metric_history(mlflow_id, name)} == pytest.approx(expected)
    assert f"run directory: {run}" in proc.stdout
    assert "first optimizer step" in proc.stdout
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    # ZeRO-0 checkpoints export too, through the console script.
    exported = subprocess.run([zeroray, "export", str(run), "--hf", str(tmp_path / "hf")],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert exported.returncode == 0, exported.stderr[-2000:]
    last_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    check_export(run, tmp_path / "hf", last_loss, exported=True)

    def cli(*args, timeout=240):
        proc = subprocess.run([zeroray, *map(str, args)], capture_output=True, text=True, env=_env(tmp_path),
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    runs_dir = tmp_path / "runs"
    rows = json.loads(cli("runs", "--dir", runs_dir, "--json").stdout)
    assert [(r["name"], r["status"], r["step"], r["checkpoint_step"]) for r in rows] == [("cli", "finished", 4, 4)]
    assert "cli" in cli("runs", "--dir", runs_dir).stdout

    cli("resume", run, "trainer.max_steps=6")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    row = json.loads(cli("runs", "--dir", runs_dir, "--json").stdout)[0]
    assert (row["status"], row["step"], row["loss"]) == ("finished", 6, records[-1]["loss"])

    tensorboard = tensorboard_scalars(run / "tensorboard")
    assert [step for step, _ in tensorboard["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tensorboard["loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)

    png = tmp_path / "loss.png"
    assert "wrote" in cli("plot", run, run, "--metric", "loss", "-o", png).stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    bad = subprocess.run([zeroray, "plot", run, "--metric", "nope"], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=60)
    assert bad.returncode == 2 and "has no metric 'nope'" in bad.stderr and "loss" in bad.stderr


def _first_step_loss(spec, world: int) -> float:
    """Step 1's loss as the plain (uncompiled) model computes it: the trainer's initial weights (same
    seed), in the run's precision, on each rank's first micro-batch, averaged over the ranks."""
    import torch

    import models
    from data_pipelines import BatchStream
    from trainer.build import seed_everything
    from trainer.ds_config import resolve_precision

    seed_everything(spec.trainer.seed)
    model = models.build(spec.model)
    if resolve_precision(spec) == "bf16":
        model = model.to(torch.bfloat16)  # DeepSpeed's bf16 mode holds the module in bf16
    losses = []
    with torch.no_grad():
        for rank in range(world):
            stream = BatchStream(spec.data, spec.trainer.micro_batch_size, rank, world,
                                 grad_accum=spec.trainer.grad_accum_steps)
            losses.append(model(**next(stream)).loss.float().item())
    return sum(losses) / world


def test_torchrun_runs_the_same_trainer_with_zero1_compiled(tiny_config, tmp_path):
    """torchrun instead of Ray, with `trainer.compile`: the compiled model trains, and its first loss is the
    plain model's."""
    from trainer.spec import load_spec

    overrides = ["trainer.zero_stage=1", "trainer.max_steps=6", "trainer.warmup_steps=1", "output.name=torchrun",
                 "trainer.compile=true"]
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer", str(tiny_config), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 6" in proc.stdout
    run = tmp_path / "runs" / "torchrun"
    assert "model compiled with torch.compile" in (run / "logs" / "rank_0.log").read_text()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(_first_step_loss(load_spec(tiny_config, overrides), world=2), rel=2e-2)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_accelerate_launch_runs_the_same_trainer_as_torchrun(tiny_config, tmp_path):
    """`accelerate launch --use_deepspeed` only provides the processes and their environment (the trainer
    builds its own DeepSpeed engine from the spec): two CPU processes give torchrun's losses exactly."""
    overrides = ["trainer.zero_stage=1", "trainer.max_steps=3", "trainer.warmup_steps=1"]
    bin_dir = Path(sys.executable).parent
    launchers = {
        "accelerate": [str(bin_dir / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed", "--zero_stage", "1"],
        "torchrun": [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2"],
    }
    losses = {}
    for name, launcher in launchers.items():
        cmd = [*launcher, "-m", "trainer", str(tiny_config), *overrides, f"output.name={name}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "finished at step 3" in proc.stdout
        records = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in records]
        assert sorted(f.name for f in (tmp_path / "runs" / name / "logs").glob("rank_*.log")) == [
            "rank_0.log", "rank_1.log"]
    assert len(losses["accelerate"]) == 3
    assert losses["accelerate"] == pytest.approx(losses["torchrun"], rel=1e-6)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Reads tensorboardX event files (TFRecord framing: length, crc, event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_plot_draws_each_runs_metric(tmp_path, tiny_config):
    """The curves are the runs' own records (checked in the figure, not just the file)."""
    import yaml

    from launcher.runs import plot_runs
    from trainer.spec import load_spec

    spec = load_spec(tiny_config)
    runs = []
    for name, losses in (("a", [5.0, 4.0, 3.5]), ("b", [6.0, 4.5, 4.2])):
        run = tmp_path / name
        run.mkdir()
        (run / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
        runs.append((run, losses))
    fig = plot_runs([r for r, _ in runs], "loss", tmp_path / "p.png")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    for line, (_, losses) in zip(lines, runs, strict=True):
        assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == losses
