"""Collecting the runs' metrics into per-arm statistics and comparisons, and writing results.md/json + plot."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

from launcher.experiments.plan import Plan, PlannedRun, _eval_line, model_size, tokens_per_arm
from launcher.experiments.schema import METRIC_TITLES, default_out
from trainer.storage import RunDir

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
        # bits per byte: comparable across tokenizers (byte-level Charformer against BPE models)
        "eval_bits_per_byte": evals[-1].get("eval/bits_per_byte") if evals else None,
        "eval_step": evals[-1]["step"] if evals else None,
        "train_loss": train[-1]["loss"] if train else None,
        "load_imbalance": _late_mean(train, "moe/max_load_over_mean"),
        "curve_metric": key,
        "curve": [[r["step"] * spec.tokens_per_step, r[key]] for r in curve_from],
    }


def _late_mean(records: list[dict], key: str) -> float | None:
    """The mean of `key` over the records of the run's last quarter of steps (None where absent)."""
    values = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    if not values:
        return None
    last = values[-1][0]
    return statistics.fmean([v for step, v in values if step > 0.75 * last] or [values[-1][1]])


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
    lines += ["", "| run | status | steps | wall (s) | eval loss | eval bits/byte | train loss | tokens/s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        for r in a["runs"]:
            wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "–"
            lines.append(f"| {name} seed {r['seed']} | {r['status']} | {r['step']} | {wall} | "
                         f"{_fmt('eval_loss', r['eval_loss'])} | {_fmt('eval_loss', r.get('eval_bits_per_byte'))} | "
                         f"{_fmt('train_loss', r['train_loss'])} | "
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
