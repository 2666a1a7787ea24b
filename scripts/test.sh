#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then lint and run them.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r requirements-dev.txt

# The edge tests run the real SDK against mosquitto, as IoT Edge's edgeHub would be.
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            mosquitto openssl >/dev/null
    else
        echo "mosquitto is not installed: the IoT Edge tests will be skipped" \
            "(sudo apt-get install mosquitto openssl)" >&2
    fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
