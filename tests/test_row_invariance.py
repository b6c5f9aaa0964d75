"""Lossless speculation needs row invariance: the full graph must give a position bitwise the same
logits as a one-token step, as any row of a verify pass and inside a prefill (row_invariance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conflayers_runtime import DraftConfig, generate, load, read_manifest
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.row_invariance import measure

from conflayers_export.models import load_model
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES

PROMPT = [5, 17, 3, 9, 10, 7, 8, 9]


@pytest.fixture(scope="module")
def near_tie_artifact(make_tiny, tiny_folder, tmp_path_factory):
    """A tiny llama whose output head rows are one vector plus 1e-6 noise: every logit is within
    ~1e-6 of every other, so the top-1 token hangs on the last bits of the hidden state, which is
    where a one-token step and a verify pass differ. Draft "same" is the full graph itself (run
    in one-token steps, as drafts are), so it is rejected exactly where the two disagree."""
    model, _ = make_tiny("llama", tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.lm_head.weight
        head.copy_(head[0] + 1e-6 * torch.randn(head.shape, generator=generator))
    folder = tmp_path_factory.mktemp("near-tie")
    hf = tiny_folder("llama", tie_word_embeddings=False)  # its tokenizer; the weights are ours
    model.save_pretrained(folder / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "hf" / name).write_bytes((hf / name).read_bytes())
    build(folder / "artifact", load_model(str(folder / "hf")), {"same": [], "mid": [1, 2]}, max_seq_len=256)
    return folder / "artifact"


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def test_near_ties_make_unpadded_steps_disagree_with_verify_passes(near_tie_artifact):
    """The model is sensitive: without padding (what main did before), speculation drifts from plain."""
    manifest = read_manifest(near_tie_artifact)
    plain, _ = generate(open_backend(near_tie_artifact, manifest, exact=False), PROMPT, 200, draft=None)
    backend = open_backend(near_tie_artifact, manifest, "same", exact=False)
    speculative, stats = generate(backend, PROMPT, 200, draft=DraftConfig(4, 0.0))
    assert _first_difference(plain, speculative) is not None
    assert 0 < stats.acceptance_rate < 1  # the full graph's own steps are rejected at the near-ties
    unpadded = open_backend(near_tie_artifact, manifest, exact=False)
    assert measure(unpadded, [*PROMPT, *plain[:64]], len(PROMPT)).argmax_flips > 0


@pytest.mark.parametrize("draft", ["same", "mid"])
def test_speculation_equals_plain_decoding_at_near_ties(near_tie_artifact, draft):
    plain = load(near_tie_artifact, draft=None).generate(PROMPT, 200, mode="plain")
    model = load(near_tie_artifact, draft=draft)
    for config in (DraftConfig(4, 0.0), DraftConfig(8, 0.8), DraftConfig(1, 0.0)):
        speculative = model.generate(PROMPT, 200, mode="speculative", draft_config=config)
        assert _first_difference(plain.token_ids, speculative.token_ids) is None, config
        assert len(speculative.token_ids) == 200


@pytest.mark.parametrize("dtype", ["fp32", "int4", "fp16"])
@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_full_graph_rows_are_bitwise_equal_across_pass_lengths(tiny_folder, tmp_path, model_type, dtype):
    loaded = load_model(str(tiny_folder(model_type)))
    build(tmp_path / "a", loaded, {"mid": [1, 2]}, dtype=dtype)
    backend = open_backend(tmp_path / "a", read_manifest(tmp_path / "a"))
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, 28)]
    result = measure(backend, tokens, 16)
    assert result.pass_rows == 2 and result.positions == 12
    assert result.bitwise, result.describe()


def test_generation_may_fill_the_cache_to_max_seq_len(near_tie_artifact):
    """Padding rows need room past the last real token; stream's length check leaves it."""
    model = load(near_tie_artifact, draft="same")
    new = model.max_seq_len - len(PROMPT)
    plain = model.generate(PROMPT, new, mode="plain").token_ids
    assert model.generate(PROMPT, new, mode="speculative").token_ids == plain
    assert len(plain) == new
