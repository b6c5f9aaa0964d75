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
def tiny_folder(make_tiny, tmp_path_factory):
    """tiny_folder(model_type, seed=0, **config) -> a Hugging Face folder (weights + a word-level
    tokenizer covering the whole vocabulary), made once per distinct arguments."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folders = {}

    def build(model_type: str, seed: int = 0, **overrides):
        key = (model_type, seed, tuple(sorted(overrides.items())))
        if key not in folders:
            model, _ = make_tiny(model_type, seed, **overrides)
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            model.save_pretrained(folder)
            # Letters are ids 0-25; every other id of the model decodes to "<id>", so any
            # generated sequence has text (26 doubles as the unknown token).
            vocab = {chr(ord("a") + i): i for i in range(26)}
            vocab |= {f"<{i}>": i for i in range(26, model.config.vocab_size)}
            tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<26>"))
            tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
            PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<26>").save_pretrained(folder)
            folders[key] = folder
        return folders[key]

    return build


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (converted once, then read from the cache)."""
    from conflayers_export.models import load_model

    return load_model("smollm2-135m")
