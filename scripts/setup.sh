#!/usr/bin/env bash
# Set-up: a ComfyUI host with this pack's requirements. Uses $COMFYUI_PATH if it holds a host
# with a .venv; else builds /opt/ComfyUI from a ComfyUI source snapshot with ../shared/comfyui-host.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
host=${COMFYUI_PATH:-/opt/ComfyUI}
if [ ! -x "$host/.venv/bin/python" ] || [ ! -f "$host/comfy/samplers.py" ]; then
  [ -x ../shared/comfyui-host.sh ] || { echo "no ComfyUI host at $host and no ../shared/comfyui-host.sh to build one" >&2; exit 2; }
  bash ../shared/comfyui-host.sh "" "$host"
fi
"$host/.venv/bin/pip" install -q -r requirements.txt pytest
echo "host ready: export COMFYUI_PATH=$host"
