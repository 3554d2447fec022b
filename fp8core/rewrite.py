"""Rewrite a float model into its FP8 QDQ form (SPEC section 3).

* weight of an FP8 op: FP8 initializer -> DequantizeLinear(2**s) -> op (encoded offline, once);
* activation input of an FP8 op: QuantizeLinear(2**s, saturate=1) -> DequantizeLinear -> op;
  with an offset c (:mod:`fp8core.offsets`, non-negative inputs): Sub(x, c) -> Q -> DQ -> op, and
  the op's bias gains c times its FP8 weight summed over its inputs (MatMul: an Add after it);
* op outputs keep their float type; every other op is untouched.

Graph form of the activation Q/DQ, chosen for onnxruntime (see fp8core.runtime):
opset >= 21 writes QuantizeLinear with ``output_dtype`` and no zero point, which onnxruntime's
default optimizations compute correctly around Relu and Clip (the zero-point form trips its
ReluQuantRewrite / ClipQuantRewrite rules). Opset 19-20 has no ``output_dtype``, so there the FP8
zero point is written and the model must be run with :func:`fp8core.runtime.make_session` (which
also disables ``WeightBiasQuantization``, wrong in both forms).
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp8core.errors import first_line
from fp8core.fold import fold_computed_weights
from fp8core import offsets
from fp8core.formats import decode, encode, encode_to_dtype, get_format
from fp8core.graph import (
    MIN_FP8_OPSET,
    FreshNames,
    GraphIndex,
    ModelError,
    assign_node_names,
    assign_subgraph_node_names,
    keep_only,
    names_read,
    node_attr,
    replace_all,
    subgraphs,
    with_initializers,
    without_large_initializers,
    default_opset,
    set_input_shapes,
)
from fp8core.inputs import normalize_dynamic_dims, record_batch_axes
from fp8core.model import Model
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.scale import FLOAT16_EXPONENTS, fits, scale_initializer

DEFAULT_OPSET = 21
OUTPUT_DTYPE_OPSET = 21  # QuantizeLinear gained output_dtype in opset 21


def target_opset(model: onnx.ModelProto, requested: int | None) -> int:
    current = default_opset(model)
    if requested is None:
        return max(current, DEFAULT_OPSET)
    if requested < MIN_FP8_OPSET:
        raise ModelError(f"--convert_version {requested}: FP8 needs opset >= {MIN_FP8_OPSET}; use 19 or higher")
    if requested < current:
        raise ModelError(
            f"--convert_version {requested} is below the model's opset {current}; "
            f"opsets can only be raised, use {max(current, MIN_FP8_OPSET)} or higher"
        )
    return requested


def prepare_model(
    model: onnx.ModelProto,
    opset: int,
    input_shapes: dict[str, list[int]] | None = None,
    batch_axes: dict[str, int | None] | None = None,
    notes: list[str] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with named nodes, fixed input shapes and the target opset.

    Nodes are named before the opset upgrade so that ``OpType_index`` counts the user's graph,
    not nodes the version converter adds. Large initializers are copied once, after the upgrade:
    the version converter serializes and re-parses whatever it is given (ResNet50: +600 MB peak).
    Input dims stored as -1 or 0 become dynamic; ``batch_axes`` (``--input_batch_axis``) is
    recorded in the model (:mod:`fp8core.inputs`); shapes the input model declares but its graph
    does not produce are dropped (:func:`repair_declared_shapes`). What was changed about the
    input model is appended to ``notes``, one line each.
    """
    notes = [] if notes is None else notes
    light, large, added_inputs = without_large_initializers(model)
    assign_node_names(light.graph)
    assign_subgraph_node_names(light.graph)
    for name in normalize_dynamic_dims(light.graph):
        notes.append(f"input {name!r} has dims stored as -1 or 0; they are read as dynamic")
    if input_shapes:
        set_input_shapes(light.graph, input_shapes)
    record_batch_axes(light, batch_axes or {})
    repaired = repair_declared_shapes(light, final=default_opset(light) >= opset)
    if repaired:
        notes.append(repaired)
    if default_opset(light) < opset:
        names = [n.name for n in light.graph.node]
        try:
            light = onnx.version_converter.convert_version(light, opset)
        except Exception as exc:
            first = first_line(exc)
            raise ModelError(
                f"could not upgrade the model from opset {default_opset(light)} to {opset} ({first}); "
                "re-export it with opset >= 19"
            ) from None
        if len(light.graph.node) == len(names):  # keep names if the converter dropped them
            for node, name in zip(light.graph.node, names):
                node.name = node.name or name
        assign_node_names(light.graph)
        assign_subgraph_node_names(light.graph)
        repaired = repair_declared_shapes(light)  # the upgraded ops' stricter inference may see more
        if repaired and repaired not in notes:
            notes.append(repaired)
    prepared = with_initializers(light, large, added_inputs)
    folded = fold_computed_weights(prepared)
    if folded:
        notes.append(f"{len(folded)} Conv/MatMul/Gemm weights computed from constants (e.g. {folded[0]!r}) "
                     "were folded into initializers, so they are stored in FP8")
    return prepared


