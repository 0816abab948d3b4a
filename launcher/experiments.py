"""`zeroray experiment NAME`: compare architectures fairly — same data, same tokens, same budget.

An experiment is data (configs/experiments/NAME.yaml): per scale a base config and a budget, the arms
as override lists, the metrics its table shows, the paper's figures and the direction its claims
point. Every arm × seed is a `zeroray train` run (launcher.ray_launch.launch) in its own run
directory under the experiment's directory, all on one Ray cluster; only `trainer.seed` changes
between seeds, so every arm reads the same data in the same order. The runs evaluate on the
held-out split (the spec's `eval` section); the results land next to them as results.json,
results.md and eval_loss.png. Re-running the command skips the runs that finished.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import models
from trainer.errors import SpecError, ZerorayError
from trainer.spec import RunSpec, apply_overrides, parse_spec, read_yaml, resolve
from trainer.storage import RunDir

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
EXPERIMENTS = CONFIGS / "experiments"
HELD_OUT = "data/stdlib/val"  # `zeroray data prepare`'s held-out split, next to the configs' data/stdlib/train

# Where each scale runs; the experiment file sets the budget (steps, batch, evaluation).
PLATFORMS: dict[str, tuple[str, ...]] = {
    # This kind of machine: 2 CPU cores, one per worker; only the final checkpoint (runs are minutes long).
    "smoke": ("cluster.workers=2", "cluster.cpus_per_worker=1", "cluster.gpus_per_worker=0",
              "trainer.checkpoint_every=0", "trainer.log_every=1"),
    "tiny": ("cluster.workers=2", "cluster.cpus_per_worker=1", "cluster.gpus_per_worker=0",
             "trainer.checkpoint_every=0", "trainer.log_every=5"),
    # One GPU node: the tiny models, many more tokens.
    "small": ("cluster.workers=8", "cluster.cpus_per_worker=8", "cluster.gpus_per_worker=1",
              "trainer.precision=bf16", "trainer.checkpoint_every=1000", "trainer.log_every=20"),
    # The papers' shapes (the experiment's base configs) on the cluster those configs describe.
    "base": ("trainer.precision=bf16", "trainer.log_every=20"),
}
SCALES = tuple(PLATFORMS)

Metric = Literal["params", "active_params", "flops_per_token", "tokens_per_s", "eval_loss", "train_loss"]
METRIC_TITLES = {"params": "params", "active_params": "active params", "flops_per_token": "FLOPs/token",
                 "tokens_per_s": "tokens/s", "eval_loss": "eval loss", "train_loss": "train loss"}


# ---- the experiment files -------------------------------------------------------------------


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Row of the table and run directory prefix.")
    label: str = Field(description="What the arm is, in words.")
    overrides: tuple[str, ...] = Field((), description="key=value overrides on top of the base config.")
    paper: str | None = Field(None, description="The paper's figure for this arm, if it gives one.")


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Metric
    arm: str
    relation: Literal["lower", "higher", "not_higher"] = Field(
        description="lower/higher: the paper's direction; not_higher: 'comparable or better' (lower, or "
        "higher by no more than the seed spread)."
    )
    than: str
    claim: str = Field(description="The paper's claim this checks, in words.")


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config: str = Field(description="Base config, a file in configs/.")
    steps: int | None = Field(None, ge=1, description="trainer.max_steps; null = the config's own.")
    micro_batch_size: int | None = Field(None, ge=1, description="trainer.micro_batch_size; null = the config's.")
    grad_accum_steps: int | None = Field(None, ge=1, description="trainer.grad_accum_steps; null = the config's.")
    warmup_steps: int | None = Field(None, ge=1, description="null = a tenth of steps (or the config's).")
    eval_every: int = Field(ge=1, description="Steps between evaluations on the held-out split (and after the last).")
    eval_batches: int = Field(ge=1, description="Micro-batches each worker evaluates (eval.batches).")
    overrides: tuple[str, ...] = Field((), description="Further overrides for this scale (every arm).")

    def run_overrides(self) -> list[str]:
        out = []
        if self.steps is not None:
            out.append(f"trainer.max_steps={self.steps}")
            # DeepSpeed's schedule needs at least one warm-up step, and fewer than max_steps.
            warmup = self.warmup_steps if self.warmup_steps is not None else min(max(1, self.steps // 10), self.steps - 1)
            out.append(f"trainer.warmup_steps={warmup}")
        elif self.warmup_steps is not None:
            out.append(f"trainer.warmup_steps={self.warmup_steps}")
        if self.micro_batch_size is not None:
            out.append(f"trainer.micro_batch_size={self.micro_batch_size}")
        if self.grad_accum_steps is not None:
            out.append(f"trainer.grad_accum_steps={self.grad_accum_steps}")
        out += [f"eval.sources=[{{path: {HELD_OUT}}}]", f"eval.every={self.eval_every}",
                f"eval.batches={self.eval_batches}"]
        return out + list(self.overrides)


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    question: str
    paper: str = Field(description="The paper and its figures, in words.")
    overrides: tuple[str, ...] = Field((), description="Overrides for every arm at every scale.")
    arms: tuple[Arm, ...] = Field(min_length=2)
    baseline: str
    metrics: tuple[Metric, ...] = Field(min_length=1)
    expectations: tuple[Expectation, ...] = ()
    scales: dict[str, Budget]

    @model_validator(mode="after")
    def _names_fit(self) -> Experiment:
        arms = [a.name for a in self.arms]
        if len(set(arms)) != len(arms):
            raise ValueError(f"arm names must be unique; got {arms}")
        for where, name in [("baseline", self.baseline), *((f"expectations: {e.claim!r}", n)
                                                            for e in self.expectations for n in (e.arm, e.than))]:
            if name not in arms:
                raise ValueError(f"{where} names arm {name!r}; the arms are {', '.join(arms)}")
        unknown = set(self.scales) - set(SCALES)
        if unknown:
            raise ValueError(f"unknown scale(s) {sorted(unknown)}; scales are {', '.join(SCALES)}")
        return self

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def load_experiment(name: str) -> Experiment:
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise ZerorayError(f"no experiment {name!r}; experiments: {', '.join(names())} (configs/experiments/)")
    try:
        return Experiment.model_validate({"name": name, **read_yaml(path)})
    except ValidationError as err:
        problems = "\n  ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                               for e in err.errors())
        raise ZerorayError(f"{path} is invalid:\n  {problems}") from None


# ---- the plan: every arm × seed as a resolved run spec ---------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    spec: RunSpec

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.output.run_dir)


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    scale: str
    seeds: int
    out: Path
    overrides: tuple[str, ...]  # the user's, for every arm
    runs: tuple[PlannedRun, ...]

    @property
    def budget(self) -> Budget:
        return self.experiment.scales[self.scale]

    def runs_of(self, arm: str) -> list[PlannedRun]:
        return [r for r in self.runs if r.arm.name == arm]

    def common_overrides(self) -> list[str]:
        """What every arm gets on top of the base config, in order: platform, budget, experiment, user
        (an arm's own overrides go between the experiment's and the user's)."""
        return [*PLATFORMS[self.scale], *self.budget.run_overrides(), *self.experiment.overrides, *self.overrides]


def _family(overrides: tuple[str, ...]) -> str | None:
    names_ = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "model.name"]
    return names_[-1] if names_ else None


