"""The joint, cost-aware choice of the draft that ships (the last stage of ``calibrate``).

The layer search proposes skip sets; small models cannot afford to skip many layers, so drafts
also get cheaper by reading int8/int4 copies of their weights and by scoring a pruned output
vocabulary. This stage builds every combination skip set x weight precision x vocabulary size
as drafts of the target artifact dtype (scoring.py), scores each by replay along the full model's
greedy text, and ranks them by the expected speedup

    S = tokens per full pass / (draft passes per cycle * c_draft + c_verify)

with c_draft and c_verify either timed on those graphs ("measured") or taken from the bytes
each graph reads per token ("bytes", deterministic). The best few are re-scored with longer or
more confident draft lengths, since an accurate draft pays for longer drafts. The chosen one is
then confirmed by a real speculative run, timed against plain decoding (the wall-clock speedup,
which includes the prompt's prefill and is noisier than S: S chooses).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from conflayers_runtime import DraftConfig
from conflayers_runtime.manifest import ARTIFACT_DTYPES, Draft
from conflayers_runtime.speculative import DraftScore

from ..errors import CalibrationError
from ..export.quantize import BITS
from ..models import LoadedModel
from ..progress import Progress
from .scoring import CandidateGraphs, EvaluationTexts, candidate_graphs, timed_costs
from .search import CalibrationSettings


@dataclass(kw_only=True)
class DraftCandidate(DraftScore):
    """A combination of the joint choice, scored (costs: timed on its graphs, or the bytes ratio)."""

    skip: list[int]
    weight_precision: str
    vocab_size: int | None  # None: the whole vocabulary
    max_draft_tokens: int
    confidence_threshold: float
    bytes_ratio: float = 0.0  # weight bytes the draft reads per token / the full graph's
    timing_flag: str = ""  # set when the timed c_draft disagrees with the bytes ratio (scoring.timed_costs)

    @property
    def label(self) -> str:
        vocab = f"vocab {self.vocab_size}" if self.vocab_size else "full vocab"
        return f"skip {self.skip or '-'}, {self.weight_precision}, {vocab}"


@dataclass
class Confirmation:
    """The chosen draft's real speculative run on the evaluation prompts."""

    wall_clock_speedup: float  # against plain decoding of each prompt, timed right before it
    acceptance_rate: float
    mean_tokens_per_cycle: float
    matches_replay: bool  # the same statistics as the replay that scored it (replay.py)


@dataclass
class DraftSearchResult:
    candidates: list[DraftCandidate]
    chosen: DraftCandidate
    plain_tokens_per_second: float
    coverage: dict[int, float] = field(default_factory=dict)  # held-out token share per vocab size
    seconds: float = 0.0
    confirmation: Confirmation | None = None

    @property
    def recommended(self) -> bool:
        """Speculation pays with the chosen draft (its expected speedup is above 1)."""
        return self.chosen.expected_speedup > 1.0

    @property
    def wall_clock_speedup(self) -> float | None:
        """The confirming real run's speedup over plain decoding (None: not confirmed)."""
        return self.confirmation.wall_clock_speedup if self.confirmation else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


def draft_combinations(
    skip_sets: Sequence[Sequence[int]], settings: CalibrationSettings, vocab_size: int
) -> list[tuple[list[int], str, int | None]]:
    """(skip, precision, vocab size) to score. Precisions that read as many bytes as the artifact's
    own or more (int4 or int8 drafts of an int4 artifact) collapse into "base". The unchanged full
    graph is no draft (every graph of an int4 artifact computes alike, at quantize.ACCURACY_LEVEL)."""
    artifact_bits = ARTIFACT_DTYPES[settings.dtype].weight_bits
    precisions = [
        p
        for p in dict.fromkeys(settings.precisions)
        if p == "base" or not artifact_bits or BITS[p] < artifact_bits
    ]
    sizes = [None, *sorted(n for n in set(settings.vocab_sizes) if n < vocab_size)]
    combos = []
    for skip in dict.fromkeys(tuple(sorted(s)) for s in skip_sets):
        for precision in precisions:
            for size in sizes:
                if skip or size is not None or precision != "base":
                    combos.append((list(skip), precision, size))
    return combos


