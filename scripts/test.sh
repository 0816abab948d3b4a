#!/usr/bin/env bash
# Set up and run the whole test suite (real Ray, real DeepSpeed, real datasets, on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
exec python -m pytest tests "$@"
