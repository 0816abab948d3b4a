"""What the entry points import: every module a process imports at start-up costs CPU on every rank of every
launch (docs/performance.md, start-up), so heavy libraries stay out of the paths that do not use them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def imported_by(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_a_training_rank_does_not_import_transformers():
    """The step loop, its hooks and the model families a rank builds by default (llama) need torch,
    DeepSpeed and `datasets`; `transformers` only for export, generation with a cache and ConvBERT."""
    held = imported_by("import trainer.loop, models")
    assert {"torch", "datasets"} <= held, held
    assert "transformers" not in held
