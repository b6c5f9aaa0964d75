"""The streamed build (``build`` reads the model's weights from its safetensors files one tensor at
a time and writes each to weights.bin as the graphs first read it): byte for byte the artifact of
a build from the model in memory. Its peak memory on a 7B-shaped model: scripts/bench_streamed_build.py."""

from __future__ import annotations

import filecmp

import pytest
import torch

from conflayers_export.errors import ModelSourceError
from conflayers_export.models import load_model
from tests.helpers import DRAFT_KINDS, build, write_tiny_folder
from tests.test_architectures import TESTED_ARCHITECTURES


def _same_artifact(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)] == []


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_a_streamed_build_writes_the_artifact_of_an_in_memory_build(model_type, make_tiny, tmp_path):
    model, _ = make_tiny(model_type)
    # bfloat16 shards, as large checkpoints come; both loads widen them to float32 alike
    source = write_tiny_folder(model.to(torch.bfloat16), tmp_path / "hf", max_shard_size="100KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    streamed = load_model(str(source), streamed=True)
    assert streamed.streamed is not None and all(p.is_meta for p in streamed.model.parameters())
    in_memory = load_model(str(source))
    # float, int8 and int4 drafts of an fp16 artifact; an int4 artifact
    for dtype, drafts in (("fp16", DRAFT_KINDS), ("int4", {"skip": [1]})):
        build(tmp_path / f"memory-{dtype}", in_memory, drafts, ranked=range(256), dtype=dtype)
        build(tmp_path / f"streamed-{dtype}", streamed, drafts, ranked=range(256), dtype=dtype)
        _same_artifact(tmp_path / f"memory-{dtype}", tmp_path / f"streamed-{dtype}")


def test_a_streamed_build_of_smollm2_writes_the_in_memory_artifact(smollm2, tmp_path):
    """Real weights, a tied output head, a generation config with its own stop tokens."""
    streamed = load_model("smollm2-135m", streamed=True)
    assert streamed.stop_token_ids == smollm2.stop_token_ids
    drafts = {"skip": [3, 4]}
    build(tmp_path / "memory", smollm2, drafts, dtype="fp32")
    build(tmp_path / "streamed", streamed, drafts, dtype="fp32")
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")


def test_a_streamed_load_names_missing_weights(make_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    source = write_tiny_folder(make_tiny("llama")[0], tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="lack 1 of the model's parameters.*up_proj.*save_pretrained"):
        load_model(str(source), streamed=True)
