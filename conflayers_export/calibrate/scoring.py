"""Scoring drafts on built graphs: what both selection steps of ``calibrate`` stand on.

Candidates are built as drafts of one temporary artifact of the target dtype and run through ONNX
Runtime on the target device. They are scored by replay (replay.py): the full model's greedy
text of each evaluation prompt is generated once per calibration (every candidate artifact holds
the same full graph), and each candidate drafts along it without verify passes. Costs are
timed on the same graphs, robustly (:func:`timed_costs`), or taken from the weight bytes each
graph reads per token.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from conflayers_runtime import DraftConfig, GenerationStats, LookupConfig, TreeConfig
from conflayers_runtime.artifact import artifact_section, open_backend
from conflayers_runtime.manifest import Draft, Manifest, VocabularyRanking, read_manifest, skip_order
from conflayers_runtime.onnx_backend import OnnxBackend
from conflayers_runtime.speculative import GREEDY, generate, measure_pass_costs

from ..export.build import build_artifact
from ..models import LoadedModel
from ..progress import Progress
from .replay import KnownCaches, replay_generation
from .settings import CalibrationSettings, Candidate

# A timed c_draft further than this factor from the draft's bytes ratio is re-timed, and flagged in
# the report if the re-timing agrees with the first: weight bytes bound a decoding step on most
# devices, so a large disagreement means either kernels whose compute sets the cost (int4
# unpacking on a CPU, launches on a GPU) or a machine busy with other work.
TIMING_MARGIN = 1.5


@dataclass
class EvaluationTexts:
    """The prompts every candidate is scored on, and the full model's greedy continuation of each
    (``max_new_tokens`` tokens, stop tokens ignored: replay.py says why), generated once."""

    prompts: list[list[int]]
    max_new_tokens: int
    texts: list[list[int]] | None = None
    plain_seconds: float = 0.0  # plain decoding time of the texts (one pass per token)
    # Each text's full-model keys and values, kept from its plain decoding for the replays that
    # score drafts along it (replay.KnownCaches); False for texts no draft is scored on.
    keep_caches: bool = True
    caches: list[KnownCaches] | None = None

    def fill(self, backend: OnnxBackend) -> None:
        if self.texts is not None:
            return
        started = time.perf_counter()
        texts, caches = [], []
        for prompt in self.prompts:
            texts.append(generate(backend, prompt, self.max_new_tokens, GREEDY, None)[0])
            if self.keep_caches:  # the copy is not timed: plain_seconds is plain decoding's speed
                pause = time.perf_counter()
                caches.append(KnownCaches(backend, len(prompt) + len(texts[-1]) - 1))
                started += time.perf_counter() - pause
        self.plain_seconds = time.perf_counter() - started
        self.texts, self.caches = texts, caches if self.keep_caches else None

    def first(self, count: int) -> EvaluationTexts:
        """The first ``count`` prompts with their texts (and kept caches)."""
        return EvaluationTexts(
            self.prompts[:count],
            self.max_new_tokens,
            self.texts[:count] if self.texts is not None else None,
            keep_caches=self.keep_caches,
            caches=self.caches[:count] if self.caches is not None else None,
        )

    def replies(self, stop_token_ids: Sequence[int]) -> list[list[int]]:
        """The texts as a reply ends: each cut after its first stop token."""
        stops = set(stop_token_ids)
        return [
            text[: next((i + 1 for i, t in enumerate(text) if t in stops), len(text))]
            for text in self.texts or []
        ]

    @property
    def plain_tokens_per_second(self) -> float:
        return len(self.prompts) * self.max_new_tokens / self.plain_seconds if self.plain_seconds else 0.0


class CandidateGraphs:
    """A built artifact of candidate drafts (see :func:`candidate_graphs`)."""

    def __init__(self, folder: Path, settings: CalibrationSettings, stop_token_ids: Sequence[int]):
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.section = artifact_section(self.manifest)
        self.settings = settings
        self.stop_token_ids = list(stop_token_ids)
        self._full_bytes = graph_bytes(folder / self.section.full)
        self._last: tuple[tuple[str | None, bool], OnnxBackend] | None = None

    def open(self, draft: str | None, tree: bool = False) -> OnnxBackend:
        """Sessions of the full graph with ``draft``. The last ones opened are reused, not opened
        again (costly for a big model): the chosen draft's lookups, fixed-length pricing and
        confirming run follow one another on the same sessions, and the pass costs timed on them
        (sources.RowCosts) are timed once."""
        if self._last is None or self._last[0] != (draft, tree):
            s = self.settings
            backend = open_backend(self.folder, self.manifest, draft, s.device, s.threads, tree=tree)
            self._last = ((draft, tree), backend)
        return self._last[1]

    def bytes_ratio(self, draft: str) -> float:
        """Weight bytes the draft reads per token / the full graph's."""
        return graph_bytes(self.folder / self.section.drafts[draft]) / self._full_bytes

    def texts(self, evaluation: EvaluationTexts) -> list[list[int]]:
        if evaluation.texts is None:
            evaluation.fill(self.open(None))
        assert evaluation.texts is not None
        return evaluation.texts

    def replay(
        self,
        backend: OnnxBackend,
        evaluation: EvaluationTexts,
        config: DraftConfig | None,
        tree: TreeConfig | None = None,
        lookup: LookupConfig | None = None,
    ) -> GenerationStats:
        texts = self.texts(evaluation)
        return replay_generation(
            backend,
            evaluation.prompts,
            texts,
            evaluation.max_new_tokens,
            config,
            self.stop_token_ids,
            tree,
            lookup,
            evaluation.caches,
        )

    def confirm(
        self,
        backend: OnnxBackend,
        evaluation: EvaluationTexts,
        config: DraftConfig | None,
        tree: TreeConfig | None = None,
        lookup: LookupConfig | None = None,
    ) -> tuple[GenerationStats, float]:
        """A real speculative run of every prompt (with stop tokens), timed against plain decoding of
        the same prompt right before it. Returns (its stats, wall-clock speedup over plain)."""
        total = GenerationStats()
        seconds = {"plain": 0.0, "speculative": 0.0}
        tokens = {"plain": 0, "speculative": 0}
        for prompt in evaluation.prompts:
            for mode in ("plain", "speculative"):
                speculative = mode == "speculative"
                started = time.perf_counter()
                _, stats = generate(  # plain decoding proposes nothing, so its tree stays empty
                    backend,
                    prompt,
                    evaluation.max_new_tokens,
                    GREEDY,
                    config if speculative else None,
                    self.stop_token_ids,
                    tree,
                    lookup if speculative else None,
                )
                seconds[mode] += time.perf_counter() - started
                tokens[mode] += stats.new_tokens
                if speculative:
                    total.merge(stats)
        speedup = (tokens["speculative"] / seconds["speculative"]) / (tokens["plain"] / seconds["plain"])
        return total, speedup


