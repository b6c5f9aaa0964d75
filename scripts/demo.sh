#!/usr/bin/env bash
# The main job on the packaged SmolLM2-135M-Instruct: set up, calibrate (the ConfLayers layer
# search, then the joint choice of the draft on real fp32 graphs: ~12 min on 2 cores), build the
# paired ONNX graphs, validate them against PyTorch, and generate a chat answer with ONNX Runtime.
# Output folder: out/smollm2-135m (or $1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cli="${CONFLAYERS_VENV:-$root/.venv}/bin/conflayers-export"
out="${1:-$root/out/smollm2-135m}"
prompt="${2:-Explain in three sentences why the sky is blue.}"

"$cli" calibrate --model smollm2-135m --out "$out" --force
"$cli" build "$out" --max-seq-len 1024
"$cli" validate "$out"
echo "--- generate (mode auto: speculative only where calibrate recommends it) ---"
"$cli" generate "$out" --prompt "$prompt" --max-new-tokens 96
echo "--- generate (mode speculative, forced) ---"
"$cli" generate "$out" --prompt "$prompt" --max-new-tokens 96 --mode speculative
