"""Time the PyTorch reference decoder: plain greedy vs self-speculative, interleaved and repeated.

    .venv/bin/python scripts/bench_reference.py --model smollm2-135m --skip 14,15,16

Prints one JSON object: per mode, decode tokens/s (median, min, max over repeats), acceptance
and mean tokens per full-model pass. Both modes run in the same process on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from conflayers_runtime import DraftConfig

from conflayers_export.models import load_model
from conflayers_export.models.reference import speculative_generate

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 times 23? Explain step by step.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip", default="14,15,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    skip = [int(v) for v in args.skip.split(",") if v]
    loaded = load_model(args.model)
    prompts = [loaded.encode(p) for p in PROMPTS]
    rates: dict[str, list[float]] = {"plain": [], "speculative": []}
    last_stats = {}
    for _ in range(args.repeats):
        for mode in rates:  # interleaved, so drift in machine load hits both modes alike
            tokens = drafted = accepted = passes = 0
            seconds = 0.0
            for ids in prompts:
                start = time.perf_counter()
                out, stats = speculative_generate(
                    loaded.model,
                    loaded.architecture,
                    ids,
                    skip,
                    args.max_new_tokens,
                    draft_config=None if mode == "plain" else DraftConfig(),
                )
                seconds += time.perf_counter() - start
                tokens += len(out)
                drafted += stats.drafted_tokens
                accepted += stats.accepted_tokens
                passes += stats.verify_passes
            rates[mode].append(tokens / seconds)
            last_stats[mode] = {
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_tokens_per_full_pass": (tokens - len(prompts)) / passes,
            }
    result = {
        "model": args.model,
        "skip_layers": skip,
        "device": "cpu",
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "prompts": len(PROMPTS),
        "max_new_tokens": args.max_new_tokens,
        **{
            mode: {
                "tokens_per_s_median": statistics.median(r),
                "min": min(r),
                "max": max(r),
                **last_stats[mode],
            }
            for mode, r in rates.items()
        },
    }
    result["speedup"] = result["speculative"]["tokens_per_s_median"] / result["plain"]["tokens_per_s_median"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