def arm_spec(experiment: Experiment, scale: str, arm: Arm, seed: int, out: Path, overrides: tuple[str, ...] = ()
             ) -> RunSpec:
    """The arm's run spec: base config → platform → budget → experiment → arm → user → seed, output.

    An arm that names another model family (`model.name=llama` on a hyper-connection config) keeps
    the base config's model keys that family has — width, depth, heads — and drops the others
    (`rate`, `dynamic`): "the same model without the idea" stays one line in the experiment file."""
    budget = experiment.scales[scale]
    origin = f"experiment {experiment.name} ({scale}), arm {arm.name}"
    raw = apply_overrides(read_yaml(CONFIGS / budget.config),
                          [*PLATFORMS[scale], *budget.run_overrides(), *experiment.overrides])
    family = _family(arm.overrides)
    if family is not None and family != raw["model"].get("name"):
        try:
            fields = models.entry(family).config_cls.model_fields
        except KeyError as exc:
            raise SpecError(f"{origin}: {exc.args[0]}") from None
        raw["model"] = {k: v for k, v in raw["model"].items() if k in fields}
    raw = apply_overrides(raw, [*arm.overrides, *overrides, f"trainer.seed={seed}",
                                f"output.dir={out}", f"output.name={arm.name}-seed{seed}"])
    return resolve(parse_spec(raw, origin=origin))


