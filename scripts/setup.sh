#!/usr/bin/env bash
# Create .venv (if missing) and install elasticlm with its test tools at the exact versions of
# requirements/dev.lock (what the suite was last tested with). Safe to re-run: it also brings an existing .venv
# back to the lock. The package's own requirements (pyproject.toml) stay ranges; only this environment is pinned.
# Refresh the pins on purpose with scripts/lock.sh; scripts/test_latest.sh says whether the newest releases pass.
#
# TORCH_VERSION=2.14.1 bash scripts/setup.sh   installs another torch and leaves torch out of the lock's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)
# uv (pinned in requirements/tools.txt) installs the lock with parallel downloads; pip stays the fallback. Neither
# byte-compiles here: scripts/test.sh caches byte-code for what the tests import (PYTHONPYCACHEPREFIX).
"${pip[@]}" -r requirements/tools.txt || echo "setup: could not install uv; installing with pip" >&2
install=("$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python")
if [ -n "${PIP_FIND_LINKS:-}" ]; then  # where pip finds the CPU build of torch on this machine; uv needs telling
  for links in $PIP_FIND_LINKS; do install+=(--find-links "$links"); done
fi
if [ ! -x "$VENV/bin/uv" ]; then install=("${pip[@]}"); fi
lock=requirements/dev.lock
if [ -n "${TORCH_VERSION:-}" ]; then  # a deliberate other torch: pin it, keep every other package locked
  grep -v '^torch==' requirements/dev.lock > "$VENV/dev.lock.no-torch"
  lock="$VENV/dev.lock.no-torch"
  "${pip[@]}" "torch==${TORCH_VERSION}"  # pip: the local CPU builds and this machine's cap apply
fi
# The lock lists every package with its dependencies already resolved: installing it without a second resolution
# is both exact and fast. The CPU build of torch lies on local disk here (pip's find-links); a bare `torch`
# requirement would pull a multi-GB CUDA build.
"${install[@]}" --no-deps -r "$lock" || {
  echo "setup: uv could not install the lock; trying pip" >&2
  "${pip[@]}" --no-deps -r "$lock"
}
# the build backend from the lock as well (setuptools is pinned there), not whatever PyPI has today
"${install[@]}" --no-deps --no-build-isolation -e . || "${pip[@]}" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null || {
  echo "error: the installed set is inconsistent (pip check); refresh requirements/dev.lock with scripts/lock.sh" >&2
  "$VENV/bin/python" -m pip check --disable-pip-version-check >&2
  exit 1
}
