"""`build` and `validate`: paired graphs over one weights file, in-place KV caches, proven parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conflayers_runtime import (
    DraftConfig,
    GenerationError,
    ManifestError,
    SkipSetError,
    generate,
    read_manifest,
)
from conflayers_runtime.artifact import open_backend, verify_files

from conflayers_export.cli import main
from conflayers_export.errors import BuildError
from conflayers_export.export import build as build_module
from conflayers_export.export.build import manifest_for_build
from conflayers_export.export.validate import TOLERANCE, check_parity
from conflayers_export.models import load_model
from tests.helpers import build
from tests.test_architectures import TESTED_ARCHITECTURES


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_folder, tmp_path_factory):
    """model_type -> (artifact folder, loaded model), built once per architecture."""
    built = {}

    def get(model_type):
        if model_type not in built:
            loaded = load_model(str(tiny_folder(model_type)))
            folder = tmp_path_factory.mktemp(f"artifact-{model_type}")
            build(folder, loaded, {"mid": [1, 2], "one": [2]})
            built[model_type] = folder, loaded
        return built[model_type]

    return get


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_full_and_draft_graphs_match_pytorch_step_by_step(tiny_artifacts, model_type):
    folder, loaded = tiny_artifacts(model_type)
    results = check_parity(folder, loaded)  # raises ParityError on any failure
    paired = {
        f"{tree}paired.{d}/{role}"
        for tree in ("", "tree.")
        for d in ("mid", "one")
        for role in ("full", "draft")
    }
    assert {r.graph for r in results} == {"full", "tree.full", "draft.mid", "draft.one", *paired}
    assert len(results) == 12 * 6 and all(r.argmax_equal for r in results)
    assert max(r.max_abs_diff for r in results) <= TOLERANCE["fp32"]


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_onnx_speculative_greedy_equals_pytorch_greedy(tiny_artifacts, model_type):
    folder, loaded = tiny_artifacts(model_type)
    prompt = [5, 17, 3, 9, 10, 7, 8, 9, 10, 11, 12]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False, eos_token_id=None
        )
    expected = out[0, len(prompt) :].tolist()
    manifest = read_manifest(folder)
    for draft in ("mid", "one"):
        backend = open_backend(folder, manifest, draft)
        tokens, stats = generate(backend, prompt, 40, draft_config=DraftConfig())
        assert tokens == expected, draft
        assert stats.cycles > 0
    plain, _ = generate(open_backend(folder, manifest), prompt, 40, draft_config=None)
    assert plain == expected


def _external_entries(model):
    tensors = [t for t in model.graph.initializer if t.external_data]
    return {t.name: {e.key: e.value for e in t.external_data} for t in tensors}


def test_weights_are_stored_once_and_drafts_point_into_them(tiny_artifacts):
    folder, loaded = tiny_artifacts("llama")
    full = onnx.load(folder / "full.onnx", load_external_data=False)
    entries = _external_entries(full)
    for name in ("draft.mid.onnx", "draft.one.onnx"):
        draft_entries = _external_entries(onnx.load(folder / name, load_external_data=False))
        assert draft_entries and all(entries[n] == e for n, e in draft_entries.items()), name
        assert len(draft_entries) < len(entries)
        assert {e["location"] for e in draft_entries.values()} == {"weights.bin"}
    one_copy = sum(p.numel() * p.element_size() for p in loaded.model.parameters())  # tied: counted once
    rope = 2 * 64 * 8 * 4  # cos and sin tables, [max_seq_len, head_dim / 2] fp32
    assert (folder / "weights.bin").stat().st_size <= 1.02 * (one_copy + rope) + 4096 * len(entries)


@pytest.mark.real_model
def test_smollm2_artifact_size_and_parity(smollm2, tmp_path):
    manifest = build(tmp_path / "smol", smollm2, {"mid3": [14, 15, 16]}, max_seq_len=256)
    files = manifest.artifacts.files
    one_copy = sum(p.numel() * p.element_size() for p in smollm2.model.parameters())
    tokenizer = sum(f.size for n, f in files.items() if n.startswith(("tokenizer", "chat_template")))
    assert sum(f.size for f in files.values()) <= 1.02 * one_copy + tokenizer
    results = check_parity(tmp_path / "smol", smollm2)
    assert max(r.max_abs_diff for r in results) <= TOLERANCE["fp32"]


def test_a_failed_build_leaves_the_existing_artifact_untouched(tiny_folder, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_folder("qwen2")))
    folder = tmp_path / "art"
    build(folder, loaded, {"mid": [1, 2]})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build_module, "attach_external", broken)
    with pytest.raises(OSError, match="disk full"):
        build(folder, loaded, {"other": [1]})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "temporary folder left behind"


def test_a_damaged_file_is_reported_by_name(tiny_artifacts, tmp_path):
    folder, _ = tiny_artifacts("mistral")
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    data = bytearray((copy / "weights.bin").read_bytes())
    data[5000] ^= 0xFF
    (copy / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="weights.bin does not match its sha256.*conflayers-export build"):
        verify_files(copy, read_manifest(copy))
    (copy / "draft.mid.onnx").unlink()
    with pytest.raises(ManifestError, match="draft.mid.onnx is missing"):
        verify_files(copy, read_manifest(copy))


def test_a_manifest_for_another_model_is_refused(tiny_artifacts, tiny_folder):
    folder, _ = tiny_artifacts("llama")
    other = load_model(str(tiny_folder("qwen2")))
    with pytest.raises(ManifestError, match="made for another model.*pass the matching --model"):
        manifest_for_build(folder, other)


@pytest.mark.parametrize(
    "skip, error",
    [([0], "invalid layers \\[0\\]"), ([3], "invalid layers \\[3\\]"), ([9], "invalid layers \\[9\\]")],
)
def test_bad_skip_sets_are_refused(tiny_folder, tmp_path, skip, error):
    loaded = load_model(str(tiny_folder("llama")))
    with pytest.raises(SkipSetError, match=error):
        build(tmp_path / "art", loaded, {"bad": skip})
    assert not (tmp_path / "art").exists()


def test_unsupported_dtype_is_refused(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("llama")))
    with pytest.raises(BuildError, match="unsupported dtype 'int3'"):
        build(tmp_path / "art", loaded, {}, dtype="int3")


def test_too_long_sequence_is_refused_by_the_backend(tiny_artifacts):
    folder, _ = tiny_artifacts("llama")
    backend = open_backend(folder, read_manifest(folder))
    with pytest.raises(GenerationError, match="exceeds the artifact's max_seq_len 64.*--max-seq-len"):
        backend.forward(list(range(65)), 0, use_draft=False)


def test_cli_build_and_validate(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "art"
    argv = [
        "build",
        str(folder),
        "--model",
        str(tiny_folder("phi3")),
        "--skip",
        "1,2",
        "--max-seq-len",
        "64",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["drafts"] == ["manual"] and "weights.bin" in result["files"]
    assert main(["validate", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(
        "ok: hashes match; 7 graph(s)"
    )  # full, tree.full, draft.manual, paired.manual and tree.paired.manual as both
    manifest = read_manifest(folder)
    assert manifest.artifacts.layers["manual"] == [0, 3]
    np.testing.assert_array_equal(manifest.draft("manual").skip_layers, [1, 2])
    # A newer minor version's field: read past, and listed by validate.
    data = json.loads((folder / "manifest.json").read_text())
    data["schema_version"], data["drafts"][0]["source"] = "1.99", "model"
    (folder / "manifest.json").write_text(json.dumps(data))
    assert main(["validate", str(folder)]) == 0
    assert "does not read, ignored: drafts[0].source" in capsys.readouterr().out


def test_the_manifest_reads_back_to_the_json_build_wrote(tiny_folder, tmp_path):
    """Typed on read, the same JSON on write: drivers in other languages read that JSON."""
    from conflayers_runtime.manifest import Draft

    loaded = load_model(str(tiny_folder("llama")))
    drafts = {"mid": [1, 2], "v": Draft("v", [1], 64, "int8")}
    build(tmp_path / "a", loaded, drafts, ranked=range(255, -1, -1))
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest = read_manifest(tmp_path / "a")
    assert manifest.to_dict() == on_disk
    section = on_disk["artifacts"]
    assert list(section) == [
        *("dtype", "max_seq_len", "weights", "full", "drafts", "draft_vocab", "paired", "capturable"),
        *("tree", "quantization", "kv"),
        *("layers", "weights_index", "graph_weights", "inputs", "outputs", "tokenizer", "files"),
    ]
    dtype, shape, _, length = section["weights_index"][section["draft_vocab"]["v"]]  # a 4-item list
    assert (dtype, shape, length) == ("int64", [64], 64 * 8)
    assert set(section["files"]["weights.bin"]) == {"size", "sha256"}
    assert on_disk["calibration"]["vocabulary"] == {"ranked_token_ids": list(range(255, -1, -1))}
    assert manifest.artifacts.weights_index[manifest.artifacts.draft_vocab["v"]].length == 64 * 8


def test_the_minimal_example_driver_reproduces_greedy_output(tiny_artifacts, tiny_folder, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conflayers_runtime.manifest import Draft

    # A plain layer-skip draft, and a pruned int8 draft (the driver maps its columns to ids).
    loaded = load_model(str(tiny_folder("llama")))
    build(tmp_path / "p", loaded, {"one": Draft("one", [1], 64, "int8")}, ranked=range(255, -1, -1))
    for folder in (tiny_artifacts("qwen3")[0], tmp_path / "p"):
        prompt = [5, 17, 3, 9, 10, 7]
        expected, _ = generate(open_backend(folder, read_manifest(folder)), prompt, 24, draft_config=None)
        driver = Path(__file__).parent.parent / "examples" / "driver.py"
        args = [sys.executable, str(driver), str(folder), ",".join(map(str, prompt)), "--draft", "one"]
        result = subprocess.run([*args, "--new-tokens", "24"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected


def test_fp16_graphs_match_pytorch_within_the_stated_tolerance(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder("gemma3_text")))
    build(tmp_path / "fp16", loaded, {"mid": [1, 2]}, dtype="fp16")
    results = check_parity(tmp_path / "fp16", loaded)
    assert max(r.max_abs_diff for r in results) <= TOLERANCE["fp16"]


def test_an_output_head_equal_to_the_embeddings_is_stored_once(make_tiny, tmp_path):
    from conflayers_export.export.graph import build_graph
    from conflayers_export.export.weights import weights_file

    model, architecture = make_tiny("llama")
    for copy_embeddings in (False, True):
        if copy_embeddings:
            with torch.no_grad():
                model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        with weights_file(tmp_path / "weights.bin") as store:
            build_graph(model, architecture, range(4), "fp32", 32, store, "full")
        assert ("lm_head.weight" in store) is not copy_embeddings
