"""`zeroray data inspect` and `zeroray data trace`, run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ZERORAY = shutil.which("zeroray", path=str(Path(sys.executable).parent)) or "zeroray"


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([ZERORAY, *map(str, args)], capture_output=True, text=True, timeout=180)


def test_trace_is_the_same_when_the_run_resumes_on_another_worker_count(tiny_config):
    plain = run("data", "trace", tiny_config, "--steps", "4", "--json")
    assert plain.returncode == 0, plain.stderr[-2000:]
    resized = run("data", "trace", tiny_config, "--steps", "4", "--resume-at", "2", "--resume-world", "1", "--json")
    assert resized.returncode == 0, resized.stderr[-2000:]
    a, b = json.loads(plain.stdout), json.loads(resized.stdout)
    assert len(a["steps"]) == 4 and len(set(a["steps"])) == 4
    assert a["steps"] == b["steps"] and a["overall"] == b["overall"]
    assert b["schedule"] == [[0, 2], [2, 1]]
    bad = run("data", "trace", tiny_config, "--steps", "4", "--resume-at", "2", "--resume-world", "3")
    assert bad.returncode == 2 and "data.streams (4) must be a multiple of the worker count (3)" in bad.stderr


def test_inspect_shows_sources_batch_and_samples(tiny_config):
    proc = run("data", "inspect", tiny_config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "objective: causal" in out and "tokens/document mean" in out
    assert "first batch: input_ids [4, 32], labels [4, 32]" in out and "packing efficiency (real tokens) 100.0%" in out
    assert out.count("sample ") == 2
