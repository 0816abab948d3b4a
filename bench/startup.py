"""Where the seconds from `zeroray train …` to the first optimizer step go.

`timeline` splits one run's start-up at the marks the run leaves anyway, without touching the
trainer: the lines the CLI writes to stderr (run directory ready; Ray cluster up), the trainer's
start on rank 0 (its first metrics record says how long after it was written), DeepSpeed's own log
lines in the rank-0 log (engine set-up begins and ends), and the first record's time.

`import_probe` runs this file in a fresh interpreter, which times the imports a worker pays (each
figure is what that import adds to the ones before it). (DeepSpeed's CPU shm communication op, once
JIT-built on first use and loaded at every start, is no longer part of a rank's start: trainer/build.py.)
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

# What the CLI prints when the run directory is ready and when the Ray cluster is up (launcher/ray_launch.py).
RUN_DIR_READY = ("zeroray: new run in", "zeroray: --fresh:", "zeroray: resuming")
CLUSTER_UP = "zeroray: training on"
DS_ENGINE_START = "DeepSpeed info: version="  # DeepSpeedEngine.__init__ begins
DS_ENGINE_CONFIG = "DeepSpeedEngine configuration:"  # printed at the end of the engine's set-up
PROBED_IMPORTS = ("torch", "mlflow", "deepspeed", "ray", "ray.train.torch", "datasets", "transformers",
                  "models", "data_pipelines", "trainer.loop")


def _log_time(line: str) -> float | None:
    """Epoch seconds of a log line stamped by logging's default asctime ('2026-11-22 08:48:47,461 …')."""
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def _first(stderr: list[tuple[float, str]], prefixes: tuple[str, ...] | str) -> float | None:
    return next((t for t, line in stderr if line.startswith(prefixes)), None)


def _deepspeed_marks(rank0_log: Path, before: float) -> tuple[float | None, float | None]:
    """(engine set-up starts, ends) from the rank-0 log: the version line, and the last line of the
    configuration dump that ends the set-up (the last stamped line before the first step's record)."""
    if not rank0_log.is_file():
        return None, None
    start = end = None
    in_dump = False
    for line in rank0_log.read_text(errors="replace").splitlines():
        stamp = _log_time(line)
        if stamp is None or stamp > before:
            continue
        if DS_ENGINE_START in line and start is None:
            start = stamp
        if DS_ENGINE_CONFIG in line:
            in_dump = True
        if in_dump:
            end = stamp
    return start, end


def timeline(launched: float, stderr: list[tuple[float, str]], first_record: dict, run_dir: Path) -> dict:
    """Seconds of each start-up phase of one `zeroray train` run (phases whose marks are missing
    merge into the next one)."""
    first_step = first_record["time"]
    train_start = first_record["time"] - first_record["since_start_s"]  # trainer.loop.train() entered, rank 0
    ds_start, ds_end = _deepspeed_marks(run_dir / "logs" / "rank_0.log", first_step)
    marks = [
        ("CLI: imports, spec, data preflight (one batch), run directory", _first(stderr, RUN_DIR_READY)),
        ("Ray: embedded cluster start (ray.init)", _first(stderr, CLUSTER_UP)),
        ("Ray Train: controller, worker processes, their imports, process group", train_start),
        ("worker: DeepSpeed comm init, logging, checkpoint lookup, model build", ds_start),
        ("DeepSpeed engine and ZeRO optimizer set-up", ds_end),
        ("data stream, metrics set-up, first batch, first forward/backward/step", first_step),
    ]
    phases, previous = [], launched
    for name, mark in marks:
        if mark is None:
            continue
        phases.append({"phase": name, "seconds": max(0.0, mark - previous)})
        previous = max(previous, mark)
    return {"first_step_s": first_step - launched, "phases": phases}


def _probe() -> dict:
    """Runs in the fresh interpreter: incremental import times."""
    import importlib

    out, modules = {"imports": []}, list(PROBED_IMPORTS)
    for name in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError:
            continue  # mlflow is optional
        out["imports"].append({"module": name, "seconds": time.perf_counter() - start})
    return out


def import_probe(env: dict) -> dict:
    cmd = [sys.executable, __file__]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the import probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; the JSON goes there alone
        result = _probe()
    print(json.dumps(result))
