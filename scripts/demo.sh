#!/usr/bin/env bash
# Set up, build the offline demo data (once), and train the demo model on an embedded Ray cluster.
# Extra arguments are passed to `zeroray train`, e.g. trainer.max_steps=50 or --fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0
[ -f data/stdlib/tokenizer.json ] || zeroray data prepare --out data/stdlib
exec zeroray train configs/demo.yaml "$@"
