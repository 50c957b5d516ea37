#!/usr/bin/env bash
# The Comfy Registry's own check of this pack (`comfy node validate`: pyproject.toml as the registry
# reads it, and ruff's security rules over the code), with comfy-cli from .tools/comfy-cli (setup.sh
# installs it there) or $COMFY_CLI. Its security findings are warnings in comfy-cli ("will soon be an
# error"); here they fail, as they will at publishing.
set -euo pipefail
cd "$(dirname "$0")/.."
comfy=${COMFY_CLI:-.tools/comfy-cli/bin/comfy}
[ -x "$comfy" ] || { echo "no comfy-cli at $comfy: bash scripts/setup.sh installs it (or set COMFY_CLI)" >&2; exit 2; }
comfy=$(cd "$(dirname "$comfy")" && pwd)/$(basename "$comfy")
dir=${1:-.}  # the pack's folder (another one: the tests check that a broken copy fails)
out=$(cd "$dir" && "$comfy" --skip-prompt --no-enable-telemetry node validate 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out"
case "$out" in
  *"Security warnings found"*) echo "comfy node validate: security warnings (above)" >&2; exit 1 ;;
  *"passed successfully"*) ;;
  *) echo "comfy node validate: no success line in its output" >&2; exit 1 ;;
esac
