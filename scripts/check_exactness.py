"""Exactness on real weights: greedy speculative output == plain output, token for token.

For each artifact dtype it builds one artifact of MODEL with one draft of every kind (three middle
layers skipped; int8 and int4 weights; a pruned vocabulary of 8192 tokens with int8 weights, ranked
by token counts of plain generations of the calibration prompts), measures the full graph's row
invariance (padded passes, as the runtime runs them, and one-token steps), then generates
NEW_TOKENS tokens for each prompt of examples/prompts/exactness.txt (stop tokens ignored, so every
generation is full length) plainly and with every draft. With --reference it also decodes the fp32
PyTorch model greedily and reports where plain and speculative output first leave it. With
--tree N every draft also runs with token trees of N alternative rows; with --lookup MIN,MAX,K
the lookup runs alone and beside every draft.

    python scripts/check_exactness.py --model smollm2-135m --dtypes fp32,int4 --prompts 16 \
        --new-tokens 256 --reference --json exactness.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_pass_rows import builder_constants  # scripts/, beside this file
from conflayers_runtime import DraftConfig, GenerationStats, LookupConfig, TreeConfig, generate, read_manifest
from conflayers_runtime.artifact import artifact_section, full_pass_rows, open_backend
from conflayers_runtime.manifest import Draft, VocabularyRanking
from conflayers_runtime.row_invariance import measure

from conflayers_export.calibrate.data import default_prompts
from conflayers_export.calibrate.select import rank_vocabulary
from conflayers_export.export.build import build_artifact, hand_draft, manifest_for_build
from conflayers_export.export.graph import MIN_ATTENTION_ROWS
from conflayers_export.export.quantize import ACCURACY_LEVEL
from conflayers_export.models import load_model
from conflayers_export.models.reference import TorchBackend

PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "prompts" / "exactness.txt"
PRUNED_VOCAB = 8192


def drafts_for(dtype: str, num_layers: int, vocab_size: int) -> list[Draft]:
    middle = [num_layers // 2 - 1, num_layers // 2, num_layers // 2 + 1]
    drafts = [hand_draft("skip", middle)]
    if dtype.startswith("int4"):  # int8/int4 copies read no fewer bytes than int4 weights
        return [*drafts, hand_draft("pruned", [], vocab_size=min(PRUNED_VOCAB, vocab_size - 1))]
    return [
        *drafts,
        hand_draft("int8", [], "int8"),
        hand_draft("int4", [], "int4"),
        hand_draft("pruned-int8", [], "int8", min(PRUNED_VOCAB, vocab_size - 1)),
    ]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def vocabulary_ranking(loaded, folder: Path, device: str) -> list[int]:
    """Token counts in 64-token plain generations of 8 calibration prompts (a quick calibrate)."""
    build_artifact(folder, loaded, manifest_for_build(folder, loaded), max_seq_len=512)
    backend = open_backend(folder, read_manifest(folder), device=device)
    counts = np.zeros(loaded.model.config.vocab_size)
    for prompt in default_prompts()[:8]:
        tokens, _ = generate(backend, loaded.encode(prompt), 64, draft_config=None)
        np.add.at(counts, tokens, 1)
    return rank_vocabulary(counts, loaded.stop_token_ids)


def check_dtype(
    loaded, dtype, prompts, new_tokens, device, ranking, reference, folder, only=None, tree=None, lookup=None
) -> dict:
    drafts = drafts_for(dtype, loaded.identity.num_layers, loaded.model.config.vocab_size)
    drafts = [d for d in drafts if only is None or d.name in only]
    manifest = manifest_for_build(folder, loaded, drafts)
    manifest.vocabulary = VocabularyRanking(ranking)
    longest = max(map(len, prompts)) + new_tokens + 32
    build_artifact(folder, loaded, manifest, dtype=dtype, max_seq_len=longest)
    manifest = read_manifest(folder)
    plain_backend = open_backend(folder, manifest, device=device)
    started = time.perf_counter()
    plain = [generate(plain_backend, ids, new_tokens, draft_config=None)[0] for ids in prompts]
    result: dict = {"plain_seconds": time.perf_counter() - started}
    if plain_backend.full_pass_rows > 1:  # what the padding costs, and what one-row steps would give
        unpadded_backend = open_backend(folder, manifest, device=device, exact=False)
        started = time.perf_counter()
        unpadded = [generate(unpadded_backend, ids, new_tokens, draft_config=None)[0] for ids in prompts]
        result["plain_unpadded_seconds"] = time.perf_counter() - started
        result["plain_unpadded_vs_plain"] = [
            first_difference(u, p) for u, p in zip(unpadded, plain, strict=True)
        ]
    sample = [*prompts[0], *plain[0][:32]]
    result["row_invariance"] = []
    device_rows = full_pass_rows(artifact_section(manifest), device)
    for rows in sorted({1, 2, device_rows}):  # and the device's own
        backend = open_backend(folder, manifest, device=device, exact=False)
        backend.full_pass_rows = rows
        result["row_invariance"].append(vars(measure(backend, sample, len(prompts[0]))))
    if reference is not None:
        result["plain_vs_reference"] = [first_difference(p, r) for p, r in zip(plain, reference, strict=True)]
    # name -> (backend, draft length or None, tree, lookup)
    runs = {"lookup": (plain_backend, None, None, lookup)} if lookup is not None else {}
    for draft in drafts:
        backend = open_backend(folder, manifest, draft.name, device)
        runs[draft.name] = (backend, DraftConfig(), None, None)
        if tree is not None:  # the same draft with token trees (the tree graph's own session)
            tree_backend = open_backend(folder, manifest, draft.name, device, tree=True)
            runs[f"{draft.name} tree"] = (tree_backend, DraftConfig(), tree, None)
        if lookup is not None:
            runs[f"{draft.name} + lookup"] = (backend, DraftConfig(), None, lookup)
    for name, (backend, config, shape, text) in runs.items():
        outputs, total = [], GenerationStats()
        for ids in prompts:
            tokens, stats = generate(backend, ids, new_tokens, draft_config=config, tree=shape, lookup=text)
            outputs.append(tokens)
            total.merge(stats)
        differences = [first_difference(s, p) for s, p in zip(outputs, plain, strict=True)]
        entry = {
            "prompts_equal_to_plain": sum(d is None for d in differences),
            "first_differences": differences,
            "acceptance_rate": total.acceptance_rate,
            "tokens_per_full_pass": total.mean_tokens_per_cycle,
            "tree_nodes": total.tree_nodes,
            "tree_hits": total.tree_hits,
            "verify_passes": total.verify_passes,
            "looked_up_accepted": total.looked_up_accepted,
        }
        if reference is not None:
            pairs = zip(outputs, reference, strict=True)
            entry["vs_reference"] = [first_difference(s, r) for s, r in pairs]
        result[name] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,int4")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true", help="also decode the fp32 PyTorch model")
    parser.add_argument("--drafts", help="comma-separated draft names to run (default: every kind)")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        default=ACCURACY_LEVEL,
        help="MatMulNBits accuracy_level of the int4 graphs (0: float math, as full graphs had before)",
    )
    parser.add_argument("--tree", type=int, default=0, help="also run every draft with trees of N nodes")
    parser.add_argument(
        "--lookup",
        help="MIN,MAX,K: also the lookup (n-grams MIN..MAX, K proposals) alone and beside every draft",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = load_model(args.model)
    texts = [line for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [loaded.encode(text) for text in texts[: args.prompts]]
    report: dict = {"model": args.model, "device": args.device, "prompts": len(prompts)}
    report["accuracy_level"] = args.accuracy_level
    report["new_tokens"] = args.new_tokens
    with tempfile.TemporaryDirectory(prefix="conflayers-exactness-") as tmp:
        ranking = vocabulary_ranking(loaded, Path(tmp) / "ranking", args.device)
        reference = None
        if args.reference:
            started = time.perf_counter()
            torch_backend = TorchBackend(loaded.model, loaded.architecture)
            reference = [
                generate(torch_backend, ids, args.new_tokens, draft_config=None)[0] for ids in prompts
            ]
            report["reference_seconds"] = time.perf_counter() - started
        with builder_constants(MIN_ATTENTION_ROWS, args.accuracy_level):
            for dtype in args.dtypes.split(","):
                report[dtype] = check_dtype(
                    loaded,
                    dtype,
                    prompts,
                    args.new_tokens,
                    args.device,
                    ranking,
                    reference,
                    Path(tmp) / dtype,
                    args.drafts.split(",") if args.drafts else None,
                    TreeConfig(args.tree) if args.tree else None,
                    LookupConfig(*map(int, args.lookup.split(","))) if args.lookup else None,
                )
                print(json.dumps({dtype: report[dtype]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
