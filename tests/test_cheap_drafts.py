"""Cheaper drafts: int8/int4 draft weights, pruned draft vocabularies, int4 artifacts.

The claims: quantized graphs compute what the same dequantized weights compute in PyTorch; every
kind of draft leaves greedy output identical and sampled output distributed exactly as plain
decoding; bad requests are refused with the fix in the message.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conflayers_runtime import DeviceError, ManifestError, load, read_manifest, speculative
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.manifest import Draft
from onnx import TensorProto, helper, numpy_helper

from conflayers_export.calibrate.select import rank_vocabulary
from conflayers_export.cli import main as export_main
from conflayers_export.errors import BuildError
from conflayers_export.export.quantize import BLOCK_SIZE, dequantize, quantize
from conflayers_export.export.validate import check_parity
from conflayers_export.models import load_model
from conflayers_export.models.reference import TorchBackend
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES
from tests.test_reference import VOCAB, chi_square_p_value, exact_first_two, speculative_first_two


def ranking(vocab_size):
    """A vocabulary ranking as calibrate writes it (here: highest ids first, so that a pruned draft
    keeps a block of ids unlike the identity)."""
    return list(range(vocab_size - 1, -1, -1))


# --- quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_are_what_matmulnbits_multiplies_by(bits):
    rng = np.random.default_rng(bits)
    n, k = 48, 80  # k is not a multiple of the block: the last block is padded
    weight = rng.normal(size=(n, k)).astype(np.float32)
    packed, scales, zero_points = quantize(weight, bits)
    restored = dequantize(packed, scales, zero_points, bits, k)
    # Round to nearest: at most half a step (the block's range / levels) from the original.
    blocks = np.pad(weight, ((0, 0), (0, -k % BLOCK_SIZE))).reshape(n, -1, BLOCK_SIZE)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / (2**bits - 1)
    assert (np.abs(restored - weight) <= np.repeat(step, BLOCK_SIZE, axis=1)[:, :k] / 2 + 1e-6).all()
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "S", "Z"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=BLOCK_SIZE,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [
            numpy_helper.from_array(a, name)
            for a, name in zip((packed, scales, zero_points), "BSZ", strict=True)
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    x = rng.normal(size=(3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"A": x}
    )[0]
    np.testing.assert_allclose(y, x @ restored.T, atol=1e-4, rtol=1e-5)


# --- every kind of draft, on every architecture --------------------------------------------------

KINDS = {
    "int8": Draft("int8", [], weight_precision="int8"),
    "int4": Draft("int4", [], weight_precision="int4"),
    "pruned": Draft("pruned", [], vocab_size=96),
    "all": Draft("all", [1], vocab_size=128, weight_precision="int4"),
}


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_cheap_drafts_match_pytorch_and_keep_greedy_output(tiny_folder, tmp_path, model_type):
    loaded = load_model(str(tiny_folder(model_type)))
    vocab = loaded.model.config.vocab_size
    build(tmp_path / "a", loaded, KINDS, ranked=ranking(vocab))
    results = check_parity(tmp_path / "a", loaded)  # raises on any disagreement beyond tolerance
    paired = {f"{t}paired.{k}/{role}" for t in ("", "tree.") for k in KINDS for role in ("full", "draft")}
    assert {r.graph for r in results} == {"full", "tree.full", *(f"draft.{k}" for k in KINDS), *paired}
    section = read_manifest(tmp_path / "a").artifacts
    assert set(section.draft_vocab) == {"pruned", "all"}
    plain = load(tmp_path / "a", draft=None).generate("abcdefg", 24, chat=False, mode="plain").token_ids
    for name, draft in KINDS.items():
        model = load(tmp_path / "a", draft=name)
        if draft.vocab_size:  # the draft scores its own columns, mapped to the top-ranked ids
            assert model.backend.widths[True] == draft.vocab_size
            assert sorted(model.backend.draft_token_ids) == list(range(vocab - draft.vocab_size, vocab))
        assert model.generate("abcdefg", 24, chat=False, mode="speculative").token_ids == plain, name


def test_quantized_copies_are_stored_once_and_drafts_share_them(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    drafts = {"a": Draft("a", [1], weight_precision="int4"), "b": Draft("b", [2], weight_precision="int4")}
    build(tmp_path / "a", loaded, drafts)
    section = read_manifest(tmp_path / "a").artifacts
    quantized = [n for n in section.weights_index if ".int4" in n]
    assert quantized and len(quantized) == len(set(quantized))
    a, b = (set(section.graph_weights[section.drafts[d]]) for d in "ab")
    assert "model.layers.3.mlp.down_proj.weight.int4" in a & b  # a layer both keep: one copy
    full = set(section.graph_weights[section.full])
    assert not full & set(quantized)  # the verify pass keeps the artifact's precision
    graph = onnx.load(str(tmp_path / "a" / section.drafts["a"]), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(set(names)) == len(names) and all(n.startswith(("/model/layers.", "/lm_head")) for n in names)


# --- int4 artifacts ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3"])
def test_int4_artifacts_match_dequantized_pytorch_and_speculate_exactly(tiny_folder, tmp_path, model_type):
    loaded = load_model(str(tiny_folder(model_type)))
    vocab = loaded.model.config.vocab_size
    drafts = {"skip": [1, 2], "pruned": Draft("pruned", [1], vocab_size=vocab // 2)}
    build(tmp_path / "a", loaded, drafts, ranked=ranking(vocab), dtype="int4")
    # The int4 full graph rounds its activations to int8, like the drafts: check_parity holds it to
    # the quantized tolerance against the same weights (it raises otherwise), argmax up to near-ties.
    results = check_parity(tmp_path / "a", loaded)
    assert all(r.argmax_equal for r in results if r.graph == "full")
    # With the int8 activations emulated (quantize.round_activations) the reference is close: the
    # graphs stay well inside the tolerance (measured: up to 0.4% of the largest logit here).
    worst = max(r.max_abs_diff / r.scale for r in results)
    assert worst <= 0.02, worst
    manifest = read_manifest(tmp_path / "a")
    section = manifest.artifacts
    assert section.dtype == "int4" and section.kv.dtype == "fp32"
    assert section.quantization.accuracy_level == {"full": 4, "drafts": 4}
    plain = load(tmp_path / "a", draft=None).generate("abcdefgh", 32, chat=False, mode="plain").token_ids
    for name in drafts:
        model = load(tmp_path / "a", draft=name)
        assert model.generate("abcdefgh", 32, chat=False, mode="speculative").token_ids == plain


# --- sampling stays exact ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_model(tiny_folder):
    return load_model(str(tiny_folder("llama", seed=3, vocab_size=VOCAB)))


@pytest.mark.parametrize(
    "draft",
    [
        Draft("pruned", [1, 2], vocab_size=VOCAB // 2),
        Draft("int4", [], weight_precision="int4"),
        Draft("all", [2], vocab_size=VOCAB // 2, weight_precision="int8"),
    ],
    ids=lambda d: d.name,
)
def test_sampling_with_cheap_drafts_is_distributed_as_plain_sampling(sampling_model, tmp_path, draft):
    build(tmp_path / "a", sampling_model, {draft.name: draft}, ranked=ranking(VOCAB))
    backend = open_backend(tmp_path / "a", read_manifest(tmp_path / "a"), draft.name)
    prompt = [1, 2, 3, 4]
    counts = speculative_first_two(backend, prompt, 3000)
    assert chi_square_p_value(counts, exact_first_two(sampling_model.model, prompt)) > 1e-3
    if draft.vocab_size:  # tokens the draft can never propose still appear, through the residual
        outside = sorted(set(range(VOCAB)) - set(backend.draft_token_ids.tolist()))
        assert counts[:, outside].sum() > 0


def test_a_pruned_draft_that_ignored_its_zero_mass_would_fail(sampling_model, tmp_path, monkeypatch):
    """The test has power: a rule that claims probability for tokens the draft never proposes
    (instead of exactly zero) is detected."""
    build(
        tmp_path / "a",
        sampling_model,
        {"p": Draft("p", [1, 2], vocab_size=VOCAB // 2)},
        ranked=ranking(VOCAB),
    )
    backend = open_backend(tmp_path / "a", read_manifest(tmp_path / "a"), "p")
    right = speculative._over_vocabulary
    monkeypatch.setattr(
        speculative, "_over_vocabulary", lambda rows, ids, size: 0.5 * right(rows, ids, size) + 0.5 / size
    )
    prompt = [1, 2, 3, 4]
    counts = speculative_first_two(backend, prompt, 3000)
    assert chi_square_p_value(counts, exact_first_two(sampling_model.model, prompt)) < 1e-6


def test_the_reference_backend_prunes_like_the_graphs(sampling_model):
    ids = np.array([1, 5, 6])
    backend = TorchBackend(sampling_model.model, sampling_model.architecture, [1], draft_token_ids=ids)
    full = TorchBackend(sampling_model.model, sampling_model.architecture, [1])
    np.testing.assert_allclose(backend.forward([1, 2], 0, True), full.forward([1, 2], 0, True)[:, ids])


# --- the draft length travels with the draft -----------------------------------------------------


def test_the_runtime_drafts_as_long_as_calibrated(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("qwen2")))
    tuned = Draft("tuned", [1], max_draft_tokens=3, confidence_threshold=0.0)
    build(tmp_path / "a", loaded, {"tuned": tuned, "default": [2]})
    model = load(tmp_path / "a", draft="tuned")
    assert (model.draft_config().max_draft_tokens, model.draft_config().confidence_threshold) == (3, 0.0)
    result = model.generate("abcdef", 30, chat=False, mode="speculative")
    # Never stops early at threshold 0 (only the last cycle may be cut by max_new_tokens).
    assert 3 * (result.stats.cycles - 1) <= result.stats.draft_passes <= 3 * result.stats.cycles
    assert load(tmp_path / "a", draft="default").draft_config().max_draft_tokens == 8  # runtime default


# --- bad input -----------------------------------------------------------------------------------


def test_bad_cheap_drafts_are_refused_with_the_fix(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    vocab = loaded.model.config.vocab_size
    with pytest.raises(
        BuildError, match=f"vocab_size {vocab + 1} exceeds the model's vocabulary of {vocab}"
    ):
        build(tmp_path / "a", loaded, {"v": Draft("v", [], vocab_size=vocab + 1)}, ranked=ranking(vocab))
    with pytest.raises(BuildError, match="manifest ranks 0: run `conflayers-export calibrate`"):
        build(tmp_path / "a", loaded, {"v": Draft("v", [], vocab_size=16)})
    with pytest.raises(BuildError, match="int8 weights on a int4 artifact would read more bytes"):
        build(tmp_path / "a", loaded, {"q": Draft("q", [], weight_precision="int8")}, dtype="int4")
    with pytest.raises(ManifestError, match="weight_precision 'int2' is not one of base, int8, int4"):
        build(tmp_path / "a", loaded, {"q": Draft("q", [], weight_precision="int2")})
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_a_draft_the_device_cannot_run_is_refused_naming_it(tiny_folder, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_folder("llama")))
    build(tmp_path / "a", loaded, {"q": Draft("q", [1], weight_precision="int8")})
    real = ort.InferenceSession

    def session(path, *args, **kwargs):  # an onnxruntime build without 8-bit MatMulNBits kernels
        if "draft.q" in str(path) or "paired.q" in str(path):
            raise RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for MatMulNBits(1)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(
        DeviceError, match=r"cannot run the draft 'q' \(int8 weights\).*Choose another draft"
    ):
        load(tmp_path / "a", draft="q", weights="prepacked")
    with pytest.raises(  # the paired graph holds the same draft
        DeviceError, match=r"cannot run the paired graph of draft 'q' \(int8 weights\).*Choose another"
    ):
        load(tmp_path / "a", draft="q", weights="paired")


def test_cli_builds_a_manual_cheap_draft(tiny_folder, tmp_path, capsys):
    folder = str(tiny_folder("qwen2"))
    argv = ["build", str(tmp_path / "a"), "--model", folder, "--skip", "2", "--draft-precision", "int4"]
    assert export_main([*argv, "--max-seq-len", "64"]) == 0
    draft = read_manifest(tmp_path / "a").draft("manual")
    assert (draft.skip_layers, draft.weight_precision) == ([2], "int4")
    assert export_main(["build", str(tmp_path / "b"), "--model", folder, "--draft-vocab", "16"]) == 1
    assert "run `conflayers-export calibrate`" in capsys.readouterr().err


# --- the packaged SmolLM2 ------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_cheap_drafts_keep_greedy_output(smollm2, tmp_path):
    prompts = ["Write a short poem about the sea.", "Explain how a bicycle works."]
    ids = [smollm2.encode(p) for p in prompts]
    from conflayers_runtime.speculative import generate as run

    generations = [
        run(TorchBackend(smollm2.model, smollm2.architecture), p, 32, draft_config=None)[0] for p in ids[:1]
    ]
    counts = np.bincount(generations[0], minlength=smollm2.model.config.vocab_size)
    ranked = rank_vocabulary(counts, smollm2.stop_token_ids)
    drafts = {"q8v": Draft("q8v", [], vocab_size=8192, weight_precision="int8", max_draft_tokens=6)}
    build(
        tmp_path / "a",
        smollm2,
        drafts,
        max_seq_len=256,
        ranked=ranked,
    )
    check_parity(tmp_path / "a", smollm2)
    model = load(tmp_path / "a", draft="q8v")
    for prompt in ids:
        speculative = model.generate(prompt, 64, mode="speculative")
        assert speculative.token_ids == model.generate(prompt, 64, mode="plain").token_ids
        assert speculative.stats.acceptance_rate > 0.5  # an int8 copy of the same model mostly agrees


def test_fp32_activations_are_refused_on_cuda(tiny_folder, tmp_path, monkeypatch):
    """Seen on an H200: fp32 graphs run attention on the CPU under CUDA and go wrong after the prompt."""
    loaded = load_model(str(tiny_folder("llama")))
    build(tmp_path / "a", loaded, {}, dtype="int4")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(
        DeviceError, match="int4 artifact .* cannot run correctly on CUDA: rebuild it with --dtype fp16"
    ):
        load(tmp_path / "a", device="cuda")


def test_activations_are_rounded_per_block_as_the_cpu_kernel_does():
    import torch

    from conflayers_export.export.quantize import round_activations

    # One block whose largest |value| is 127: its scale is 1, so values round to integers, half to even.
    block = torch.tensor([127.0, 0.5, 1.5, -2.5, 3.2, *([0.0] * (BLOCK_SIZE - 5))])
    zeros = torch.zeros(BLOCK_SIZE)  # an all-zero block stays zero
    tail = torch.tensor([0.1, -0.05])  # a last, partial block: its own scale 0.1 / 127
    rounded = round_activations(torch.cat([block, zeros, tail]))
    assert rounded[:5].tolist() == [127.0, 0.0, 2.0, -2.0, 3.0]
    assert not rounded[BLOCK_SIZE : 2 * BLOCK_SIZE].any()
    assert torch.allclose(rounded[-2:], torch.tensor([0.1, -0.05]), rtol=0, atol=0.1 / 254)
