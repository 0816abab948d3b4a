"""Fingerprints of the global batches a run would train on, for any worker count and resumes.

`trace` plays every worker's `BatchStream` in one process (no torch.distributed) and hashes
each optimizer step's rows as a set: the order of rows inside a step depends on the worker
count, the set must not. A resume saves every worker's data state (through JSON, as a checkpoint
does), merges them and loads the union into the workers of the new count. Two traces with the
same per-step fingerprints feed the optimizer the same data: nothing skipped, nothing repeated.
Behind `zeroray data trace`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_pipelines.config import DataConfig, LayoutError
from data_pipelines.stream import BatchStream, merge_states


@dataclass(frozen=True)
class DataTrace:
    steps: tuple[str, ...]
    """sha256 of each optimizer step's rows, taken as a set."""
    overall: str
    """sha256 of all the step fingerprints, in order."""
    schedule: tuple[tuple[int, int], ...]
    """(first step, worker count) of each stretch: the start, then every resume."""

    def to_dict(self) -> dict:
        return {"overall": self.overall, "steps": list(self.steps), "schedule": [list(s) for s in self.schedule]}

    def lines(self) -> list[str]:
        stretches = ", ".join(f"{w} worker(s) from step {s}" for s, w in self.schedule)
        return [f"step {k}: {fp}" for k, fp in enumerate(self.steps)] + [f"overall: {self.overall} ({stretches})"]


def trace(
    cfg: DataConfig,
    steps: int,
    global_batch: int,
    world: int = 1,
    micro_batch: int | None = None,
    resumes: Sequence[tuple[int, int]] = (),
) -> DataTrace:
    """Fingerprints of `steps` optimizer steps of `global_batch` rows, read by `world` workers;
    `resumes` = (step, worker count) pairs: after that many steps, save and resume on that count.

    `micro_batch`: rows per worker batch (None = a worker's whole share of a step); the
    accumulation steps follow from the batch and the worker count, as when a run changes size.
    """
    schedule = ((0, world), *sorted((int(at), int(count)) for at, count in resumes))
    if any(not 0 < at < steps for at, _ in schedule[1:]) or len({at for at, _ in schedule}) < len(schedule):
        raise ValueError(f"resume steps {[at for at, _ in schedule[1:]]} must be distinct and in 1..{steps - 1}")
    for _, count in schedule:
        cfg.check_layout(global_batch, count)
    # Every worker is played in this process, so its streams are read here too: loader workers would
    # give the same rows (tested) and only start processes.
    cfg = cfg.model_copy(update={"loader_workers": 0})
    fingerprints: list[str] = []
    workers: list[BatchStream] = []
    for n, (start, count) in enumerate(schedule):
        end = schedule[n + 1][0] if n + 1 < len(schedule) else steps
        micro, accum = _split(global_batch, count, micro_batch)
        resumed = [json.loads(json.dumps(w.state_dict())) for w in workers]  # as a checkpoint stores it
        workers = [BatchStream(cfg, micro, rank, count, accum) for rank in range(count)]
        if resumed:
            union = merge_states(resumed)
            for w in workers:
                w.load_state_dict(union)
        for _ in range(start, end):
            rows = [_row_digest(batch, r) for w in workers for batch in _take(w, accum) for r in range(micro)]
            fingerprints.append(hashlib.sha256("".join(sorted(rows)).encode()).hexdigest())
    overall = hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()
    return DataTrace(tuple(fingerprints), overall, schedule)


def _split(global_batch: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch rows, accumulation steps) that make `global_batch` rows on `world` workers."""
    micro = micro_batch or global_batch // world
    if global_batch % (micro * world):
        raise LayoutError(
            f"a global batch of {global_batch} rows cannot be split into micro-batches of {micro} rows on "
            f"{world} worker(s): it must be a multiple of {micro} × {world}"
        )
    return micro, global_batch // (micro * world)


def _take(stream: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(n)]


def _row_digest(batch: dict[str, torch.Tensor], row: int) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode())
        h.update(batch[key][row].numpy().tobytes())
    return h.hexdigest()
