"""The self-speculative decoding loop, independent of the engine that runs the model.

A :class:`Backend` runs the full model or the layer-skipped draft over a few tokens at a given
position of its KV cache. The same loop drives the PyTorch reference backend (in the exporter,
used as the oracle and by ``calibrate``) and the ONNX Runtime backend (this package), so the
two can only differ in the logits they compute, which the parity tests pin down.

One cycle (gpt-fast / Leviathan et al. style):
    cache holds positions [0, n); ``pending`` is the next token, not yet in the cache.
    draft:  feed pending, d1, ..., d_{k-1} one at a time to the draft -> proposals d1..dk
            (the draft writes KV only for the layers it runs, at positions n..n+k-1)
    verify: feed [pending, d1..dk] to the full model at position n in ONE pass -> k+1 rows;
            every layer's KV for positions n..n+k is rewritten, so accepted positions are exact
    accept: m drafted tokens survive, plus one token from the full model; the valid cache length
            becomes n+m+1, and rejected positions are simply overwritten later (rollback = length).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from . import sampling
from . import tree as trees
from .errors import GenerationError
from .lookup import LookupConfig, TextLookup
from .sampling import SamplingConfig
from .tree import TreeConfig


class Backend(Protocol):
    """Runs the full model, or the draft (``use_draft``), over ``token_ids`` at cache positions
    [start, start + len(token_ids)).

    Cache entries at positions >= start are garbage and are overwritten: this is how a rejected
    draft is rolled back. Returns float logits [len(token_ids), vocab]; they may be a view of a
    buffer the backend reuses, valid until its next call, so callers consume (or copy) them first.

    Optionally a backend chooses greedy tokens itself (OnnxBackend: in the graph, on the device):
    ``chooses_on_device`` is true and ``greedy(token_ids, start, use_draft)`` returns (the argmax
    token id of every row, and for the draft its softmax probability); greedy decoding then reads
    no logits (:func:`greedy_tokens`).
    """

    # None, or the draft's pruned vocabulary: draft rows are then [len(token_ids), len(ids)], column
    # j scoring token draft_token_ids[j] (the decoding loop maps the columns back to token ids).
    draft_token_ids: np.ndarray | None

    def forward(self, token_ids: Sequence[int], start: int, use_draft: bool) -> np.ndarray: ...


@dataclass(frozen=True)
class DraftConfig:
    """Dynamic draft length: SWIFT-style early stop on low draft confidence, capped."""

    max_draft_tokens: int = 8
    # Stop drafting once the draft's top-1 probability falls below this: such tokens are
    # usually rejected, and each extra draft pass costs time.
    confidence_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.max_draft_tokens < 1:
            raise GenerationError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise GenerationError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


GREEDY = SamplingConfig()
DEFAULT_DRAFT_CONFIG = DraftConfig()


@dataclass
class GenerationStats:
    """What one generation did. ``accepted_histogram[m]`` counts cycles that accepted m drafts."""

    new_tokens: int = 0
    cycles: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefill_passes: int = 0
    draft_passes: int = 0
    verify_passes: int = 0  # full-model passes after prefill (speculative verify or plain steps)
    draft_rows: int = 0  # tokens the draft passes read (more than one a pass where it confirms a guess)
    accepted_histogram: list[int] = field(default_factory=list)
    tree_nodes: int = 0  # alternative rows verified (token trees, tree.py)
    tree_hits: int = 0  # cycles whose first proposal came from an alternative's row
    rows_histogram: list[int] = field(default_factory=list)  # [r]: full passes after prefill of r rows
    # Proposals read from the text (lookup.py; beside a draft: the guesses it confirmed), part of
    # drafted_tokens, and how many of them were accepted, part of accepted_tokens
    looked_up_tokens: int = 0
    looked_up_accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def draft_passes_per_cycle(self) -> float:
        """Draft passes per full-model pass after prefill (0.0 for plain decoding)."""
        return self.draft_passes / self.verify_passes if self.verify_passes else 0.0

    @property
    def mean_tokens_per_cycle(self) -> float:
        """Tokens emitted per full-model pass after prefill (1.0 for plain decoding)."""
        after_prefill = self.new_tokens - self.prefill_passes  # each prefill emits one token
        return after_prefill / self.verify_passes if self.verify_passes else 0.0

    @property
    def rows_per_full_pass(self) -> float:
        """Mean rows of a full pass after prefill (1.0 for plain decoding): what its cost grows with."""
        rows = sum(r * passes for r, passes in enumerate(self.rows_histogram))
        return rows / self.verify_passes if self.verify_passes else 0.0

    def record_pass(
        self, proposal: _Proposal, alternatives: list[trees.Alternative], accepted: int, tree_hit: bool
    ) -> None:
        """Count one full pass after prefill, its proposals and how many it accepted."""
        rows = 1 + len(proposal.tokens) + len(alternatives)
        self.verify_passes += 1
        _count(self.rows_histogram, rows, 1)
        self.draft_passes += proposal.draft_passes
        self.tree_nodes += len(alternatives)
        self.tree_hits += tree_hit
        self.draft_rows += proposal.draft_rows
        if proposal.tokens:
            self.record_cycle(len(proposal.tokens), accepted)
            self.looked_up_tokens += sum(proposal.from_text)
            self.looked_up_accepted += sum(proposal.from_text[:accepted])

    def record_cycle(self, drafted: int, accepted: int) -> None:
        self.cycles += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        _count(self.accepted_histogram, accepted, 1)

    def merge(self, other: GenerationStats) -> None:
        """Add another generation's counts to these (to report a prompt set as a whole)."""
        for name in (
            "new_tokens",
            "cycles",
            "drafted_tokens",
            "accepted_tokens",
            "prefill_passes",
            "draft_passes",
            "draft_rows",
            "verify_passes",
            "tree_nodes",
            "tree_hits",
            "looked_up_tokens",
            "looked_up_accepted",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for accepted, cycles in enumerate(other.accepted_histogram):
            _count(self.accepted_histogram, accepted, cycles)
        for rows, passes in enumerate(other.rows_histogram):
            _count(self.rows_histogram, rows, passes)

    def as_dict(self) -> dict[str, object]:
        return {
            "new_tokens": self.new_tokens,
            "cycles": self.cycles,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_tokens_per_cycle": self.mean_tokens_per_cycle,
            "accepted_histogram": list(self.accepted_histogram),
            "passes": {
                "prefill": self.prefill_passes,
                "draft": self.draft_passes,
                "verify": self.verify_passes,
            },
            "tree": {"nodes": self.tree_nodes, "hits": self.tree_hits},
            "rows_per_full_pass": self.rows_per_full_pass,
            "rows_histogram": list(self.rows_histogram),
            "looked_up": {"proposed": self.looked_up_tokens, "accepted": self.looked_up_accepted},
        }


def _count(histogram: list[int], value: int, times: int) -> None:
    while len(histogram) <= value:
        histogram.append(0)
    histogram[value] += times


def stream(
    backend: Backend,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling_config: SamplingConfig = GREEDY,
    draft_config: DraftConfig | None = DEFAULT_DRAFT_CONFIG,
    stop_token_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
    guard: SpeedGuard | None = None,
    tree: TreeConfig | None = None,
    lookup: LookupConfig | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens in chunks as they are decided (one chunk per cycle).

    Proposals come from the model draft (``draft_config``), from the text itself (``lookup``,
    lookup.py: its continuation of the text, at no model cost), or both: then each draft pass
    also reads the text's guess of the next tokens and keeps those the draft chooses itself, so
    a repeated span is drafted in one pass (_propose). Neither: plain decoding with the full model.
    Greedy output is identical either way; sampled output is distributed exactly as plain
    sampling. A ``guard`` may turn proposing off for some cycles (when speculation is measured
    slower than plain decoding); that changes speed only, never the output distribution.
    ``tree``: verify passes also run the full model at the draft's likely alternatives, whose rows
    propose the next cycle's first token (tree.py; the backend needs ``verifies_trees``); the
    output is the same.
    """
    if tree is not None and not getattr(backend, "verifies_trees", False):
        raise GenerationError("token trees need the artifact's tree graph: load it with tree=True")
    if not prompt_ids:
        raise GenerationError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stats = stats if stats is not None else GenerationStats()
    rng = np.random.default_rng(sampling_config.seed)
    stops = set(stop_token_ids)
    prompt = list(prompt_ids)
    pending = _prefill(backend, prompt, sampling_config, rng)
    stats.prefill_passes += 1
    stats.new_tokens = produced = 1
    yield [pending]
    if pending in stops:
        return
    cached = len(prompt)  # valid KV positions; `pending` is not in the cache yet
    text = TextLookup(lookup, [*prompt, pending]) if lookup is not None else None
    carried = _Carried()  # the next cycle's first proposals, from the last tree pass
    # A device whose exact passes all have one row count (row invariance, artifact.py) must not get
    # longer ones: there a tree's alternatives take the place of padding rows, at no cost.
    max_rows = getattr(backend, "max_full_pass_rows", None)
    sources = _Sources(draft_config, text, max_rows)

    while produced < max_new_tokens:
        started = time.perf_counter()
        # Leave room for the full model's own token: a cycle emits accepted proposals + 1.
        budget = sources.budget(max_new_tokens - produced - 1)
        if guard is not None and not guard.allow_draft():
            budget = 0
        proposal = _propose(backend, pending, cached, budget, sources, sampling_config, rng, tree, carried)
        alternatives = _alternatives(proposal, tree, max_rows)
        accepted, next_token, carried = _verify(
            backend, pending, cached, proposal, alternatives, sampling_config, rng
        )
        stats.record_pass(proposal, alternatives, accepted, carried.tokens != [])
        chunk = [*proposal.tokens[:accepted], next_token]
        if guard is not None:
            guard.record(bool(proposal.tokens), 1 + accepted, time.perf_counter() - started)
        stop_at = next((i for i, t in enumerate(chunk) if t in stops), None)
        if stop_at is not None:
            chunk = chunk[: stop_at + 1]
        cached += 1 + accepted
        pending = next_token
        produced += len(chunk)
        stats.new_tokens = produced
        if text is not None:
            text.extend(chunk)
        yield chunk
        if stop_at is not None:
            return


def _prefill(
    backend: Backend, prompt: list[int], sampling_config: SamplingConfig, rng: np.random.Generator
) -> int:
    """The full model over the prompt; returns the first new token."""
    if sampling_config.greedy:
        return int(greedy_tokens(backend, prompt, 0, use_draft=False)[0][-1])
    last = backend.forward(prompt, 0, use_draft=False)[-1]
    return sampling.sample(sampling.warp(last, sampling_config), rng)


@dataclass(frozen=True)
class _Sources:
    """Where a cycle's proposals come from: the model draft (``draft``), the text (``text``), or both."""

    draft: DraftConfig | None
    text: TextLookup | None
    max_rows: int | None  # every full pass has this many rows (CUDA), so a chain fits in them

    def budget(self, room: int) -> int:
        """The most proposals a cycle may make, with ``room`` tokens left to generate."""
        caps = [self.draft.max_draft_tokens if self.draft else 0]
        caps.append(self.text.config.max_draft_tokens if self.text else 0)
        if self.max_rows is not None:
            room = min(room, self.max_rows - 1)
        return max(0, min(room, max(caps)))


def _alternatives(
    proposal: _Proposal, tree: TreeConfig | None, max_rows: int | None
) -> list[trees.Alternative]:
    """The token tree's alternative rows for this proposal (none without a tree or proposals)."""
    if tree is None or not proposal.tokens:
        return []
    nodes = tree.nodes
    if max_rows is not None:  # every pass has that many rows (CUDA): fill the padding rows
        nodes = min(nodes, max_rows - 1 - len(proposal.tokens))
    return trees.choose(proposal.confidences, proposal.offers, nodes) if nodes > 0 else []


def _verify(
    backend: Backend,
    pending: int,
    cached: int,
    proposal: _Proposal,
    alternatives: list[trees.Alternative],
    sampling_config: SamplingConfig,
    rng: np.random.Generator,
) -> tuple[int, int, _Carried]:
    """One full pass over [pending, proposals, alternatives]: (proposals accepted, the full model's
    next token, the next cycle's carried proposals from a tree hit)."""
    drafted = proposal.tokens
    rows = [pending, *drafted, *(a.token for a in alternatives)]
    chain = len(drafted) + 1  # the rows that decide the output; alternatives only propose
    depths = [*range(chain), *(a.depth for a in alternatives)] if alternatives else None
    if sampling_config.greedy:
        targets, _ = greedy_tokens(backend, rows, cached, use_draft=False, depths=depths)
        accepted, next_token = sampling.accept_greedy(targets[:chain], drafted)
        hit = _hit(alternatives, chain, accepted, next_token)
        return accepted, next_token, _Carried() if hit is None else _Carried([int(targets[hit])])
    verify_logits = backend.forward(rows, cached, use_draft=False, **_tree_arguments(depths))
    p = sampling.warp(verify_logits[:chain], sampling_config)
    q = proposal.distributions(getattr(backend, "draft_token_ids", None), p.shape[-1])
    accepted, next_token = sampling.accept_sampled(p, q, drafted, rng)
    hit = _hit(alternatives, chain, accepted, next_token)
    if hit is None:
        return accepted, next_token, _Carried()
    # Any proposal distribution keeps the rule exact: the full model's (its alternative's row) here.
    row = sampling.warp(verify_logits[hit], sampling_config)
    return accepted, next_token, _Carried([sampling.sample(row, rng)], [row])


class SpeedGuard:
    """Decodes plainly while speculation is measured slower than plain decoding, probing again later.

    It keeps an exponential moving average of seconds per emitted token of plain steps. The first
    ``warmup`` steps are plain (the baseline); then it drafts, and judges speculation every
    ``judge_after`` cycles by the seconds per token of those cycles together: one cycle alone says
    little (a draft rejected at its first token makes a slow cycle even when the draft pays; seen
    on SmolLM2: auto mode fell back often enough to lose a fifth of the speedup). While speculation
    is slower it decodes plainly for ``probe_every`` steps before trying again, doubling that wait
    after each consecutive loss so a losing draft costs ever less.
    """

    def __init__(
        self,
        warmup: int = 2,
        probe_every: int = 16,
        smoothing: float = 0.3,
        max_wait: int = 512,
        judge_after: int = 4,
    ):
        self.warmup = warmup
        self.probe_every = probe_every
        self.smoothing = smoothing
        self.judge_after = judge_after
        self.plain: float | None = None  # seconds per token
        self.speculative: float | None = None  # seconds per token of the last judged cycles
        self.plain_steps = 0
        self.plain_until_probe = 0
        self.wait = probe_every
        self.max_wait = max_wait
        self.switches = 0
        self._cycles: list[tuple[int, float]] = []  # (tokens, seconds) of speculative cycles not yet judged

    def allow_draft(self) -> bool:
        if self.plain_steps < self.warmup:
            return False
        if self.plain_until_probe > 0:
            self.plain_until_probe -= 1
            return False
        return True

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        if not drafted:
            self.plain_steps += 1
            self.plain = self._mix(self.plain, seconds / tokens)
            return
        self._cycles.append((tokens, seconds))
        if len(self._cycles) < self.judge_after:
            return
        self.speculative = sum(s for _, s in self._cycles) / sum(t for t, _ in self._cycles)
        self._cycles.clear()
        if self.plain is not None and self.speculative > self.plain:
            self.plain_until_probe = self.wait
            self.wait = min(2 * self.wait, self.max_wait)
            self.switches += 1
        else:
            self.wait = self.probe_every

    def _mix(self, average: float | None, value: float) -> float:
        return value if average is None else (1 - self.smoothing) * average + self.smoothing * value


@dataclass
class _Carried:
    """Proposals a tree pass made for the next cycle: token ids and, when sampling, the full-vocabulary
    distribution each was drawn from (its draft distribution in the acceptance rule)."""

    tokens: list[int] = field(default_factory=list)
    distributions: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Proposal:
    """One cycle's proposals in order: carried ones, then the draft's (some confirming the text's
    guess) or the text's alone (a lookup without a draft), with what acceptance and a token tree
    need of each (``confidences``: the probability of the chosen token, 1.0 for carried and
    looked-up ones; ``offers``: its runners-up as (token id, probability), in tree mode)."""

    tokens: list[int] = field(default_factory=list)
    carried: list[np.ndarray] = field(default_factory=list)  # full-vocabulary rows of carried tokens
    drafted: list[np.ndarray] = field(default_factory=list)  # the draft's rows, over its own columns
    looked_up: int = 0  # the last proposals, read from the text by a lookup alone (one-hot)
    from_text: list[bool] = field(default_factory=list)  # per proposal: the text's guess
    confidences: list[float] = field(default_factory=list)
    offers: list[list[tuple[int, float]]] = field(default_factory=list)
    draft_passes: int = 0
    draft_rows: int = 0

    def add_looked_up(self, tokens: list[int]) -> None:
        """The text's proposals, taken as they are (a lookup alone)."""
        self.tokens += tokens
        self.looked_up += len(tokens)
        self.from_text += [True] * len(tokens)
        self.confidences += [1.0] * len(tokens)
        self.offers += [[] for _ in tokens]

    def add_drafted(self, row: _DraftRow, from_text: bool) -> None:
        """The draft's choice (``from_text``: it equals the text's guess at that position)."""
        self.tokens.append(row.token)
        self.from_text.append(from_text)
        self.confidences.append(row.confidence)
        self.offers.append(row.offered)
        if row.q is not None:
            self.drafted.append(row.q)

    def distributions(self, token_ids: np.ndarray | None, vocab_size: int) -> np.ndarray:
        """Every proposal's draft distribution over the full vocabulary [k, vocab] (sampling): a
        looked-up token is a deterministic proposal, one-hot."""
        drafted = _over_vocabulary(self.drafted, token_ids, vocab_size)
        looked_up = np.zeros((self.looked_up, vocab_size))
        looked_up[np.arange(self.looked_up), self.tokens[len(self.tokens) - self.looked_up :]] = 1.0
        return np.concatenate([np.array(self.carried).reshape(-1, vocab_size), drafted, looked_up])


def _propose(
    backend: Backend,
    pending: int,
    cached: int,
    budget: int,
    sources: _Sources,
    sampling_config: SamplingConfig,
    rng: np.random.Generator,
    tree: TreeConfig | None = None,
    carried: _Carried | None = None,
) -> _Proposal:
    """Propose up to ``budget`` tokens: the carried ones, then the text's continuation (a lookup
    alone), or the draft's. With both, each draft pass also reads the text's guess of the next
    tokens and keeps them while the draft chooses them itself: one pass confirms a span the text
    repeats, which one-token passes would draft a token at a time. The first pass reads
    ``pending`` and the carried tokens together."""
    proposal = _Proposal()
    if carried is not None and budget:
        proposal.tokens = carried.tokens[:budget]
        proposal.carried = carried.distributions[:budget]
        proposal.confidences = [1.0] * len(proposal.tokens)
        proposal.offers = [[] for _ in proposal.tokens]
        proposal.from_text = [False] * len(proposal.tokens)
    if sources.draft is None:
        if sources.text is not None and budget > len(proposal.tokens):
            proposal.add_looked_up(sources.text.propose(proposal.tokens, budget - len(proposal.tokens)))
        return proposal
    feed, position = [pending, *proposal.tokens], cached
    draft_budget = min(budget, len(proposal.tokens) + sources.draft.max_draft_tokens)
    while len(proposal.tokens) < draft_budget:
        room = draft_budget - len(proposal.tokens) - 1  # the draft's own token after the guess
        guess = sources.text.propose(proposal.tokens, room) if sources.text is not None and room else []
        rows = _draft_rows(backend, [*feed, *guess], position, len(guess) + 1, sampling_config, rng, tree)
        proposal.draft_passes += 1
        proposal.draft_rows += len(feed) + len(guess)
        used = 0
        for i, row in enumerate(rows):
            proposal.add_drafted(row, from_text=i < len(guess) and row.token == guess[i])
            used += 1
            if not proposal.from_text[-1]:  # the draft chose otherwise: later rows read a wrong token
                break
        # The guesses it confirmed are in the draft's cache now; its last token is not yet.
        position, feed = position + len(feed) + used - 1, [proposal.tokens[-1]]
        if proposal.confidences[-1] < sources.draft.confidence_threshold:
            break
    return proposal


@dataclass(frozen=True)
class _DraftRow:
    token: int  # the draft's choice (argmax, or a sample of ``q`` when sampling)
    confidence: float  # its probability
    offered: list[tuple[int, float]]  # runners-up (token trees)
    q: np.ndarray | None  # the distribution it was sampled from (sampling), over the draft's columns


def _draft_rows(
    backend: Backend,
    feed: list[int],
    position: int,
    count: int,
    sampling_config: SamplingConfig,
    rng: np.random.Generator,
    tree: TreeConfig | None,
) -> list[_DraftRow]:
    """One draft pass over ``feed`` at ``position``: the draft's choice after each of its last
    ``count`` tokens (the choice after a token is valid only where the tokens before it were the
    draft's own choices: _propose keeps rows while they are)."""
    greedy = sampling_config.greedy
    if greedy and tree is None:  # the token chosen on the device where the backend can
        ids, probabilities = greedy_tokens(backend, feed, position, use_draft=True)
        chosen = zip(ids[-count:], probabilities[-count:], strict=True)
        return [_DraftRow(int(t), float(p), [], None) for t, p in chosen]
    token_ids = getattr(backend, "draft_token_ids", None)  # test doubles may leave it out
    rows = []
    for row in backend.forward(feed, position, use_draft=True)[-count:]:
        q = sampling.warp(row, sampling_config)
        column = int(row.argmax()) if greedy else sampling.sample(q, rng)
        offered = [] if tree is None else trees.runners_up(q, column, tree.width)
        offered = [(_token_id(c, token_ids), p) for c, p in offered]
        rows.append(_DraftRow(_token_id(column, token_ids), float(q.max()), offered, None if greedy else q))
    return rows


def _token_id(column: int, token_ids: np.ndarray | None) -> int:
    return column if token_ids is None else int(token_ids[column])


def _hit(alternatives: list[trees.Alternative], chain: int, accepted: int, token: int) -> int | None:
    """The row of the alternative equal to the full model's correction, if the tree held it."""
    for index, alternative in enumerate(alternatives):
        if alternative.depth == accepted + 1 and alternative.token == token:
            return chain + index
    return None


def _tree_arguments(depths: list[int] | None) -> dict[str, list[int]]:
    """A full pass's keyword arguments: a token tree's ``depths`` where there is one (backends that
    do not verify trees take none)."""
    return {} if depths is None else {"depths": depths}


def greedy_tokens(
    backend: Backend, token_ids: Sequence[int], start: int, use_draft: bool, depths: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(argmax token id of every row, its softmax probability): chosen on the device where the
    backend can (``chooses_on_device``: only ids and, for the draft, probabilities cross the bus),
    else from the logits here. Both paths pick the first of equal maxima; the probability only
    decides where a draft stops (the device computes it in float32), never which token is emitted.
    ``depths``: a token tree's rows (tree.py), for a backend that ``verifies_trees``."""
    tree = _tree_arguments(depths)
    if getattr(backend, "chooses_on_device", False):
        ids, probabilities = backend.greedy(token_ids, start, use_draft, **tree)  # type: ignore[attr-defined]
        return ids, probabilities
    logits = backend.forward(token_ids, start, use_draft, **tree)
    columns = logits.argmax(axis=-1)
    mapping = getattr(backend, "draft_token_ids", None) if use_draft else None
    ids = columns if mapping is None else np.asarray(mapping)[columns]
    return ids, (sampling.softmax(logits).max(axis=-1) if use_draft else None)  # type: ignore[return-value]


def _over_vocabulary(q_rows: list[np.ndarray], token_ids: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Draft distributions [k, vocab]: a pruned draft gives probability 0 to every token outside its
    columns, so rejection sampling resamples those from the residual and stays exact."""
    if token_ids is None:
        return np.array(q_rows).reshape(-1, vocab_size)
    q = np.zeros((len(q_rows), vocab_size))
    if q_rows:
        q[:, token_ids] = q_rows
    return q


def generate(
    backend: Backend,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling_config: SamplingConfig = GREEDY,
    draft_config: DraftConfig | None = DEFAULT_DRAFT_CONFIG,
    stop_token_ids: Sequence[int] = (),
    tree: TreeConfig | None = None,
    lookup: LookupConfig | None = None,
) -> tuple[list[int], GenerationStats]:
    """Run :func:`stream` to the end. Returns (new token ids, stats)."""
    stats = GenerationStats()
    tokens: list[int] = []
    for chunk in stream(
        backend,
        prompt_ids,
        max_new_tokens,
        sampling_config,
        draft_config,
        stop_token_ids,
        stats,
        tree=tree,
        lookup=lookup,
    ):
        tokens.extend(chunk)
    return tokens, stats


def fastest_passes(
    backend: Backend, passes: Mapping[str, tuple[Sequence[int], bool]], repeats: int = 15, context: int = 64
) -> dict[str, float]:
    """Seconds of each named pass (token ids, use_draft) at cache position ``context``, after a
    ``context``-token prefill and one warm-up call each (first calls allocate, or capture a graph).

    Robust to a busy machine: each repeat runs every pass back to back (load that comes and goes
    hits them alike) and each keeps its fastest repeat (other work only ever adds time). A pass runs
    as greedy decoding runs it: the token chosen on the device where the backend can (the logits
    stay there), else from logits brought to the host.
    """
    backend.forward(list(range(100, 100 + context)), 0, use_draft=False)
    on_device = getattr(backend, "chooses_on_device", False)
    run = backend.greedy if on_device else backend.forward
    for tokens, use_draft in passes.values():
        run(tokens, context, use_draft)
    fastest = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, (tokens, use_draft) in passes.items():
            start = time.perf_counter()
            run(tokens, context, use_draft)
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    return fastest


def measure_pass_costs(
    backend: Backend, repeats: int = 15, context: int = 64, verify_tokens: int = 4
) -> tuple[float, float]:
    """(c_draft, c_verify): the time of one draft pass and of one ``verify_tokens``-token verify
    pass (pass the typical drafts per cycle + 1), relative to one full-model decoding step, timed by
    :func:`fastest_passes` after a ``context``-token prefill."""
    verify = list(range(101, 101 + verify_tokens))
    passes = {"step": ([101], False), "draft": ([101], True), "verify": (verify, False)}
    fastest = fastest_passes(backend, passes, repeats, context)
    return fastest["draft"] / fastest["step"], fastest["verify"] / fastest["step"]


def expected_speedup(
    tokens_per_full_pass: float, draft_passes_per_full_pass: float, c_draft: float, c_verify: float = 1.0
) -> float:
    """Decoding speed relative to plain decoding, S = tokens per full pass / (draft passes per full
    pass * c_draft + c_verify), with the pass costs relative to one plain step (0.0 without passes)."""
    if not tokens_per_full_pass:
        return 0.0
    return tokens_per_full_pass / (draft_passes_per_full_pass * c_draft + c_verify)


@dataclass(kw_only=True)
class DraftScore:
    """How a draft did on a prompt set and what it is expected to gain: the one record of a draft's
    evaluation (calibrate's layer search and joint choice extend it with what they vary)."""

    acceptance_rate: float = 0.0
    mean_tokens_per_cycle: float = 0.0  # tokens per full-model pass
    draft_passes_per_cycle: float = 0.0
    c_draft: float = 0.0  # one draft pass / one plain step
    c_verify: float = 1.0  # one verify pass / one plain step
    expected_speedup: float = 0.0

    def metrics(self) -> dict[str, float]:
        """This record's own fields (what a manifest's draft metrics and reports start from)."""
        return {f.name: getattr(self, f.name) for f in fields(DraftScore)}

    def scored(self, stats: GenerationStats, c_draft: float, c_verify: float = 1.0) -> None:
        """Fill the record from a generation's statistics and the pass costs."""
        self.acceptance_rate = stats.acceptance_rate
        self.mean_tokens_per_cycle = stats.mean_tokens_per_cycle
        self.draft_passes_per_cycle = stats.draft_passes_per_cycle
        self.c_draft, self.c_verify = c_draft, c_verify
        self.expected_speedup = expected_speedup(
            stats.mean_tokens_per_cycle, stats.draft_passes_per_cycle, c_draft, c_verify
        )
