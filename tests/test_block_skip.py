"""Attention and MLP blocks skipped independently (SWIFT-style): skip sets with "<layer>.attention"
and "<layer>.mlp" entries, built, checked against PyTorch, and exact like every draft."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conflayers_runtime import load
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.errors import ManifestError, SkipSetError
from conflayers_runtime.manifest import Draft, SkipPlan, _Reader, check_skip_layers, read_manifest

from conflayers_export.export.validate import check_parity
from conflayers_export.models import load_model
from conflayers_export.models.reference import TorchBackend
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES
from tests.test_cheap_drafts import ranking, sampling_model  # noqa: F401 (a fixture)
from tests.test_reference import VOCAB, chi_square_p_value, exact_first_two, speculative_first_two

BLOCK_DRAFTS = {
    "blocks": Draft("blocks", ["1.attention", "2.mlp"]),
    "mixed": Draft("mixed", [1, "2.attention"], vocab_size=96, weight_precision="int4"),
}


def test_a_skip_set_splits_into_layers_and_blocks():
    assert SkipPlan.of([3, "1.attention", "5.mlp", "2.mlp"]) == SkipPlan([3], [1], [2, 5])
    check_skip_layers([1, "2.attention", "3.mlp"], 6)
    for bad, problem in [
        (["2.attn"], "neither a layer index"),
        (["0.mlp"], "invalid layers"),
        (["2.attention", "2.mlp"], "both blocks of layers"),
        ([2, "2.mlp"], "whole and a block"),
        (["3.mlp", "3.mlp"], "repeats"),
    ]:
        with pytest.raises(SkipSetError, match=problem):
            check_skip_layers(bad, 6)


def test_readers_before_block_skipping_refuse_a_block_skip_set():
    """Before schema 1.3 a skip set was typed list[int]: such a reader stops at the first block."""
    with pytest.raises(Exception, match=r"skip_layers\[1\] must be an integer"):
        _Reader().typed(list[int], [1, "2.mlp"], "drafts[0].skip_layers")
    assert _Reader().typed(list[int | str], [1, "2.mlp"], "drafts[0].skip_layers") == [1, "2.mlp"]


def test_a_bypassed_block_is_a_block_whose_output_projection_is_zero(make_tiny):
    """The PyTorch reference's block bypass against an independent oracle: the same model with the
    block's last projection zeroed (no bias), on an architecture with sandwich norms too."""
    for model_type in ("llama", "gemma3_text"):
        model, architecture = make_tiny(model_type)
        zeroed = copy.deepcopy(model)
        layers = architecture.decoder_layers(zeroed)
        with torch.no_grad():
            architecture.blocks(layers[1])[0].o_proj.weight.zero_()
            architecture.blocks(layers[2])[1].down_proj.weight.zero_()
        tokens = [5, 9, 2, 7, 11, 3]
        bypassed = TorchBackend(model, architecture, ["1.attention", "2.mlp"]).forward(tokens, 0, True)
        expected = TorchBackend(zeroed, architecture).forward(tokens, 0, False)
        np.testing.assert_allclose(bypassed, expected, atol=1e-5)
        full = TorchBackend(model, architecture).forward(tokens, 0, False)
        assert np.abs(full - expected).max() > 1e-3  # the control: the blocks do matter


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_block_skip_drafts_match_pytorch_and_keep_greedy_output(tiny_folder, tmp_path, model_type):
    loaded = load_model(str(tiny_folder(model_type)))
    build(tmp_path / "a", loaded, BLOCK_DRAFTS, ranked=ranking(loaded.model.config.vocab_size))
    results = check_parity(tmp_path / "a", loaded)  # raises on any disagreement beyond tolerance
    assert {"draft.blocks", "draft.mixed", "paired.blocks/draft"} <= {r.graph for r in results}
    manifest = read_manifest(tmp_path / "a")
    # The draft reads the caches of the layers whose attention runs, and only those.
    backend = open_backend(tmp_path / "a", manifest, "blocks", weights="prepacked")
    cached = {int(i.name.split(".")[1]) for i in backend.sessions[True].get_inputs() if "past" in i.name}
    assert cached == {0, 2, 3}
    plain = load(tmp_path / "a", draft=None).generate("abcdefg", 24, chat=False, mode="plain").token_ids
    for name in BLOCK_DRAFTS:
        for weights in ("paired", "prepacked"):
            model = load(tmp_path / "a", draft=name, weights=weights)
            result = model.generate("abcdefg", 24, chat=False, mode="speculative")
            assert result.token_ids == plain and result.stats.drafted_tokens > 0, (name, weights)


def test_sampling_with_a_block_skip_draft_is_distributed_as_plain_sampling(sampling_model, tmp_path):  # noqa: F811
    build(tmp_path / "a", sampling_model, {"blocks": BLOCK_DRAFTS["blocks"]}, ranked=ranking(VOCAB))
    manifest = read_manifest(tmp_path / "a")
    backend = open_backend(tmp_path / "a", manifest, "blocks")
    prompt = [1, 2, 3, 4]
    counts = speculative_first_two(backend, prompt, 3000)
    assert chi_square_p_value(counts, exact_first_two(sampling_model.model, prompt)) > 1e-3


def test_cli_builds_a_block_skip_draft(tiny_folder, tmp_path):
    from conflayers_export.cli import main

    common = ["--model", str(tiny_folder("qwen2")), "--max-seq-len", "64", "--quiet"]
    assert main(["build", str(tmp_path / "a"), *common, "--skip", "2.mlp,1.attention"]) == 0
    assert read_manifest(tmp_path / "a").draft("manual").skip_layers == ["1.attention", "2.mlp"]
    assert main(["build", str(tmp_path / "b"), *common, "--skip", "1.mlp,1.attention"]) == 1
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "b")  # nothing written
