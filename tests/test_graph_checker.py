"""Every graph ``build`` writes is a valid ONNX model for ``onnx.checker`` (full check, shape
inference included), with ONNX Runtime's default-domain contrib op declared (export/checker.py)."""

from __future__ import annotations

import onnx
import pytest

from conflayers_export.export.checker import GraphCheckError, check_graph, check_graphs
from conflayers_export.models import load_model
from tests.helpers import build


def test_every_graph_of_a_cpu_artifact_passes_the_checker(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    checked = {path.name for path in check_graphs(folder)}
    section = manifest.artifacts
    # full, drafts, paired and tree graphs, each form
    expected = {section.full, *section.drafts.values(), *section.paired.values(), *section.tree.values()}
    assert expected <= checked


@pytest.mark.parametrize("dtype", ["fp16", "int4", "int4-fp16"])
def test_every_graph_of_each_dtype_passes_the_checker(tiny_folder, tmp_path, dtype):
    loaded = load_model(str(tiny_folder("llama")))
    drafts = {"skip": [1]}
    if dtype == "fp16":
        from conflayers_runtime.manifest import Draft

        drafts |= {"q": Draft("q", [], weight_precision="int4")}
    manifest = build(tmp_path / "a", loaded, drafts, dtype=dtype)
    checked = {path.name for path in check_graphs(tmp_path / "a")}
    assert {*manifest.artifacts.capturable.values(), *manifest.artifacts.drafts.values()} <= checked
    assert manifest.artifacts.full in checked


def test_a_malformed_contrib_node_is_caught(draft_kinds_artifact, tmp_path):
    """Control: the declared schema makes the checker verify SimplifiedLayerNormalization nodes
    (here one without its scale input), and a dangling input is caught as in any graph."""
    folder, manifest = draft_kinds_artifact
    model = onnx.load(str(folder / manifest.artifacts.full), load_external_data=False)
    norm = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
    del norm.input[1]
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError, match="bad.onnx is not a valid ONNX model.*rebuild"):
        check_graph(tmp_path / "bad.onnx")

    model = onnx.load(str(folder / manifest.artifacts.full), load_external_data=False)
    model.graph.node[3].input[0] = "no_such_tensor"
    onnx.save(model, str(tmp_path / "dangling.onnx"))
    with pytest.raises(GraphCheckError, match="dangling.onnx"):
        check_graph(tmp_path / "dangling.onnx")
