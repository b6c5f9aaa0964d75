"""Peak memory and time of `conflayers-export build` on a 7B-shaped llama (target: <= 4 GB RSS).

Writes a random Llama-2-7B-shaped model as bfloat16 safetensors shards (never the whole model in
memory: one shard at a time), then builds an fp16 artifact of it with one layer-skip draft in a
child process, and reports the child's peak resident memory (its VmHWM, read by the child itself
at the end: a fresh process image, so the parent's memory does not count) and wall time as JSON.
Needs ~27 GB of free disk (13.5 GB of source shards, 13.5 GB of fp16 weights) under --work.

    python scripts/bench_streamed_build.py --work DIR [--layers 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARD_BYTES = 1 << 30
# Runs the CLI in this process, then prints its peak resident memory ("VmHWM: <kB> kB") last.
_BUILD_AND_REPORT_PEAK = """
import sys
from conflayers_export.cli import main
code = main(sys.argv[1:])
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")), file=sys.stderr)
sys.exit(code)
"""


def write_source(folder: Path, layers: int) -> int:
    """A random 7B-shaped llama in bfloat16 shards with a word-level tokenizer; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # names and shapes only
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        scale = 1.0 if name.endswith("norm.weight") else 0.02
        tensor = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        total += tensor.nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<0>").save_pretrained(folder)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for the source and the artifact")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-2-7B)")
    parser.add_argument("--keep", action="store_true", help="keep the source and the artifact")
    args = parser.parse_args()
    source, artifact = args.work / "source", args.work / "artifact"
    skip = range(args.layers // 3, args.layers // 3 + 3) if args.layers >= 8 else [1]
    started = time.perf_counter()
    source_bytes = write_source(source, args.layers)
    written = time.perf_counter() - started
    command = [
        *(sys.executable, "-c", _BUILD_AND_REPORT_PEAK, "build", str(artifact), "--model", str(source)),
        *("--dtype", "fp16", "--max-seq-len", "2048", "--skip", ",".join(map(str, skip))),
        *("--quiet", "--json"),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"build failed: {done.stderr[-2000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1].split()[1])
    built = json.loads(done.stdout)
    print(
        json.dumps(
            {
                "layers": args.layers,
                "source_gb": source_bytes / 1e9,
                "source_write_seconds": written,
                "build_seconds": seconds,
                "build_peak_rss_gb": peak_kib * 1024 / 1e9,
                "artifact_gb": built["total_bytes"] / 1e9,
                "drafts": built["drafts"],
            },
            indent=2,
        )
    )
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
