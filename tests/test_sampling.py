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
