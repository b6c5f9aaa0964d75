"""calibration/report.json, report.md and confidence.png."""

from __future__ import annotations

import json
from pathlib import Path

from .drafts import DraftSearchResult
from .search import Candidate, TaskResult


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
        beat = "beat" if r.conflayers_beats_baselines else "did **not** beat"
        lines += [f"## Task `{r.task}`", ""]
        if r.drafts is not None:
            lines += _draft_table(r.drafts)
        lines += [
            "### Layer search (ConfLayers, bytes cost model)",
            "",
            f"Chosen skip set: {r.chosen.skip} ({verdict}). ConfLayers {beat} the best baseline "
            f"(expected speedup {max(b.expected_speedup for b in r.baselines):.3f}x). "
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


# Item 2 of issue 13: where our selection's numerics differ from the reference's, and why.
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


def _draft_table(d: DraftSearchResult) -> list[str]:
    c = d.chosen
    verdict = "recommended" if d.recommended else "**speculation not recommended** (below 1)"
    coverage = ", ".join(f"{n}: {share:.1%}" for n, share in d.coverage.items()) or "-"
    return [
        f"### Draft that ships: {c.label}, up to {c.max_draft_tokens} drafts above confidence "
        f"{c.confidence_threshold} ({verdict}: expected speedup {c.expected_speedup:.3f}x)",
        "",
        f"Every combination scored on the target graphs ({len(d.candidates)} runs, {d.seconds:.0f} s; plain "
        f"decoding ran at {d.plain_tokens_per_second:.1f} tok/s). Held-out coverage of the pruned "
        f"vocabularies (share of generated tokens inside): {coverage}.",
        "",
        "| skip set | weights | vocabulary | draft length | acceptance | tokens / full pass | drafts / cycle "
        "| bytes ratio | c_draft | c_verify | expected speedup | wall-clock speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {','.join(map(str, x.skip)) or '-'} | {x.weight_precision} | {x.vocab_size or 'full'} | "
            f"{x.max_draft_tokens} / {x.confidence_threshold} | {x.acceptance_rate:.3f} | "
            f"{x.mean_tokens_per_cycle:.2f} | {x.draft_passes_per_cycle:.2f} | {x.bytes_ratio:.3f} | "
            f"{x.c_draft:.3f} | {x.c_verify:.3f} | {x.expected_speedup:.3f}"
            f"{' **(chosen)**' if x is c else ''} | {x.measured_speedup:.3f} |"
            for x in d.candidates
        ),
        "",
    ]


def _plot(path: Path, results: list[TaskResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for (left, right), r in zip(axes, results, strict=True):
        layers = list(range(1, len(r.profile.get("scores", [])) + 1))
        if layers:
            left.plot(layers, r.profile["scores"], "o-", label="confidence score (z-normalised)")
            left.plot(layers, r.profile["thresholds"], "--", label="adaptive threshold (first iteration)")
            chosen = [i for i in r.chosen.skip if i in layers]
            left.scatter(
                chosen,
                [r.profile["scores"][i - 1] for i in chosen],
                s=120,
                facecolors="none",
                edgecolors="red",
                label="chosen skip set",
            )
        left.set(title=f"{r.task}: per-layer confidence", xlabel="decoder layer", ylabel="score")
        left.legend(fontsize=8)
        its = [it["iteration"] for it in r.iterations]
        right.plot(its, [it["acceptance_rate"] for it in r.iterations], "o-", label="acceptance rate")
        right.plot(its, [it["expected_speedup"] for it in r.iterations], "s-", label="expected speedup")
        right.axhline(1.0, color="grey", lw=0.8)
        right.set(title=f"{r.task}: search iterations", xlabel="iteration")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
