#!/usr/bin/env bash
# The main job on the packaged SmolLM2-135M-Instruct: set up, calibrate (the ConfLayers layer
# search, then the joint choice of the draft on real fp32 graphs: about 4 minutes on 2 cores), build
# the paired ONNX graphs, validate them against PyTorch, generate a chat answer with ONNX Runtime,
# then time plain and speculative decoding of the same prompt side by side.
# Output folder: out/smollm2-135m (or $1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${CONFLAYERS_VENV:-$root/.venv}"
cli="$venv/bin/conflayers-export"
out="${1:-$root/out/smollm2-135m}"
prompt="${2:-Explain in three sentences why the sky is blue.}"

"$cli" calibrate --model smollm2-135m --out "$out" --force
"$cli" build "$out" --max-seq-len 1024
"$cli" validate "$out"
echo "--- generate (mode auto: speculative only where calibrate recommends it) ---"
"$cli" generate "$out" --prompt "$prompt" --max-new-tokens 96
echo "--- the same prompt decoded plainly, then speculatively (forced) ---"
plain="$("$cli" generate "$out" --prompt "$prompt" --max-new-tokens 96 --mode plain --json)"
speculative="$("$cli" generate "$out" --prompt "$prompt" --max-new-tokens 96 --mode speculative --json)"
"$venv/bin/python" -c '
import json, sys
plain, spec = (json.loads(arg) for arg in sys.argv[1:])
ratio = spec["tokens_per_second"] / plain["tokens_per_second"]
same = "yes" if spec["text"] == plain["text"] else "no"
print("plain %.1f tok/s, speculative %.1f tok/s (draft %s): %.2fx; outputs identical: %s"
      % (plain["tokens_per_second"], spec["tokens_per_second"], spec["draft"], ratio, same))
' "$plain" "$speculative"