def plan(experiment: Experiment, scale: str, seeds: int, out: Path, overrides: tuple[str, ...] = ()) -> Plan:
    if scale not in experiment.scales:
        raise ZerorayError(f"experiment {experiment.name} has no scale {scale!r}; it has "
                           f"{', '.join(experiment.scales)}")
    if seeds < 1:
        raise ZerorayError(f"--seeds must be at least 1 (got {seeds})")
    out = Path(out).expanduser().resolve()
    runs = tuple(PlannedRun(arm, seed, arm_spec(experiment, scale, arm, seed, out, tuple(overrides)))
                 for arm in experiment.arms for seed in range(seeds))
    _check_fair(experiment, runs)
    return Plan(experiment, scale, seeds, out, tuple(overrides), runs)


def _check_fair(experiment: Experiment, runs: tuple[PlannedRun, ...]) -> None:
    """Arms may differ in their model only: the same data, budget, optimiser and cluster."""
    first = [r for r in runs if r.seed == 0]
    reference = _budget_sections(first[0].spec)
    for run in first[1:]:
        theirs = _budget_sections(run.spec)
        differ = [key for key in sorted(set(reference) | set(theirs)) if reference.get(key) != theirs.get(key)]
        if differ:
            raise ZerorayError(
                f"experiment {experiment.name}: arm {run.arm.name} differs from arm {first[0].arm.name} outside "
                f"the model ({', '.join(differ)}); arms must share data, budget and cluster: move those "
                f"overrides to the experiment or the scale"
            )


def _budget_sections(spec: RunSpec) -> dict:
    flat = {}
    for section, values in spec.to_dict().items():
        if section in ("model", "output"):
            continue
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            flat[f"{section}.{key}"] = value
    return flat


def tokens_per_arm(spec: RunSpec) -> int:
    return spec.trainer.max_steps * spec.tokens_per_step


