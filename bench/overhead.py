"""The two training runs the bench compares: `zeroray train` and the hand-written DeepSpeed loop.

`run_zeroray` launches `zeroray train` as a user would (embedded Ray cluster, streaming data,
metrics, a checkpoint at the end) and reads its metrics file: steady-state tokens/s over the steps
after the warm-up (the final checkpoint is excluded by the trainer's own timing), and the start-up
timeline (`startup.timeline`). `run_handwritten` runs `bench/handwritten_ds.py` under torchrun with
the same spec: same model, batch, worker count, threads and DeepSpeed config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from startup import timeline

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 1800  # a run that hangs (a stuck collective) must not hang the bench


def bench_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS=str(threads))
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _run(cmd: list[str], what: str, env: dict, cwd: Path = REPO) -> tuple[str, list[tuple[float, str]]]:
    """Run a command; returns its stdout and its stderr lines with the time each arrived."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    stdout: list[str] = []
    stderr: list[tuple[float, str]] = []

    def read_stdout() -> None:
        stdout.extend(proc.stdout)

    def read_stderr() -> None:
        for line in proc.stderr:
            stderr.append((time.time(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, daemon=True) for read in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not finish within {RUN_TIMEOUT_S} s: {' '.join(cmd)}") from None
    finally:
        for reader in readers:
            reader.join()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in stderr[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return "".join(stdout), stderr


def steady_tokens_per_s(records: list[dict], warmup: int) -> float:
    """tokens/s over the steps after `warmup`; each record covers the steps since the previous one."""
    previous = {r["step"]: p["step"] for p, r in zip(records, records[1:], strict=False)}
    steady = [r for r in records if r["step"] > warmup and r["step"] in previous]
    if not steady:
        raise ValueError(f"no metrics record after step {warmup}: run more steps than the warm-up")
    tokens = sum((r["step"] - previous[r["step"]]) * r["tokens_per_s"] * r["step_time_s"] for r in steady)
    seconds = sum((r["step"] - previous[r["step"]]) * r["step_time_s"] for r in steady)
    return tokens / seconds


def run_zeroray(config: Path, overrides: list[str], steps: int, warmup: int, runs_dir: Path,
                name: str) -> dict:
    """`zeroray train CONFIG …` in a subprocess, `warmup` steps discarded (one record at step
    `warmup`, then one per `warmup` steps)."""
    cmd = [str(BIN / "zeroray"), "train", str(config), *overrides, f"trainer.max_steps={steps}",
           f"trainer.warmup_steps={min(warmup, steps - 1)}", f"trainer.log_every={max(1, warmup)}",
           "trainer.checkpoint_every=0", f"output.dir={runs_dir}", f"output.name={name}", "--fresh"]
    launched = time.time()
    _, stderr = _run(cmd, "zeroray train", bench_env())
    run_dir = runs_dir / name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {"tokens_per_s": steady_tokens_per_s(records, warmup) if steps > warmup else None,
            "first_step_s": records[0]["time"] - launched, "precision": records[0]["precision"],
            "steps": steps, "warmup": warmup, "startup": timeline(launched, stderr, records[0], run_dir)}


def run_handwritten(config: Path, overrides: list[str], workers: int, steps: int, warmup: int) -> dict:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(workers),
           str(BENCH / "handwritten_ds.py"), str(config), str(steps), str(warmup), *overrides]
    stdout, _ = _run(cmd, "the hand-written DeepSpeed loop", bench_env())
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
