#!/usr/bin/env bash
# Install everything and run the main job. Until the elastic demo exists this shows the CLI,
# creates a tiny random model and generates from it (full model, then a nested half-width one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
elasticlm --help
elasticlm init runs/tiny --preset tiny --force
elasticlm info runs/tiny
elasticlm generate --model runs/tiny --prompt "Hello" --max-new-tokens 16 --ignore-eos
python - <<'PY'
import json
from elasticlm import Subnet, load
m = load("runs/tiny")
s = Subnet.uniform(m.config, hidden_size=32, mamba_heads_per_group=2, attention_heads_per_kv_group=1,
                   intermediate_size=96)
json.dump(s.to_dict(), open("runs/tiny-half.json", "w"))
print(f"half-width subnet: {m.num_parameters(s):,} of {m.num_parameters():,} parameters")
PY
elasticlm generate --model runs/tiny --subnet runs/tiny-half.json --prompt "Hello" --max-new-tokens 16 --ignore-eos
