"""Greedy token choice on the device (graph outputs next_token_ids / top_probability): the same
tokens and statistics as choosing from logits rows on the host, without reading any logits."""

from __future__ import annotations

import numpy as np
import pytest
from conflayers_runtime import DraftConfig
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.speculative import generate

from tests.helpers import DRAFT_KINDS


class _NoLogits:
    """Forwards to a backend, counting the logits rows read."""

    def __init__(self, backend):
        self.backend, self.logits_calls = backend, 0
        self.chooses_on_device = backend.chooses_on_device
        self.draft_token_ids = backend.draft_token_ids

    def forward(self, token_ids, start, use_draft):
        self.logits_calls += 1
        return self.backend.forward(token_ids, start, use_draft)

    def greedy(self, token_ids, start, use_draft):
        return self.backend.greedy(token_ids, start, use_draft)


@pytest.mark.parametrize("draft", list(DRAFT_KINDS))
def test_device_choice_equals_host_choice(draft_kinds_artifact, draft):
    folder, manifest = draft_kinds_artifact
    backend = open_backend(folder, manifest, draft, "cpu", 1)
    assert backend.chooses_on_device
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 200, 11)]
    config = DraftConfig(6, 0.3)
    spy = _NoLogits(backend)
    on_device, device_stats = generate(spy, prompt, 40, draft_config=config)
    assert spy.logits_calls == 0, "greedy decoding read logits rows"
    backend.chooses_on_device = False  # the host path: argmax and softmax of logits rows, here
    on_host, host_stats = generate(backend, prompt, 40, draft_config=config)
    assert on_device == on_host
    assert device_stats.as_dict() == host_stats.as_dict()
    assert host_stats.drafted_tokens > 0


def test_device_choice_rows_match_the_logits(draft_kinds_artifact):
    """Every row of a pass: the id is the logits' first argmax (mapped through a pruned draft's
    ids), and the probability is the softmax maximum up to float32 rounding."""
    folder, manifest = draft_kinds_artifact
    backend = open_backend(folder, manifest, "pruned", "cpu", 1)
    tokens = [int(t) for t in np.random.default_rng(2).integers(3, 200, 20)]
    backend.forward(tokens[:12], 0, use_draft=False)
    for use_draft in (False, True):
        logits = backend.forward(tokens[12:], 12, use_draft).copy()
        ids, probabilities = backend.greedy(tokens[12:], 12, use_draft)
        columns = logits.argmax(axis=-1)
        expected = backend.draft_token_ids[columns] if use_draft else columns
        np.testing.assert_array_equal(ids, expected)
        if use_draft:
            z = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
            np.testing.assert_allclose(probabilities, 1.0 / z.sum(axis=-1), rtol=1e-5)
        else:
            assert probabilities is None
