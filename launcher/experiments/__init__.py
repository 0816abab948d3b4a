"""`zeroray experiment NAME`: compare architectures fairly — same data, same tokens, same budget.

An experiment is data (configs/experiments/NAME.yaml): per scale a base config and a budget, the arms
as override lists, the metrics its table shows, the paper's figures and the direction its claims
point. Every arm × seed is a `zeroray train` run (launcher.ray_launch.launch) in its own run
directory under the experiment's directory, all on one Ray cluster; only `trainer.seed` changes
between seeds, so every arm reads the same data in the same order. The runs evaluate on the
held-out split (the spec's `eval` section); the results land next to them as results.json,
results.md and eval_loss.png. Re-running the command skips the runs that finished.

The package: schema (the files), plan (arm × seed → run specs), run (training them; the command),
report (statistics, results.md/json, the plot).
"""

from launcher.experiments.plan import Plan, PlannedRun, arm_spec, plan, plan_lines
from launcher.experiments.report import (
    collect,
    compare,
    markdown,
    run_metrics,
    summarise,
    verdict,
    write_results,
)
from launcher.experiments.run import cli, run_experiment, run_state
from launcher.experiments.schema import (
    HELD_OUT,
    PLATFORMS,
    SCALES,
    Arm,
    Budget,
    Experiment,
    configs_dir,
    default_out,
    load_experiment,
    names,
)

__all__ = ["HELD_OUT", "PLATFORMS", "SCALES", "Arm", "Budget", "Experiment", "Plan", "PlannedRun", "arm_spec",
           "cli", "collect", "compare", "configs_dir", "default_out", "load_experiment", "markdown", "names",
           "plan", "plan_lines", "run_experiment", "run_metrics", "run_state", "summarise", "verdict",
           "write_results"]
