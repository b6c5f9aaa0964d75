"""Lossless speculation needs row invariance: the full graph must give a position bitwise the same
logits as a one-token step, as any row of a verify pass and inside a prefill (row_invariance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conflayers_runtime import DraftConfig, GenerationError, generate, load, read_manifest
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.row_invariance import measure

from conflayers_export.export import graph as graph_module
from conflayers_export.models import load_model
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES

PROMPT = [5, 17, 3, 9, 10, 7, 8, 9]


@pytest.fixture(scope="module")
def near_tie_artifacts(make_tiny, tiny_folder, tmp_path_factory):
    """Artifacts of a tiny llama whose output head rows are one vector plus 1e-6 noise: every
    logit is within ~1e-6 of every other, so the top-1 token hangs on the last bits of the hidden
    state, which is where a one-token step and a verify pass differ. Draft "same" is the full
    graph itself (run in one-token steps, as drafts are), so it is rejected exactly where the two
    disagree. Kinds: "fp32" and "int4" as built today; "fp32-unpadded" with graphs built as before
    the attention padding (a one-token pass's attention over one row)."""
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
    loaded = load_model(str(folder / "hf"))
    drafts = {"same": [], "mid": [1, 2]}
    build(folder / "fp32", loaded, drafts, max_seq_len=256)
    build(folder / "int4", loaded, drafts, max_seq_len=256, dtype="int4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_module, "MIN_ATTENTION_ROWS", 1)  # graph.min_attention_rows reads it
        build(folder / "fp32-unpadded", loaded, drafts, max_seq_len=256)
    return folder


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def test_near_ties_part_one_token_steps_from_verify_passes(near_tie_artifacts):
    """The model is sensitive: with one-row full passes computed as main computed them (no
    padding anywhere), speculation drifts from plain decoding. (int4's own one-row difference,
    MatMulNBits' M == 1 kernel, does not show at these tiny shapes; it does on SmolLM2, where
    validate and scripts/check_exactness.py measure it.)"""
    folder = near_tie_artifacts / "fp32-unpadded"
    manifest = read_manifest(folder)
    plain, _ = generate(open_backend(folder, manifest, exact=False), PROMPT, 200, draft_config=None)
    backend = open_backend(folder, manifest, "same", exact=False)
    speculative, stats = generate(backend, PROMPT, 200, draft_config=DraftConfig(4, 0.0))
    assert _first_difference(plain, speculative) is not None
    assert 0 < stats.acceptance_rate < 1  # the full graph's own steps are rejected at the near-ties
    unpadded = open_backend(folder, manifest, exact=False)
    assert measure(unpadded, [*PROMPT, *plain[:64]], len(PROMPT)).argmax_flips > 0


@pytest.mark.parametrize("draft", ["same", "mid"])
@pytest.mark.parametrize("kind", ["fp32", "int4", "fp32-unpadded"])
def test_speculation_equals_plain_decoding_at_near_ties(near_tie_artifacts, kind, draft):
    folder = near_tie_artifacts / kind
    plain = load(folder, draft=None).generate(PROMPT, 200, mode="plain")
    model = load(folder, draft=draft)
    for config in (DraftConfig(4, 0.0), DraftConfig(8, 0.8), DraftConfig(1, 0.0)):
        speculative = model.generate(PROMPT, 200, mode="speculative", draft_config=config)
        assert _first_difference(plain.token_ids, speculative.token_ids) is None, config
        assert len(speculative.token_ids) == 200


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_graphs_are_row_invariant_without_runtime_padding(near_tie_artifacts, kind):
    """The attention padding inside the graph is enough: one-row plain steps (what
    onnxruntime-genai or a driver of its own runs) equal speculative output too."""
    folder = near_tie_artifacts / kind
    manifest = read_manifest(folder)
    plain, _ = generate(open_backend(folder, manifest, exact=False), PROMPT, 200, draft_config=None)
    assert open_backend(folder, manifest).full_pass_rows == 1
    speculative, _ = generate(open_backend(folder, manifest, "same", exact=False), PROMPT, 200)
    assert _first_difference(plain, speculative) is None


@pytest.mark.parametrize("dtype", ["fp32", "int4", "fp16"])
@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_full_graph_rows_are_bitwise_equal_across_pass_lengths(tiny_folder, tmp_path, model_type, dtype):
    loaded = load_model(str(tiny_folder(model_type)))
    build(tmp_path / "a", loaded, {"mid": [1, 2]}, dtype=dtype)
    backend = open_backend(tmp_path / "a", read_manifest(tmp_path / "a"))
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, 28)]
    result = measure(backend, tokens, 16)
    # CPU artifacts' graphs pad a one-token attention themselves: the runtime runs one-row steps
    # unpadded; CUDA artifacts' (fp16) do not, and the runtime pads their passes (2 rows here)
    assert result.pass_rows == (2 if dtype == "fp16" else 1) and result.positions == 12
    assert result.bitwise, result.describe()


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_generation_may_fill_the_cache_to_max_seq_len(near_tie_artifacts, kind):
    """Padding rows need room past the last real token; stream's length check leaves it."""
    model = load(near_tie_artifacts / kind, draft="same")
    new = model.max_seq_len - len(PROMPT)
    plain = model.generate(PROMPT, new, mode="plain").token_ids
    assert model.generate(PROMPT, new, mode="speculative").token_ids == plain
    assert len(plain) == new
    with pytest.raises(GenerationError, match="exceeds the artifact's max_seq_len"):
        model.generate(PROMPT, new + 1, mode="plain")
    with pytest.raises(GenerationError, match="exceeds the artifact's max_seq_len"):
        model.backend.forward([1], model.max_seq_len - 1, use_draft=False)  # no room for its second row