class DraftSearch:
    def __init__(self, loaded: LoadedModel, settings: CalibrationSettings, progress: Progress | None = None):
        self.loaded = loaded
        self.settings = settings
        self.progress = progress or Progress()

    def run(
        self,
        task: str,
        skip_sets: Sequence[Sequence[int]],
        evaluation: EvaluationTexts,
        ranked: list[int],
    ) -> DraftSearchResult:
        """Score the combinations on the ``evaluation`` prompts; ``ranked`` (the vocabulary ranking,
        made from other prompts' generations) decides which tokens a pruned vocabulary keeps."""
        started = time.perf_counter()
        s = self.settings
        combos = draft_combinations(skip_sets, s, self.loaded.model.config.vocab_size)
        if not combos:
            raise CalibrationError(
                "no draft to score: the layer search kept every layer and --precisions/--vocab-sizes "
                "offer nothing cheaper than the full graph; allow int8/int4 or a vocabulary size"
            )
        drafts = [Draft(f"c{i}", skip, size, precision) for i, (skip, precision, size) in enumerate(combos)]
        policies = [DraftConfig(max_tokens, threshold) for max_tokens, threshold in s.draft_policies]
        first = DraftConfig(s.max_draft_tokens, s.confidence_threshold)
        steps = 1 + len(drafts) + s.policy_finalists * len(policies) + 1
        with self.progress.phase(f"[{task}] scoring {len(drafts)} drafts ({s.dtype})", steps) as step:
            with candidate_graphs(self.loaded, s, drafts, [evaluation], ranked) as graphs:
                step()
                candidates = []
                for draft in drafts:
                    candidates += self._score(graphs, draft, [first], evaluation, step)
                by_speedup = sorted(range(len(drafts)), key=lambda i: -candidates[i].expected_speedup)
                for index in by_speedup[: s.policy_finalists]:
                    candidates += self._score(graphs, drafts[index], policies, evaluation, step)
                chosen = max(candidates, key=lambda c: c.expected_speedup)
                confirmation = self._confirm(graphs, drafts, chosen, evaluation)
                step()
        sizes = sorted({d.vocab_size for d in drafts if d.vocab_size})
        return DraftSearchResult(
            candidates=candidates,
            chosen=chosen,
            plain_tokens_per_second=evaluation.plain_tokens_per_second,
            coverage=coverage(ranked, evaluation.replies(self.loaded.stop_token_ids), sizes),  # held-out text
            seconds=time.perf_counter() - started,
            confirmation=confirmation,
        )

    def _score(
        self,
        graphs: CandidateGraphs,
        draft: Draft,
        configs: Sequence[DraftConfig],
        evaluation: EvaluationTexts,
        step: Callable[[], None],
    ) -> list[DraftCandidate]:
        """One replay per draft length, on one pair of sessions (opened once: costly for big models)."""
        backend = graphs.open(draft.name)
        ratio = graphs.bytes_ratio(draft.name)
        scored = []
        for config in configs:
            stats = graphs.replay(backend, evaluation, config)
            c_draft, c_verify, flag = ratio, 1.0, ""
            if self.settings.cost == "measured":
                # verify passes as long as this draft's typical cycle
                verify_tokens = max(2, round(stats.draft_passes_per_cycle) + 1)
                c_draft, c_verify, flag = timed_costs(backend, ratio, verify_tokens)
            candidate = DraftCandidate(
                skip=list(draft.skip_layers),
                weight_precision=draft.weight_precision,
                vocab_size=draft.vocab_size,
                max_draft_tokens=config.max_draft_tokens,
                confidence_threshold=config.confidence_threshold,
                bytes_ratio=ratio,
                timing_flag=flag,
            )
            candidate.scored(stats, c_draft, c_verify)
            self.progress.log(
                f"  {candidate.label}, up to {config.max_draft_tokens} drafts above "
                f"{config.confidence_threshold}: acceptance {candidate.acceptance_rate:.2f}, "
                f"c_draft {c_draft:.2f}, expected {candidate.expected_speedup:.2f}x"
                + (f" [{flag}]" if flag else "")
            )
            scored.append(candidate)
            step()
        return scored

    def _confirm(
        self,
        graphs: CandidateGraphs,
        drafts: Sequence[Draft],
        chosen: DraftCandidate,
        evaluation: EvaluationTexts,
    ) -> Confirmation:
        draft = next(
            d
            for d in drafts
            if (list(d.skip_layers), d.weight_precision, d.vocab_size)
            == (chosen.skip, chosen.weight_precision, chosen.vocab_size)
        )
        config = DraftConfig(chosen.max_draft_tokens, chosen.confidence_threshold)
        stats, speedup = graphs.confirm(graphs.open(draft.name), evaluation, config)
        confirmation = Confirmation(
            wall_clock_speedup=speedup,
            acceptance_rate=stats.acceptance_rate,
            mean_tokens_per_cycle=stats.mean_tokens_per_cycle,
            matches_replay=stats.acceptance_rate == chosen.acceptance_rate
            and stats.mean_tokens_per_cycle == chosen.mean_tokens_per_cycle,
        )
        self.progress.log(
            f"  confirmed by a real run: {speedup:.2f}x plain decoding on the wall clock, acceptance "
            f"{stats.acceptance_rate:.2f}"
            + ("" if confirmation.matches_replay else " (differs from the replay)")
        )
        return confirmation