def repair_declared_shapes(model: onnx.ModelProto, final: bool = True) -> str | None:
    """Make a model whose declared shapes contradict its graph pass the full checker.

    Exporters sometimes write output or value_info shapes their graph does not produce (a CRNN
    declaring a rank-2 output its Reshape makes rank 3). The full checker, which every FP8 model
    must pass, rejects that; it is a defect of the input, not of the conversion, so the declared
    shapes (value_info everywhere, output shapes) are dropped, keeping element types, and shape
    inference works the output shapes out again. Returns a note saying so, or None when nothing
    was wrong. With ``final`` (no opset upgrade follows, whose stricter op versions may infer
    more), raises ModelError when the input still fails the full checker.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        return None
    except Exception as exc:
        first = first_line(exc)
    if "Inferred shape and existing shape differ" not in first and "shape" not in first.lower():
        if not final:
            return None
        raise ModelError(f"the input model fails the full ONNX checker ({first[:200]}); this is a defect of "
                         "the input model, not of the conversion: re-export it") from None
    _drop_value_info(model.graph)
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for out, found in zip(model.graph.output, inferred.graph.output):
            if found.type.tensor_type.HasField("shape"):
                out.type.tensor_type.shape.CopyFrom(found.type.tensor_type.shape)
    except Exception:
        pass
    if final:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            again = first_line(exc)
            raise ModelError(f"the input model fails the full ONNX checker ({again[:200]}); this is a defect of "
                             "the input model, not of the conversion: re-export it") from None
    if "Field 'shape'" in first:
        return None  # only our own clearing of a shape (first pass) was seen
    return f"the input model declares shapes its graph does not produce ({first[:160]}); they were dropped"


def _drop_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for _, body in subgraphs(node):
            _drop_value_info(body)


def _scale_tensor(name: str, p: QuantParams, elem_type: int) -> onnx.TensorProto:
    """The scale initializer of ``p`` in the op's float type (:mod:`fp8core.scale`'s storage rules)."""
    if not isinstance(p, RealScaleParams) and not fits(p.scale, elem_type):
        raise ModelError(
            f"scale {p.scale} is not representable in float16 (this op is float16); "
            f"use a scale in {FLOAT16_EXPONENTS.start}..{FLOAT16_EXPONENTS.stop - 1}"
        )
    return scale_initializer(name, p.to_scale(), elem_type)


def _zero_point(name: str, fmt: str) -> onnx.TensorProto:
    return helper.make_tensor(name, get_format(fmt).onnx_type, [], [0.0])


def _drop_unread_body_constants(nodes: list[onnx.NodeProto], used: set[str]) -> None:
    """Constant nodes and initializers of If/Loop/Scan bodies that nothing reads any more (weights
    now stored in FP8) are removed from the bodies."""
    for node in nodes:
        for _, body in subgraphs(node):
            keep_only(body.node, lambda n: not (n.op_type == "Constant" and n.output[0] not in used))
            keep_only(body.initializer, lambda t: t.name in used)
            _drop_unread_body_constants(list(body.node), used)


def _params_suffix(p: QuantParams) -> str:
    return f"{p.format}_s{p.scale}".replace("-", "m")


WeightKey = tuple[str, QuantParams]


def weights_to_encode(plans: list[OpPlan]) -> list[WeightKey]:
    """Every distinct (weight tensor, params) pair the plan stores in FP8, in graph order."""
    keys: list[WeightKey] = []
    for plan in plans:
        if plan.fp8:
            for q in plan.input("weight"):
                if q.params is not None and (q.tensor, q.params) not in keys:
                    keys.append((q.tensor, q.params))
    return keys


def encode_weights(model: Model | onnx.ModelProto, plans: list[OpPlan]) -> dict[WeightKey, np.ndarray]:
    """FP8 bytes (uint8) of every weight the plan quantizes, encoded once on the CPU.

    Streaming: one weight at a time is read (from the proto, or from its external data file),
    encoded and dropped, so memory holds the FP8 result plus one float weight.
    """
    index = Model.of(model).index()
    encoded: dict[WeightKey, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for tensor, params in weights_to_encode(plans):
            value = index.constant_value(tensor)
            encoded[(tensor, params)] = _encode_in_chunks(value, params, pool)
            del value  # free the float copy before reading the next weight
    return encoded


ENCODE_CHUNK_ELEMENTS = 1 << 20


def _encode_in_chunks(value: np.ndarray, p: QuantParams, pool: ThreadPoolExecutor) -> np.ndarray:
    """``encode(value)``, element by element the same, computed in 1M-element slices on all cores
    (numpy and ml_dtypes release the GIL), each slice's float32 temporary freed as it finishes."""
    scale = p.to_scale()
    if scale.axis is not None:  # per-channel scales: one pass
        return encode(value, p.format, scale)
    flat = np.ascontiguousarray(value).reshape(-1)
    if flat.size <= ENCODE_CHUNK_ELEMENTS:
        return encode(value, p.format, scale)
    out = np.empty(flat.size, np.uint8)

    def one(start: int) -> None:
        stop = start + ENCODE_CHUNK_ELEMENTS
        encode_to_dtype(flat[start:stop], p.format, scale, out=out[start:stop])

    list(pool.map(one, range(0, flat.size, ENCODE_CHUNK_ELEMENTS)))
    return out.reshape(value.shape)


