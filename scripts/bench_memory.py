"""Resident memory of an artifact's sessions: the full graph alone vs the full + draft pair.

    .venv/bin/python scripts/bench_memory.py ARTIFACT [--draft NAME] [--weights prepacked|shared]

Each configuration runs in a fresh process and reports PSS (proportional set size: shared
memory-mapped pages are split between the processes mapping them, unlike RSS) after loading and
generating 16 tokens, minus PSS before loading. Linux only (/proc/self/smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
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
start = time.perf_counter()
n = len(model.generate("Write a short poem about the sea.", 64, mode="plain").token_ids)
print(pss_mb() - base, n / (time.perf_counter() - start))
"""


def measure(folder: str, draft: str | None, weights: str) -> tuple[float, float]:
    """(PSS in MB, plain tok/s) of one configuration, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, folder, draft or "", weights],
        capture_output=True,
        text=True,
        check=True,
    )
    pss, tps = out.stdout.split()[-2:]
    return float(pss), float(tps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--weights", choices=["prepacked", "shared", "both"], default="both")
    args = parser.parse_args()
    modes = ["prepacked", "shared"] if args.weights == "both" else [args.weights]
    result = {}
    for weights in modes:
        full, full_tps = measure(args.artifact, None, weights)
        pair, pair_tps = measure(args.artifact, args.draft, weights)
        result[weights] = {
            "full_pss_mb": full,
            "pair_pss_mb": pair,
            "pair_over_full": pair / full,
            "plain_tok_s_full_only": full_tps,
            "plain_tok_s_with_pair": pair_tps,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
