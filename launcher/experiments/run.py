"""Running a plan: each run through the launcher on one Ray cluster, finished runs skipped; the command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml

from launcher.experiments.plan import Plan, PlannedRun, plan, plan_lines
from launcher.experiments.report import collect, markdown, write_results
from launcher.experiments.schema import default_out, load_experiment
from trainer.checkpoint_listing import CheckpointListing
from trainer.errors import SpecError, ZerorayError
from trainer.spec import parse_spec
from trainer.storage import RunDir

# ---- running ---------------------------------------------------------------------------------


def run_state(run: PlannedRun) -> Literal["finished", "partial", "new"]:
    """finished: this very spec reached max_steps; partial: a checkpoint to resume from; new."""
    from trainer.run_prep import order_defining  # imports datasets: not needed for a --dry-run
    d = RunDir(run.run_dir)
    if not d.spec.is_file():
        return "new"
    saved = yaml.safe_load(d.spec.read_text()) or {}
    try:  # through today's schema: a key a newer zeroray added, at its default, changes nothing
        saved = parse_spec(saved, origin=str(d.spec)).to_dict()
    except SpecError:
        pass  # a key that no longer exists: compared as written, so it counts as a change
    mine = run.spec.to_dict()
    # Compared as a relaunch compares them: a data section differing only in how fast it is read (e.g.
    # data.loader_workers) is the same run.
    changed = [k for k in mine if order_defining(k, saved.get(k)) != order_defining(k, mine[k])]
    latest = CheckpointListing(d.checkpoints).latest()
    if changed and latest is not None:
        raise ZerorayError(
            f"{d.root} holds a run of arm {run.arm.name} with another {', '.join(changed)} section (the plan "
            f"changed since it ran). Use another --out, or delete that run directory to run it again."
        )
    if latest is None:
        return "new"
    return "finished" if latest.step >= run.spec.trainer.max_steps else "partial"


def run_experiment(p: Plan, announce: Callable[[str], None] = print, ray_temp_dir: str | None = None,
                   progress_interval_s: float = 30.0) -> dict:
    """Train every planned run that has not finished (one Ray cluster for all), then write the
    results. Returns the results (as written to results.json)."""
    from cluster.local import ray_cluster
    from launcher.ray_launch import launch

    p.out.mkdir(parents=True, exist_ok=True)
    pending = [(r, s) for r in p.runs if (s := run_state(r)) != "finished"]
    announce(f"{len(p.runs) - len(pending)} of {len(p.runs)} runs already finished in {p.out}")
    if pending:
        with ray_cluster(p.runs[0].spec.cluster, temp_dir=ray_temp_dir):
            for i, (run, state) in enumerate(pending, 1):
                announce(f"[{i}/{len(pending)}] {run.arm.name} seed {run.seed}")
                # A run directory without a checkpoint holds only a failed start: begin it again cleanly
                # (`--fresh` moves it aside) so its metrics are not appended to the old ones.
                launch(run.spec, fresh=state == "new" and run.run_dir.exists(), ray_temp_dir=ray_temp_dir,
                       progress_interval_s=progress_interval_s, announce=announce)
    results = collect(p)
    write_results(results, p.out)
    return results


def cli(name: str, scale: str, seeds: int, out: Path | None, dry_run: bool, overrides: list[str],
        progress_interval_s: float) -> int:
    experiment = load_experiment(name)
    p = plan(experiment, scale, seeds, out or default_out(name, scale), tuple(overrides))
    if dry_run:
        print("\n".join(plan_lines(p)))
        return 0
    results = run_experiment(p, announce=lambda s: print(f"zeroray: {s}", file=sys.stderr, flush=True),
                             progress_interval_s=progress_interval_s)
    print(markdown(results))
    print(f"results: {p.out / 'results.md'}, {p.out / 'results.json'}, {p.out / 'eval_loss.png'}")
    return 0
