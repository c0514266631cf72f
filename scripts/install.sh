#!/usr/bin/env bash
# Install peft-gateway into the active Python environment (a venv: Debian's system Python refuses pip).
#
#   ./scripts/install.sh                 CPU build of torch, then the gateway with the openai client
#   EXTRAS=test,dev ./scripts/install.sh what scripts/test.sh uses
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 ./scripts/install.sh   a CUDA build instead
#
# torch comes first, from PyTorch's own CPU wheel index: from PyPI alone, pip resolves several GB of CUDA
# packages on Linux. Where that index cannot be reached (an offline mirror, a machine with a staged torch
# wheel in pip's find-links), it falls back to a plain `pip install torch`, saying so, rather than letting
# pip retry an unreachable host for a minute. An importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
EXTRAS="${EXTRAS:-client}"

if [[ -z "${VIRTUAL_ENV:-}" && "$("$PYTHON" -c 'import sys; print(sys.prefix == sys.base_prefix)')" == "True" ]]; then
    echo "note: no virtual environment is active; 'python3 -m venv .venv && . .venv/bin/activate' first" \
        "if pip refuses to install into the system Python" >&2
fi

reachable() {
    "$PYTHON" - "$1" <<'PY'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/", timeout=10).close()
except Exception:
    raise SystemExit(1)
PY
}

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') is already installed; keeping it"
elif reachable "$TORCH_INDEX"; then
    "$PYTHON" -m pip install "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"
else
    echo "note: $TORCH_INDEX is unreachable; installing $TORCH_SPEC from the configured indexes" \
        "(on Linux, without a locally staged CPU wheel, that is the CUDA build)" >&2
    "$PYTHON" -m pip install "$TORCH_SPEC"
fi

"$PYTHON" -m pip install -e ".[${EXTRAS}]"