@contextlib.contextmanager
def candidate_graphs(
    loaded: LoadedModel,
    settings: CalibrationSettings,
    drafts: Sequence[Draft],
    evaluations: Sequence[EvaluationTexts],
    ranked: Sequence[int] = (),
) -> Iterator[CandidateGraphs]:
    """Build ``drafts`` (pruned ones cut from the vocabulary ranking ``ranked``) into a temporary
    artifact of ``settings.dtype``, long enough for the evaluation prompts and the cost timing."""
    longest = max([len(p) + e.max_new_tokens + 16 for e in evaluations for p in e.prompts] + [96])
    with tempfile.TemporaryDirectory(prefix="conflayers-drafts-") as tmp:
        folder = Path(tmp) / "artifact"
        manifest = Manifest(
            model=loaded.identity, drafts=list(drafts), vocabulary=VocabularyRanking(list(ranked))
        )
        build_artifact(folder, loaded, manifest, settings.dtype, max_seq_len=longest)
        yield CandidateGraphs(folder, settings, loaded.stop_token_ids)


def generate_texts(
    loaded: LoadedModel,
    settings: CalibrationSettings,
    evaluations: Sequence[EvaluationTexts],
    progress: Progress,
) -> None:
    """The full model's greedy texts of the prompt sets that have none yet, on the target graphs
    (a full graph alone)."""
    missing = [e for e in evaluations if e.texts is None]
    if not missing:
        return
    label = f"generating the full model's greedy text of {sum(len(e.prompts) for e in missing)} prompts"
    with progress.phase(label, len(missing) + 1) as step:
        with candidate_graphs(loaded, settings, [], missing) as graphs:
            step()
            fill_texts(graphs, missing, step)


def fill_texts(
    graphs: CandidateGraphs, evaluations: Sequence[EvaluationTexts], step: Callable[[], None]
) -> None:
    """Generate, on ``graphs``' full graph, the texts of the prompt sets that have none yet (a
    ``step`` after each set)."""
    for evaluation in evaluations:
        if evaluation.texts is None:
            graphs.texts(evaluation)
            step()


