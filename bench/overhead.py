"""zeroray's training throughput against a hand-written DeepSpeed loop, in one sitting.

For each ZeRO stage, runs `zeroray train` (embedded Ray cluster, streaming data, metrics,
checkpoint at the end) and `bench/handwritten_ds.py` under torchrun with the same model, batch,
worker count and precision, as `--repeats` pairs in alternating order (this 2-core machine drifts by
±10% between runs). Reports steady-state tokens/s (steps after the warm-up), the median of the pairs'
ratios with their range, and the seconds from the `zeroray train` command to its first optimizer step.

    .venv/bin/python bench/overhead.py [--config configs/demo.yaml] [--steps 60] [--stages 0 2 3] [--repeats 2]

Writes bench/results/<date>-overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import save

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_zeroray(config: str, stage: int, steps: int, warmup: int, runs_dir: str) -> dict:
    cmd = [str(BIN / "zeroray"), "train", config, f"trainer.zero_stage={stage}", f"trainer.max_steps={steps}",
           f"trainer.log_every={warmup}", "trainer.checkpoint_every=0", f"output.dir={runs_dir}",
           f"output.name=zero{stage}", "--fresh"]
    launched = time.time()
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env())
    records = [json.loads(x) for x in (Path(runs_dir) / f"zero{stage}" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["step"] > warmup]
    # Each record covers the steps since the previous one: total tokens / total seconds.
    prev = {r["step"]: p["step"] for p, r in zip(records, records[1:], strict=False)}
    tokens = sum((r["step"] - prev[r["step"]]) * r["tokens_per_s"] * r["step_time_s"] for r in steady)
    seconds = sum((r["step"] - prev[r["step"]]) * r["step_time_s"] for r in steady)
    return {"tokens_per_s": tokens / seconds, "first_step_s": records[0]["time"] - launched,
            "precision": records[0]["precision"]}


def run_handwritten(config: str, stage: int, steps: int, warmup: int) -> dict:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "bench" / "handwritten_ds.py"),
           config, str(stage), str(steps), str(warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env(), cwd=REPO).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zr-bench-") as runs_dir:
        for stage in args.stages:
            pairs = []
            for i in range(args.repeats):
                first, second = (run_zeroray, run_handwritten) if i % 2 == 0 else (run_handwritten, run_zeroray)
                a = first(args.config, stage, args.steps, args.warmup, *([runs_dir] if first is run_zeroray else []))
                b = second(args.config, stage, args.steps, args.warmup, *([runs_dir] if second is run_zeroray else []))
                ours, base = (a, b) if first is run_zeroray else (b, a)
                pairs.append({"zeroray": ours, "handwritten": base, "ratio": ours["tokens_per_s"] / base["tokens_per_s"]})
                print(json.dumps({"stage": stage, **pairs[-1]}), file=sys.stderr, flush=True)
            ratios = sorted(p["ratio"] for p in pairs)
            rows.append({"stage": stage, "ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
                         "ratio_max": ratios[-1],
                         "zeroray_tokens_per_s": statistics.median(p["zeroray"]["tokens_per_s"] for p in pairs),
                         "handwritten_tokens_per_s": statistics.median(p["handwritten"]["tokens_per_s"] for p in pairs),
                         "first_step_s": statistics.median(p["zeroray"]["first_step_s"] for p in pairs),
                         "precision": pairs[0]["zeroray"]["precision"], "pairs": pairs})
    out = save("overhead", {"config": args.config, "steps": args.steps, "warmup": args.warmup,
                            "repeats": args.repeats, "rows": rows})
    print("| ZeRO stage | zeroray tokens/s | hand-written tokens/s | ratio (median, range) | command → first step (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['zeroray_tokens_per_s']:.0f} | {r['handwritten_tokens_per_s']:.0f} | "
              f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | {r['first_step_s']:.1f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
