# The ComfyUI install this pack belongs to, and the Python that runs it, found as users lay them out.
# Sourced by setup.sh and test.sh from the pack's root; `find_host` sets HOST, `find_python` sets PY
# and PIP (the command that installs into PY). Each prints what it looked at and why it could not
# use it, and returns 2, when nothing fits.
#
#   host:   $COMFYUI_PATH; else the ComfyUI two folders up (the pack at ComfyUI/custom_nodes/<pack>);
#           else /opt/ComfyUI (where setup.sh builds one on a development machine; INDOMAIN_DEV_HOST)
#   python: $PYTHON; else the first that runs and imports torch of the host's .venv/ and venv/
#           (bin/python, or Scripts/python.exe on Windows), the portable build's python_embeded/
#           beside the host (ComfyUI_windows_portable/), the active virtualenv or conda environment

is_host() { [ -f "$1/comfy/samplers.py" ] && [ -f "$1/main.py" ]; }

how_to_get_comfyui() {
  cat >&2 <<'EOF'
To get ComfyUI (https://github.com/comfyanonymous/ComfyUI), then this pack inside it:
  git clone https://github.com/comfyanonymous/ComfyUI.git && cd ComfyUI
  python3 -m venv .venv && .venv/bin/pip install -r requirements.txt   (torch for your GPU first: see ComfyUI's README)
  git clone <this pack's repository> custom_nodes/comfyui-indomain
  bash custom_nodes/comfyui-indomain/scripts/setup.sh
or with comfy-cli: pip install comfy-cli && comfy install, then the pack into its custom_nodes/.
An install elsewhere: COMFYUI_PATH=/path/to/ComfyUI (and PYTHON=/path/to/its/python).
EOF
}

pack_dir() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }
in_custom_nodes() { [ "$(basename "$(dirname "$(pack_dir)")")" = custom_nodes ]; }  # ComfyUI/custom_nodes/<pack>

find_host() {
  local pack parent
  pack=$(pack_dir)
  parent=$(dirname "$pack")
  if [ -n "${COMFYUI_PATH:-}" ]; then
    is_host "$COMFYUI_PATH" && { HOST=$COMFYUI_PATH; return 0; }
    echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (no comfy/samplers.py and main.py there)" >&2
    return 2
  fi
  if in_custom_nodes; then
    is_host "$(dirname "$parent")" && { HOST=$(dirname "$parent"); return 0; }
    echo "the pack is in $parent, but $(dirname "$parent") is not a ComfyUI folder (no comfy/samplers.py and main.py)" >&2
    return 2
  fi
  local dev=${INDOMAIN_DEV_HOST:-/opt/ComfyUI}
  is_host "$dev" && { HOST=$dev; return 0; }
  echo "No ComfyUI found: COMFYUI_PATH is not set, the pack ($pack) is not in a ComfyUI's custom_nodes/," \
       "and $dev is not a ComfyUI folder." >&2
  return 2
}

# python_status PATH: prints nothing and returns 0 when PATH runs and imports torch; else prints why not.
python_status() {
  [ -e "$1" ] || { echo "not there"; return 1; }
  "$1" -c "import sys" >/dev/null 2>&1 || { echo "there, but it does not run on this machine"; return 1; }
  "$1" -c "import torch" >/dev/null 2>&1 \
    || { echo "runs, but cannot import torch: not the environment ComfyUI runs in (install ComfyUI's requirements into it)"; return 1; }
}

find_python() {  # after find_host
  local why c tried=""
  if [ -n "${PYTHON:-}" ]; then
    c=$(command -v "$PYTHON" 2>/dev/null || echo "$PYTHON")
    why=$(python_status "$c") && { PY=$c; PIP=("$PY" -m pip); return 0; }
    echo "PYTHON=$PYTHON: $why" >&2
    return 2
  fi
  local candidates=("$HOST/.venv/bin/python" "$HOST/.venv/Scripts/python.exe" "$HOST/venv/bin/python"
                    "$HOST/venv/Scripts/python.exe" "$(dirname "$HOST")/python_embeded/python.exe")
  [ -n "${VIRTUAL_ENV:-}" ] && candidates+=("$VIRTUAL_ENV/bin/python")
  [ -n "${CONDA_PREFIX:-}" ] && candidates+=("$CONDA_PREFIX/bin/python")
  for c in "${candidates[@]}"; do
    if why=$(python_status "$c"); then
      PY=$c
      case "$c" in  # the portable build installs with -s (no user site-packages), as its README does
        */python_embeded/*) PIP=("$PY" -s -m pip) ;;
        *) PIP=("$PY" -m pip) ;;
      esac
      return 0
    fi
    tried+="  $c: $why"$'\n'
  done
  printf 'No Python for the ComfyUI at %s. Looked at:\n%sSet PYTHON to the Python that runs this ComfyUI.\n' "$HOST" "$tried" >&2
  return 2
}
