#!/usr/bin/env bash
# Tests: the whole suite in the real ComfyUI host this pack belongs to (scripts/host.sh: the ComfyUI
# two folders up, COMFYUI_PATH, PYTHON; the install's .venv/, venv/ or portable python_embeded/).
#   bash scripts/test.sh          the CPU tier (CI): the host on the CPU, in TEST_WORKERS processes
#                                 (default 2, pytest-xdist, one test file per process at a time;
#                                 TEST_WORKERS=1: one process)
#   bash scripts/test.sh --gpu    the GPU tier: the host on the GPU with its own defaults (needs CUDA;
#                                 one process: the tests measure the GPU's memory)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/host.sh
find_host || { how_to_get_comfyui; exit 2; }
find_python || exit 2
export COMFYUI_PATH=$HOST
args=()
workers=${TEST_WORKERS:-2}
if [ "$workers" -gt 1 ] && [[ " $* " != *" --gpu "* ]]; then
  if "$PY" -c "import xdist" 2>/dev/null; then
    # Each worker's torch gets its share of the cores, not all of them.
    per=$(( $(nproc 2>/dev/null || echo 1) / workers )); [ "$per" -ge 1 ] || per=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per}
    args=(-n "$workers" --dist loadfile)
  else
    echo "pytest-xdist is not installed in $PY (bash scripts/setup.sh installs it): the tests run in one process" >&2
  fi
fi
# pytest exits 5 when it ran no test: that is a failure here too (set -e keeps every non-zero code).
exec "$PY" -m pytest tests -q -p no:cacheprovider "${args[@]}" "$@"
