"""The artifact folder runs in onnxruntime-genai: the full graph unmodified, with the same greedy
tokens as PyTorch and as our runtime, and with our default draft as its draft model
(genai_speculative.json), with the same greedy tokens as its plain decoding."""

from __future__ import annotations

import json

import pytest
import torch
from conflayers_runtime import load
from conflayers_runtime.manifest import Draft, Task, read_manifest

from conflayers_export.bench import genai_config
from conflayers_export.export.build import (
    GENAI_SPECULATIVE,
    WEIGHTS_FILE,
    build_artifact,
    draft_graph_name,
    manifest_for_build,
)
from conflayers_export.models import load_model
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES

og = pytest.importorskip("onnxruntime_genai", reason="interop extra not installed: pip install -e .[interop]")


def genai_greedy(config, ids: list[int], max_new_tokens: int) -> tuple[list[int], dict]:
    """onnxruntime-genai's own greedy loop: (new token ids, its speculative statistics)."""
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
    return tokens, generator.get_speculative_stats()


# The default draft comes first (no default task: the first built draft); int8 weights keep a tiny
# random model's argmax, so its drafts are accepted.
CALIBRATED_LENGTH = 5
FIXED_LENGTH = 3  # calibrated for a loop that drafts a fixed length, as onnxruntime-genai's does
GENAI_DRAFTS = {
    "int8": Draft(
        "int8",
        [],
        weight_precision="int8",
        max_draft_tokens=CALIBRATED_LENGTH,
        fixed_length_tokens=FIXED_LENGTH,
    ),
    "skip": [1],
}


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_genai_with_our_draft_decodes_as_its_plain_decoding(model_type, tiny_folder, tmp_path):
    folder = tmp_path / "a"
    build(folder, load_model(str(tiny_folder(model_type))), GENAI_DRAFTS, max_seq_len=96)
    overlay = json.loads((folder / GENAI_SPECULATIVE).read_text())
    assert overlay["model"]["draft"]["filename"] == draft_graph_name("int8")
    assert overlay["speculative"] == {"max_draft_tokens": FIXED_LENGTH}  # as calibrated for its loop
    # Its two sessions take turns: neither keeps spinning once its run ends.
    for session in ("decoder", "draft"):
        assert overlay["model"][session]["session_options"]["session.force_spinning_stop"] == "1"
    assert [f.name for f in folder.glob("*.bin")] == [WEIGHTS_FILE]  # the draft reads the same weights
    assert GENAI_SPECULATIVE in read_manifest(folder).artifacts.files  # hashed like every file

    ours = load(folder, draft=None)
    ids = ours.encode("abcabd", chat=False)
    plain, _ = genai_greedy(genai_config(og, folder), ids, 40)
    speculative, stats = genai_greedy(genai_config(og, folder, speculative=True), ids, 40)
    assert len(plain) == 40 and speculative == plain
    assert stats["draft_tokens_accepted"] > 0
    # and the full graph decodes in onnxruntime-genai as in our runtime
    assert ours.generate(ids, 40, mode="plain").token_ids == plain


def test_the_default_tasks_draft_is_offered(tiny_folder, tmp_path):
    folder = tmp_path / "a"
    loaded = load_model(str(tiny_folder("llama")))
    drafts = [Draft("int8", [], weight_precision="int8"), Draft("mid", [1])]
    manifest = manifest_for_build(folder, loaded, drafts)
    manifest.tasks["default"] = Task("mid")
    build_artifact(folder, loaded, manifest, max_seq_len=64)
    overlay = json.loads((folder / GENAI_SPECULATIVE).read_text())
    assert overlay["model"]["draft"]["filename"] == draft_graph_name("mid")
    assert overlay["speculative"]["max_draft_tokens"] == 8  # uncalibrated: the runtime's default length
    assert manifest.draft("mid").fixed_length_tokens is None


def test_a_pruned_vocabulary_draft_is_not_offered(tiny_folder, tmp_path):
    """onnxruntime-genai needs draft and target logits over the same vocabulary: no overlay, and
    the folder still opens plainly."""
    folder = tmp_path / "a"
    pruned = Draft("pruned", [2], vocab_size=96)
    build(folder, load_model(str(tiny_folder("llama"))), {"pruned": pruned}, ranked=range(256))
    assert not (folder / GENAI_SPECULATIVE).exists()
    assert GENAI_SPECULATIVE not in read_manifest(folder).artifacts.files
    tokens, _ = genai_greedy(genai_config(og, folder), [3, 4, 5], 8)
    assert len(tokens) == 8


@pytest.fixture(scope="module")
def smol_genai(smollm2, tmp_path_factory):
    """SmolLM2 fp32 with an int8 draft, offered to onnxruntime-genai."""
    folder = tmp_path_factory.mktemp("smol-genai") / "a"
    manifest = manifest_for_build(folder, smollm2, [Draft("int8", [], weight_precision="int8")])
    build_artifact(folder, smollm2, manifest, max_seq_len=256)
    return folder


@pytest.mark.real_model
def test_onnxruntime_genai_generates_what_pytorch_generates(smollm2, smol_genai):
    ids = smollm2.encode("Write a short poem about the sea.")
    tokens, _ = genai_greedy(genai_config(og, smol_genai), ids, 32)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = smollm2.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    assert len(tokens) == 32 and tokens == expected


@pytest.mark.real_model
@pytest.mark.parametrize(
    "prompt",
    ["Write a short poem about the sea.", "Summarize the plot of Romeo and Juliet in three sentences."],
)
def test_onnxruntime_genai_with_our_smollm2_draft_is_exact(smollm2, smol_genai, prompt):
    ids = smollm2.encode(prompt)
    plain, _ = genai_greedy(genai_config(og, smol_genai, threads=2), ids, 48)
    speculative, stats = genai_greedy(genai_config(og, smol_genai, threads=2, speculative=True), ids, 48)
    assert speculative == plain
    assert stats["draft_tokens_accepted"] > 0
