#!/usr/bin/env bash
# Install what the tests need (CPU torch first, so pip never pulls CUDA wheels), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test,dev,ray]'
bash .ci/install-browser || echo "note: headless chromium unavailable; the browser test will skip" >&2
python3 -m pytest -q -p no:cacheprovider "$@"
