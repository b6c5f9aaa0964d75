"""``onnx.checker`` over the graphs ``build`` writes, with ONNX Runtime's contrib ops declared.

The graphs use ops ONNX itself does not define: GroupQueryAttention, MatMulNBits and
SkipSimplifiedLayerNormalization in the com.microsoft domain, which the checker leaves to the
runtime that registers that domain, and SimplifiedLayerNormalization, which ONNX Runtime registers
in the default ONNX domain (as onnxruntime-genai's models use it), where the checker looks every op
up. Its schema is declared here as ONNX Runtime defines it (contrib_defs.cc: since version 1, inputs
X and scale, outputs Y and the optional inv_std_var; attributes axis, epsilon, stash_type), so
the checker verifies each such node like any other instead of refusing the graph.

Graphs are checked by path: their weights stay in the external data file, which the checker finds
by its relative location and never loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.defs import OpSchema

from ..errors import ConflayersError

_OPTIONAL = OpSchema.FormalParameterOption.Optional
_TENSORS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


class GraphCheckError(ConflayersError):
    """A graph of the artifact is not a valid ONNX model."""


def _simplified_layer_norm() -> OpSchema:
    return OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        inputs=[
            OpSchema.FormalParameter("X", "T"),
            OpSchema.FormalParameter("scale", "V"),
        ],
        outputs=[
            OpSchema.FormalParameter("Y", "V"),
            OpSchema.FormalParameter("inv_std_var", "U", param_option=_OPTIONAL),
        ],
        type_constraints=[
            ("T", _TENSORS, "input types"),
            ("U", ["tensor(float)", "tensor(double)"], "the stashed statistics' type"),
            ("V", _TENSORS, "output and scale types"),
        ],
        attributes=[
            OpSchema.Attribute("axis", onnx.helper.make_attribute("axis", -1), "first normalized axis"),
            OpSchema.Attribute("epsilon", onnx.helper.make_attribute("epsilon", 1e-5), "variance offset"),
            OpSchema.Attribute("stash_type", onnx.helper.make_attribute("stash_type", 1), "statistics' type"),
        ],
    )


def _declare_contrib_ops() -> None:
    """Register the default-domain contrib schemas once per process."""
    if not onnx.defs.has("SimplifiedLayerNormalization"):
        onnx.defs.register_schema(_simplified_layer_norm())


def check_graph(path: str | os.PathLike[str]) -> None:
    """Run ``onnx.checker.check_model`` with shape inference (full_check) on one graph file."""
    _declare_contrib_ops()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphCheckError(
            f"{path} is not a valid ONNX model ({exc}); rebuild it with `conflayers-export build`"
        ) from exc


def check_graphs(folder: str | os.PathLike[str]) -> list[Path]:
    """Check every .onnx file of an artifact folder; returns the files checked."""
    graphs = sorted(Path(folder).glob("*.onnx"))
    for graph in graphs:
        check_graph(graph)
    return graphs
