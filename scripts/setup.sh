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
lock=requirements/dev.lock
if [ -n "${TORCH_VERSION:-}" ]; then  # a deliberate other torch: pin it, keep every other package locked
  grep -v '^torch==' requirements/dev.lock > "$VENV/dev.lock.no-torch"
  lock="$VENV/dev.lock.no-torch"
  "${pip[@]}" "torch==${TORCH_VERSION}"
fi
# The lock lists every package with its dependencies already resolved: installing it without a second resolution
# is both exact and fast. The CPU build of torch lies on local disk here (pip's find-links); a bare `torch`
# requirement would pull a multi-GB CUDA build.
"${pip[@]}" --no-deps -r "$lock"
"${pip[@]}" --no-deps -e .
# Byte-compile on both cores instead of pip's one (--no-compile above): this shell and CI set
# PYTHONDONTWRITEBYTECODE, so modules not compiled here would be compiled again by every process the tests start.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true  # a few vendored py2 files never compile
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null || {
  echo "error: the installed set is inconsistent (pip check); refresh requirements/dev.lock with scripts/lock.sh" >&2
  "$VENV/bin/python" -m pip check --disable-pip-version-check >&2
  exit 1
}
