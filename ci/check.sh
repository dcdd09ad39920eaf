#!/usr/bin/env bash
# The same as ci/github-workflow.yml for any CI: property suites, then the model file.
# Usage: ci/check.sh [MODEL.py] ; exit code 1 means an explosion was found (see stability.json/png).
set -euo pipefail
model="${1:-model.py}"
python -m pytest properties/ -n auto --stability-profile ci
stabilitycheck "$model" --seed 0 --json stability.json --plot stability.png --markdown stability.md
