#!/usr/bin/env bash
# Create .venv and install zeroray with the pinned versions of constraints.txt.
# Idempotent: does nothing when pyproject.toml and constraints.txt have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.zeroray-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing zeroray and its pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 (pinned in constraints.txt) is the CPU build found on this machine's disk.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
