"""The plan: every arm × seed of an experiment as a resolved run spec, checked to be a fair comparison."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from launcher.experiments.schema import PLATFORMS, Arm, Budget, Experiment, configs_dir
from trainer.errors import SpecError, ZerorayError
from trainer.spec import RunSpec, apply_overrides, parse_spec, read_yaml, resolve

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
    raw = apply_overrides(read_yaml(configs_dir() / budget.config),
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
