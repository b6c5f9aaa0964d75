"""One session over the paired graph (the full model and a draft as If branches, export/paired.py):
the same tokens and statistics as two sessions, with every weight in memory once."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
from conflayers_runtime import DraftConfig, SamplingConfig
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.errors import ManifestError
from conflayers_runtime.speculative import generate

from conflayers_export.models import load_model
from tests.helpers import DRAFT_KINDS, build, write_tiny_folder


@pytest.mark.parametrize("draft", list(DRAFT_KINDS))
def test_one_paired_session_decodes_as_two_sessions(draft_kinds_artifact, draft):
    folder, manifest = draft_kinds_artifact
    paired = open_backend(folder, manifest, draft, "cpu", 1, weights="paired")
    two = open_backend(folder, manifest, draft, "cpu", 1, weights="prepacked")
    assert paired.paired and not two.paired
    # The CPU default: one session where the draft reads the full graph's weights, two where it
    # reads its own quantized copies (one session would save nothing and add its If's cost).
    assert open_backend(folder, manifest, draft, "cpu", 1).paired == (draft == "skip")
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 200, 9)]
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, top_k=40, seed=5)):
        for config in (DraftConfig(6, 0.3), None):
            one = generate(paired, prompt, 40, sampling, config)
            other = generate(two, prompt, 40, sampling, config)
            assert one[0] == other[0] and one[1].as_dict() == other[1].as_dict()


def test_paired_mode_needs_a_paired_graph(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    with pytest.raises(ManifestError, match="has no paired graph for draft None.*rebuild"):
        open_backend(folder, manifest, None, "cpu", 1, weights="paired")
    manifest = copy.deepcopy(manifest)
    manifest.artifacts.paired = {}  # as read from an artifact built before schema 1.2
    assert not open_backend(folder, manifest, "skip", "cpu", 1).paired  # two sessions then


PSS = """
import sys, conflayers_runtime as rt
def pss_mb():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
folder, draft, weights = sys.argv[1], sys.argv[2] or None, sys.argv[3]
base = pss_mb()
model = rt.load(folder, draft=draft, weights=weights, verify=False, threads=1)
model.generate("abcdefgh", 24, chat=False, mode="plain" if draft is None else "speculative")
print(pss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS is read from /proc")
def test_a_paired_layer_skip_draft_holds_the_weights_once(make_tiny, tmp_path):
    """A ~40 MB random llama with a draft skipping one of 8 layers: the paired session holds about
    the full graph's memory (<= 1.2x), two sessions clearly more (the control)."""
    model, _ = make_tiny(
        "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=1024, vocab_size=8192
    )
    loaded = load_model(str(write_tiny_folder(model, tmp_path / "hf")))
    build(tmp_path / "a", loaded, {"skip": [3]}, max_seq_len=64)

    def pss(draft: str, weights: str) -> float:
        run = [sys.executable, "-c", PSS, str(tmp_path / "a"), draft, weights]
        return float(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    full = pss("", "prepacked")
    assert pss("skip", "paired") <= 1.2 * full
    assert pss("skip", "prepacked") >= 1.4 * full  # measured 57, 60 and 89 MB
