"""Shared fixtures: a small real dataset (prepared by zeroray itself) and one embedded Ray cluster."""

from __future__ import annotations

import os

# Tests never download: Hub names must fail fast and clearly instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Under pytest-xdist each worker's torch gets its share of the cores for its intra-op pool (set before torch
# is imported). With torch's default, every core in every worker, the OpenMP threads of one worker's
# in-process tests spin on the cores another worker's training ranks need.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import shutil  # noqa: E402
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import yaml

from data_pipelines.prepare import prepare

REPO = Path(__file__).resolve().parent.parent

# The files whose tests take minutes (multi-process Ray/DeepSpeed runs), longest first. scripts/test.sh
# runs the files on two pytest-xdist workers (--dist loadfile: a file's module fixtures, e.g. the
# fault tests' reference run, are built once); handing out the longest first keeps one worker from
# starting test_faults.py when the other is nearly done. Order only: a stale list costs time, not tests.
# Measured 2026-12-07 (CPU seconds of a serial run): 349, 168, 147, 82, 75, 61, 42, 35, 32, 29, 28.
LONGEST_FIRST = ("test_faults.py", "test_launchers.py", "test_train_families.py", "test_train_ray.py",
                 "test_remote_runs.py", "test_jobs.py", "test_moe_balance.py", "test_expert_parallel.py",
                 "test_mhc.py", "test_async_checkpoint.py", "test_hf_native.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Shards + BPE tokenizer built from a slice of the standard library (offline, ~2 s)."""
    out = tmp_path_factory.mktemp("corpus")
    source = Path(sysconfig.get_paths()["stdlib"]) / "email"
    prepare(out, source=source, shards=4, vocab_size=512, val_fraction=0.05)
    return out


def write_config(path: Path, corpus: Path, runs: Path, **sections) -> Path:
    """A tiny but complete run spec; keyword arguments update whole sections."""
    spec = {
        "model": {"name": "llama", "vocab_size": 0, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
        "data": {"sources": [{"path": str(corpus / "train")}], "tokenizer": str(corpus / "tokenizer.json"),
                 "seq_len": 32, "tokenize_batch": 4, "streams": 4,
                 # In-process reading: each loader worker pays a fork-server start in every
                 # training process; tests/test_launchers.py's CLI run has one loader worker.
                 "loader_workers": 0},
        "trainer": {"zero_stage": 2, "micro_batch_size": 4, "max_steps": 12, "warmup_steps": 2, "lr": 3e-3,
                    "log_every": 1, "checkpoint_every": 6},
        "cluster": {"workers": 2, "cpus_per_worker": 1},
        "output": {"dir": str(runs), "keep_last": 3},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def tiny_config(tmp_path, small_corpus) -> Path:
    return write_config(tmp_path / "tiny.yaml", small_corpus, tmp_path / "runs")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray cluster for all launch tests (bound to this machine, private temp dir)."""
    import ray

    temp = tempfile.mkdtemp(prefix="zr-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def free_ports(n: int = 1) -> list[int]:
    """n distinct ports free on 127.0.0.1 (all held open while they are chosen, so no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def torchrun_module(module: str, *args: str, nproc: int = 2, timeout: int = 500) -> None:
    """`torchrun --standalone --nproc_per_node N -m MODULE ARGS…` from the repository root on CPU (one
    thread per rank), failing the test with the end of its output if any rank fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m",
         module, *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def metrics_records(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
