#!/usr/bin/env bash
# Install what the tests need (CPU torch first, so pip never pulls CUDA wheels), then run the whole suite.
#
# The chat page's browser test needs Chromium. In CI (CI=true) or with PEFT_GATEWAY_INSTALL_BROWSER=1 this
# script installs it with apt (system-wide, needs root or sudo); elsewhere it never touches the system, and
# the test skips with a note when Chromium is not there.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,dev,ray bash scripts/install.sh
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    :
elif [[ "${CI:-}" == "true" || "${PEFT_GATEWAY_INSTALL_BROWSER:-}" == "1" ]]; then
    bash .ci/install-browser || echo "note: headless chromium unavailable; the browser test will skip" >&2
else
    echo "note: chromium and chromedriver are not installed, so the chat page's browser test will skip;" \
        "PEFT_GATEWAY_INSTALL_BROWSER=1 ./scripts/test.sh installs them with apt (system-wide)" >&2
fi
python3 -m pytest -q -p no:cacheprovider "$@"
