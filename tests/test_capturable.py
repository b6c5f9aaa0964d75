"""Capturable graphs (CUDA artifacts, graph.py): lengths given as a ``seqlens_k`` input and a
constant total, so ONNX Runtime can capture each pass in a CUDA graph. On the CPU they run
uncaptured through the same runtime path; here they must compute what the mask graphs compute and
decode exactly as they do. Capture itself needs a GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conflayers_runtime import DraftConfig, SamplingConfig, TreeConfig
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.errors import ManifestError, SessionOptionError
from conflayers_runtime.manifest import read_manifest
from conflayers_runtime.speculative import generate

from conflayers_export.models import load_model
from tests.helpers import DRAFT_KINDS, build
from tests.test_architectures import TESTED_ARCHITECTURES


@pytest.fixture(scope="module", params=TESTED_ARCHITECTURES)
def fp16_artifact(request, tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fp16-{request.param}") / "a"
    loaded = load_model(str(tiny_folder(request.param)))
    build(folder, loaded, DRAFT_KINDS, max_seq_len=96, ranked=range(256), dtype="fp16")
    return folder, read_manifest(folder)


@pytest.mark.parametrize("draft", list(DRAFT_KINDS))
def test_capturable_graphs_decode_as_the_mask_graphs(fp16_artifact, draft):
    folder, manifest = fp16_artifact
    assert set(manifest.artifacts.capturable) == {"full", "tree.full", *DRAFT_KINDS}
    mask = open_backend(folder, manifest, draft, "cpu", 1, weights="prepacked")
    lengths = open_backend(folder, manifest, draft, "cpu", 1, weights="prepacked", capturable=True)
    assert lengths.sessions[False]._model_path.endswith("capturable.full.onnx")
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 200, 13)]
    # Pass by pass: a prompt, one-token steps of both roles, a verify pass, a rollback.
    for tokens, start, use_draft in [
        (prompt, 0, False),
        (prompt[:1], 13, False),
        (prompt[1:2], 14, True),
        (prompt[2:7], 14, False),
        (prompt[7:8], 16, False),
    ]:
        expected = mask.forward(tokens, start, use_draft).copy()
        np.testing.assert_array_equal(lengths.forward(tokens, start, use_draft), expected)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, top_k=40, seed=5)):
        one = generate(lengths, prompt, 40, sampling, DraftConfig(6, 0.3))
        other = generate(mask, prompt, 40, sampling, DraftConfig(6, 0.3))
        assert one[0] == other[0] and one[1].as_dict() == other[1].as_dict()
    plain, _ = generate(lengths, prompt, 40)
    speculative, stats = generate(lengths, prompt, 40, draft_config=DraftConfig(6, 0.3))
    assert speculative == plain and stats.drafted_tokens > 0


def test_the_capturable_tree_graph_decodes_as_the_mask_tree_graph(fp16_artifact):
    folder, manifest = fp16_artifact
    assert manifest.artifacts.capturable["tree.full"] == "capturable.tree.full.onnx"
    mask = open_backend(folder, manifest, "skip", "cpu", 1, weights="prepacked", tree=True)
    lengths = open_backend(folder, manifest, "skip", "cpu", 1, capturable=True, tree=True)
    assert lengths.sessions[False]._model_path.endswith("capturable.tree.full.onnx")
    prompt = [int(t) for t in np.random.default_rng(6).integers(3, 200, 13)]
    # A prompt, a one-token step, a draft pass, a chain and a tree verify pass (its bias spans the
    # whole cache in the capturable graph), a rollback.
    for tokens, start, use_draft, depths in [
        (prompt, 0, False, None),
        (prompt[:1], 13, False, None),
        (prompt[1:2], 14, True, None),
        (prompt[2:7], 14, False, None),
        (prompt[2:9], 14, False, [0, 1, 2, 3, 4, 1, 3]),
        (prompt[7:8], 16, False, None),
    ]:
        expected = mask.forward(tokens, start, use_draft, depths).copy()
        np.testing.assert_array_equal(lengths.forward(tokens, start, use_draft, depths), expected)
    tree = TreeConfig(4, 2)
    one = generate(lengths, prompt, 40, draft_config=DraftConfig(6, 0.3), tree=tree)
    other = generate(mask, prompt, 40, draft_config=DraftConfig(6, 0.3), tree=tree)
    assert one[0] == other[0] and one[1].as_dict() == other[1].as_dict() and one[1].tree_nodes > 0
    assert one[0] == generate(lengths, prompt, 40, draft_config=None)[0]


# Inputs that CUDA kernels read from host memory: values computed on the host from shapes may flow
# only into these, else ONNX Runtime inserts a copy to the device, which a CUDA graph cannot hold.
# (Constant initializers are no such value: they are placed once, where their consumers read them.)
_HOST_INPUTS = {"Slice": {1, 2, 3, 4}, "Reshape": {1}, "GroupQueryAttention": {6}}


def _host_values_in_device_inputs(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(node, input) pairs where a value computed on the host feeds an input read on the device."""
    constants = {n.name for n in graph.initializer}
    host: set[str] = set()  # values computed on the host
    found = []
    for node in graph.node:  # topological order: a node's host inputs are known before it
        inputs = [i for i in node.input if i]
        computed_on_host = any(i in host for i in inputs) and all(i in host | constants for i in inputs)
        if node.op_type == "Shape" or computed_on_host:
            host.update(node.output)
            continue
        for slot, name in enumerate(node.input):
            if name in host and slot not in _HOST_INPUTS.get(node.op_type, ()):
                found.append((node.name, name))
    return found


def test_capturable_graphs_keep_host_values_out_of_device_inputs(fp16_artifact):
    folder, manifest = fp16_artifact
    for file_name in manifest.artifacts.capturable.values():
        graph = onnx.load(folder / file_name, load_external_data=False).graph
        assert [i.name for i in graph.input[:2]] == ["input_ids", "seqlens_k"]
        assert _host_values_in_device_inputs(graph) == [], file_name
    # The control: the mask graph adds a shape-derived padding to the mask's sum on the device.
    full = onnx.load(folder / manifest.artifacts.full, load_external_data=False).graph
    assert ("/model/mask/Add", "/model/mask/Last/output_0") in _host_values_in_device_inputs(full)


def test_cpu_artifacts_have_no_capturable_graphs(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    assert manifest.artifacts.capturable == {}
    with pytest.raises(ManifestError, match="no capturable graphs.*rebuild"):
        open_backend(folder, manifest, "skip", "cpu", 1, capturable=True)


def test_capturable_graphs_run_in_two_sessions_and_only_when_asked_on_the_cpu(fp16_artifact):
    folder, manifest = fp16_artifact
    with pytest.raises(SessionOptionError, match="two sessions"):
        open_backend(folder, manifest, "skip", "cpu", 1, weights="paired", capturable=True)
    # CPU default for an fp16 artifact: mask graphs in two sessions (its If branch does not compute
    # as full.onnx alone on the CPU, artifact._pairs_by_default)
    default = open_backend(folder, manifest, "skip", "cpu", 1)
    assert not default.paired and not default._seqlens
    older = copy.deepcopy(manifest)
    older.artifacts.capturable = {}  # as read from an artifact built before schema 1.3
    assert not open_backend(folder, older, "skip", "cpu", 1, weights="prepacked")._seqlens
