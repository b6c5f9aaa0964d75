"""The joint, cost-aware choice of the draft that ships (the last stage of ``calibrate``).

The layer search proposes skip sets; small models cannot afford to skip many layers, so drafts
also get cheaper by reading int8/int4 copies of their weights and by scoring a pruned output
vocabulary. This stage builds every combination skip set x weight precision x vocabulary size
as drafts of the target artifact dtype (scoring.py), scores them by replay along the full model's
greedy text (each skip set x precision at its widest vocabulary, then the narrower vocabularies of
the best few), and ranks them by the expected speedup

    S = tokens per full pass / (draft passes per cycle * c_draft + c_verify)

with c_draft and c_verify timed on those graphs ("measured"), taken from the bytes each graph
reads per token ("bytes", deterministic), or priced by a cost table measured on the target device
by the runtime alone ("table", conflayers_runtime.costs). The best few are re-scored with longer or
more confident draft lengths, since an accurate draft pays for longer drafts. The chosen one is
then confirmed by a real speculative run, timed against plain decoding (the wall-clock speedup,
which includes the prompt's prefill and is noisier than S: S chooses). The chosen draft is also
priced for a loop that drafts a fixed length every cycle (onnxruntime-genai's draft-model mode),
whose best length the manifest carries for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from conflayers_runtime import DraftConfig, GenerationStats, TreeConfig
from conflayers_runtime.costs import CostTable
from conflayers_runtime.manifest import ARTIFACT_DTYPES, WEIGHT_PRECISIONS, Draft, skip_order
from conflayers_runtime.onnx_backend import OnnxBackend
from conflayers_runtime.speculative import DraftScore, expected_speedup

from ..errors import CalibrationError, CostTableError
from ..export.quantize import BITS
from ..models import LoadedModel
from ..progress import Progress
from .scoring import TIMING_MARGIN, CandidateGraphs, EvaluationTexts, candidate_graphs, timed_costs
from .settings import (
    CalibrationSettings,
    Confirmation,
    DraftCandidate,
    DraftSearchResult,
    FixedLength,
    SourceCandidate,
)
from .sources import RowCosts, score_sources


def rank_vocabulary(scores: np.ndarray, stop_token_ids: Sequence[int]) -> list[int]:
    """Every token id, most useful to a draft first: the stop tokens (so a draft can end a reply),
    then by ``scores`` (counts in calibration generations), ties by id (BPE vocabularies number
    their merges roughly by frequency, so low ids are the better guess for unseen tokens)."""
    stops = list(dict.fromkeys(int(t) for t in stop_token_ids if 0 <= t < len(scores)))
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return [*stops, *(int(t) for t in order if int(t) not in set(stops))]


def coverage(
    ranked: Sequence[int], generations: Sequence[Sequence[int]], sizes: Sequence[int]
) -> dict[int, float]:
    """Share of the tokens of ``generations`` that a vocabulary of the first N ranked ids covers."""
    tokens = [t for text in generations for t in text]
    rank = {t: i for i, t in enumerate(ranked)}
    return {n: sum(rank.get(t, len(ranked)) < n for t in tokens) / max(len(tokens), 1) for n in sizes}


def draft_precisions(dtype: str, precisions: Sequence[str] = WEIGHT_PRECISIONS) -> list[str]:
    """The ``precisions`` a draft of a ``dtype`` artifact can save bytes with: those that read as
    many bytes as the artifact's own or more (int4 or int8 drafts of an int4 artifact) collapse
    into "base"."""
    artifact_bits = ARTIFACT_DTYPES[dtype].weight_bits
    return [
        p for p in dict.fromkeys(precisions) if p == "base" or not artifact_bits or BITS[p] < artifact_bits
    ]


def draft_combinations(
    skip_sets: Sequence[Sequence[int | str]], settings: CalibrationSettings, vocab_size: int
) -> list[tuple[list[int | str], str, int | None]]:
    """(skip, precision, vocab size) to score, over :func:`draft_precisions`. The unchanged full
    graph is no draft (every graph of an int4 artifact computes alike, at quantize.ACCURACY_LEVEL).
    A cost table prices whole layers only (conflayers_runtime.costs): with one, sets that skip
    single blocks are left out."""
    precisions = draft_precisions(settings.dtype, settings.precisions)
    sizes = [None, *sorted(n for n in set(settings.vocab_sizes) if n < vocab_size)]
    combos = []
    priced = [s for s in skip_sets if settings.cost != "table" or all(isinstance(u, int) for u in s)]
    for skip in dict.fromkeys(tuple(sorted(s, key=skip_order)) for s in priced):
        for precision in precisions:
            for size in sizes:
                if skip or size is not None or precision != "base":
                    combos.append((list(skip), precision, size))
    return combos


def check_cost_table(costs: CostTable | None, loaded: LoadedModel, settings: CalibrationSettings) -> None:
    """A cost table goes with ``settings.cost`` "table", and prices every draft the joint choice
    may score: measured for this model, this artifact dtype, each precision tried and verify
    passes of the longest cycle. Raises CalibrationError (options) or CostTableError (a table
    that does not fit), naming the fix."""
    if costs is not None and settings.cost != "table":
        raise CalibrationError(
            f"a cost table (--costs) prices the drafts itself: drop --cost {settings.cost}, or the table"
        )
    if costs is None and settings.cost == "table":
        raise CalibrationError(
            "--cost table needs the table: pass --costs FILE (written by `conflayers-run profile`)"
        )
    if costs is None:
        return
    profile = f"`conflayers-run profile` on a profiling artifact of --dtype {settings.dtype} for this model"
    if costs.fingerprint != loaded.identity.fingerprint:
        raise CostTableError(
            f"the cost table {costs.path} was measured for another model ({costs.model_source}, "
            f"{costs.fingerprint[:19]}...) than {loaded.identity.source}: measure one with {profile}"
        )
    if costs.artifact_dtype != settings.dtype:
        raise CostTableError(
            f"the cost table {costs.path} was measured on a {costs.artifact_dtype} artifact, not "
            f"{settings.dtype}: pass --dtype {costs.artifact_dtype}, or measure one with {profile}"
        )
    missing = [
        p for p in draft_precisions(settings.dtype, settings.precisions) if p not in costs.coefficients
    ]
    if missing:
        raise CostTableError(
            f"the cost table {costs.path} has no cost model for {', '.join(missing)} drafts: leave them "
            f"out of --precisions, or measure one with {profile}"
        )
    rows = 1 + max(settings.max_draft_tokens, *(tokens for tokens, _ in settings.draft_policies))
    if rows > max(costs.verify):
        raise CostTableError(
            f"the cost table {costs.path} times verify passes of up to {max(costs.verify)} rows; cycles "
            f"of {rows - 1} drafts need {rows}: measure one with {profile}"
        )


class DraftSearch:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: CalibrationSettings,
        progress: Progress | None = None,
        costs: CostTable | None = None,
    ):
        """``costs``: the cost table that prices the drafts when ``settings.cost`` is "table"
        (:func:`check_cost_table`)."""
        check_cost_table(costs, loaded, settings)
        self.loaded = loaded
        self.settings = settings
        self.progress = progress or Progress()
        self.costs = costs
        # weight precisions whose drafts' timed cost a re-timing confirmed far from their bytes ratio
        self._compute_bound: set[str] = set()
        # each draft's c_draft as first timed: every draft length and token tree of one draft is
        # priced with it, so that timing noise (10-15% between timings) cannot choose among them
        # (SmolLM2: a chain timed at 0.46 and the same draft's 2x2 tree at 0.40, which shipped
        # though it accepted no more tokens per pass)
        self._draft_costs: dict[str, float] = {}

    @property
    def cost_source(self) -> str:
        """Where c_draft and c_verify come from, in words (the manifest's metrics and the report)."""
        s, table = self.settings, self.costs
        if s.cost == "table" and table is not None:
            held_out = table.max_held_out_error
            return (
                f"cost table {Path(table.path).name} measured on {table.device} "
                f"({table.threads or 'default'} threads, "
                f"onnxruntime {table.onnxruntime}, {table.profiled_at}), linear model fitted to "
                f"{len(table.drafts)} drafts within {table.max_error:.1%}"
                + (f" ({held_out:.1%} held out)" if held_out is not None else "")
            )
        if s.cost == "measured":
            return f"timed on the candidate graphs on {s.device} ({s.threads or 'default'} threads)"
        return "weight bytes read per token (verify passes priced as one step)"

    def run(
        self,
        task: str,
        skip_sets: Sequence[Sequence[int | str]],
        evaluation: EvaluationTexts,
        ranked: list[int],
    ) -> DraftSearchResult:
        """Score the combinations on the ``evaluation`` prompts; ``ranked`` (the vocabulary ranking,
        made from other prompts' generations) decides which tokens a pruned vocabulary keeps."""
        started = time.perf_counter()
        s = self.settings
        self._draft_costs = {}  # the drafts of this task's graphs (their names repeat across tasks)
        combos = draft_combinations(skip_sets, s, self.loaded.model.config.vocab_size)
        if not combos:
            raise CalibrationError(
                "no draft to score: the layer search kept every layer and --precisions/--vocab-sizes "
                "offer nothing cheaper than the full graph; allow int8/int4 or a vocabulary size"
            )
        drafts = [Draft(f"c{i}", skip, size, precision) for i, (skip, precision, size) in enumerate(combos)]
        policies = [DraftConfig(max_tokens, threshold) for max_tokens, threshold in s.draft_policies]
        first = DraftConfig(s.max_draft_tokens, s.confidence_threshold)
        trees = s.tree_shapes if s.cost != "bytes" else ()
        lookups = s.lookups if s.cost != "bytes" else ()  # both price passes by their rows
        groups = _precision_groups(drafts)
        scorings = len(groups) + _most_narrower(groups, s.vocab_finalists)
        prices_fixed_length = bool(s.fixed_length_max) and s.cost != "bytes"  # by rows, like lookups
        steps = 1 + scorings + s.policy_finalists * len(policies) + len(trees) + len(lookups) + 1
        steps += prices_fixed_length
        with self.progress.phase(f"[{task}] scoring {len(drafts)} drafts ({s.dtype})", steps) as step:
            with candidate_graphs(self.loaded, s, drafts, [evaluation], ranked) as graphs:
                step()
                ceiling_tokens = max([first.max_draft_tokens, *(p.max_draft_tokens for p in policies)])
                scored, left_out = self._score_vocabularies(
                    graphs, groups, first, evaluation, step, ceiling_tokens
                )
                for _ in range(scorings - len(scored) - len(left_out)):
                    step()  # the bar counted the finalist groups with the most vocabularies: those left out
                candidates = [candidate for _, candidate in scored]
                for draft in _policy_finalists(scored, s.policy_finalists):
                    candidates += self._score(graphs, draft, policies, evaluation, step)
                chosen = max(candidates, key=preference)
                # The chosen draft and draft length with token trees, where passes are priced by
                # their rows (timed or from a table: the bytes model prices every verify pass as a step).
                if trees:
                    candidates += self._score(
                        graphs, _draft_of(drafts, chosen), [chosen.policy], evaluation, step, trees
                    )
                    chosen = max(candidates, key=preference)
                row_costs = RowCosts(self.costs if s.cost == "table" else None)
                draft = _draft_of(drafts, chosen)
                sources = self._score_sources(graphs, draft, chosen, evaluation, row_costs, step)
                best = max(sources, key=lambda c: c.expected_speedup, default=None)
                source = best if best and best.expected_speedup > max(1.0, chosen.expected_speedup) else None
                fixed_length = None
                if prices_fixed_length:
                    fixed_length = self._fixed_length(graphs, draft, chosen, evaluation, row_costs)
                    step()
                confirmation = self._confirm(graphs, drafts, chosen, evaluation, source)
                step()
        sizes = sorted({d.vocab_size for d in drafts if d.vocab_size})
        return DraftSearchResult(
            candidates=candidates,
            chosen=chosen,
            plain_tokens_per_second=evaluation.plain_tokens_per_second,
            coverage=coverage(ranked, evaluation.replies(self.loaded.stop_token_ids), sizes),  # held-out text
            seconds=time.perf_counter() - started,
            confirmation=confirmation,
            sources=sources,
            source=source,
            left_out=left_out,
            fixed_length=fixed_length,
        )

    def _score_vocabularies(
        self,
        graphs: CandidateGraphs,
        groups: Sequence[Sequence[Draft]],
        config: DraftConfig,
        evaluation: EvaluationTexts,
        step: Callable[[], None],
        ceiling_tokens: int,
    ) -> tuple[list[tuple[Draft, DraftCandidate]], dict[str, float]]:
        """Each skip set x precision at its widest vocabulary first, then the narrower vocabularies
        of the ``vocab_finalists`` best of those only: a pruned vocabulary moves a draft's expected
        speedup by a few percent (SmolLM2, Qwen2.5-Coder-0.5B: at most 2% up), the skip set and
        precision by far more, so pairs far behind after the first round do not catch up; this
        saves half the first round's scorings of a default run. ``groups``: the drafts by skip set
        and precision (:func:`_precision_groups`).

        The pairs go cheapest first, and a pair whose :func:`_ceiling` (at drafts of up to
        ``ceiling_tokens``) is below the best expected speedup scored so far is left out unscored:
        none of its drafts could be chosen (on the CPU, full-precision drafts of an fp32 artifact
        once a quantized copy has scored). Returns the scored (draft, candidate) pairs and the
        left-out pairs' labels with their ceilings."""
        widest = [max(group, key=lambda d: d.vocab_size or np.inf) for group in groups]
        floors = [min(self._floor_cost(graphs, d) for d in group) for group in groups]
        scored: list[tuple[Draft, DraftCandidate]] = []
        left_out: dict[str, float] = {}
        first_round: dict[int, DraftCandidate] = {}
        for index in sorted(range(len(groups)), key=lambda i: floors[i]):
            best = max((c.expected_speedup for _, c in scored), default=0.0)
            ceiling = _ceiling(floors[index], ceiling_tokens)
            if ceiling < best:
                label = f"skip {list(widest[index].skip_layers) or '-'}, {widest[index].weight_precision}"
                left_out[label] = ceiling
                self.progress.log(
                    f"  {label}: left out, at most {ceiling:.2f}x expected (best so far {best:.2f}x)"
                )
                step()
                continue
            first_round[index] = self._score(graphs, widest[index], [config], evaluation, step)[0]
            scored.append((widest[index], first_round[index]))
        ranked = sorted(first_round, key=lambda i: -first_round[i].expected_speedup)
        for index in ranked[: self.settings.vocab_finalists]:
            for draft in groups[index]:
                if draft is not widest[index]:
                    scored.append((draft, self._score(graphs, draft, [config], evaluation, step)[0]))
        return scored, left_out

    def _floor_cost(self, graphs: CandidateGraphs, draft: Draft) -> float:
        """The lowest c_draft the pricing could give ``draft``: timed costs are accepted down to
        its bytes ratio / TIMING_MARGIN (scoring.timed_costs); a cost table's and the bytes
        model's are exact."""
        ratio = graphs.bytes_ratio(draft.name)
        if self.settings.cost == "measured":
            return ratio / TIMING_MARGIN
        if self.settings.cost == "table":
            return self._table_draft_cost(draft)
        return ratio

    def _score(
        self,
        graphs: CandidateGraphs,
        draft: Draft,
        configs: Sequence[DraftConfig],
        evaluation: EvaluationTexts,
        step: Callable[[], None],
        tree_shapes: Sequence[tuple[int, int]] = (),
    ) -> list[DraftCandidate]:
        """One replay per draft length (or, given ``tree_shapes``, per token tree at the one draft
        length), on one pair of sessions (opened once: costly for big models)."""
        backend = graphs.open(draft.name, tree=bool(tree_shapes))
        ratio = graphs.bytes_ratio(draft.name)
        runs = [(config, None) for config in configs] if not tree_shapes else []
        runs += [(configs[0], TreeConfig(*shape)) for shape in tree_shapes]
        scored = []
        for config, tree in runs:
            stats = graphs.replay(backend, evaluation, config, tree)
            # A verify pass holds the pending token, the drafts and the tree's alternatives.
            rows = stats.rows_per_full_pass
            c_draft, c_verify, flag = self._pass_costs(backend, draft, ratio, max(2, round(rows)))
            candidate = DraftCandidate(
                skip=list(draft.skip_layers),
                weight_precision=draft.weight_precision,
                vocab_size=draft.vocab_size,
                max_draft_tokens=config.max_draft_tokens,
                confidence_threshold=config.confidence_threshold,
                bytes_ratio=ratio,
                timing_flag=flag,
                cost_source=self.cost_source,
                tree_nodes=tree.nodes if tree else 0,
                tree_width=tree.width if tree else 0,
            )
            candidate.scored(stats, c_draft, c_verify)
            self.progress.log(
                f"  {candidate.label}, up to {config.max_draft_tokens} drafts above "
                f"{config.confidence_threshold}: acceptance {candidate.acceptance_rate:.2f}, "
                f"{candidate.mean_tokens_per_cycle:.2f} tokens per pass, c_draft {c_draft:.2f}, "
                f"c_verify {c_verify:.2f}, expected {candidate.expected_speedup:.2f}x"
                + (f" [{flag}]" if flag else "")
            )
            scored.append(candidate)
            step()
        return scored

    def _pass_costs(
        self, backend: OnnxBackend, draft: Draft, bytes_ratio: float, verify_tokens: int
    ) -> tuple[float, float, str]:
        """(c_draft, c_verify, timing flag) by ``settings.cost``: timed on the draft's graphs,
        priced by the cost table, or the bytes ratio. ``verify_tokens``: the rows of this draft's
        typical verify pass."""
        if self.settings.cost == "measured":
            retime = draft.weight_precision not in self._compute_bound
            c_draft, c_verify, flag = timed_costs(backend, bytes_ratio, verify_tokens, retime)
            if flag and retime:  # confirmed by a re-timing: its kernels, not the machine
                self._compute_bound.add(draft.weight_precision)
            return self._draft_costs.setdefault(draft.name, c_draft), c_verify, flag
        if self.settings.cost == "table":
            assert self.costs is not None  # check_cost_table
            return self._table_draft_cost(draft), self.costs.verify_cost(verify_tokens), ""
        return bytes_ratio, 1.0, ""

    def _table_draft_cost(self, draft: Draft) -> float:
        assert self.costs is not None  # block sets are left out with a table (draft_combinations)
        kept_layers = self.loaded.identity.num_layers - len(draft.skip_layers)
        columns = draft.vocab_size or self.loaded.model.config.vocab_size
        return self.costs.draft_cost(draft.weight_precision, kept_layers, columns)

    def _score_sources(
        self,
        graphs: CandidateGraphs,
        draft: Draft,
        chosen: DraftCandidate,
        evaluation: EvaluationTexts,
        row_costs: RowCosts,
        step: Callable[[], None],
    ) -> list[SourceCandidate]:
        """The lookup settings, alone and beside the chosen draft (sources.py); none under the bytes
        model, which cannot price passes by their rows."""
        if self.settings.cost == "bytes" or not self.settings.lookups:
            return []
        return score_sources(
            graphs,
            evaluation,
            self.settings.lookups,
            draft.name,
            chosen,
            chosen.policy,
            chosen.tree,
            row_costs,
            self.progress,
            step,
        )

    def _fixed_length(
        self,
        graphs: CandidateGraphs,
        draft: Draft,
        chosen: DraftCandidate,
        evaluation: EvaluationTexts,
        row_costs: RowCosts,
    ) -> FixedLength | None:
        """The chosen draft's best length where every cycle drafts that many tokens, no confidence
        stop (onnxruntime-genai's draft-model mode): one replay at ``fixed_length_max`` tokens with
        a threshold of 0, priced at every shorter length (:func:`fixed_length_speedups`). None for
        a pruned vocabulary, which onnxruntime-genai cannot verify."""
        if draft.vocab_size is not None:
            return None
        longest = self.settings.fixed_length_max
        backend = graphs.open(draft.name)
        stats = graphs.replay(backend, evaluation, DraftConfig(longest, 0.0))
        verify = row_costs.by_rows(backend, range(2, longest + 2))
        speedups = fixed_length_speedups(stats.accepted_histogram, chosen.c_draft, verify)
        fixed = FixedLength(max(speedups, key=lambda k: speedups[k]), speedups)
        self.progress.log(
            f"  a fixed length every cycle (onnxruntime-genai's draft-model loop): {fixed.max_draft_tokens} "
            f"drafts, expected {fixed.expected_speedup:.2f}x ("
            + ", ".join(f"{k}: {v:.2f}x" for k, v in speedups.items())
            + ")"
        )
        return fixed

    def _confirm(
        self,
        graphs: CandidateGraphs,
        drafts: Sequence[Draft],
        chosen: DraftCandidate,
        evaluation: EvaluationTexts,
        source: SourceCandidate | None = None,
    ) -> Confirmation:
        """A real run of what ships: the chosen draft, or the chosen ``source`` (a lookup alone or
        beside the draft), timed against plain decoding."""
        lookup_alone = source is not None and source.source == "lookup"
        draft = None if lookup_alone else _draft_of(drafts, chosen).name
        backend = graphs.open(draft, tree=chosen.tree is not None and not lookup_alone)
        policy = None if lookup_alone else chosen.policy
        tree = None if lookup_alone else chosen.tree
        lookup = source.config if source is not None else None
        count = self.settings.confirm_prompts or len(evaluation.prompts)
        confirmed = evaluation.first(count) if count < len(evaluation.prompts) else evaluation
        stats, speedup = graphs.confirm(backend, confirmed, policy, tree, lookup)
        expected: DraftScore | GenerationStats = source if source is not None else chosen
        if confirmed is not evaluation:  # the scoring replayed every prompt: replay these alone
            expected = graphs.replay(backend, confirmed, policy, tree, lookup)
        confirmation = Confirmation(
            wall_clock_speedup=speedup,
            acceptance_rate=stats.acceptance_rate,
            mean_tokens_per_cycle=stats.mean_tokens_per_cycle,
            matches_replay=stats.acceptance_rate == expected.acceptance_rate
            and stats.mean_tokens_per_cycle == expected.mean_tokens_per_cycle,
            prompts=len(confirmed.prompts),
        )
        self.progress.log(
            f"  confirmed by a real run: {speedup:.2f}x plain decoding on the wall clock, acceptance "
            f"{stats.acceptance_rate:.2f}"
            + ("" if confirmation.matches_replay else " (differs from the replay)")
        )
        return confirmation


def fixed_length_speedups(
    accepted_histogram: Sequence[int], c_draft: float, verify_cost: dict[int, float]
) -> dict[int, float]:
    """Expected speedup of a loop that drafts K tokens every cycle, for K from 1 to the length a
    replay drafted, from that replay's cycles by accepted drafts: a cycle of length K accepts
    min(a, K) of the a drafts the longer one accepted, so it emits 1 + sum_{j<=K} P(a >= j) tokens,
    for K draft passes and a verify pass of K + 1 rows (``verify_cost``: by rows, a step = 1)."""
    cycles = sum(accepted_histogram)
    longest = max(verify_cost) - 1
    if not cycles:
        return {k: 0.0 for k in range(1, longest + 1)}
    at_least = [sum(accepted_histogram[j:]) / cycles for j in range(longest + 1)]
    return {
        k: expected_speedup(1 + sum(at_least[1 : k + 1]), k, c_draft, verify_cost[k + 1])
        for k in range(1, longest + 1)
    }


def _ceiling(c_draft: float, max_draft_tokens: int) -> float:
    """The highest expected speedup a draft of pass cost ``c_draft`` can reach with drafts of up to
    ``max_draft_tokens``: every draft accepted, and a verify pass costing one step (no cheaper than
    the step it replaces). S = (d + 1) / (d * c_draft + 1) grows with d while c_draft < 1."""
    d = max_draft_tokens
    return max(1.0, (d + 1) / (d * c_draft + 1))


# A pruned draft vocabulary must beat the full one by more than this factor to be preferred: it
# saves a few % of a draft pass on a CPU (within the 10-15% timing noise), accepts fewer tokens
# at long draft lengths (SmolLM2's int8 copy at 12 drafts above 0.3: 0.78 with 32768 tokens, 0.93
# with all), and onnxruntime-genai cannot verify it (no genai_speculative.json).
PRUNED_VOCABULARY_MARGIN = 1.05


def preference(candidate: DraftCandidate) -> float:
    """What the joint choice ranks drafts by: the expected speedup, a pruned vocabulary's divided
    by PRUNED_VOCABULARY_MARGIN."""
    margin = PRUNED_VOCABULARY_MARGIN if candidate.vocab_size else 1.0
    return candidate.expected_speedup / margin


def _policy_finalists(scored: Sequence[tuple[Draft, DraftCandidate]], count: int) -> list[Draft]:
    """The drafts re-scored at every draft policy: the best ``count`` skip set x precision pairs,
    each at its best vocabulary by :func:`preference`. A slot spent on a second vocabulary of one
    pair is lost to another pair (SmolLM2: three int4 vocabularies took three of four slots from the
    int8 copy, which wins at a longer draft length)."""
    finalists: dict[tuple[tuple[int | str, ...], str], Draft] = {}
    for draft, _ in sorted(scored, key=lambda pair: -preference(pair[1])):
        finalists.setdefault((tuple(draft.skip_layers), draft.weight_precision), draft)
    return list(finalists.values())[:count]


def _precision_groups(drafts: Sequence[Draft]) -> list[list[Draft]]:
    """The drafts by skip set and weight precision (each group: its vocabulary sizes), in order."""
    groups: dict[tuple[tuple[int | str, ...], str], list[Draft]] = {}
    for draft in drafts:
        groups.setdefault((tuple(draft.skip_layers), draft.weight_precision), []).append(draft)
    return list(groups.values())


def _most_narrower(groups: Sequence[Sequence[Draft]], finalists: int) -> int:
    """The most narrower-vocabulary scorings ``finalists`` groups can add (a progress bar's length)."""
    return sum(sorted((len(group) - 1 for group in groups), reverse=True)[:finalists])


def _draft_of(drafts: Sequence[Draft], candidate: DraftCandidate) -> Draft:
    """The draft a candidate scored (drafts differ by skip set, precision and vocabulary)."""
    return next(
        d
        for d in drafts
        if (list(d.skip_layers), d.weight_precision, d.vocab_size)
        == (candidate.skip, candidate.weight_precision, candidate.vocab_size)
    )
