#!/usr/bin/env bash
# Install everything, then run the whole method end to end (≈ 21–23 min with the install on 2 CPU cores):
# train the small parent → importance + reorder → elastic training of budgets 1.0 / 0.75 / 0.5 →
# extract every budget → zero-shot pruned baselines → evaluation table + Pareto plot (runs/demo/eval/).
# Extra arguments go to `elasticlm demo`, e.g. `bash scripts/demo.sh --quick` (a 30-second smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
elasticlm demo "$@"
