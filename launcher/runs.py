"""`zeroray runs`, `zeroray resume`, `zeroray plot`: run directories as the user sees them.

Listing and plotting read the run's files as they are (the saved spec's model name and step count, the
metrics, the checkpoint listing) without validating the spec: that would import every model family and so
torch (about 3 s a call); a run is validated when it is resumed (`run_spec`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from trainer.checkpoint_listing import CheckpointListing
from trainer.errors import ZerorayError
from trainer.spec_parsing import read_yaml
from trainer.storage import RunDir

if TYPE_CHECKING:
    from trainer.spec import RunSpec


def read_metrics(run: RunDir) -> list[dict]:
    if not run.metrics.is_file():
        return []
    lines = run.metrics.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]  # skip a line being written


def _saved_spec_file(run_dir: Path) -> Path:
    run = RunDir(Path(run_dir))
    if not run.spec.is_file():
        raise ZerorayError(f"{run_dir} is not a zeroray run directory (no spec.yaml); `zeroray runs` lists runs")
    return run.spec


def run_spec(run_dir: Path) -> RunSpec:
    """The run's saved spec, validated (for a resume)."""
    from trainer.spec import read_spec

    return read_spec(_saved_spec_file(run_dir))


def _listed_fields(run_dir: Path) -> tuple[str, int]:
    """The saved spec's model.name and trainer.max_steps, read as written."""
    path = _saved_spec_file(run_dir)
    raw = read_yaml(path)
    try:
        name, max_steps = raw["model"]["name"], raw["trainer"]["max_steps"]
    except (KeyError, TypeError):
        name = max_steps = None
    if not isinstance(name, str) or not isinstance(max_steps, int):
        raise ZerorayError(f"{path} has no model.name or no whole-number trainer.max_steps: not a spec zeroray "
                           f"saved (`zeroray resume {run_dir}` says what else is wrong)")
    return name, max_steps


def _status(run: RunDir, step: int, max_steps: int) -> str:
    status = json.loads(run.status.read_text()) if run.status.is_file() else {}
    state = status.get("status")
    pid = status.get("pid")
    if state == "running" and status.get("host") == socket.gethostname() and not (
        isinstance(pid, int) and psutil.pid_exists(pid)
    ):
        return "stopped"  # the driver died without saying so (killed, machine rebooted)
    if state is None:
        return "finished" if step >= max_steps else "stopped"
    return state


def describe(run_dir: Path) -> dict:
    run = RunDir(Path(run_dir))
    model, max_steps = _listed_fields(run_dir)
    records = read_metrics(run)
    latest = CheckpointListing(run.checkpoints).latest()
    step = max(records[-1]["step"] if records else 0, latest.step if latest else 0)
    return {
        "name": run.root.name,
        "model": model,
        "status": _status(run, step, max_steps),
        "step": step,
        "max_steps": max_steps,
        "checkpoint_step": latest.step if latest else None,
        "loss": records[-1]["loss"] if records else None,
        "path": str(run.root),
    }


def list_runs(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise ZerorayError(f"{folder} does not exist; runs are written under output.dir (default runs/)")
    rows = []
    for d in sorted(folder.iterdir()):
        if not (d / "spec.yaml").is_file():
            continue
        try:
            rows.append(describe(d))
        except ZerorayError as exc:  # e.g. a run written by an older zeroray: list it, say why it is odd
            rows.append({"name": d.name, "model": "?", "status": "unreadable", "step": 0, "max_steps": 0,
                         "checkpoint_step": None, "loss": None, "path": str(d),
                         "error": str(exc).splitlines()[-1].strip()})
    return rows


def plot_runs(run_dirs: list[Path], metric: str, out: Path):
    """One chart, one curve per run: `metric` against the optimizer step. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir in run_dirs:
        run = RunDir(Path(run_dir))
        _saved_spec_file(run_dir)  # a clear error for a folder that is not a run
        points = [(r["step"], r[metric]) for r in read_metrics(run) if isinstance(r.get(metric), int | float)]
        if not points:
            known = sorted({k for r in read_metrics(run) for k, v in r.items() if isinstance(v, int | float)})
            raise ZerorayError(f"{run_dir} has no metric {metric!r}; it has: {', '.join(known) or 'no records yet'}")
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=run.root.name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return fig
