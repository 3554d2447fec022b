"""Values computed inside If/Loop/Scan bodies, made visible as model outputs for capture.

onnxruntime can only return top-level values, but real models (a voice-activity detector whose
whole network sits in the branches of an ``If`` on the sample rate) compute their Conv/MatMul
inputs inside bodies. :func:`expose_values` threads each wanted body value out, level by level:

* a body of an ``If`` gains an output (through an ``Identity``), the other branch an output of
  an empty tensor of the same type, and the ``If`` a new output: the taken branch's value, or
  an empty tensor when the other branch ran (its statistics add nothing);
* a ``Loop`` or ``Scan`` body gains a scan output: the node returns the value of every iteration
  stacked on a new axis, which holds exactly the values the op saw.

Nothing else changes: the added outputs are only read by the capture session.
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper

from fp8core.errors import FP8Error
from fp8core.graph import tensor_elem_types, walk_graphs


class BodyValueError(FP8Error):
    """A value inside the body of a node other than If, Loop and Scan (the model's structure):
    it cannot be made visible. A name missing from the model is the caller's mistake (the names
    come from the model), a plain ValueError."""


def top_level_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def expose_values(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` (or ``model`` itself when every name is top-level) in which each name
    is readable as a top-level value, and ``{name: the top-level name to read it by}``."""
    top = top_level_names(model.graph)
    inner = [n for n in names if n not in top]
    mapping = {n: n for n in names if n in top}
    if not inner:
        return model, mapping
    model = copy.deepcopy(model)
    types = tensor_elem_types(model)
    where = _producing_graphs(model.graph)
    used = {n for g, _ in walk_graphs(model.graph) for node in g.node for n in list(node.output) + [node.name]}
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{base}__exposed{counter[0]}"
            if name not in used:
                used.add(name)
                return name

    for name in inner:
        if name not in where:
            raise ValueError(f"tensor {name!r} is produced nowhere in the model")
        body, path = where[name]
        elem = types.get(name, onnx.TensorProto.FLOAT)
        current = name
        for holder_index in range(len(path) - 1, -1, -1):
            holder = path[holder_index]
            current = _lift(holder, body, current, elem, fresh)
            body = where_graph(model.graph, path[:holder_index + 1])
        mapping[name] = current
    return model, mapping


def where_graph(root: onnx.GraphProto, path) -> onnx.GraphProto:
    """The graph that holds the last node of ``path`` (the root for an empty path)."""
    if not path:
        return root
    holder = path[-1]
    for g, _ in walk_graphs(root):
        if any(n.name == holder.name and list(n.output) == list(holder.output) for n in g.node):
            return g
    raise ValueError(f"node {holder.name!r} is not in the model")


def _producing_graphs(root: onnx.GraphProto) -> dict[str, tuple[onnx.GraphProto, tuple[onnx.NodeProto, ...]]]:
    """``{value: (the body defining it, the chain of nodes holding that body)}`` for body values."""
    found = {}
    for g, path in walk_graphs(root):
        if not path:
            continue
        for vi in g.input:
            found[vi.name] = (g, path)
        for node in g.node:
            for out in node.output:
                found[out] = (g, path)
    return found


def _lift(holder: onnx.NodeProto, body: onnx.GraphProto, value: str, elem: int, fresh) -> str:
    """Make ``value`` of ``body`` (an attribute graph of ``holder``) an output of ``holder``;
    returns the holder's new output name (a value of the graph that holds ``holder``)."""
    inner_out = fresh(value)
    body.node.append(helper.make_node("Identity", [value], [inner_out], name=fresh(f"{value}_Identity")))
    body.output.append(helper.make_tensor_value_info(inner_out, elem, None))
    if holder.op_type == "If":
        for attr in holder.attribute:
            if attr.HasField("g") and inner_out not in {o.name for o in attr.g.output}:
                empty = fresh(f"{value}_empty")
                attr.g.node.append(helper.make_node(
                    "Constant", [], [empty], name=fresh(f"{value}_Constant"),
                    value=helper.make_tensor(f"{empty}_value", elem, [0], [])))
                attr.g.output.append(helper.make_tensor_value_info(empty, elem, None))
    elif holder.op_type == "Scan":
        for attr in holder.attribute:
            if attr.name in ("scan_output_axes", "scan_output_directions") and attr.ints:
                attr.ints.append(0)
    elif holder.op_type != "Loop":
        raise BodyValueError(f"{holder.op_type} node {holder.name!r}: values inside its body cannot be captured")
    outer = fresh(value)
    holder.output.append(outer)
    return outer
