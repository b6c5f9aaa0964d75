"""calibration/report.json, report.md and confidence.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .scoring import TIMING_MARGIN
from .settings import Candidate, DraftCandidate, DraftSearchResult, TaskResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def write_reports(folder: Path, results: list[TaskResult], header: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(
        json.dumps({**header, "tasks": [r.as_dict() for r in results]}, indent=2) + "\n"
    )
    (folder / "report.md").write_text(_markdown(results, header))
    _plot(folder / "confidence.png", results)


def _row(c: Candidate, chosen: bool) -> str:
    mark = " **(chosen)**" if chosen else ""
    return (
        f"| {c.origin}{mark} | {len(c.skip)} | {','.join(map(str, c.skip)) or '-'} | "
        f"{c.acceptance_rate:.3f} | "
        f"{c.mean_tokens_per_cycle:.2f} | {c.draft_passes_per_cycle:.2f} | {c.c_draft:.3f} | "
        f"{c.expected_speedup:.3f} |"
    )


def _markdown(results: list[TaskResult], header: dict[str, object]) -> str:
    lines = [
        f"# Calibration report: {header['model']}",
        "",
        f"Settings: `{json.dumps(header['settings'])}`",
        "",
    ]
    for r in results:
        verdict = (
            f"expected speedup {r.chosen.expected_speedup:.3f}x"
            if r.recommended
            else f"expected speedup {r.chosen.expected_speedup:.3f}x, below 1 on its own"
        )
        best = r.best_baseline
        beat = "beat" if r.conflayers_beats_baselines else "did **not** beat"
        compared = (
            f"ConfLayers {beat} the best baseline (expected speedup {best.expected_speedup:.3f}x). "
            if best
            else "Baselines not scored (`baselines = false`). "
        )
        lines += [f"## Task `{r.task}`", ""]
        if r.drafts is not None:
            lines += _draft_table(r.drafts)
        lines += [
            "### Layer search (ConfLayers, bytes cost model)",
            "",
            *_layer_search_fate(r),
            f"The layer search chose skip set {r.chosen.skip} ({verdict}). {compared}"
            f"Search took {r.seconds:.0f} s.",
            "",
            "| candidate | layers | skip set | acceptance | tokens / full pass | drafts / cycle | c_draft "
            "| expected speedup |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *(_row(c, c is r.chosen) for c in r.finalists),
            *(_row(c, False) for c in r.baselines),
            "",
            *_choices(r),
            "Search iterations:",
            "",
            *_iterations(r.iterations),
        ]
        if r.search == "both":
            lines += ["Search iterations of the published loop:", "", *_iterations(r.published_iterations)]
    return "\n".join(lines)


def _draft_words(c: DraftCandidate) -> str:
    """A draft in words: "no skip, int8, full vocab", "skip [3], fp32, vocab 8192"."""
    return f"{f'skip {c.skip}' if c.skip else 'no skip'}, {c.weight_precision}, " + (
        f"vocab {c.vocab_size}" if c.vocab_size else "full vocab"
    )


def _ships_layer_search_set(r: TaskResult) -> bool:
    return r.drafts is not None and sorted(r.drafts.chosen.skip) == sorted(r.chosen.skip)


def _layer_search_fate(r: TaskResult) -> list[str]:
    """One sentence: whether the draft that ships skips the layer search's set, and if not, what won."""
    if r.drafts is None:
        return []
    shipped = r.drafts.chosen
    ours = (
        f"The layer search's set {r.chosen.skip} "
        f"(expected {r.chosen.expected_speedup:.2f}x with the bytes model)"
    )
    if _ships_layer_search_set(r):
        sentence = (
            f"{ours} ships: the joint choice on the target graphs kept it, as {_draft_words(shipped)} "
            f"(expected {shipped.expected_speedup:.2f}x)."
        )
    else:
        sentence = (
            f"{ours} did not ship: the joint choice on the target graphs picked {_draft_words(shipped)} "
            f"(expected {shipped.expected_speedup:.2f}x)."
        )
    return [sentence, ""]


# Where our selection's numerics differ from the reference's, and why.
NUMERICS = (
    "Numerics: we compute the selection (z-normalisation, gradients, windows, thresholds) in float64; "
    "the reference computes it in float16. On flat or near-tied profiles the two can pick different "
    "sets (float16 keeps 11 significant bits, so near-equal scores tie or swap), and on a perfectly "
    "flat profile the reference's min-max is 0/0 and it crashes. float64 is deterministic here and "
    "defined on flat profiles (a flat profile gives curvature weights of 0.5 and skips nothing)."
)


