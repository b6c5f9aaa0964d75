"""Token choice and the speculative acceptance rules, in numpy.

Both the PyTorch reference decoder (in the exporter) and the ONNX Runtime decoder call these
functions, so the rule that makes speculation lossless is written exactly once.

Acceptance rules (Leviathan et al. 2023; Chen et al. 2023):
- greedy: accept drafted tokens while they equal the full model's argmax; the first mismatch
  is replaced by the full model's argmax, and when every draft matches, the full model's next
  argmax is appended (the "bonus" token).
- sampling: accept drafted token x with probability min(1, p(x) / q(x)); on the first rejection
  resample from norm(max(0, p - q)) and stop. The emitted tokens are then distributed exactly
  as sampling from p alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (probability ratios p/q need the precision)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def warp(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Turn logits [..., V] into the sampling distribution [..., V] (temperature, top-k, top-p).

    Greedy configs get the plain softmax: it is only used for the draft's confidence.
    """
    if config.greedy:
        return softmax(logits)
    probs = softmax(logits / config.temperature)
    if config.top_k and config.top_k < probs.shape[-1]:
        kth = np.partition(probs, -config.top_k, axis=-1)[..., -config.top_k, None]
        probs = np.where(probs >= kth, probs, 0.0)
    if config.top_p < 1.0:
        rows = probs.reshape(-1, probs.shape[-1])
        probs = np.stack([_nucleus(row, config.top_p) for row in rows]).reshape(probs.shape)
    return probs / probs.sum(axis=-1, keepdims=True)


# Tokens sorted first when looking for a nucleus: sorting a whole vocabulary costs milliseconds a
# row (more than a decoding step of a small model), and the nucleus of a real model's distribution
# is almost always among its few hundred most likely tokens.
NUCLEUS_CANDIDATES = 512


def _nucleus(row: np.ndarray, top_p: float) -> np.ndarray:
    """``row`` with the tokens outside its nucleus zeroed: the nucleus is the smallest prefix of
    the tokens by descending probability (ties by id) whose mass reaches ``top_p`` of the row's;
    the top token is always in it. The NUCLEUS_CANDIDATES most likely tokens are sorted first; the
    whole row only where they do not settle the nucleus."""
    threshold = top_p * row.sum()
    if row.shape[0] > NUCLEUS_CANDIDATES:
        candidates = np.argpartition(-row, NUCLEUS_CANDIDATES - 1)[:NUCLEUS_CANDIDATES]
        order = candidates[np.lexsort((candidates, -row[candidates]))]
        kept = _prefix_reaching(row[order], threshold)
        # Every token left out is no more likely than the least likely candidate, so the candidates
        # more likely than that one are the whole vocabulary's first tokens, cumulative sums and
        # all: a nucleus that ends among them is the nucleus.
        if kept <= np.count_nonzero(row[order] > row[order[-1]]):
            return _only(row, order[:kept])
    order = np.argsort(-row, kind="stable")
    return _only(row, order[: _prefix_reaching(row[order], threshold)])


def _prefix_reaching(ordered: np.ndarray, threshold: float) -> int:
    """How many of the first ``ordered`` values it takes to reach ``threshold``: those with less
    than it before them."""
    return int(np.count_nonzero(np.cumsum(ordered) - ordered < threshold))


def _only(row: np.ndarray, kept: np.ndarray) -> np.ndarray:
    out = np.zeros_like(row)
    out[kept] = row[kept]
    return out


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a distribution [V] (inverse CDF: one uniform per draw)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def accept_greedy(targets: Sequence[int] | np.ndarray, drafted: list[int]) -> tuple[int, int]:
    """Greedy rule. ``targets`` [k+1] are the full model's argmax tokens at the k drafted positions
    plus the bonus position. Returns (number of drafted tokens accepted, the full model's next token).
    """
    accepted = 0
    while accepted < len(drafted) and drafted[accepted] == int(targets[accepted]):
        accepted += 1
    return accepted, int(targets[accepted])


def accept_sampled(
    p: np.ndarray, q: np.ndarray, drafted: list[int], rng: np.random.Generator
) -> tuple[int, int]:
    """Speculative rejection sampling. ``p`` [k+1, V]: full-model distributions; ``q`` [k, V]: the
    draft distributions each drafted token was sampled from. Returns (accepted count, next token).
    """
    for i, token in enumerate(drafted):
        # Accept with probability min(1, p/q); q[token] > 0 because the token was sampled from q.
        if rng.random() * q[i, token] < p[i, token]:
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        # total == 0 only when p == q up to rounding, where rejection has probability ~0: fall back to p.
        return i, sample(residual / total if total > 0 else p[i], rng)
    return len(drafted), sample(p[len(drafted)], rng)
