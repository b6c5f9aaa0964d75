"""Settings of a calibration and the types of its results.

The leaf module of ``calibrate``: every stage (search, scoring, select, report) imports these
and this module imports none of them, so the stages can be imported alone and in any order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from conflayers_runtime import DraftConfig, LookupConfig, TreeConfig
from conflayers_runtime.speculative import DraftScore

COST_MODELS = ("bytes", "measured", "table")  # table: a --costs file (runtime costs.py)
SEARCHES = ("cost-aware", "published", "both")


@dataclass(frozen=True)
class CalibrationSettings:
    skip_ratio: float = 0.4  # target share of layers 1..L-2 to skip (the paper uses 0.4-0.45)
    context_window: int = 32  # tokens whose block outputs are scored (reference default: 100)
    search_interval: int = 25  # verify cycles per search iteration (reference: 25-30)
    max_iter: int = 20  # offline and deterministic, so far fewer than the online 100-1000 suffice
    max_new_tokens: int = 48  # per calibration prompt
    eval_prompts: int = 8  # prompts of the final, common scoring of candidates and baselines
    finalists: int = 3  # best search sets re-scored on the common slice
    ranked_sizes: tuple[int, ...] = (1, 2, 4, 8)  # sizes of the confidence-ranked sets also scored
    seed: int = 0  # random baselines
    # Score the start set, early exits and random sets beside the search's sets: how the method
    # compares, for the report; they never ship, so a calibration in a hurry may leave them out.
    baselines: bool = True
    search: str = "cost-aware"  # SEARCHES: ours, the reference's outer loop, or both (ours ships)
    max_draft_tokens: int = 8
    confidence_threshold: float = 0.8
    # The joint choice of the draft that ships (select.py), on the target artifact's real graphs:
    # "measured": passes timed on the device; "bytes": weight bytes read per token; "table": the
    # cost table of ``costs`` (measured on the target by `conflayers-run profile`)
    cost: str = "measured"
    dtype: str = "fp32"  # the artifact dtype the drafts are built and scored for
    device: str = "cpu"
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    # Where the layer search's PyTorch reference runs (LoadedModel.reference_model): CPU float32 by
    # default; "cuda" with float16 on a GPU; device_map "auto" spreads a big model over GPUs.
    reference_device: str = "cpu"
    reference_dtype: str = "float32"
    device_map: str | None = None
    precisions: tuple[str, ...] = ("base", "int8", "int4")
    vocab_sizes: tuple[int, ...] = (8192, 32768)  # pruned draft vocabularies tried (below the vocab)
    # skip set x precision pairs, best at their widest vocabulary, whose narrower vocabularies are scored
    vocab_finalists: int = 2
    ranking_prompts: int = 16  # prompts after the evaluation slice whose generations rank the vocabulary
    # best skip set x precision pairs (each at its best vocabulary) re-run with each of the
    # draft_policies: 4, because timings move by ~10% between runs and a draft that nearly ties at
    # the first policy may win by far at a longer one (SmolLM2: the int8 draft, 4th at the first
    # policy, 1.39x, is the best at 12 drafts above 0.3, 1.60x)
    policy_finalists: int = 4
    draft_policies: tuple[tuple[int, float], ...] = ((8, 0.5), (12, 0.3), (6, 0.0))
    # Token trees tried on the chosen draft (alternative rows, runners-up per drafted token): the
    # draft ships with the tree where one is expected faster than its chain (docs/TOKEN_TREES.md).
    tree_shapes: tuple[tuple[int, int], ...] = ((2, 2), (4, 2))
    # Lookup drafting tried alone and beside the chosen draft (min n-gram, max n-gram, proposals per
    # pass; sources.py): a task ships one where it is expected faster than the draft alone. A long
    # proposal pays where extra rows are cheap (fp32), a short one from a longer match where they are
    # not (int4 on the CPU, where each row of a verify pass costs ~0.2-0.4 of a step).
    lookups: tuple[tuple[int, int, int], ...] = ((2, 3, 8), (3, 4, 4))
    # Prompts of the confirming real run of what ships (the first of the evaluation prompts; None:
    # all). Half of it is plain decoding, the slowest decoding there is: a big model's run is long.
    confirm_prompts: int | None = None
    # The longest length tried for a loop that drafts a fixed length every cycle, no confidence stop
    # (onnxruntime-genai's draft-model mode, build's genai_speculative.json): one replay of the
    # chosen draft at this length prices every shorter one (Draft.fixed_length_tokens); 0: none.
    fixed_length_max: int = 8


@dataclass(kw_only=True)
class Candidate(DraftScore):
    """A skip set of the layer search, scored (costs: the bytes model)."""

    skip: list[int | str]  # layers and blocks (conflayers_runtime.manifest.SkipPlan)
    origin: str  # "conflayers", "start set", "early exit", "random"
    cycles: int = 0


@dataclass
class TaskResult:
    task: str
    chosen: Candidate
    recommended: bool
    finalists: list[Candidate]
    baselines: list[Candidate]
    iterations: list[dict[str, object]] = field(default_factory=list)
    profile: dict[str, list[float]] = field(default_factory=dict)  # first prompt's scores and thresholds
    conflayers_beats_baselines: bool = False
    seconds: float = 0.0
    drafts: DraftSearchResult | None = None  # the joint choice that ships (select.py)
    search: str = "cost-aware"
    published: Candidate | None = None  # the reference loop's choice (search "published" or "both")
    published_iterations: list[dict[str, object]] = field(default_factory=list)

    @property
    def best_baseline(self) -> Candidate | None:
        """The baseline with the best expected speedup (None: baselines not scored)."""
        return max(self.baselines, key=lambda b: b.expected_speedup, default=None)

    @property
    def beats_baselines(self) -> bool | None:
        """Whether the search's choice is expected at least as fast as the best baseline (None:
        baselines not scored)."""
        best = self.best_baseline
        return None if best is None else self.chosen.expected_speedup >= best.expected_speedup

    def choices(self) -> dict[str, Candidate]:
        """Each search's choice, scored on the common evaluation slice."""
        found = {} if self.search == "published" else {"cost-aware": self.chosen}
        return {**found, **({"published": self.published} if self.published else {})}

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "choices": {k: asdict(c) for k, c in self.choices().items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        """A layer search's result as :meth:`as_dict` wrote it (without the joint choice)."""
        fields = {k: v for k, v in data.items() if k not in ("choices", "drafts")}
        for name in ("chosen", "published"):
            if fields.get(name) is not None:
                fields[name] = Candidate(**fields[name])
        for name in ("finalists", "baselines"):
            fields[name] = [Candidate(**c) for c in fields[name]]
        return cls(**fields)


@dataclass(kw_only=True)
class DraftCandidate(DraftScore):
    """A combination of the joint choice, scored (costs: timed on its graphs, or the bytes ratio)."""

    skip: list[int | str]
    weight_precision: str
    vocab_size: int | None  # None: the whole vocabulary
    max_draft_tokens: int
    confidence_threshold: float
    bytes_ratio: float = 0.0  # weight bytes the draft reads per token / the full graph's
    timing_flag: str = ""  # set when the timed c_draft disagrees with the bytes ratio (scoring.timed_costs)
    cost_source: str = ""  # where c_draft and c_verify come from (DraftSearch.cost_source)
    tree_nodes: int = 0  # token trees: alternative rows per verify pass (0: a chain)
    tree_width: int = 0

    @property
    def label(self) -> str:
        vocab = f"vocab {self.vocab_size}" if self.vocab_size else "full vocab"
        tree = f", tree {self.tree_nodes}x{self.tree_width}" if self.tree_nodes else ""
        return f"skip {self.skip or '-'}, {self.weight_precision}, {vocab}{tree}"

    @property
    def policy(self) -> DraftConfig:
        return DraftConfig(self.max_draft_tokens, self.confidence_threshold)

    @property
    def tree(self) -> TreeConfig | None:
        return TreeConfig(self.tree_nodes, self.tree_width) if self.tree_nodes else None


@dataclass
class Confirmation:
    """The chosen draft's real speculative run on the evaluation prompts."""

    wall_clock_speedup: float  # against plain decoding of each prompt, timed right before it
    acceptance_rate: float
    mean_tokens_per_cycle: float
    matches_replay: bool  # the same statistics as the replay that scored it (replay.py)
    prompts: int  # how many of the evaluation prompts it ran (settings.confirm_prompts)


@dataclass
class FixedLength:
    """The chosen draft's length for a loop that drafts a fixed length every cycle
    (select.fixed_length_speedups): the best of ``speedups``, expected speedup by length."""

    max_draft_tokens: int
    speedups: dict[int, float]

    @property
    def expected_speedup(self) -> float:
        return self.speedups[self.max_draft_tokens]


@dataclass(kw_only=True)
class SourceCandidate(DraftScore):
    """A lookup setting, alone or beside the chosen model draft, scored by replay (sources.py)."""

    source: str  # "lookup" or "both"
    min_ngram: int
    max_ngram: int
    max_draft_tokens: int
    rows_per_full_pass: float = 0.0
    lookup_share: float = 0.0  # of the accepted proposals, the share read from the text

    @property
    def config(self) -> LookupConfig:
        return LookupConfig(self.min_ngram, self.max_ngram, self.max_draft_tokens)

    @property
    def label(self) -> str:
        return f"{self.source} n-gram {self.min_ngram}-{self.max_ngram}, up to {self.max_draft_tokens}"

    def metrics(self) -> dict[str, float]:
        extra = {"rows_per_full_pass": self.rows_per_full_pass, "lookup_share": self.lookup_share}
        return {**super().metrics(), **extra}


@dataclass
class DraftSearchResult:
    candidates: list[DraftCandidate]
    chosen: DraftCandidate
    plain_tokens_per_second: float
    coverage: dict[int, float] = field(default_factory=dict)  # held-out token share per vocab size
    seconds: float = 0.0
    confirmation: Confirmation | None = None
    sources: list[SourceCandidate] = field(default_factory=list)  # lookup settings, alone and with `chosen`
    # The best of ``sources`` where it is expected faster than ``chosen`` alone and than plain
    # decoding: the task ships it (Task.lookup); None: the model draft alone, or nothing.
    source: SourceCandidate | None = None
    # skip set x precision pairs left unscored, with their ceiling: the most any of their drafts could
    # reach, below a draft already scored (select.DraftSearch._score_vocabularies)
    left_out: dict[str, float] = field(default_factory=dict)
    fixed_length: FixedLength | None = None  # where the chosen draft was scored at fixed lengths

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
