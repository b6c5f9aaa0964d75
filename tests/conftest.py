"""Shared fixtures: tiny random models for every architecture, and the packaged SmolLM2."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(model_type, **config_overrides) -> (model, architecture), seeded and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from conflayers_export.architectures import get_architecture

    def build(model_type: str, seed: int = 0, **overrides):
        architecture = get_architecture(model_type)
        config = architecture.tiny_config()
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval(), architecture

    return build


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (converted once, then read from the cache)."""
    from conflayers_export.models import load_model

    return load_model("smollm2-135m")
