"""The token-choice and acceptance rules, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
from conflayers_runtime import GenerationError, SamplingConfig
from conflayers_runtime.sampling import accept_greedy, accept_sampled, sample, warp
from scipy.stats import chisquare


def test_warp_top_k_keeps_the_k_most_likely():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    probs = warp(logits, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [0, 4 / 7, 0, 3 / 7])


def test_warp_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    # 0.4 + 0.3 = 0.7 >= 0.65: tokens 1 and 3 survive; 0.4 alone is not enough.
    probs = warp(logits, SamplingConfig(temperature=1.0, top_p=0.65))
    np.testing.assert_allclose(probs, [0, 4 / 7, 0, 3 / 7])
    # top_p below the top token's mass still keeps the top token.
    np.testing.assert_allclose(warp(logits, SamplingConfig(temperature=1.0, top_p=0.1)), [0, 1, 0, 0])


def _nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus as defined, from one stable sort of the whole row."""
    order = np.argsort(-probs, kind="stable")
    ordered = probs[order]
    keep = np.zeros(probs.shape, bool)
    keep[order] = np.cumsum(ordered) - ordered < top_p * probs.sum()
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat (the nucleus outgrows the candidates) to peaked
def test_warp_top_p_over_a_large_vocabulary_equals_the_full_sort(spread):
    rng = np.random.default_rng(int(spread))
    logits = rng.standard_normal((3, 50_000)) * spread
    logits[:, 7:40] = logits[:, 7, None]  # ties, broken by token id
    for top_p in (0.05, 0.5, 0.9, 0.99):
        config = SamplingConfig(temperature=0.7, top_p=top_p)
        tempered = np.exp((logits - logits.max(-1, keepdims=True)) / 0.7)
        tempered /= tempered.sum(-1, keepdims=True)
        expected = np.stack([_nucleus_by_full_sort(row, top_p) for row in tempered])
        np.testing.assert_allclose(warp(logits, config), expected, rtol=1e-12, atol=0)


def test_warp_top_p_breaks_ties_at_the_nucleus_edge_by_token_id():
    probs = np.full(50_000, 0.2 / 49_989)
    probs[123] = 0.5
    tied = [40_000, 9, 31_000, 17, 2, 45_000, 600, 5, 49_999, 10_000]  # 0.03 each
    probs[tied] = 0.03
    # 0.5 + 4 x 0.03 = 0.62 >= 0.6: the top token and the 4 tied tokens of the lowest ids.
    kept = np.flatnonzero(warp(np.log(probs), SamplingConfig(temperature=1.0, top_p=0.6)))
    assert kept.tolist() == [2, 5, 9, 17, 123]


def test_warp_temperature_sharpens():
    logits = np.array([0.0, 1.0])
    cold = warp(logits, SamplingConfig(temperature=0.5))
    np.testing.assert_allclose(cold[1], np.exp(2) / (1 + np.exp(2)))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(GenerationError):
        SamplingConfig(**kwargs)


def test_accept_greedy_stops_at_first_mismatch():
    # argmax rows: 3, 1, 2, 0
    rows = np.eye(4)[[3, 1, 2, 0]]
    assert accept_greedy(rows.argmax(-1), [3, 1, 0]) == (2, 2)  # third draft (0) != argmax 2 -> replaced by 2
    assert accept_greedy(rows.argmax(-1), [3, 1, 2]) == (3, 0)  # all accepted, bonus = argmax of last row
    assert accept_greedy(rows[:1].argmax(-1), []) == (0, 3)  # nothing drafted: plain step


def _always_accept(p, q, drafted, rng):
    return len(drafted), sample(p[len(drafted)], rng)


@pytest.mark.parametrize("rule, should_pass", [(accept_sampled, True), (_always_accept, False)])
def test_rejection_sampling_reproduces_the_target_distribution(rule, should_pass):
    """Context-free toy: the target p is the same at every position, so every emitted token must be
    distributed as p, whether it is an accepted draft, a resample or the bonus token."""
    p_row = np.array([0.5, 0.2, 0.2, 0.1])
    q_row = np.array([0.1, 0.1, 0.3, 0.5])  # a draft that disagrees a lot
    p, q = np.tile(p_row, (3, 1)), np.tile(q_row, (2, 1))
    rng = np.random.default_rng(0)
    counts = np.zeros((2, 4))  # [position in the cycle, token]
    for _ in range(20000):
        drafted = [sample(q_row, rng), sample(q_row, rng)]
        accepted, nxt = rule(p, q, drafted, rng)
        emitted = [*drafted[:accepted], nxt]
        for position, token in enumerate(emitted[:2]):
            counts[position, token] += 1
    for position in range(2):
        observed = counts[position]
        _, p_value = chisquare(observed, observed.sum() * p_row)
        assert (p_value > 1e-3) == should_pass, (position, observed / observed.sum(), p_value)
