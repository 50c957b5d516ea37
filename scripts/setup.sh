#!/usr/bin/env bash
# Set-up: this pack's requirements, pytest (with pytest-xdist) and the optional packages the tests
# use, installed into the Python of the ComfyUI it belongs to (scripts/host.sh says how both are
# found: the ComfyUI two folders up, COMFYUI_PATH, PYTHON; .venv/, venv/, the portable
# python_embeded/). On a development machine without any ComfyUI, it builds /opt/ComfyUI (or
# $COMFYUI_PATH) from a source snapshot with ../shared/comfyui-host.sh. Also comfy-cli in a virtual
# environment of its own (.tools/comfy-cli: its pins never touch the host's), for the registry's
# check (scripts/validate.sh), and Debian's chromium (tests/test_browser.py) when it is missing and
# root or password-less sudo is available.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/host.sh
why=$(mktemp)
if ! { find_host && find_python; } 2>"$why"; then
  if [ -z "${PYTHON:-}" ] && [ -x ../shared/comfyui-host.sh ] && ! in_custom_nodes; then
    bash ../shared/comfyui-host.sh "" "${COMFYUI_PATH:-/opt/ComfyUI}"   # a development machine: build one
    find_host && find_python || exit 2
  else
    cat "$why" >&2
    [ -n "${HOST:-}" ] || how_to_get_comfyui
    rm -f "$why"; exit 2
  fi
fi
rm -f "$why"
echo "ComfyUI: $HOST; Python: $PY"
"${PIP[@]}" install -q -r requirements.txt "pytest>=7.3" pytest-xdist
# Optional at run time (the training's adamw8bit optimizer names it when missing); the tests use it.
"${PIP[@]}" install -q bitsandbytes || echo "bitsandbytes could not be installed: the 8-bit optimizer's tests are skipped" >&2
# Optional at run time too (Train Domain UNet's tensorboard input names it when missing); its tests read the logs with it.
"${PIP[@]}" install -q tensorboard || echo "tensorboard could not be installed: the TensorBoard log tests are skipped" >&2
# Newer hosts (0.33) import torchaudio at start-up; ../shared/comfyui-host.sh leaves it out, and the
# registry has it only for older torch builds: take a matching set (about 90 s).
if grep -qs "^import comfy.ldm.lightricks.vae.audio_vae" "$HOST/comfy/sd.py" \
   && ! "$PY" -c "import torchaudio" 2>/dev/null; then
  "${PIP[@]}" install -q torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1 2>&1 | grep -v "is ignored" || true
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

# comfy-cli (the registry's own check, `comfy node validate`) in a virtual environment of its own.
cli_python=${COMFY_CLI_PYTHON:-python3}
if [ -x .tools/comfy-cli/bin/comfy ]; then
  echo "comfy-cli: .tools/comfy-cli/bin/comfy"
elif "$cli_python" -m venv .tools/comfy-cli >/dev/null 2>&1 && .tools/comfy-cli/bin/pip install -q comfy-cli ruff; then
  echo "comfy-cli: installed .tools/comfy-cli/bin/comfy"
else
  rm -rf .tools/comfy-cli
  echo "comfy-cli could not be installed into .tools/comfy-cli (with $cli_python -m venv; COMFY_CLI_PYTHON picks" \
       "another Python): scripts/validate.sh cannot run the registry's check" >&2
  [ -z "${CI:-}" ] || exit 1
fi
echo "ready: ComfyUI at $HOST, tests with $PY (bash scripts/test.sh finds both again)"
