"""The PyTorch reference self-speculative decoder: greedy exactness and distribution exactness."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conflayers_runtime import DraftConfig, GenerationError, SamplingConfig, SkipSetError, generate, sampling
from scipy.stats import chisquare

from conflayers_export.models.reference import TorchBackend, speculative_generate
from tests.test_architectures import TESTED_ARCHITECTURES

PROMPT = [5, 17, 33, 9, 100, 7, 8, 9, 10, 11, 12]  # longer than gemma3's tiny sliding window (8)


def _hf_greedy(model, prompt, n):
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
@pytest.mark.parametrize("skip", [[], [1], [1, 2]])
def test_greedy_speculation_equals_plain_greedy(make_tiny, model_type, skip):
    model, architecture = make_tiny(model_type)
    expected = _hf_greedy(model, PROMPT, 40)
    tokens, stats = speculative_generate(model, architecture, PROMPT, skip, 40)
    assert tokens == expected
    assert stats.new_tokens == 40 and stats.cycles > 0
    assert stats.drafted_tokens == stats.draft_passes
    assert sum(stats.accepted_histogram) == stats.cycles
    if not skip:  # the draft is the full model: every drafted token must be accepted
        assert stats.acceptance_rate == 1.0


def test_plain_mode_equals_plain_greedy_and_counts_passes(make_tiny):
    model, architecture = make_tiny("llama")
    tokens, stats = speculative_generate(model, architecture, PROMPT, [1], 12, draft_config=None)
    assert tokens == _hf_greedy(model, PROMPT, 12)
    assert (stats.prefill_passes, stats.verify_passes, stats.draft_passes) == (1, 11, 0)
    assert stats.mean_tokens_per_cycle == 1.0


def test_long_drafts_are_accepted_and_bounded(make_tiny):
    model, architecture = make_tiny("llama")
    draft = DraftConfig(max_draft_tokens=5, confidence_threshold=0.0)  # always draft the maximum
    tokens, stats = speculative_generate(model, architecture, PROMPT, [], 23, draft_config=draft)
    assert tokens == _hf_greedy(model, PROMPT, 23)
    # Identical draft: 22 tokens after prefill = 3 cycles of 5 accepted + 1 bonus, then 3 + 1 (capped).
    assert stats.accepted_histogram == [0, 0, 0, 1, 0, 3] and stats.verify_passes == 4


def test_stop_token_ends_generation_and_is_included(make_tiny):
    model, architecture = make_tiny("llama")
    reference = _hf_greedy(model, PROMPT, 30)
    stop = reference[9]
    first = reference.index(stop)
    tokens, _ = speculative_generate(model, architecture, PROMPT, [1], 30, stop_token_ids=[stop])
    assert tokens == reference[: first + 1]


@pytest.mark.parametrize(
    "skip, message",
    [([0], r"invalid layers \[0\]"), ([3], r"invalid layers \[3\]"), ([7], r"invalid layers \[7\].*1\.\.2")],
)
def test_skip_sets_with_first_last_or_missing_layers_are_refused(make_tiny, skip, message):
    model, architecture = make_tiny("llama")
    with pytest.raises(SkipSetError, match=message):
        speculative_generate(model, architecture, PROMPT, skip, 4)


def test_empty_prompt_is_refused(make_tiny):
    model, architecture = make_tiny("llama")
    with pytest.raises(GenerationError, match="prompt is empty"):
        speculative_generate(model, architecture, [], [1], 4)


# --- Sampling is distribution-exact -------------------------------------------------------------

VOCAB = 8
SAMPLING = SamplingConfig(temperature=1.0)


def exact_first_two(model, prompt):
    """Exact joint distribution [V, V] of the first two sampled tokens under plain sampling."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        pairs = torch.tensor([[*prompt, t] for t in range(VOCAB)])
        second = torch.softmax(model(pairs).logits[:, -1].double(), -1)  # [V, V]
    return (first[:, None] * second).numpy()


def speculative_first_two(backend, prompt, samples):
    counts = np.zeros((VOCAB, VOCAB))
    # The first token comes from prefill; the next two are drafted in one cycle and go through
    # the acceptance rule (the second of them too, as a draft or as the resample).
    draft = DraftConfig(max_draft_tokens=2, confidence_threshold=0.0)
    for seed in range(samples):
        config = SamplingConfig(temperature=SAMPLING.temperature, seed=seed)
        tokens, _ = generate(backend, prompt, 4, config, draft)
        counts[tokens[0], tokens[1]] += 1
    return counts


def chi_square_p_value(counts, expected_probs):
    expected = expected_probs.ravel() * counts.sum()
    observed = counts.ravel()
    rare = expected < 5  # pool rare cells so the chi-square approximation holds
    observed = np.append(observed[~rare], observed[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    return chisquare(observed, expected).pvalue


def always_accept(p, q, drafted, rng):
    """A deliberately wrong acceptance rule: keeps every drafted token."""
    return len(drafted), sampling.sample(p[len(drafted)], rng)


@pytest.fixture(scope="module")
def sampling_setup(make_tiny):
    model, architecture = make_tiny("llama", seed=3, vocab_size=VOCAB)
    prompt, skip = [1, 2, 3, 4], [1, 2]
    expected = exact_first_two(model, prompt)
    # Precondition: the draft must disagree with the full model, or a wrong rule could not fail.
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        backend = TorchBackend(model, architecture, skip)
        backend.forward(prompt[:-1], 0, use_draft=False)
        q = torch.softmax(
            torch.from_numpy(backend.forward(prompt[-1:], len(prompt) - 1, use_draft=True)[0]), -1
        )
    assert 0.5 * (p - q).abs().sum() > 0.15, "draft too close to the full model for this test"
    return model, architecture, prompt, skip, expected


# Enough samples that the wrong rule below fails far beyond its threshold (measured: its chi-square
# statistic grows by ~0.4 per sample over 15 degrees of freedom; at 500 samples p ~ 1e-35, and
# still ~1e-19 three standard deviations low), no more: each sample is a whole generation.
SAMPLES = 500


def test_speculative_sampling_matches_plain_sampling(sampling_setup):
    model, architecture, prompt, skip, expected = sampling_setup
    counts = speculative_first_two(TorchBackend(model, architecture, skip), prompt, SAMPLES)
    assert chi_square_p_value(counts, expected) > 1e-3


def test_a_wrong_acceptance_rule_fails_the_same_test(sampling_setup, monkeypatch):
    model, architecture, prompt, skip, expected = sampling_setup

    monkeypatch.setattr(sampling, "accept_sampled", always_accept)
    counts = speculative_first_two(TorchBackend(model, architecture, skip), prompt, SAMPLES)
    assert chi_square_p_value(counts, expected) < 1e-6


def test_same_seed_same_sample(make_tiny):
    model, architecture = make_tiny("qwen2")
    config = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    runs = [speculative_generate(model, architecture, PROMPT, [1], 20, config)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(set(itertools.chain(*runs))) > 1