def _choices(r: TaskResult) -> list[str]:
    """The searches' choices side by side (search "published" or "both")."""
    if r.search == "cost-aware":
        return []
    ships = "cost-aware" if r.search == "both" else "published"
    return [
        "Search choices, scored on the common evaluation slice (the bytes cost model):",
        "",
        "| search | skip set | acceptance | tokens / full pass | expected speedup |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name}{' **(ships)**' if name == ships else ''} | {','.join(map(str, c.skip)) or '-'} | "
            f"{c.acceptance_rate:.3f} | {c.mean_tokens_per_cycle:.2f} | {c.expected_speedup:.3f} |"
            for name, c in r.choices().items()
        ),
        "",
        NUMERICS,
        "",
    ]


def _iterations(iterations: list[dict[str, object]]) -> list[str]:
    def notes(it: dict[str, object]) -> str:
        marks = []
        if it.get("lambda_steps"):
            marks.append(f"{it['lambda_steps']} lambda steps to the minimum size")
        if it.get("below_min_size"):
            marks.append("still below the minimum size")
        if it.get("abandoned"):
            marks.append("abandoned at half the interval")
        return "; ".join(marks) or "-"

    return [
        "| iteration | lambda | layers skipped | acceptance | accepted / cycle | expected speedup | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {it['iteration']} | {it['lambda']:+.2f} | {len(it['skip'])} | "  # type: ignore[arg-type]
            f"{it['acceptance_rate']:.3f} | "
            f"{it['accepted_per_cycle']:.2f} | {it['expected_speedup']:.3f} | {notes(it)} |"
            for it in iterations
        ),
        "",
    ]


def _left_out(d: DraftSearchResult) -> str:
    if not d.left_out:
        return ""
    pairs = ", ".join(f"{label} (at most {ceiling:.2f}x)" for label, ceiling in d.left_out.items())
    return (
        f" Left out unscored, since even with every draft accepted and a verify pass at the cost of a "
        f"step none of their drafts could beat one already scored: {pairs}."
    )


def _draft_table(d: DraftSearchResult) -> list[str]:
    c = d.chosen
    verdict = "recommended" if d.recommended else "**speculation not recommended** (below 1)"
    coverage = ", ".join(f"{n}: {share:.1%}" for n, share in d.coverage.items()) or "-"
    flagged = [x for x in d.candidates if x.timing_flag]
    return [
        f"### Draft that ships: {c.label}, up to {c.max_draft_tokens} drafts above confidence "
        f"{c.confidence_threshold} ({verdict}: expected speedup {c.expected_speedup:.3f}x)",
        "",
        "Drafts scored on the target graphs (each skip set x weight precision at its widest vocabulary, "
        f"the narrower vocabularies of the best pairs; {len(d.candidates)} scorings, {d.seconds:.0f} s; "
        f"plain decoding ran at {d.plain_tokens_per_second:.1f} tok/s), by replay along the full "
        "model's greedy text (the statistics of a real speculative run, without its verify passes). "
        "The expected speedup S = tokens per full pass / (drafts per cycle x c_draft + c_verify), "
        f"with pass costs {d.chosen.cost_source or 'timed on these graphs'}, chooses: it leaves out "
        "the prompt's prefill and the noise of a whole run, which the wall clock includes. "
        f"Held-out coverage of the pruned vocabularies (share of generated tokens inside): {coverage}."
        + _left_out(d),
        "",
        *_confirmation(d),
        "| skip set | weights | vocabulary | draft length | acceptance | tokens / full pass | drafts / cycle "
        "| bytes ratio | c_draft | c_verify | expected speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {','.join(map(str, x.skip)) or '-'} | {x.weight_precision} | {x.vocab_size or 'full'} | "
            f"{x.max_draft_tokens} / {x.confidence_threshold}"
            f"{f', tree {x.tree_nodes}x{x.tree_width}' if x.tree_nodes else ''} | {x.acceptance_rate:.3f} | "
            f"{x.mean_tokens_per_cycle:.2f} | {x.draft_passes_per_cycle:.2f} | {x.bytes_ratio:.3f} | "
            f"{x.c_draft:.3f}{' (flagged)' if x.timing_flag else ''} | {x.c_verify:.3f} | "
            f"{x.expected_speedup:.3f}{' **(chosen)**' if x is c else ''} |"
            for x in d.candidates
        ),
        "",
        *_sources_table(d),
        *_fixed_length(d),
        *(
            [
                f"Flagged timings (c_draft more than {TIMING_MARGIN}x away from the bytes ratio, twice):",
                "",
                *(f"- {x.label}: {x.timing_flag}" for x in flagged),
                "",
            ]
            if flagged
            else []
        ),
    ]


