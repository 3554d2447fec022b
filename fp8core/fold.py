"""Weights computed from constants, folded into initializers before planning.

A Conv/MatMul/Gemm weight is stored in FP8 only when it is a constant (initializer or Constant
node). Some exports compute it from constants instead: the ONNX model zoo's opset-9 graphs as the
onnx wheel ships them fill every weight with ``ConstantOfShape``; others ``Cast`` a float16
initializer, ``Transpose``/``Reshape`` a stored one, or pass a shared weight through
``Identity``. Left as they are, such an op quantizes its float weight at every run (a weight
QuantizeLinear in the FP8 graph, nothing stored in FP8). Folded here, the weight is an ordinary
initializer: the rest of the pipeline sees nothing special.

Only what feeds an FP8-capable input is folded, and only when everything it depends on is a
constant of the main graph held in memory (weights still in external data are left alone:
streaming exists not to load them). The values are what onnxruntime computes for those nodes in
the original model (a session with every optimization off, the reference the tool checks
against): folding changes no output. Random, quantizing and control-flow ops are never folded.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from fp8core.graph import (
    FP8_OP_TYPES,
    QUANTIZED_INPUTS,
    GraphIndex,
    keep_only,
    names_read,
    nodes_of_type,
    subgraphs,
    uses_external_data,
)

NOT_FOLDED = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan",
})


def _in_memory_constant(index: GraphIndex, name: str) -> onnx.TensorProto | None:
    """The constant ``name`` (initializer or Constant node) as a TensorProto named ``name``, or
    None when it is no constant or its data is still in an external file."""
    tensor = index.constant_tensor(name)
    if tensor is None or uses_external_data(tensor):
        return None
    if tensor.name != name:  # a Constant node's value attribute
        named = onnx.TensorProto()
        named.CopyFrom(tensor)
        named.name = name
        tensor = named
    return tensor


def _producers(name: str, index: GraphIndex, stop: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes computing ``name`` from in-memory constants only, in order, or None if it depends
    on anything else (a graph input, an external weight, an op that is not folded)."""
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def visit(tensor: str) -> bool:
        if not tensor or tensor in seen:
            return True
        if index.is_constant(tensor):
            return _in_memory_constant(index, tensor) is not None
        node = index.producer.get(tensor)
        if node is None or tensor in stop or node.op_type in NOT_FOLDED or node.domain not in ("", "ai.onnx") \
                or subgraphs(node):
            return False
        if not all(visit(i) for i in node.input):
            return False
        seen.update(node.output)
        nodes.append(node)
        return True

    return nodes if visit(name) else None


def fold_computed_weights(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, every FP8-capable input of a Conv/MatMul/Gemm (bodies included) that the
    main graph computes from constants alone by an initializer of its value; the nodes only it
    used go. Returns the names folded."""
    from fp8core.runtime import reference_session  # onnxruntime: the values the model computes

    graph = model.graph
    index = GraphIndex(graph)
    stop = {i.name for i in graph.input}
    wanted: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes_of_type(graph, FP8_OP_TYPES, bodies=True):
        for i in QUANTIZED_INPUTS[node.op_type]:
            name = node.input[i] if i < len(node.input) else ""
            if name and not index.is_constant(name) and name in index.producer and name not in wanted:
                chain = _producers(name, index, stop)
                if chain:
                    wanted[name] = chain
    if not wanted:
        return []

    # by name (prepare_model names every node): protobuf may hand out a new wrapper per access
    nodes = list({n.name: n for chain in wanted.values() for n in chain}.values())
    order = {n.name: k for k, n in enumerate(graph.node)}
    nodes.sort(key=lambda n: order[n.name])
    read = {i for n in nodes for i in n.input if i}
    probe = helper.make_model(
        helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=n) for n in wanted],
                          [_in_memory_constant(index, i) for i in sorted(read) if index.is_constant(i)]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        values = dict(zip(wanted, reference_session(probe).run(list(wanted), {})))
    except Exception:  # onnxruntime cannot compute them apart: the ops quantize their weights at run time
        return []

    # the initializer now defines each folded name: its producer goes, then what only it read
    producers = {n.name for n in nodes} | {index.producer[i].name for i in read if i in index.producer}
    replaced = {index.producer[name].name for name in wanted}
    keep_only(graph.node, lambda n: n.name not in replaced)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in wanted)
    _drop_unread(graph, producers, read)
    return list(wanted)


def _drop_unread(graph: onnx.GraphProto, candidates: set[str], read: set[str]) -> None:
    """Remove the ``candidates`` nodes (by name) whose outputs nothing reads any more, then the
    initializers among ``read`` nothing reads (and, in IR < 4 models, their graph inputs)."""
    while True:
        used = names_read(graph.node) | {o.name for o in graph.output}
        dead = {n.name for n in graph.node if n.name in candidates and not any(o in used for o in n.output)}
        if not dead:
            break
        keep_only(graph.node, lambda n: n.name not in dead)
    gone = {t.name for t in graph.initializer if t.name in read and t.name not in used}
    keep_only(graph.initializer, lambda t: t.name not in gone)
    keep_only(graph.input, lambda i: i.name not in gone)
