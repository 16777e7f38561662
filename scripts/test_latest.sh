#!/usr/bin/env bash
# Does elasticlm still pass against the newest releases of what it talks to? Builds a side virtualenv
# (.venv-latest, not the locked .venv) with the newest versions the ranges in pyproject.toml admit, lists every
# package whose version differs from requirements/dev.lock, and runs the interop tests (transformers, lm-eval,
# openai, gguf, datasets) there. Exit status 0: all pass, so `bash scripts/lock.sh` may move the pins.
#
#   bash scripts/test_latest.sh                          # newest of everything
#   bash scripts/test_latest.sh "transformers==5.24.*"   # the locked set with one package moved
#   bash scripts/test_latest.sh --all [PINS...]          # the whole suite instead of the interop tests
#
# Record what it printed (versions and outcome) in docs/dependencies.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LATEST_VENV:-.venv-latest}
tests=(tests/test_hf_parity.py tests/test_hf_llama.py tests/test_hf_mamba2.py tests/test_families.py tests/test_moe.py
       tests/test_lm_eval.py tests/test_serve.py tests/test_serving.py tests/test_gguf.py tests/test_data.py
       tests/test_checkpoint_cli.py tests/test_deploy.py)
if [ "${1:-}" = "--all" ]; then tests=(); shift; fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"  # the CPU build on local disk; see scripts/setup.sh
if [ "$#" -gt 0 ]; then
  # The locked set with the named packages moved: every other package stays where the suite was tested.
  grep -v '^torch==' requirements/dev.lock > "$VENV/lock.txt"
  for spec in "$@"; do
    name=$(echo "$spec" | sed -E 's/[<>=!~ ].*//' | tr 'A-Z_' 'a-z-')
    grep -viE "^${name}==" "$VENV/lock.txt" > "$VENV/lock.tmp" && mv "$VENV/lock.tmp" "$VENV/lock.txt"
  done
  "${pip[@]}" --no-deps -r "$VENV/lock.txt"
  "${pip[@]}" "$@"  # the moved packages, with whatever they need in turn
  "${pip[@]}" --no-deps -e .
else
  "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[dev]"
fi
echo "== versions that differ from requirements/dev.lock"
"$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import distributions
locked = {}
for line in open("requirements/dev.lock"):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
    if m:
        locked[m.group(1).lower().replace("_", "-")] = m.group(2)
moved = []
for d in distributions():
    name = d.metadata["Name"].lower().replace("_", "-")
    if name in locked and locked[name] != d.version:
        moved.append(f"  {name}: {locked[name]} -> {d.version}")
print("\n".join(sorted(moved)) or "  none")
PY
echo "== interop tests against these versions"
if "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist worksteal "${tests[@]}"; then
  echo "test_latest: PASS"
else
  echo "test_latest: FAIL (see the failures above; fix them or pin the package that moved)"
  exit 1
fi