def _fixed_length(d: DraftSearchResult) -> list[str]:
    """The chosen draft in a loop that drafts a fixed length every cycle (select.py)."""
    f = d.fixed_length
    if f is None:
        return []
    by_length = ", ".join(f"{k}: {v:.2f}x" for k, v in f.speedups.items())
    return [
        "In a loop that drafts a fixed length every cycle, with no confidence stop (onnxruntime-genai's "
        f"draft-model mode, genai_speculative.json), the draft is expected fastest at **{f.max_draft_tokens} "
        f"drafts** ({f.expected_speedup:.2f}x), priced from one replay at {max(f.speedups)} (by length: "
        f"{by_length}).",
        "",
    ]


def _sources_table(d: DraftSearchResult) -> list[str]:
    """Lookup drafting alone and beside the chosen draft (sources.py), and which one ships."""
    if not d.sources:
        return []
    ships = (
        f"the task ships **{d.source.label}** (expected {d.source.expected_speedup:.3f}x)"
        if d.source
        else "none is expected faster than the draft alone and than plain decoding: none ships"
    )
    return [
        "Proposals read from the text (lookup), alone and beside the draft above, replayed along the "
        "same texts; a lookup makes the rows of a full pass vary, so c_verify is the mean cost of the "
        f"passes by their rows: {ships}.",
        "",
        "| source | n-gram | proposals | acceptance | tokens / full pass | from the text | drafts / cycle "
        "| rows / pass | c_verify | expected speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {x.source} | {x.min_ngram}-{x.max_ngram} | {x.max_draft_tokens} | {x.acceptance_rate:.3f} | "
            f"{x.mean_tokens_per_cycle:.2f} | {x.lookup_share:.0%} | {x.draft_passes_per_cycle:.2f} | "
            f"{x.rows_per_full_pass:.2f} | {x.c_verify:.3f} | "
            f"{x.expected_speedup:.3f}{' **(ships)**' if x is d.source else ''} |"
            for x in d.sources
        ),
        "",
    ]


def _confirmation(d: DraftSearchResult) -> list[str]:
    k = d.confirmation
    if k is None:
        return []
    same = (
        "the same acceptance and tokens per pass as its replay"
        if k.matches_replay
        else f"acceptance {k.acceptance_rate:.3f} and {k.mean_tokens_per_cycle:.2f} tokens per pass, "
        "which differ from its replay (kernels that compute a row differently in passes of different "
        "lengths: a near-tie flipped)"
    )
    return [
        f"Confirmed by a real speculative run of {k.prompts} evaluation prompt{'s' * (k.prompts != 1)}: "
        f"{k.wall_clock_speedup:.2f}x plain decoding on the wall clock (each prompt timed plain, then "
        f"speculative), with {same}.",
        "",
    ]


def _plot(path: Path, results: list[TaskResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for (left, right), r in zip(axes, results, strict=True):
        _plot_profile(left, r)
        its = [it["iteration"] for it in r.iterations]
        right.plot(its, [it["acceptance_rate"] for it in r.iterations], "o-", label="acceptance rate")
        right.plot(its, [it["expected_speedup"] for it in r.iterations], "s-", label="expected speedup")
        right.axhline(1.0, color="grey", lw=0.8, label="break-even (speedup 1.0)")
        right.set(
            title=f"{r.task}: search iterations",
            xlabel="iteration",
            ylabel="acceptance rate / expected speedup",
        )
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_profile(ax: Axes, r: TaskResult) -> None:
    """Per-layer confidence, the layer search's set (rings) and, where it differs, the layers the
    shipped draft skips (filled); the shipped draft is named in the title."""
    from matplotlib.ticker import MaxNLocator

    layers = list(range(1, len(r.profile.get("scores", [])) + 1))
    if layers:
        scores = r.profile["scores"]
        ax.plot(layers, scores, "o-", label="confidence score (z-normalised)")
        ax.plot(layers, r.profile["thresholds"], "--", label="adaptive threshold (first iteration)")
        ours = [i for i in r.chosen.skip if i in layers]
        ships = _ships_layer_search_set(r)
        ax.scatter(
            ours,
            [scores[i - 1] for i in ours],
            s=120,
            facecolors="none",
            edgecolors="red",
            label="layer search's set" + (" (ships)" if ships else ""),
        )
        if r.drafts is not None and not ships and r.drafts.chosen.skip:
            shipped = [i for i in r.drafts.chosen.skip if i in layers]
            ax.scatter(
                shipped,
                [scores[i - 1] for i in shipped],
                s=50,
                color="black",
                zorder=3,
                label="skipped by the shipped draft",
            )
    title = f"{r.task}: per-layer confidence"
    if r.drafts is not None:
        title += f"\nships: {_draft_words(r.drafts.chosen)}"
    ax.set(title=title, xlabel="decoder layer", ylabel="score")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
