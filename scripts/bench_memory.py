"""Resident memory and speed of an artifact's sessions: the full graph alone vs full + draft, per
weights mode ("paired": one session over the paired graph; "prepacked": two sessions; "shared":
two sessions over one memory map).

    .venv/bin/python scripts/bench_memory.py ARTIFACT [--draft NAME] [--modes paired,prepacked] [--repeats 3]

Each configuration runs in a fresh process and reports PSS (proportional set size: shared
memory-mapped pages are split between the processes mapping them, unlike RSS) after loading and
generating, minus PSS before loading, and the decoding speed of 4 prompts x 64 tokens (plain, and
speculative with the draft's calibrated length), the best of 2 runs. Configurations are
interleaved ``--repeats`` times and the median is reported. Linux only (/proc/self/smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import sys, time, conflayers_runtime as rt
def pss_mb():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
folder, draft, weights = sys.argv[1], sys.argv[2] or None, sys.argv[3]
base = pss_mb()
model = rt.load(folder, draft=draft, weights=weights, verify=False, threads=2)
prompts = ["Write a short poem about the sea.", "Explain why the sky is blue.",
           "List three uses of a paperclip.", "What is the capital of France? Answer briefly."]
def rate(mode):
    best = 0.0
    for _ in range(2):
        start, n = time.perf_counter(), 0
        for p in prompts:
            n += len(model.generate(p, 64, mode=mode).token_ids)
        best = max(best, n / (time.perf_counter() - start))
    return best
plain = rate("plain")
speculative = rate("speculative") if draft else 0.0
print(pss_mb() - base, plain, speculative)
"""


def measure(folder: str, draft: str | None, weights: str) -> tuple[float, float, float]:
    """(PSS in MB, plain tok/s, speculative tok/s) of one configuration, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, folder, draft or "", weights],
        capture_output=True,
        text=True,
        check=True,
    )
    pss, plain, speculative = out.stdout.split()[-3:]
    return float(pss), float(plain), float(speculative)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--modes", default="paired,prepacked")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = [(None, "prepacked")] + [(args.draft, mode) for mode in args.modes.split(",")]
    samples: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):
        for draft, weights in configs:  # interleaved: machine drift hits every configuration alike
            key = f"{weights} (full + {draft})" if draft else "full graph alone"
            samples.setdefault(key, []).append(measure(args.artifact, draft, weights))
    full_pss = statistics.median(s[0] for s in samples["full graph alone"])
    result = {}
    for key, runs in samples.items():
        pss = statistics.median(s[0] for s in runs)
        result[key] = {
            "pss_mb": round(pss, 1),
            "over_full_alone": round(pss / full_pss, 3),
            "plain_tok_s": round(statistics.median(s[1] for s in runs), 1),
            "speculative_tok_s": round(statistics.median(s[2] for s in runs), 1),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
