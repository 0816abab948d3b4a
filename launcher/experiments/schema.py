"""The experiment files (configs/experiments/NAME.yaml): arms, budgets per scale, expectations."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import ZerorayError
from trainer.spec import read_yaml

CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout, when zeroray runs from one
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

Metric = Literal["params", "active_params", "flops_per_token", "tokens_per_s", "eval_loss", "train_loss",
                 "load_imbalance"]
METRIC_TITLES = {"params": "params", "active_params": "active params", "flops_per_token": "FLOPs/token",
                 "tokens_per_s": "tokens/s", "eval_loss": "eval loss", "eval_bits_per_byte": "eval bits/byte",
                 "train_loss": "train loss",
                 # MoE: max ÷ mean expert load over a step (all ranks), averaged over layers and over the
                 # records of the run's last quarter (moe/max_load_over_mean; 1 = balanced)
                 "load_imbalance": "max/mean load"}

def configs_dir() -> Path:
    """The folder of run specs the experiments name (`configs/`): $ZERORAY_CONFIGS, else ./configs of the
    working directory, else the copy an installed zeroray ships (sys.prefix/share/zeroray/configs, see
    pyproject's data-files), else the source checkout's. Why not only next to this file: an installed
    package has no configs/ beside it."""
    candidates = [Path(os.environ["ZERORAY_CONFIGS"])] if os.environ.get("ZERORAY_CONFIGS") else []
    candidates += [Path.cwd() / "configs", Path(sys.prefix) / "share" / "zeroray" / "configs", CHECKOUT / "configs"]
    for folder in candidates:
        if (folder / "experiments").is_dir():
            return folder
    raise ZerorayError(f"no configs/experiments folder found (looked in {', '.join(map(str, candidates))}); "
                       f"run from a zeroray checkout or set $ZERORAY_CONFIGS")


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
    return sorted(p.stem for p in (configs_dir() / "experiments").glob("*.yaml"))


def load_experiment(name: str) -> Experiment:
    path = configs_dir() / "experiments" / f"{name}.yaml"
    if not path.is_file():
        raise ZerorayError(f"no experiment {name!r}; experiments: {', '.join(names())} (configs/experiments/)")
    try:
        return Experiment.model_validate({"name": name, **read_yaml(path)})
    except ValidationError as err:
        problems = "\n  ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                               for e in err.errors())
        raise ZerorayError(f"{path} is invalid:\n  {problems}") from None


def default_out(name: str, scale: str) -> Path:
    return Path("runs") / "experiments" / f"{name}-{scale}"
