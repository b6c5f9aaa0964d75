"""Token trees: a verify pass that also runs the full model at the draft's likely alternatives.

Where the draft is unsure, the full model's token (the correction a chain emits at the first
mismatch) is often the draft's second or third choice. A tree verify pass adds those
alternatives as extra rows, each at the position of the drafted token it replaces and attending
only to its ancestors (the cache and the drafted chain before it: tree graphs take
``position_ids`` and ``attention_bias``, export/graph.py). Rows are laid out as

    [pending, d1 .. dk, a1 .. an]    chain rows at positions start .. start+k,
                                     alternative a at the position of the d_j it replaces

The chain is verified and accepted exactly as without a tree. When the full model's correction
after accepting j-1 drafts equals an alternative of d_j, that alternative's row is the full
model's prediction of the token after the correction: it becomes the first proposal of the next
cycle (its argmax greedily; a sample of its distribution, used as that proposal's draft
distribution, when sampling), which the next verify pass checks like any draft token.

Why the alternative rows never emit a token themselves: their keys lie past the chain's in the
cache, so attention reduces over a different layout than a plain step at that position does,
and ONNX Runtime's CPU kernel then rounds differently in the last bits (measured: 108 of 200
random cases, max 2.4e-7; docs/TOKEN_TREES.md). Emitting from them would break the bitwise
equality with plain decoding at near-ties; proposing from them cannot change the output, only
how many proposals the next pass accepts. A hit saves the draft pass that would have proposed
that token and brings a proposal the full model itself made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError

TREE_INPUTS = ("position_ids", "attention_bias")  # what a tree-form graph takes beyond the chain's


@dataclass(frozen=True)
class TreeConfig:
    """How many alternative rows a verify pass adds (``nodes``) and how many of the draft's
    runners-up each drafted position offers (``width``)."""

    nodes: int = 4
    width: int = 2

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.width < 1:
            raise GenerationError(f"a token tree needs nodes >= 1 and width >= 1, got {self}")


@dataclass(frozen=True)
class Alternative:
    depth: int  # the chain row of the drafted token it replaces (1 .. k)
    token: int
    score: float  # the draft's probability of reaching this node: the rows are chosen by it


def runners_up(probabilities: np.ndarray, chosen_column: int, width: int) -> list[tuple[int, float]]:
    """The ``width`` most probable columns other than the chosen one, with their probabilities."""
    top = np.argpartition(probabilities, -(width + 1))[-(width + 1) :]
    ranked = sorted((int(c) for c in top if c != chosen_column), key=lambda c: -probabilities[c])
    return [(c, float(probabilities[c])) for c in ranked[:width]]


def choose(
    confidences: Sequence[float], offers: Sequence[Sequence[tuple[int, float]]], nodes: int
) -> list[Alternative]:
    """The ``nodes`` alternatives most likely to be the correction: an alternative of drafted
    position j (1-based) is needed when d1..d_{j-1} are accepted and d_j is not, so it scores
    prod(confidences[:j-1]) * its own probability (the draft's estimates). Ordered by position,
    then score: rows parents-first, which the attention's implied causal mask needs."""
    scored = []
    reach = 1.0  # the draft's probability that d1..d_{j-1} are all accepted
    for j, (confidence, offered) in enumerate(zip(confidences, offers, strict=True), start=1):
        scored += [Alternative(j, token, reach * p) for token, p in offered]
        reach *= confidence
    best = sorted(scored, key=lambda a: -a.score)[:nodes]
    return sorted(best, key=lambda a: (a.depth, -a.score))


def tree_inputs(
    depths: Sequence[int], start: int, dtype: type, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids [1, R], attention_bias [1, 1, R, width or start + R]) of a pass whose row r
    sits at position start + depths[r]. A chain row has depth r; a row with depth j < r (an
    alternative of the chain row j) hides the keys of rows j .. r-1 (the chain from j on, earlier
    alternatives); keys after a row are hidden by the attention's causal mask. ``width``: the
    bias's columns where a graph takes them fixed (capturable: max_seq_len)."""
    rows = len(depths)
    positions = start + np.asarray([depths], dtype=np.int64)
    bias = np.zeros((1, 1, rows, width or start + rows), dtype=dtype)
    hidden = np.finfo(dtype).min / 2  # exp() of it is 0; half keeps score + bias finite
    for r, depth in enumerate(depths):
        if depth < r:
            bias[0, 0, r, start + depth : start + r] = hidden
    return positions, bias
