"""`zeroray models` (sizes and FLOPs of configs) and `zeroray experiment` (architecture comparisons)."""

from __future__ import annotations

import json
from pathlib import Path

DEEPSPEED = {"experiment"}  # unless --dry-run (cli.main asks `needs_deepspeed`)


def needs_deepspeed(args) -> bool:
    return args.command == "experiment" and not args.dry_run


def add_commands(sub) -> None:
    models_cmd = sub.add_parser(
        "models", help="list model configs with parameters and FLOPs per token",
        description="For each run spec (default: every file in configs/), the model family, total and active "
        "parameters (top_k experts of each MoE layer) and training FLOPs per token at the spec's sequence length.",
    )
    models_cmd.add_argument("configs", nargs="*", help="run spec files (default: configs/*.yaml)")
    models_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    experiment = sub.add_parser(
        "experiment", help="compare architectures: every arm × seed trained and evaluated, one results table",
        description="Run an experiment of configs/experiments/ (hyper-connections, moe-balancing, moe-bias-rate, widenet, charformer, convbert): "
        "every arm × seed through `zeroray train` on one Ray cluster, with the same data and budget, evaluated "
        "on the held-out split; writes results.md, results.json and eval_loss.png into the experiment's "
        "directory. Re-running skips the runs that finished. docs/results.md has the latest figures.",
    )
    experiment.add_argument("name", metavar="NAME", help="experiment: a file name in configs/experiments/")
    experiment.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every arm")
    experiment.add_argument("--scale", default="tiny",
                            help="budget and platform: smoke (3 steps), tiny (this 2-core CPU, 10–60 min), "
                            "small (one 8-GPU node), base (the papers' shapes on a GPU cluster); default tiny")
    experiment.add_argument("--seeds", type=int, default=2, help="seeds per arm (trainer.seed 0..N-1; default 2)")
    experiment.add_argument("--out", type=Path, default=None,
                            help="experiment directory (default runs/experiments/NAME-SCALE)")
    experiment.add_argument("--dry-run", action="store_true",
                            help="print the plan (arms, overrides, sizes, token budget) without training")
    experiment.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                            help="seconds between progress lines when output is not a terminal (default 30)")


def cmd_models(args) -> int:
    from launcher.model_table import model_rows

    rows = model_rows(args.configs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'config':<24} {'model':<16} {'params':>9} {'active':>9} {'train FLOPs/token':>18}  description")
    for r in rows:
        print(f"{r['config']:<24} {r['model']:<16} {r['params'] / 1e6:>8.2f}M {r['active_params'] / 1e6:>8.2f}M "
              f"{r['flops_per_token']:>18.3e}  {r['summary']}")
    return 0


def cmd_experiment(args) -> int:
    from launcher.experiments import cli

    return cli(args.name, args.scale, args.seeds, args.out, args.dry_run, args.overrides, args.progress_interval)


COMMANDS = {
    ("models", None): cmd_models,
    ("experiment", None): cmd_experiment,
}
