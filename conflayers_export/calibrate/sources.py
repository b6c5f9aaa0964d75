"""Lookup drafting scored beside the model draft: the last step of the joint choice.

A lookup (conflayers_runtime.lookup) proposes from the text itself at no model cost, so where a
task's text repeats its prompt or itself (summaries, code explanations, translations) it can pay
where no model draft does. Beside the model draft ("both") it makes the draft cheaper: each draft
pass also reads the text's guess of the next tokens and keeps those the draft would choose
itself, so one pass drafts a repeated span. Each lookup setting is replayed alone and with the
chosen model draft along the same greedy texts as the drafts (replay.py), and priced like them:

    S = tokens per full pass / (draft passes per full pass * c_draft + E[c_verify(rows)])

where a lookup makes its full passes' row counts vary (one row without a match, up to
1 + max_draft_tokens with one), so the verify cost is the mean over the replay's passes of the
cost of a pass of that many rows (timed on the graphs, or from the cost table; a plain step
costs 1); beside a draft, each draft pass also reads the text's guess, so c_draft is the chosen
draft's one-row cost grown to the mean rows of its passes. Under ``--cost bytes`` rows are not
priced, so sources are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from conflayers_runtime import DraftConfig, GenerationStats, LookupConfig, TreeConfig
from conflayers_runtime.costs import CostTable
from conflayers_runtime.onnx_backend import OnnxBackend
from conflayers_runtime.speculative import DraftScore, fastest_passes

from ..progress import Progress
from .scoring import CandidateGraphs, EvaluationTexts
from .settings import SourceCandidate

SOURCES = ("lookup", "both")


class RowCosts:
    """The cost of a full pass of r rows relative to a one-token step, per backend: timed once per
    row count (fastest repeats, interleaved with the step), or read from a cost table."""

    def __init__(self, costs: CostTable | None, repeats: int = 9):
        self.table = costs
        self.repeats = repeats
        self.timed: dict[tuple[int, int], float] = {}  # (id of the backend, rows) -> cost

    def mean(self, backend: OnnxBackend, histogram: Sequence[int]) -> float:
        """E[c_verify] over the passes counted in ``histogram`` (passes by row count)."""
        passes = sum(histogram)
        if not passes:
            return 1.0
        rows = [r for r, n in enumerate(histogram) if n]
        cost = self.by_rows(backend, rows)
        return sum(histogram[r] * cost[r] for r in rows) / passes

    def draft_factor(self, backend: OnnxBackend, mean_rows: float) -> float:
        """How much more a draft pass of ``mean_rows`` rows (guesses it confirms beside its token)
        costs than a one-row draft pass: timed at the two row counts around the mean and
        interpolated; from a cost table, the full model's growth with rows stands in."""
        low = max(1, int(mean_rows))
        high = low + 1
        weight = mean_rows - low
        if self.table is not None:
            cost = {r: 1.0 if r == 1 else self.table.verify_cost(r) for r in (low, high)}
            return (1 - weight) * cost[low] + weight * cost[high]
        key = (id(backend), -low)  # negative rows: draft passes
        if key not in self.timed:
            passes = {f"{r}": (list(range(101, 101 + r)), True) for r in {1, low, high}}
            fastest = fastest_passes(backend, passes, self.repeats)
            for r in (low, high):
                self.timed[id(backend), -r] = fastest[f"{r}"] / fastest["1"]
        return (1 - weight) * self.timed[id(backend), -low] + weight * self.timed[id(backend), -high]

    def by_rows(self, backend: OnnxBackend, rows: Sequence[int]) -> dict[int, float]:
        """The cost of a full pass of each of ``rows`` rows (a one-row pass: a step, 1)."""
        if self.table is not None:
            return {r: 1.0 if r == 1 else self.table.verify_cost(r) for r in rows}
        missing = [r for r in rows if r > 1 and (id(backend), r) not in self.timed]
        if missing:
            passes = {"step": ([101], False)} | {f"{r}": (list(range(101, 101 + r)), False) for r in missing}
            fastest = fastest_passes(backend, passes, self.repeats)
            for r in missing:
                self.timed[id(backend), r] = fastest[f"{r}"] / fastest["step"]
        return {r: 1.0 if r == 1 else self.timed[id(backend), r] for r in rows}


def score_sources(
    graphs: CandidateGraphs,
    evaluation: EvaluationTexts,
    lookups: Sequence[tuple[int, int, int]],
    draft: str,
    chosen: DraftScore,
    policy: DraftConfig,
    tree: TreeConfig | None,
    row_costs: RowCosts,
    progress: Progress,
    step: Callable[[], None],
) -> list[SourceCandidate]:
    """Every lookup setting (min n-gram, max n-gram, proposals) replayed alone and beside the chosen
    model draft ``draft`` (with its draft length ``policy``, its ``tree`` and the c_draft ``chosen``
    was priced with)."""
    plain = graphs.open(None)
    paired = graphs.open(draft, tree=tree is not None)
    scored = []
    for setting in lookups:
        lookup = LookupConfig(*setting)
        for source in SOURCES:
            if source == "lookup":
                stats = graphs.replay(plain, evaluation, None, None, lookup)
                c_draft, c_verify = 0.0, row_costs.mean(plain, stats.rows_histogram)
            else:
                stats = graphs.replay(paired, evaluation, policy, tree, lookup)
                rows = stats.draft_rows / stats.draft_passes if stats.draft_passes else 1.0
                c_draft = chosen.c_draft * row_costs.draft_factor(paired, rows)
                c_verify = row_costs.mean(paired, stats.rows_histogram)
            candidate = _candidate(source, lookup, stats, c_draft, c_verify)
            progress.log(
                f"  {candidate.label}: acceptance {candidate.acceptance_rate:.2f}, "
                f"{candidate.mean_tokens_per_cycle:.2f} tokens per pass ({candidate.lookup_share:.0%} of the "
                f"accepted from the text), {candidate.rows_per_full_pass:.2f} rows, c_verify {c_verify:.2f}, "
                f"expected {candidate.expected_speedup:.2f}x"
            )
            scored.append(candidate)
        step()
    return scored


def _candidate(
    source: str, lookup: LookupConfig, stats: GenerationStats, c_draft: float, c_verify: float
) -> SourceCandidate:
    candidate = SourceCandidate(
        source=source,
        min_ngram=lookup.min_ngram,
        max_ngram=lookup.max_ngram,
        max_draft_tokens=lookup.max_draft_tokens,
        rows_per_full_pass=stats.rows_per_full_pass,
        lookup_share=stats.looked_up_accepted / stats.accepted_tokens if stats.accepted_tokens else 0.0,
    )
    candidate.scored(stats, c_draft, c_verify)  # c_verify: the mean over the passes' rows
    return candidate
