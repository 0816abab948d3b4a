#!/usr/bin/env bash
# Set up and run the whole test suite (real Ray, real DeepSpeed, real datasets, on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
# Two pytest-xdist workers, one file at a time each (a file's module fixtures are built once);
# tests/conftest.py hands out the longest files first. `-n 0` after the script runs serially.
exec python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder "$@"
