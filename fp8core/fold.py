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

from fp8core.graph import FP8_OP_TYPES, QUANTIZED_INPUTS, keep_only, nodes_of_type, subgraphs, uses_external_data

NOT_FOLDED = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan",
})


def _constant_sources(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Constants of ``graph`` whose values are in memory, as named TensorProtos."""
    out = {t.name: t for t in graph.initializer if not uses_external_data(t)}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.type == onnx.AttributeProto.TENSOR and not uses_external_data(attr.t):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                out[node.output[0]] = tensor
    return out


def _producers(name: str, producer: dict, constants: dict, stop: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes computing ``name`` from constants only, in order, or None if it depends on
    anything else (a graph input, an external weight, an op that is not folded)."""
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def visit(tensor: str) -> bool:
        if not tensor or tensor in constants or tensor in seen:
            return True
        node = producer.get(tensor)
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
    constants = _constant_sources(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    stop = {i.name for i in graph.input}
    wanted: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes_of_type(graph, FP8_OP_TYPES, bodies=True):
        for i in QUANTIZED_INPUTS[node.op_type]:
            name = node.input[i] if i < len(node.input) else ""
            if name and name not in constants and name in producer and name not in wanted:
                chain = _producers(name, producer, constants, stop)
                if chain:
                    wanted[name] = chain
    if not wanted:
        return []

    # by name (prepare_model names every node): protobuf may hand out a new wrapper per access
    nodes = list({n.name: n for chain in wanted.values() for n in chain}.values())
    order = {n.name: k for k, n in enumerate(graph.node)}
    nodes.sort(key=lambda n: order[n.name])
    needed = {i for n in nodes for i in n.input if i in constants}
    probe = helper.make_model(
        helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=n) for n in wanted],
                          [constants[i] for i in sorted(needed)]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        values = dict(zip(wanted, reference_session(probe).run(list(wanted), {})))
    except Exception:  # onnxruntime cannot compute them apart: the ops quantize their weights at run time
        return []

    # the initializer now defines each folded name: its producer goes, then what only it read
    read = {i for n in nodes for i in n.input}
    candidates = {n.name for n in nodes} | {producer[i].name for i in read if i in producer}  # Constant nodes too
    replaced = {producer[name].name for name in wanted}
    keep_only(graph.node, lambda n: n.name not in replaced)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in wanted)
    _drop_unused(graph, candidates, read)
    return list(wanted)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for _, body in subgraphs(node):
            used |= _used_names(body)  # outer-scope names a body reads
    return used


def _drop_unused(graph: onnx.GraphProto, candidates: set[str], read: set[str]) -> None:
    """Remove the ``candidates`` nodes (by name) whose outputs nothing reads any more, then the
    initializers among ``read`` nothing reads (and, in IR < 4 models, their graph inputs)."""
    while True:
        used = _used_names(graph)
        dead = {n.name for n in graph.node if n.name in candidates and not any(o in used for o in n.output)}
        if not dead:
            break
        keep_only(graph.node, lambda n: n.name not in dead)
    gone = {t.name for t in graph.initializer if t.name in read and t.name not in used}
    keep_only(graph.initializer, lambda t: t.name not in gone)
    keep_only(graph.input, lambda i: i.name not in gone)
