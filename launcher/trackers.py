"""Metric trackers fed on the driver from the run's metrics records (the JSONL file stays the
source of truth; trackers are views of it, so a tracker failing never stops training)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("zeroray.trackers")


class TensorBoardSink:
    """Scalars under their metric names (`loss`, `aux/load_balance`, …), x = optimizer step; a list
    metric (tokens per expert) becomes one scalar per item. tensorboardX writes the event files
    without TensorFlow or the TensorBoard server installed."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder), flush_secs=5)

    def __call__(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name in ("step", "max_steps", "time"):
                continue
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float):
                self.writer.add_scalar(name, value, step)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{name}/{i}", v, step)

    def close(self) -> None:
        self.writer.close()
