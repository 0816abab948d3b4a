"""Connect to a Ray cluster: an embedded one on this machine by default, or `cluster.address`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.config import ClusterConfig


def worker_env(cluster: ClusterConfig) -> dict[str, str]:
    """Environment for every training worker: thread pools sized to the cores it was given."""
    threads = str(cluster.cpus_per_worker)
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "RAYON_NUM_THREADS": threads,  # the Rust tokenizer's pool
        "TOKENIZERS_PARALLELISM": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextmanager
def ray_cluster(cluster: ClusterConfig, temp_dir: str | None = None) -> Iterator[str]:
    """Yield a description of the cluster in use; shut down only what we started.

    The embedded cluster uses address="local" so it never attaches to another Ray cluster that
    happens to run on this machine, and it does not forward worker output to the console: the
    workers write per-rank logs in the run directory and the driver shows progress.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield "the Ray cluster this process already joined"
        return
    if cluster.address:
        ray.init(address=cluster.address, log_to_driver=True)
        where = f"Ray cluster at {cluster.address}"
    else:
        needed = cluster.workers * cluster.cpus_per_worker
        ray.init(
            address="local",
            num_cpus=max(needed, os.cpu_count() or 1),
            num_gpus=cluster.workers * cluster.gpus_per_worker,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
        where = "embedded local Ray cluster"
    try:
        yield where
    finally:
        ray.shutdown()
