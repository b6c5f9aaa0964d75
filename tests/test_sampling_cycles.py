"""Sampling is exact over whole cycles: every drafted position, the rejection residual at each of
them, the bonus token, and a pruned draft vocabulary, through the runtime's decoding loop.

The model is a Markov chain (the next token's distribution depends on the previous token), run
by a backend that needs no graph, so the exact joint distribution of the generated tokens is a
product of known rows, and 30,000 generations take seconds. Each generation drafts up to three
tokens in its first cycle, so the joint of its five tokens covers rows 0-3 of a verify pass.
With token trees (tree.py) the second cycle often starts from a proposal sampled from an
alternative's row, which the backend computes wrongly on purpose: proposals never decide the
output, so it must stay exact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conflayers_runtime import DraftConfig, SamplingConfig, TreeConfig, generate, sampling, speculative

from tests.test_reference import chi_square_p_value

VOCAB = 4
NEW_TOKENS = 5
# The fewest samples at which every wrong rule below still fails with margin (measured: the
# residual and tree rules add ~0.015 per sample to a chi-square of ~260 degrees of freedom, so at
# 20,000 samples p < 1e-9 even three standard deviations low); each sample is a whole generation.
SAMPLES = 20_000
PROMPT = [0, 2]


class MarkovBackend:
    """Full model: p(next | previous) = full[previous]. Draft: another chain over a pruned
    vocabulary (token 3 missing), its logits over ``draft_token_ids`` only."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        # Random rows mixed with the uniform one, so that no probability is tiny.
        self.full = 0.6 * rng.dirichlet(np.ones(VOCAB), VOCAB) + 0.4 / VOCAB
        self.draft_token_ids = np.array([0, 1, 2])
        width = len(self.draft_token_ids)
        self.draft = 0.6 * rng.dirichlet(np.ones(width), VOCAB) + 0.4 / width

    verifies_trees = True

    def forward(self, token_ids, start, use_draft, depths=None):
        table = self.draft if use_draft else self.full
        logits = np.log(table[np.asarray(token_ids)])
        for row, depth in enumerate(depths or []):
            if depth < row:  # an alternative's row: off on purpose, as rounding may make it
                logits[row] = np.log(self.draft[token_ids[row], [0, 1, 2, 2]])
        return logits


def exact_joint(backend: MarkovBackend) -> np.ndarray:
    probs = np.zeros((VOCAB,) * NEW_TOKENS)
    for tokens in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        previous = [PROMPT[-1], *tokens[:-1]]
        probs[tokens] = np.prod([backend.full[a, b] for a, b in zip(previous, tokens, strict=True)])
    return probs


def sampled_joint(backend: MarkovBackend, tree: TreeConfig | None = None) -> np.ndarray:
    counts = np.zeros((VOCAB,) * NEW_TOKENS)
    draft = DraftConfig(max_draft_tokens=3, confidence_threshold=0.0)  # always draft the maximum
    hits = 0
    for seed in range(SAMPLES):
        config = SamplingConfig(temperature=1.0, seed=seed)
        tokens, stats = generate(backend, PROMPT, NEW_TOKENS, config, draft, tree=tree)
        counts[tuple(tokens)] += 1
        hits += stats.tree_hits
    assert tree is None or hits > SAMPLES // 10, "the trees' rows must propose often"
    return counts


def bonus_from_row_zero(p, q, drafted, rng):
    """Wrong: when every draft is accepted, the bonus token comes from row 0 instead of row k."""
    return _accept_sampled(np.vstack([p[:-1], p[:1]]), q, drafted, rng)


def residual_from_row_zero(p, q, drafted, rng):
    """Wrong: a rejection at position i > 0 resamples from the residual of row 0."""
    accepted, token = _accept_sampled(p, q, drafted, rng)
    if 0 < accepted < len(drafted):
        residual = np.maximum(p[0] - q[0], 0.0)
        token = sampling.sample(residual / residual.sum(), rng)
    return accepted, token


_accept_sampled = sampling.accept_sampled


@pytest.fixture(scope="module")
def chain():
    backend = MarkovBackend()
    # Preconditions: the draft often disagrees (rejections at every row), and the full model puts
    # mass on the token the pruned draft cannot propose (the residual must supply it).
    assert backend.full[:, 3].min() > 0.05
    return backend, exact_joint(backend)


def test_sampled_cycles_are_distributed_as_the_full_model(chain):
    backend, expected = chain
    counts = sampled_joint(backend)
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("wrong_rule", [bonus_from_row_zero, residual_from_row_zero])
def test_a_wrong_bonus_or_residual_row_fails(chain, monkeypatch, wrong_rule):
    backend, expected = chain
    monkeypatch.setattr(sampling, "accept_sampled", wrong_rule)
    counts = sampled_joint(backend)
    assert chi_square_p_value(counts, expected) < 1e-6


TREE = TreeConfig(nodes=3, width=1)


def test_sampled_cycles_with_trees_are_distributed_as_the_full_model(chain):
    backend, expected = chain
    counts = sampled_joint(backend, TREE)
    assert chi_square_p_value(counts, expected) > 1e-3


def test_a_tree_proposal_taken_as_certain_fails(chain, monkeypatch):
    """Wrong: the proposal from an alternative's row is its argmax but is verified as if drawn from
    the row (the rule needs the proposal distributed as the distribution it is checked against)."""
    backend, expected = chain
    carried = speculative._Carried

    def argmax_proposal(tokens=None, distributions=None):
        if distributions:
            tokens = [int(np.argmax(d)) for d in distributions]
        return carried(tokens or [], distributions or [])

    monkeypatch.setattr(speculative, "_Carried", argmax_proposal)
    counts = sampled_joint(backend, TREE)
    assert chi_square_p_value(counts, expected) < 1e-6
