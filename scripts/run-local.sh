#!/usr/bin/env bash
# Set up the runtime on a fresh machine and run the module outside IoT Edge.
# With no arguments it serves the built-in demo export and scores its sample images.
# Usage: scripts/run-local.sh [main.py options], e.g. --model export.zip --twin twin.json
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
exec .venv/bin/python main.py "$@"
