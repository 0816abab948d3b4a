"""Where and how the bench scripts store their figures: bench/results/<date>-<kind>.json."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(kind: str, result: dict) -> Path:
    """Write `result` with the date and the machine it ran on; returns the file."""
    stamped = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **result}
    out = RESULTS / f"{datetime.date.today()}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamped, indent=2) + "\n")
    return out
