"""Shared fixtures: tiny random models for every architecture, and the packaged SmolLM2."""

from __future__ import annotations

import pytest

from tests.test_architectures import TESTED_ARCHITECTURES


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(model_type, **config_overrides) -> (model, architecture), seeded and in eval mode."""
    from tests.helpers import tiny_model

    return tiny_model


@pytest.fixture(scope="session")
def tiny_folder(make_tiny, tmp_path_factory):
    """tiny_folder(model_type, seed=0, **config) -> a Hugging Face folder (weights + a word-level
    tokenizer covering the whole vocabulary), made once per distinct arguments."""
    from tests.helpers import write_tiny_folder

    folders = {}

    def build(model_type: str, seed: int = 0, **overrides):
        key = (model_type, seed, tuple(sorted(overrides.items())))
        if key not in folders:
            model, _ = make_tiny(model_type, seed, **overrides)
            folder = write_tiny_folder(model, tmp_path_factory.mktemp(f"tiny-{model_type}"))
            folders[key] = folder
        return folders[key]

    return build


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (converted once, then read from the cache)."""
    from conflayers_export.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session", params=TESTED_ARCHITECTURES)
def draft_kinds_artifact(request, tiny_folder, tmp_path_factory):
    """(folder, manifest) of a tiny artifact of each architecture with tests.helpers.DRAFT_KINDS,
    built once for the whole run: tests read it (and edit copies of it), never change it."""
    from conflayers_runtime.manifest import read_manifest

    from conflayers_export.models import load_model
    from tests.helpers import DRAFT_KINDS, build

    folder = tmp_path_factory.mktemp(f"kinds-{request.param}") / "a"
    build(folder, load_model(str(tiny_folder(request.param))), DRAFT_KINDS, max_seq_len=96, ranked=range(256))
    return folder, read_manifest(folder)
