"""The joint, cost-aware choice of the draft that ships (the last stage of ``calibrate``).

The layer search proposes skip sets; small models cannot afford to skip many layers, so drafts
also get cheaper by reading int8/int4 copies of their weights and by scoring a pruned output
vocabulary. This stage builds every combination skip set x weight precision x vocabulary size
as real graphs of the target artifact dtype (in a temporary folder), runs greedy speculative
decoding through ONNX Runtime on the target device over the evaluation prompts, and scores
each one by its expected speedup

    S = tokens per full pass / (draft passes per cycle * c_draft + c_verify)

with c_draft and c_verify either timed on those graphs ("measured") or taken from the bytes
each graph reads per token ("bytes", deterministic). The best few are re-run with longer or
more confident draft lengths, since an accurate draft pays for longer drafts. Greedy decoding
is lossless, so every run emits the same text: the acceptance numbers compare like with like.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from conflayers_runtime import DraftConfig, GenerationStats
from conflayers_runtime.artifact import artifact_section, open_backend
from conflayers_runtime.manifest import ARTIFACT_DTYPES, Draft, Manifest, VocabularyRanking, read_manifest
from conflayers_runtime.speculative import GREEDY, generate, measure_pass_costs

from ..errors import CalibrationError
from ..export.build import build_artifact
from ..export.quantize import BITS
from ..models import LoadedModel
from .search import CalibrationSettings, expected_speedup


@dataclass
class DraftCandidate:
    skip: list[int]
    weight_precision: str
    vocab_size: int | None  # None: the whole vocabulary
    max_draft_tokens: int
    confidence_threshold: float
    acceptance_rate: float = 0.0
    mean_tokens_per_cycle: float = 0.0
    draft_passes_per_cycle: float = 0.0
    bytes_ratio: float = 0.0  # weight bytes the draft reads per token / the full graph's
    c_draft: float = 0.0
    c_verify: float = 1.0
    expected_speedup: float = 0.0
    measured_speedup: float = 0.0  # wall clock against plain decoding of the same prompts (noisy)

    @property
    def label(self) -> str:
        vocab = f"vocab {self.vocab_size}" if self.vocab_size else "full vocab"
        return f"skip {self.skip or '-'}, {self.weight_precision}, {vocab}"


@dataclass
class DraftSearchResult:
    candidates: list[DraftCandidate]
    chosen: DraftCandidate
    plain_tokens_per_second: float
    coverage: dict[int, float] = field(default_factory=dict)  # held-out token share per vocab size
    seconds: float = 0.0

    @property
    def recommended(self) -> bool:
        """Speculation pays with the chosen draft (its expected speedup is above 1)."""
        return self.chosen.expected_speedup > 1.0

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
    def __init__(self, loaded: LoadedModel, settings: CalibrationSettings, progress: Callable[[str], None]):
        self.loaded = loaded
        self.settings = settings
        self.progress = progress

    def run(
        self,
        task: str,
        skip_sets: Sequence[Sequence[int]],
        prompts: Sequence[list[int]],
        ranked: list[int],
    ) -> DraftSearchResult:
        """Score the combinations on ``prompts``; ``ranked`` (the vocabulary ranking, made from other
        prompts' generations) decides which tokens a pruned vocabulary keeps."""
        started = time.perf_counter()
        s = self.settings
        vocab_size = self.loaded.model.config.vocab_size
        combos = draft_combinations(skip_sets, s, vocab_size)
        if not combos:
            raise CalibrationError(
                "no draft to score: the layer search kept every layer and --precisions/--vocab-sizes "
                "offer nothing cheaper than the full graph; allow int8/int4 or a vocabulary size"
            )
        drafts = [Draft(f"c{i}", skip, size, precision) for i, (skip, precision, size) in enumerate(combos)]
        longest = max(max(len(p) for p in prompts) + s.max_new_tokens + 16, 96)  # 96: measure_pass_costs
        with tempfile.TemporaryDirectory(prefix="conflayers-drafts-") as tmp:
            folder = Path(tmp) / "artifact"
            manifest = Manifest(
                model=self.loaded.identity,
                drafts=drafts,
                vocabulary=VocabularyRanking(ranked),
            )
            self.progress(f"[{task}] building {len(drafts)} candidate drafts ({s.dtype})")
            build_artifact(folder, self.loaded, manifest, s.dtype, max_seq_len=longest)
            manifest = read_manifest(folder)
            section = artifact_section(manifest)
            full_bytes = graph_bytes(folder / section.full)

            plain = open_backend(folder, manifest, None, s.device, s.threads)
            plain_stats, plain_seconds, generations = self._decode(plain, prompts, None)
            plain_rate = plain_stats.new_tokens / plain_seconds
            del plain

            def score(index: int, configs: Sequence[DraftConfig]) -> list[DraftCandidate]:
                """One run per draft length, on one pair of sessions (opened once: costly for big models)."""
                draft = drafts[index]
                backend = open_backend(folder, manifest, draft.name, s.device, s.threads)
                ratio = graph_bytes(folder / section.drafts[draft.name]) / full_bytes
                scored = []
                for config in configs:
                    stats, seconds, _ = self._decode(backend, prompts, config)
                    c_draft, c_verify = (
                        # verify passes as long as this draft's typical cycle
                        measure_pass_costs(
                            backend, repeats=9, verify_tokens=max(2, round(stats.draft_passes_per_cycle) + 1)
                        )
                        if s.cost == "measured"
                        else (ratio, 1.0)
                    )
                    candidate = DraftCandidate(
                        skip=list(draft.skip_layers),
                        weight_precision=draft.weight_precision,
                        vocab_size=draft.vocab_size,
                        max_draft_tokens=config.max_draft_tokens,
                        confidence_threshold=config.confidence_threshold,
                        acceptance_rate=stats.acceptance_rate,
                        mean_tokens_per_cycle=stats.mean_tokens_per_cycle,
                        draft_passes_per_cycle=stats.draft_passes_per_cycle,
                        bytes_ratio=ratio,
                        c_draft=c_draft,
                        c_verify=c_verify,
                        expected_speedup=expected_speedup(stats, c_draft, c_verify),
                        measured_speedup=(stats.new_tokens / seconds) / plain_rate,
                    )
                    self.progress(
                        f"  {candidate.label}, up to {config.max_draft_tokens} drafts above "
                        f"{config.confidence_threshold}: acceptance {candidate.acceptance_rate:.2f}, "
                        f"c_draft {c_draft:.2f}, expected {candidate.expected_speedup:.2f}x "
                        f"(wall clock {candidate.measured_speedup:.2f}x)"
                    )
                    scored.append(candidate)
                return scored

            first = DraftConfig(s.max_draft_tokens, s.confidence_threshold)
            candidates = [score(i, [first])[0] for i in range(len(drafts))]
            best = sorted(range(len(drafts)), key=lambda i: -candidates[i].expected_speedup)[
                : s.policy_finalists
            ]
            policies = [DraftConfig(max_tokens, threshold) for max_tokens, threshold in s.draft_policies]
            for index in best:
                candidates.extend(score(index, policies))
        chosen = max(candidates, key=lambda c: c.expected_speedup)
        sizes = sorted({d.vocab_size for d in drafts if d.vocab_size})
        return DraftSearchResult(
            candidates=candidates,
            chosen=chosen,
            plain_tokens_per_second=plain_rate,
            coverage=coverage(ranked, generations, sizes),  # held-out text
            seconds=time.perf_counter() - started,
        )

    def _decode(
        self, backend: object, prompts: Sequence[list[int]], config: DraftConfig | None
    ) -> tuple[GenerationStats, float, list[list[int]]]:
        total = GenerationStats()
        generations = []
        started = time.perf_counter()
        for prompt in prompts:
            tokens, stats = generate(
                backend, prompt, self.settings.max_new_tokens, GREEDY, config, self.loaded.stop_token_ids
            )
            total.merge(stats)
            generations.append(tokens)
        return total, time.perf_counter() - started, generations
