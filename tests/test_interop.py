"""The full graph runs unmodified in onnxruntime-genai, with the same greedy tokens as PyTorch."""

from __future__ import annotations

import pytest
import torch

from conflayers_export.export.build import build_artifact, hand_draft, manifest_for_build

og = pytest.importorskip("onnxruntime_genai", reason="interop extra not installed: pip install -e .[interop]")

pytestmark = pytest.mark.real_model


def test_onnxruntime_genai_generates_what_pytorch_generates(smollm2, tmp_path):
    folder = tmp_path / "smol"
    build_artifact(
        folder,
        smollm2,
        manifest_for_build(folder, smollm2, [hand_draft("mid3", [14, 15, 16])]),
        max_seq_len=256,
    )
    ids = smollm2.encode("Write a short poem about the sea.")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    x = torch.tensor([ids])
    with torch.no_grad():
        out = smollm2.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids) :].tolist()
    assert len(tokens) == 32 and tokens == expected
