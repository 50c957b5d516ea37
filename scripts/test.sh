#!/usr/bin/env bash
# Tests: the whole suite in the real ComfyUI host ($COMFYUI_PATH, default /opt/ComfyUI).
#   bash scripts/test.sh          the CPU tier (CI): the host on the CPU
#   bash scripts/test.sh --gpu    the GPU tier: the host on the GPU with its own defaults (needs CUDA)
# PYTHON picks the interpreter (default: the host's .venv), e.g. PYTHON=python3 on a GPU machine
# whose system Python holds torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMFYUI_PATH=${COMFYUI_PATH:-/opt/ComfyUI}
py=${PYTHON:-$COMFYUI_PATH/.venv/bin/python}
command -v "$py" >/dev/null || { echo "No Python at $py: run bash scripts/setup.sh first (or set PYTHON)" >&2; exit 2; }
# pytest exits 5 when it ran no test: that is a failure here too (set -e keeps every non-zero code).
exec "$py" -m pytest tests -q -p no:cacheprovider "$@"
