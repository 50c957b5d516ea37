#!/usr/bin/env bash
# Tests: the whole suite in the real ComfyUI host ($COMFYUI_PATH, default /opt/ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMFYUI_PATH=${COMFYUI_PATH:-/opt/ComfyUI}
py="$COMFYUI_PATH/.venv/bin/python"
[ -x "$py" ] || { echo "No ComfyUI host at COMFYUI_PATH=$COMFYUI_PATH (no .venv/bin/python): run bash scripts/setup.sh first" >&2; exit 2; }
# pytest exits 5 when it ran no test: that is a failure here too (set -e keeps every non-zero code).
exec "$py" -m pytest tests -q -p no:cacheprovider "$@"
