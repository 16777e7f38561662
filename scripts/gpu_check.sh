#!/usr/bin/env bash
# The prepared GPU check (under 8 minutes on one GPU): the tests marked `cuda` (bf16 autocast, per-document
# attention on CUDA, cached decode, activation checkpointing, single-rank FSDP2), then bench/gpu_bench.py
# (bf16 training-step and decode speed of a ~1.1B Nano-shaped model, and `elasticlm plan` against the GPU's
# measured peak memory at 4K, 16K and 49K tokens). Everything lands in one JSON:
#   bash scripts/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; writes OUT_DIR/gpu_check.json
# Needs python3 with torch (CUDA), safetensors, tokenizers, tqdm and pytest; installs nothing when they are
# there (GPU machines often have no network), else `pip install -e .[dev]` without touching torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! $PY -c "import torch, safetensors, tokenizers, tqdm, pytest" 2>/dev/null; then
  $PY -m pip install --quiet -e ".[dev]" || { echo "cannot install the dependencies"; exit 2; }
fi
$PY - <<'PY'
import torch, sys
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
sys.exit(0 if torch.cuda.is_available() else 3)
PY
[ $? -eq 0 ] || { echo "no CUDA GPU here: nothing to check"; exit 3; }
start=$(date +%s)
timeout 240 $PY -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --junitxml "$OUT_DIR/cuda_tests.xml" \
  2>&1 | tee "$OUT_DIR/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 300 $PY bench/gpu_bench.py --out "$OUT_DIR/gpu_bench.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
$PY - "$OUT_DIR" "$tests_rc" "$bench_rc" "$start" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = {}
if (out / "cuda_tests.xml").exists():
    for case in ET.parse(out / "cuda_tests.xml").iter("testcase"):
        status = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        tests[case.get("name")] = status
bench = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").exists() else None
result = {"tests_rc": tests_rc, "tests": tests, "bench_rc": bench_rc, "bench": bench,
          "seconds": round(time.time() - start)}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=2))
PY
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
