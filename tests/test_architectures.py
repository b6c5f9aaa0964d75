"""The adapter registry: every adapter has a tiny config and is tested; bypass is exact and undone."""

from __future__ import annotations

import pytest
import torch

from conflayers_export.errors import UnsupportedArchitectureError
from conflayers_export.models.architectures import bypassed, get_architecture, registered

# Every architecture the parity tests run. The guard below fails when an adapter is registered
# without being added here.
TESTED_ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"]


def test_every_registered_architecture_is_tested():
    untested = set(registered()) - set(TESTED_ARCHITECTURES)
    assert not untested, f"add a parity test for {sorted(untested)} (TESTED_ARCHITECTURES)"


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_tiny_config_builds_a_model_of_that_type(make_tiny, model_type):
    model, architecture = make_tiny(model_type)
    assert model.config.model_type == model_type
    layout = architecture.kv_layout(model.config)
    assert layout.num_layers == len(architecture.decoder_layers(model)) == 4
    assert layout.num_kv_heads == 2 and layout.head_dim == 16
    attention, mlp = architecture.blocks(architecture.decoder_layers(model)[1])
    assert isinstance(attention, torch.nn.Module) and isinstance(mlp, torch.nn.Module)


def test_gemma3_layout_keeps_its_sliding_windows(make_tiny):
    model, architecture = make_tiny("gemma3_text")
    assert architecture.kv_layout(model.config).sliding_windows == (8, 8, None, 8)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama.*phi3"):
        get_architecture("gpt2")


def test_bypass_is_the_identity_on_the_residual_and_is_undone(make_tiny):
    model, architecture = make_tiny("llama")
    layers = architecture.decoder_layers(model)
    originals = list(layers)
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        full = model(x).logits
        with bypassed(model, architecture, [1, 2]):
            skipped = model(x).logits
            # Reference: run the kept layers by hand, passing the residual through 1 and 2.
            manual = _run_layers_by_hand(model, x, keep=[0, 3])
        again = model(x).logits
    assert list(layers) == originals
    torch.testing.assert_close(again, full)
    torch.testing.assert_close(skipped, manual)
    assert not torch.allclose(skipped, full)


def _run_layers_by_hand(model, input_ids, keep):
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    cos_sin = inner.rotary_emb(hidden, position_ids=positions)
    for i in keep:
        hidden = inner.layers[i](
            hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=positions
        )
    return model.lm_head(inner.norm(hidden))
