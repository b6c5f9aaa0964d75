#!/usr/bin/env bash
# The main job on the packaged SmolLM2-135M-Instruct: set up, then generate a chat answer with the
# reference self-speculative decoder (3 middle layers skipped) and print its stats.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${CONFLAYERS_VENV:-$root/.venv}"
"$venv/bin/conflayers-export" reference --model smollm2-135m --skip 14,15,16 --max-new-tokens 96 \
    --prompt "${1:-Explain in three sentences why the sky is blue.}"