def model_size(spec: RunSpec) -> dict[str, float]:
    """Parameters and FLOPs/token of a spec's model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = models.build(spec.model)
    return {"params": model.num_parameters(), "active_params": model.num_active_parameters(),
            "flops_per_token": spec.flops_per_token(model)}


def plan_lines(p: Plan) -> list[str]:
    """What --dry-run prints: the arms, their overrides and sizes, the token budget."""
    e, b = p.experiment, p.budget
    spec = p.runs[0].spec
    lines = [
        f"experiment {e.name} at scale {p.scale}: {e.question}",
        f"  base config: configs/{b.config}; seeds: {p.seeds} (trainer.seed 0..{p.seeds - 1}; data.seed "
        f"{spec.data.seed} for every arm)",
        f"  budget per run: {spec.trainer.max_steps} steps × {spec.global_batch_size} sequences × "
        f"{spec.data.seq_len} tokens = {tokens_per_arm(spec):,} tokens ({spec.data.tokenizer}, "
        f"{spec.data.objective.kind}); {spec.cluster.workers} workers",
        f"  held-out evaluation: {_eval_line(spec)}",
        f"  every arm: {' '.join(shlex.quote(o) for o in p.common_overrides())}",
        f"  runs: {len(p.runs)} in {p.out}",
    ]
    for arm in e.arms:
        size = model_size(p.runs_of(arm.name)[0].spec)
        mark = " (baseline)" if arm.name == e.baseline else ""
        lines.append(f"  - {arm.name}{mark}: {arm.label}")
        lines.append(f"      overrides: {' '.join(shlex.quote(o) for o in arm.overrides) or '(none)'}")
        lines.append(f"      params {size['params'] / 1e6:.2f}M, active {size['active_params'] / 1e6:.2f}M, "
                     f"FLOPs/token {size['flops_per_token']:.3g}")
    return lines


def _eval_line(spec: RunSpec) -> str:
    ev = spec.eval
    if not ev.sources:
        return "none (eval.sources is empty): the table has no eval loss"
    rows = ev.batches * spec.trainer.micro_batch_size * spec.cluster.max_workers
    when = f"every {ev.every} steps and after the last" if ev.every else "after the last step"
    return (f"{', '.join(s.path for s in ev.sources)}: the same {rows} sequences ({rows * spec.data.seq_len:,} "
            f"tokens) {when}")


# ---- running ---------------------------------------------------------------------------------


def run_state(run: PlannedRun) -> Literal["finished", "partial", "new"]:
    """finished: this very spec reached max_steps; partial: a checkpoint to resume from; new."""
    from trainer.checkpoint import CheckpointStore  # imports DeepSpeed: not needed for a --dry-run
    d = RunDir(run.run_dir)
    if not d.spec.is_file():
        return "new"
    saved = yaml.safe_load(d.spec.read_text()) or {}
    try:  # through today's schema: a key a newer zeroray added, at its default, changes nothing
        saved = parse_spec(saved, origin=str(d.spec)).to_dict()
    except SpecError:
        pass  # a key that no longer exists: compared as written, so it counts as a change
    mine = run.spec.to_dict()
    changed = [k for k in mine if saved.get(k) != mine[k]]
    latest = CheckpointStore(d.checkpoints, 0, 1).latest()
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


# ---- collecting ------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, the last record of each step (a resumed run may repeat the steps after its
    last checkpoint) and of each kind (training records and evaluation records)."""
    from launcher.runs import read_metrics

    last: dict[tuple, dict] = {}
    for r in read_metrics(RunDir(run_dir)):
        last[(r.get("step"), "eval/loss" in r, "loss" in r)] = r
    return sorted(last.values(), key=lambda r: r.get("step", 0))


def run_metrics(run: PlannedRun) -> dict:
    """One run's figures: size and cost from the spec, throughput and losses from its records."""
    spec, d = run.spec, RunDir(run.run_dir)
    records = _records(run.run_dir)
    train = [r for r in records if isinstance(r.get("loss"), int | float)]
    evals = [r for r in records if isinstance(r.get("eval/loss"), int | float)]
    # The first record times step 1 alone, with the first-step set-up in it: left out of the median.
    speeds = [r["tokens_per_s"] for r in (train[1:] or train) if isinstance(r.get("tokens_per_s"), int | float)]
    status = json.loads(d.status.read_text()) if d.status.is_file() else {}
    curve_from = evals or train
    key = "eval/loss" if evals else "loss"
    return {
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "status": status.get("status", "not run"),
        "wall_s": status["updated"] - status["started"] if {"updated", "started"} <= set(status) else None,
        "step": train[-1]["step"] if train else 0,
        **model_size(spec),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "eval_loss": evals[-1]["eval/loss"] if evals else None,
        "eval_step": evals[-1]["step"] if evals else None,
        "train_loss": train[-1]["loss"] if train else None,
        "curve_metric": key,
        "curve": [[r["step"] * spec.tokens_per_step, r[key]] for r in curve_from],
    }