def _plain_unit(unit: object) -> int | str:
    """A skip-set entry as JSON writes it: a layer (numpy integers too) or a block string."""
    return unit if isinstance(unit, str) else int(unit)  # type: ignore[call-overload]


def score_layer_sets(
    loaded: LoadedModel,
    settings: CalibrationSettings,
    sets: Sequence[tuple[str, Sequence[int | str]]],
    evaluation: EvaluationTexts,
    cost: Callable[[Sequence[int | str]], tuple[float, float]],
    progress: Progress,
    also_generate: Sequence[EvaluationTexts] = (),
) -> list[Candidate]:
    """Score (origin, skip set) pairs of the layer search as drafts of the artifact's own precision,
    at the search's draft length, with the search's ``cost`` model (the bytes each set reads).
    The texts of ``evaluation`` and ``also_generate`` that are still missing are generated first,
    on the same graphs: for a big model a build of its full graph fewer."""
    config = DraftConfig(settings.max_draft_tokens, settings.confidence_threshold)
    drafts = [
        Draft(f"s{i}", sorted(map(_plain_unit, skip), key=skip_order)) for i, (_, skip) in enumerate(sets)
    ]
    scored = []
    texts = list({id(e): e for e in [evaluation, *also_generate]}.values())
    missing = [e for e in texts if e.texts is None]
    label = f"scoring {len(sets)} skip sets" + (
        f" (first generating the full model's greedy text of {sum(len(e.prompts) for e in missing)} prompts)"
        if missing
        else ""
    )
    with progress.phase(label, 1 + len(missing) + len(sets)) as step:
        with candidate_graphs(loaded, settings, drafts, texts) as graphs:
            step()
            fill_texts(graphs, missing, step)
            for draft, (origin, _) in zip(drafts, sets, strict=True):
                stats = graphs.replay(graphs.open(draft.name), evaluation, config)
                candidate = Candidate(skip=list(draft.skip_layers), origin=origin, cycles=stats.verify_passes)
                candidate.scored(stats, *cost(draft.skip_layers))
                scored.append(candidate)
                progress.log(
                    f"  {origin} {draft.skip_layers}: expected speedup {scored[-1].expected_speedup:.3f}"
                )
                step()
    return scored


def timed_costs(
    backend: OnnxBackend, bytes_ratio: float, verify_tokens: int, retime: bool = True
) -> tuple[float, float, str]:
    """(c_draft, c_verify, flag): pass costs timed on the graphs (interleaved, fastest repeats: see
    measure_pass_costs), re-timed with twice the repeats when c_draft is more than TIMING_MARGIN
    away from the bytes ratio; the flag says so when the re-timing confirms the disagreement.
    ``retime`` False: flag the disagreement without re-timing (a draft of a weight precision whose
    disagreement an earlier draft's re-timing confirmed: the kernels', not a busy machine's)."""
    c_draft, c_verify = measure_pass_costs(backend, repeats=9, verify_tokens=verify_tokens)
    if _agrees(c_draft, bytes_ratio):
        return c_draft, c_verify, ""
    if not retime:
        return c_draft, c_verify, (
            f"timed c_draft {c_draft:.2f}: {c_draft / bytes_ratio:.2f}x its bytes ratio {bytes_ratio:.2f} "
            "(not re-timed: an earlier draft of its precision was, and disagreed alike)"
        )
    first = c_draft
    c_draft, c_verify = measure_pass_costs(backend, repeats=18, verify_tokens=verify_tokens)
    if _agrees(c_draft, bytes_ratio):
        return c_draft, c_verify, ""
    return (
        c_draft,
        c_verify,
        f"timed c_draft {first:.2f}, re-timed {c_draft:.2f}: {c_draft / bytes_ratio:.2f}x its bytes ratio "
        f"{bytes_ratio:.2f} (compute-bound kernels, or a busy machine)",
    )


def _agrees(c_draft: float, bytes_ratio: float) -> bool:
    return bytes_ratio / TIMING_MARGIN <= c_draft <= bytes_ratio * TIMING_MARGIN


def graph_bytes(path: Path) -> int:
    """Weight bytes one decoding step of the graph reads: every external initializer, except
    those only gathered from (an embedding table: one row per token)."""
    model = onnx.load(str(path), load_external_data=False)
    gathered_only = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if not (node.op_type == "Gather" and position == 0):
                gathered_only.discard(name)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name not in gathered_only:
            total += next((int(e.value) for e in tensor.external_data if e.key == "length"), 0)
    return total
