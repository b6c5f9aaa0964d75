"""One graph for the full model and a draft: the two as branches of an If, over shared weights.

Two ONNX Runtime sessions each load and prepack the weights their graph reads, so a layer-skip
draft held beside the full graph doubles most of the memory (measured on SmolLM2: 1.78x the full
graph alone). In one session, ONNX Runtime prepacks an initializer once however many nodes read
it, nodes inside If branches reading it from the outer scope included (measured with one 64 MB
weight read by one node, two nodes, and the two branches of an If: 73 MB each time). So the
paired graph keeps every weight in its outer scope and runs

    If(use_draft) then: the draft's nodes   else: the full graph's nodes

with the same inputs (input_ids, attention_mask, every layer's past_key_values) and outputs
(logits, next_token_ids, top_probability, every layer's present). A layer the draft skips passes
its cache through (Identity of a bound buffer onto itself); the full branch's top_probability is
zeros (only a draft's stop rule reads it). The branch graphs are the very graphs build wrote for
``full.onnx`` and ``draft.<name>.onnx``, with their values renamed apart, so both paths compute
the same rows (tests/test_paired.py checks equal outputs and statistics).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

USE_DRAFT = "use_draft"  # the bool scalar input that picks the branch
OUTPUTS = ("logits", "next_token_ids", "top_probability")


def paired_graph(full: onnx.ModelProto, draft: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The If model of ``full`` and ``draft`` (graphs as build made them, weights external)."""
    presents = [o.name for o in full.graph.output if o.name.startswith("present.")]
    declared = {o.name: o for o in full.graph.output}
    types = {n: o.type.tensor_type.elem_type for n, o in declared.items()} | {
        "top_probability": TensorProto.FLOAT
    }
    initializers = {t.name: t for t in full.graph.initializer}
    clashes = {}  # draft initializers named like one of the full graph's, with other contents
    for tensor in draft.graph.initializer:
        known = initializers.get(tensor.name)
        if known is None:
            initializers[tensor.name] = tensor
        elif known.SerializeToString() != tensor.SerializeToString():  # e.g. a pruned head's width
            clashes[tensor.name] = "draft:" + tensor.name
            initializers[clashes[tensor.name]] = _renamed(tensor, clashes[tensor.name])
    node = helper.make_node(
        "If",
        [USE_DRAFT],
        [*OUTPUTS, *presents],
        name="/paired/If",
        then_branch=_branch(draft.graph, "draft:", presents, types, clashes),
        else_branch=_branch(full.graph, "full:", presents, types, {}),
    )
    outputs = [
        declared.get(n) or helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence"])
        for n in (*OUTPUTS, *presents)
    ]
    # A pruned draft's logits are narrower than the full graph's: the width is left open.
    outputs[0] = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", "width"])
    inputs = [*full.graph.input, helper.make_tensor_value_info(USE_DRAFT, TensorProto.BOOL, [])]
    graph = helper.make_graph([node], name, inputs, outputs, list(initializers.values()))
    model = helper.make_model(graph, opset_imports=list(full.opset_import), producer_name="conflayers-export")
    model.ir_version = full.ir_version
    # The logits width of each branch, which the If's output cannot declare (a runtime sizes its
    # output buffers from these).
    for role, source in (("full", full), ("draft", draft)):
        logits = next(o for o in source.graph.output if o.name == "logits")
        width = logits.type.tensor_type.shape.dim[-1].dim_value
        model.metadata_props.add(key=f"{role}_logits_width", value=str(width))
    return model


def _branch(
    graph: onnx.GraphProto, prefix: str, presents: list[str], types: dict[str, int], clashes: dict[str, str]
) -> onnx.GraphProto:
    """``graph``'s nodes as an If branch: values renamed with ``prefix`` (outer-scope inputs and
    weights keep their names, but for ``clashes``), outputs in the paired order."""
    renamed = {o: prefix + o for n in graph.node for o in n.output if o} | clashes
    nodes = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.name = prefix + original.name
        del node.input[:], node.output[:]
        node.input.extend(renamed.get(i, i) for i in original.input)
        node.output.extend(renamed.get(o, o) for o in original.output)
        nodes.append(node)
    produced = {o.name for o in graph.output}
    outputs = []
    for name in (*OUTPUTS, *presents):
        if name not in produced:
            nodes += _stand_in(name, prefix, renamed)
        outputs.append(helper.make_tensor_value_info(renamed.get(name, prefix + name), types[name], None))
    return helper.make_graph(nodes, prefix + "branch", [], outputs)


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _stand_in(name: str, prefix: str, renamed: dict[str, str]) -> list[onnx.NodeProto]:
    """An output this branch's graph lacks: a skipped layer's cache, passed through, or the full
    graph's top_probability, zeros shaped like next_token_ids."""
    if name.startswith("present."):
        return [helper.make_node("Identity", [name.replace("present.", "past_key_values.")], [prefix + name])]
    shape = prefix + "next_token_ids/Shape"
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    return [
        helper.make_node("Shape", [renamed["next_token_ids"]], [shape]),
        helper.make_node("ConstantOfShape", [shape], [prefix + name], value=zero),
    ]