def rewrite_to_fp8(
    model: Model | onnx.ModelProto,
    plans: list[OpPlan],
    encoded: dict[WeightKey, np.ndarray] | None = None,
    switches: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Return the FP8 QDQ form of a prepared model (see :func:`prepare_model`); the model is untouched.

    ``switches`` (FP8 op name -> name of a new scalar bool graph input): those ops read
    ``Where(input, original, dequantized)`` for each quantized input, so one session measures
    any set of them kept in original precision (fp8core.fallback.Trials); not for saving.

    ``encoded`` holds weights already encoded by :func:`encode_weights`; missing ones are encoded
    here (read from the model's external data when they are there). Each entry is removed from
    ``encoded`` once it is copied into the new model, so the FP8 bytes are held once, not twice.
    Weights kept in float that live in external data stay references to the model's folder:
    ``Model.derive`` the result to save or run it.
    """
    encoded = {} if encoded is None else encoded
    model = Model.of(model)
    source = model.index()  # read-only: the float weights
    model, large, added_inputs = without_large_initializers(model.proto)  # float weights are not copied
    graph = model.graph
    opset = default_opset(model)
    min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, min_ir, 9)  # IR 9 introduced the FP8 types
    if opset < MIN_FP8_OPSET:
        raise ModelError(f"model opset {opset} < {MIN_FP8_OPSET}: call prepare_model first")
    use_output_dtype = opset >= OUTPUT_DTYPE_OPSET
    index = GraphIndex(graph)
    fresh = FreshNames(graph)
    by_name = {p.name: p for p in plans if p.fp8}

    new_inits: list[onnx.TensorProto] = []
    stored: dict[tuple[str, QuantParams], tuple[str, str]] = {}  # FP8 initializer and scale of a weight
    fp8_tensors: dict[str, onnx.TensorProto] = {}  # FP8 weight initializers by name (an offset reads them back)

    def weight_dq(tensor: str, p: QuantParams, elem_type: int, done: dict) -> list[onnx.NodeProto]:
        real = isinstance(p, RealScaleParams)
        base = f"{tensor}_{_params_suffix(p)}"
        if (tensor, p) not in stored:  # encoded and stored once, even when read in several bodies
            data = encoded.pop((tensor, p), None)
            if data is None:
                value = source.constant_value(tensor)
                data = encode(value, p.format, p.to_scale())
                del value
            q_name, s_name = fresh(f"{base}_fp8"), fresh(f"{base}_scale")
            q = numpy_helper.from_array(np.asarray(data, dtype=np.uint8), q_name)
            del data
            q.data_type = get_format(p.format).onnx_type  # reinterpret the uint8 bytes as FP8
            scale = _scale_tensor(s_name, p, elem_type)
            new_inits.extend([q, scale])
            stored[(tensor, p)] = (q_name, s_name)
            fp8_tensors[q_name] = q
        q_name, s_name = stored[(tensor, p)]
        out = fresh(f"{base}_dq")
        done[(tensor, p)] = out
        axis = {"axis": p.axis} if real and p.axis is not None else {}  # per-channel: 1-D scale along axis
        return [helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=fresh(f"{base}_DequantizeLinear"),
                                 **axis)]

    def new_constant(base: str, value, elem_type: int) -> str:
        """A fresh initializer holding ``value`` in the op's float type; returns its name."""
        name = fresh(base)
        new_inits.append(numpy_helper.from_array(np.asarray(value).astype(helper.tensor_dtype_to_np_dtype(elem_type)),
                                                 name))
        return name

    def activation_qdq(tensor: str, p: QuantParams, elem_type: int, done: dict) -> list[onnx.NodeProto]:
        base = f"{tensor}_{_params_suffix(p)}"
        s_name, q_out, out = fresh(f"{base}_scale"), fresh(f"{base}_q"), fresh(f"{base}_dq")
        new_inits.append(_scale_tensor(s_name, p, elem_type))
        fmt = get_format(p.format)
        nodes, rounded = [], tensor
        if p.offset:  # x - c is rounded; the op adds c back through its bias (fold_offset)
            c = new_constant(f"{base}_offset", p.offset, elem_type)
            rounded = fresh(f"{base}_shifted")
            nodes.append(helper.make_node("Sub", [tensor, c], [rounded], name=fresh(f"{base}_Sub")))
        if use_output_dtype:
            q = helper.make_node("QuantizeLinear", [rounded, s_name], [q_out], name=fresh(f"{base}_QuantizeLinear"),
                                 saturate=1, output_dtype=fmt.onnx_type)
            dq = helper.make_node("DequantizeLinear", [q_out, s_name], [out], name=fresh(f"{base}_DequantizeLinear"))
        else:
            zp = fresh(f"{base}_zero_point")
            new_inits.append(_zero_point(zp, p.format))
            q = helper.make_node("QuantizeLinear", [rounded, s_name, zp], [q_out], name=fresh(f"{base}_QuantizeLinear"),
                                 saturate=1)
            dq = helper.make_node("DequantizeLinear", [q_out, s_name, zp], [out], name=fresh(f"{base}_DequantizeLinear"))
        nodes += [q, dq]
        if p.offset and switches:  # a switchable model adds c back here, so a kept op reads x itself
            plus = fresh(f"{base}_dq_plus_offset")
            nodes.append(helper.make_node("Add", [out, c], [plus], name=fresh(f"{base}_Add")))
            out = plus
        done[(tensor, p)] = out
        return nodes

    def fold_offset(node: onnx.NodeProto, plan: OpPlan, graph_index: GraphIndex) -> list[onnx.NodeProto]:
        """Make ``node``, which reads ``x - c`` rounded, compute ``op(x)``: ``c * sum_K W`` of its
        FP8 weight into its constant bias, or an Add after it (fp8core.offsets). Returns the Add."""
        act = plan.input("activation")[0]
        weight = plan.input("weight")[0]
        if not offsets.allowed(node, plan, graph_index):
            raise ModelError(f"op {node.name!r} cannot take an activation offset (fp8core.offsets.allowed)")
        fp8_weight = fp8_tensors[stored[(weight.tensor, weight.params)][0]]
        fp8_bytes = np.frombuffer(fp8_weight.raw_data, np.uint8).reshape(tuple(fp8_weight.dims))
        w = decode(fp8_bytes, weight.params.format, weight.params.to_scale())
        term = offsets.output_term(node, w, act.params.offset)
        bias_at = 2 if node.op_type in ("Conv", "Gemm") else None
        has_bias = bias_at is not None and len(node.input) > bias_at and node.input[bias_at]
        if bias_at is not None and (not has_bias or graph_index.is_constant(node.input[bias_at])):
            if node.op_type == "Gemm":
                term = term / float(node_attr(node, "beta", 1.0))
            else:
                term = term.reshape(-1)
            old = graph_index.constant_value(node.input[bias_at]).astype(np.float64) if has_bias else 0.0
            while len(node.input) <= bias_at:
                node.input.append("")
            node.input[bias_at] = new_constant(f"{node.name}_bias_with_offset", old + term, plan.elem_type)
            return []
        name = new_constant(f"{node.name}_offset_term", term, plan.elem_type)
        before = fresh(f"{node.output[0]}_before_offset")
        after = helper.make_node("Add", [before, name], [node.output[0]], name=fresh(f"{node.name}_offset_Add"))
        node.output[0] = before
        return [after]

    def rewritten(body: onnx.GraphProto, graph_index: GraphIndex) -> list[onnx.NodeProto]:
        """The graph's nodes with Q/DQ inserted before its FP8 ops, bodies of If/Loop/Scan rewritten
        the same way in place (their Q/DQ nodes live in the body; FP8 weights and scales are
        top-level initializers, which bodies can read)."""
        done: dict[tuple[str, QuantParams], str] = {}  # (tensor, params) -> its dequantized name here
        nodes: list[onnx.NodeProto] = []
        for node in body.node:
            plan = by_name.get(node.name)
            if plan is not None:
                if node.op_type != plan.op_type:
                    raise ModelError(f"plan names {plan.name!r} as {plan.op_type} but the model has {node.op_type}")
                node = copy.deepcopy(node)
                # Weight DQs first: onnxruntime's default order (a reverse DFS from the outputs that
                # takes the higher-numbered input producer first) then runs each weight DQ right
                # before its op, not all of them up front, which would hold every weight in float
                # at once (1 GB model: validation peak 0.81 GB this way, 1.21 GB up front).
                for q in sorted(plan.inputs, key=lambda q: q.role != "weight"):
                    if q.params is None:
                        continue
                    key = (q.tensor, q.params)
                    if key not in done:
                        make = weight_dq if q.role == "weight" else activation_qdq
                        nodes.extend(make(q.tensor, q.params, plan.elem_type, done))
                    node.input[q.index] = done[key]
                    if switches and node.name in switches:
                        chosen = fresh(f"{node.input[q.index]}_or_float")
                        nodes.append(helper.make_node("Where", [switches[node.name], q.tensor, done[key]], [chosen],
                                                      name=fresh(f"{node.name}_keep_switch")))
                        node.input[q.index] = chosen
                if not switches and any(q.params is not None and q.params.offset for q in plan.inputs):
                    nodes.append(node)
                    nodes.extend(fold_offset(node, plan, graph_index))
                    continue
            elif any(True for _ in subgraphs(node)):
                node = copy.deepcopy(node)
                for _, sub in subgraphs(node):
                    replace_all(sub.node, rewritten(sub, source.for_body(sub)))
            nodes.append(node)
        return nodes

    nodes = rewritten(graph, source)

    # Originals of weights now stored as FP8 go when nothing else reads them, subgraphs included
    # (an If/Loop body may read an outer-scope initializer by name).
    still_used = names_read(nodes) | {o.name for o in graph.output}
    kept_nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] not in still_used)]
    _drop_unread_body_constants(kept_nodes, still_used)
    kept_inits = [t for t in list(graph.initializer) + large if t.name in still_used]
    graph_input_names = {t.name for t in graph.initializer} | {t.name for t in large}
    replace_all(graph.node, kept_nodes)
    replace_all(graph.initializer, kept_inits + new_inits)
    for op, flag in sorted((switches or {}).items(), key=lambda kv: kv[1]):
        graph.input.append(helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
    # IR<4 models list initializers as inputs too: drop the ones that are gone.
    gone = (graph_input_names - {t.name for t in graph.initializer}) | added_inputs
    keep_only(graph.input, lambda i: i.name not in gone)
    # value_info of removed weights would be stale
    keep_only(graph.value_info, lambda v: v.name in still_used or v.name in index.producer)
    return model
