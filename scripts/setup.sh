#!/usr/bin/env bash
# Set-up: a ComfyUI host with this pack's requirements. Uses $COMFYUI_PATH if it holds a host
# with a .venv; else builds /opt/ComfyUI from a ComfyUI source snapshot with ../shared/comfyui-host.sh.
# Also installs Debian's chromium (for tests/test_browser.py) when it is missing and root or
# password-less sudo is available.
set -euo pipefail
cd "$(dirname "$0")/.."
host=${COMFYUI_PATH:-/opt/ComfyUI}
if [ ! -x "$host/.venv/bin/python" ] || [ ! -f "$host/comfy/samplers.py" ]; then
  [ -x ../shared/comfyui-host.sh ] || { echo "no ComfyUI host at $host and no ../shared/comfyui-host.sh to build one" >&2; exit 2; }
  bash ../shared/comfyui-host.sh "" "$host"
fi
"$host/.venv/bin/pip" install -q -r requirements.txt "pytest>=7.3"
# Optional at run time (the training's adamw8bit optimizer names it when missing); the tests use it.
"$host/.venv/bin/pip" install -q bitsandbytes || echo "bitsandbytes could not be installed: the 8-bit optimizer's tests are skipped" >&2
# Optional at run time too (Train Domain UNet's tensorboard input names it when missing); its tests read the logs with it.
"$host/.venv/bin/pip" install -q tensorboard || echo "tensorboard could not be installed: the TensorBoard log tests are skipped" >&2
# Newer hosts (0.33) import torchaudio at start-up; ../shared/comfyui-host.sh leaves it out, and the
# registry has it only for older torch builds: take a matching set (about 90 s).
if grep -qs "^import comfy.ldm.lightricks.vae.audio_vae" "$host/comfy/sd.py" \
   && ! "$host/.venv/bin/python" -c "import torchaudio" 2>/dev/null; then
  "$host/.venv/bin/pip" install -q torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1 2>&1 | grep -v "is ignored" || true
fi

# Chromium for the browser tests (headless, driven over the DevTools protocol).
if [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "chromium: ${CHROMIUM:-/usr/bin/chromium}"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium missing and no apt-get: install Chromium and set CHROMIUM, or the browser tests are skipped" >&2
else
  if [ "$(id -u)" = 0 ]; then sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"
  else sudo="none"; fi
  if [ "$sudo" = none ]; then
    echo "chromium missing and neither root nor sudo: apt-get install chromium, or the browser tests are skipped" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; } \
      || echo "apt-get could not install chromium: the browser tests will be skipped (they fail under CI)" >&2
    if [ -x /usr/bin/chromium ]; then echo "chromium: installed /usr/bin/chromium"; fi
  fi
fi
echo "host ready: export COMFYUI_PATH=$host"