def summarise(values: list[float | None]) -> dict:
    """Mean and sample standard deviation over seeds (std needs two seeds)."""
    xs = [v for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs), "values": xs}


EXACT = ("params", "active_params", "flops_per_token")  # follow from the spec: no seed spread


def compare(metric: str, arm: dict, base: dict) -> dict:
    """Arm − baseline, and whether it is beyond the seed spread: the two mean ± std intervals do not
    overlap (|Δ| > std_arm + std_base). Unknown with one seed, except for the exact figures."""
    if arm["mean"] is None or base["mean"] is None:
        return {"delta": None, "relative": None, "spread": None, "beyond_spread": None}
    delta = arm["mean"] - base["mean"]
    if metric in EXACT:
        spread = 0.0
    else:
        spread = None if arm["std"] is None or base["std"] is None else arm["std"] + base["std"]
    return {"delta": delta, "relative": delta / base["mean"] if base["mean"] else None, "spread": spread,
            "beyond_spread": None if spread is None else abs(delta) > spread}


def verdict(relation: str, comparison: dict) -> str:
    """Does the result point the paper's way, and by more than the seed spread?"""
    delta, beyond = comparison["delta"], comparison["beyond_spread"]
    if delta is None:
        return "not run"
    strength = {True: "beyond the seed spread", False: "within the seed spread", None: "seed spread unknown: 1 seed"}
    if relation == "not_higher":
        agrees = delta <= 0 or beyond is False
    else:
        agrees = delta < 0 if relation == "lower" else delta > 0
    return f"{'agrees' if agrees else 'disagrees'} ({strength[beyond]})"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} CPU cores ({platform.machine()}), {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def collect(p: Plan) -> dict:
    e = p.experiment
    arms = {}
    for arm in e.arms:
        runs = [run_metrics(r) for r in p.runs_of(arm.name)]
        arms[arm.name] = {"label": arm.label, "overrides": list(arm.overrides), "paper": arm.paper, "runs": runs,
                          "summary": {m: summarise([r[m] for r in runs]) for m in METRIC_TITLES}}
    base = arms[e.baseline]["summary"]
    for values in arms.values():
        values["vs_baseline"] = {m: compare(m, values["summary"][m], base[m]) for m in METRIC_TITLES}
    expectations = []
    for x in e.expectations:
        comparison = compare(x.metric, arms[x.arm]["summary"][x.metric], arms[x.than]["summary"][x.metric])
        expectations.append({**x.model_dump(), **comparison, "verdict": verdict(x.relation, comparison)})
    spec = p.runs[0].spec
    return {
        "experiment": e.name, "question": e.question, "paper": e.paper, "scale": p.scale, "seeds": p.seeds,
        "baseline": e.baseline, "metrics": list(e.metrics),
        "command": shlex.join(["zeroray", "experiment", e.name, "--scale", p.scale, "--seeds", str(p.seeds),
                               *([] if p.out == default_out(e.name, p.scale).resolve() else ["--out", str(p.out)]),
                               *p.overrides]),
        "machine": machine(), "written": time.strftime("%Y-%m-%d %H:%M"),
        "budget": {"steps": spec.trainer.max_steps, "tokens_per_step": spec.tokens_per_step,
                   "tokens_per_run": tokens_per_arm(spec), "workers": spec.cluster.workers,
                   "evaluation": _eval_line(spec)},
        "arms": arms, "expectations": expectations,
    }


# ---- writing ---------------------------------------------------------------------------------


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    if metric in ("params", "active_params"):
        return f"{value / 1e6:.2f}M"
    if metric == "flops_per_token":
        return f"{value:.3g}"
    if metric == "tokens_per_s":
        return f"{value:.0f}"
    return f"{value:.4f}"


def _cell(metric: str, s: dict) -> str:
    if s["mean"] is None:
        return "not run"
    if s["n"] > 1 and len(set(s["values"])) > 1:
        return f"{_fmt(metric, s['mean'])} ± {_fmt(metric, s['std'])}"
    return _fmt(metric, s["mean"])


def _delta_cell(metric: str, c: dict) -> str:
    if c["delta"] is None:
        return "–"
    rel = f" ({c['relative']:+.1%})" if c["relative"] is not None else ""
    beyond = {True: ", beyond spread", False: ", within spread", None: ""}[c["beyond_spread"]]
    sign = "+" if c["delta"] > 0 else "-" if c["delta"] < 0 else ""
    return f"{sign}{_fmt(metric, abs(c['delta']))}{rel}{beyond}"


def markdown(results: dict) -> str:
    metrics = results["metrics"]
    arms = results["arms"]
    b = results["budget"]
    lines = [
        f"# Experiment {results['experiment']} ({results['scale']})", "",
        results["question"], "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}",
        f"- budget per run: {b['steps']} steps × {b['tokens_per_step']:,} tokens = {b['tokens_per_run']:,} tokens, "
        f"workers: {b['workers']}; seeds per arm: {results['seeds']}",
        f"- evaluation: {b['evaluation']}",
        f"- paper: {results['paper']}", "",
        "Mean ± standard deviation over seeds.", "",
        "| arm | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " | paper |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for name, a in arms.items():
        mark = " (baseline)" if name == results["baseline"] else ""
        cells = [_cell(m, a["summary"][m]) for m in metrics]
        lines.append(f"| **{name}**{mark}: {a['label']} | " + " | ".join(cells) + f" | {a['paper'] or ''} |")
    lines += ["", f"Difference to the baseline ({results['baseline']}); beyond spread = the mean ± std "
              "intervals do not overlap.", "",
              "| arm | " + " | ".join(f"Δ {METRIC_TITLES[m]}" for m in metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for name, a in arms.items():
        if name != results["baseline"]:
            lines.append(f"| {name} | " + " | ".join(_delta_cell(m, a["vs_baseline"][m]) for m in metrics) + " |")
    if results["expectations"]:
        lines += ["", "Does it point the paper's way?", "", "| paper's claim | check | result |", "|---|---|---|"]
        for x in results["expectations"]:
            check = f"{METRIC_TITLES[x['metric']]}: {x['arm']} {x['relation'].replace('_', ' ')} than {x['than']}"
            lines.append(f"| {x['claim']} | {check} | {x['verdict']} |")
    lines += ["", "| run | status | steps | wall (s) | eval loss | train loss | tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        for r in a["runs"]:
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "–"
            lines.append(f"| {name} seed {r['seed']} | {r['status']} | {r['step']} | {wall} | "
                         f"{_fmt('eval_loss', r['eval_loss'])} | {_fmt('train_loss', r['train_loss'])} | "
                         f"{_fmt('tokens_per_s', r['tokens_per_s'])} |")
    lines += ["", "![eval loss against tokens](eval_loss.png)", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """Loss against tokens: each seed a thin line, the mean over seeds a thick one, a colour per arm."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ylabel = "eval loss"
    for i, (name, a) in enumerate(results["arms"].items()):
        colour = f"C{i}"
        curves = [dict(map(tuple, r["curve"])) for r in a["runs"] if r["curve"]]
        if any(r["curve_metric"] != "eval/loss" for r in a["runs"] if r["curve"]):
            ylabel = "loss (training loss where a run has no eval records)"
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), color=colour, alpha=0.35, linewidth=0.8)
        shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if shared:
            ax.plot(shared, [statistics.fmean(c[t] for c in curves) for t in shared], color=colour, linewidth=2,
                    marker="o", markersize=3, label=f"{name} ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{results['experiment']} ({results['scale']})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "eval_loss.png")


def default_out(name: str, scale: str) -> Path:
    return Path("runs") / "experiments" / f"{name}-{scale}"


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

