#!/usr/bin/env bash
# Run the suite against the LOWEST versions pyproject.toml declares for hypothesis, pytest,
# pytest-xdist and tabulate (each pinned to its `>=` bound), with the CPU build of torch 2.13.0,
# in a fresh virtual environment. A bound that fails here must be raised in pyproject.toml.
# Usage: ci/lower-bounds.sh [VENV_DIR [PYTEST_ARGS...]]   (default: a new temporary venv, removed after)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-}"
shift || true  # the rest goes to pytest
if [ -z "$venv" ]; then
    venv="$(mktemp -d)"
    trap 'rm -rf "$venv"' EXIT
fi
python3 -m venv --clear "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pins="$(python - <<'PY'
import re
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name, lower = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", dep.strip()).groups()
    if name in ("hypothesis", "pytest", "pytest-xdist", "tabulate"):
        print(f"{name}=={lower}")
PY
)"
echo "lower bounds: $(echo "$pins" | tr '\n' ' ')"
# shellcheck disable=SC2086
python -m pip install --quiet torch==2.13.0 $pins "matplotlib>=3.7"  # the plot extra, as the README installs it (numpy with it)
python -m pip install --quiet --no-deps -e .
python -m pip check
python -m pip list 2>/dev/null | grep -iE '^(hypothesis|pytest|pytest-xdist|tabulate|torch) '
start=$SECONDS
python -m pytest -n auto -q -p no:cacheprovider "$@"
echo "lower-bounds suite: $((SECONDS - start)) s wall"
