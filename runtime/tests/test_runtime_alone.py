"""The runtime installed alone (``pip install "./runtime[cpu]"`` in a fresh virtual environment,
scripts/test.sh): an undeclared dependency fails here. The artifact is built beforehand by the
exporter (``python -m tests.helpers OUT``) and named by $CONFLAYERS_TEST_ARTIFACT."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import conflayers_runtime as rt
import pytest


@pytest.fixture(scope="module")
def artifact() -> Path:
    folder = os.environ.get("CONFLAYERS_TEST_ARTIFACT")
    if not folder or not (Path(folder) / rt.MANIFEST_NAME).is_file():
        pytest.fail("set CONFLAYERS_TEST_ARTIFACT to a tiny artifact: python -m tests.helpers OUT")
    return Path(folder)


def test_nothing_heavy_is_installed():
    for name in ("torch", "transformers", "onnx", "conflayers_export"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed beside the runtime"


def test_token_trees_decode_the_plain_text(artifact):
    model = rt.load(artifact, draft="mid", tree=rt.TreeConfig(nodes=3, width=2))
    plain = model.generate("abcdefg", 40, chat=False, mode="plain")
    speculative = model.generate("abcdefg", 40, chat=False, mode="speculative")
    assert speculative.token_ids == plain.token_ids and speculative.stats.tree_nodes > 0


@pytest.mark.parametrize("draft", ["mid", "int8"])
def test_greedy_speculation_equals_plain_decoding(artifact, draft):
    model = rt.load(artifact, draft=draft)
    plain = model.generate("abcdefg", 40, chat=False, mode="plain")
    speculative = model.generate("abcdefg", 40, chat=False, mode="speculative")
    assert speculative.token_ids == plain.token_ids and len(plain.token_ids) == 40
    assert speculative.stats.drafted_tokens > 0


def test_seeded_sampling_repeats(artifact):
    model = rt.load(artifact, draft="mid")
    config = rt.SamplingConfig(temperature=0.9, top_p=0.95, seed=3)
    first = model.generate("abc", 24, chat=False, mode="speculative", sampling=config).token_ids
    assert model.generate("abc", 24, chat=False, mode="speculative", sampling=config).token_ids == first


def test_command_line(artifact):
    args = [sys.executable, "-m", "conflayers_runtime.cli", str(artifact), "--prompt", "abc"]
    result = subprocess.run(
        [*args, "--no-chat", "--max-new-tokens", "8", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_tokens"] == 8


def test_a_damaged_artifact_is_refused(artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.write(b"\0\1\2\3")
    with pytest.raises(rt.ManifestError, match="weights.bin does not match its sha256"):
        rt.load(copy)
