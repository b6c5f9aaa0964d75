"""What a full pass costs by its rows inside the real decoding loop, against one plain step.

    python scripts/time_passes.py out/ARTIFACT --lookup 2,3,8 --json passes.json
    python scripts/time_passes.py out/ARTIFACT --draft default

Decodes each prompt of the set plainly, then speculatively (with the lookup and/or the draft
given), twice each, timing every full-model and draft pass the loop makes (the backend's device
greedy choice), so that the costs are those of real cycles, caches and positions included. Prints
tok/s of both modes and, per row count, the passes made and their median time, relative to the
median plain step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from conflayers_runtime import LookupConfig, load

from conflayers_export.bench import load_bench_prompts


def timed(model, passes: dict[tuple[str, int], list[float]]) -> None:
    """Record every greedy pass of ``model``'s backend in ``passes`` by (graph, rows)."""
    greedy = model.backend.greedy

    def run(token_ids, start, use_draft, **kwargs):
        started = time.perf_counter()
        result = greedy(token_ids, start, use_draft, **kwargs)
        passes["draft" if use_draft else "full", len(token_ids)].append(time.perf_counter() - started)
        return result

    model.backend.greedy = run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompts", type=Path, default=Path("examples/prompts/tasks.jsonl"))
    parser.add_argument("--lookup", help="MIN_NGRAM,MAX_NGRAM,TOKENS (default: no lookup)")
    parser.add_argument("--draft", help="a draft of the artifact (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lookup = LookupConfig(*map(int, args.lookup.split(","))) if args.lookup else False
    prompts = [p.text for p in load_bench_prompts(args.prompts)]
    plain = load(args.artifact, draft=None, lookup=False, threads=args.threads)
    speculative = load(args.artifact, draft=args.draft, lookup=lookup, threads=args.threads, tree=False)
    passes: dict[str, dict[tuple[str, int], list[float]]] = {
        "plain": defaultdict(list),
        "speculative": defaultdict(list),
    }
    timed(plain, passes["plain"])
    timed(speculative, passes["speculative"])
    seconds = {"plain": 0.0, "speculative": 0.0}
    tokens = 0
    for prompt in prompts:
        for _ in range(2):  # the second run of each is kept: warm caches for both
            a = plain.generate(prompt, args.max_new_tokens, mode="plain")
            b = speculative.generate(prompt, args.max_new_tokens, mode="speculative")
        seconds["plain"] += a.seconds
        seconds["speculative"] += b.seconds
        tokens += len(a.token_ids)
    step = statistics.median(passes["plain"]["full", 1])
    report: dict[str, object] = {f"{mode} tok/s": round(tokens / s, 1) for mode, s in seconds.items()}
    report["plain step ms"] = round(1e3 * step, 2)
    for (graph, rows), times in sorted(passes["speculative"].items()):
        if rows <= 32:  # prompts' prefill passes left out
            median = statistics.median(times) / step
            report[f"{graph} {rows} rows"] = {"passes": len(times), "steps": round(median, 2)}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
