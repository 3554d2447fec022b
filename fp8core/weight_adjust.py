"""GPTQ rounding and bias correction applied to the float model before it is encoded to FP8.

Both work on FP8 *linear ops*: a MatMul whose weight is a constant 2-D ``[K, N]`` tensor, or a
Gemm with a constant B (``[K, N]``, or ``[N, K]`` with transB=1). Conv is not covered: GPTQ
would need the im2col rows of every input patch, and bias correction a per-position shift where
padding cuts the kernel.

* ``--weight_rounding gptq``: the weight is replaced by its GPTQ rounding (:mod:`fp8core.gptq`)
  with the plan's format and scale(s); the values are exactly on the FP8 grid, so the encoder's
  round to nearest stores the GPTQ choice. ``H`` is the Gram matrix of the op's input rows.
* ``--bias_correction``: the bias becomes ``b - alpha * E[x] @ (Wq - W) / beta`` (Gemm's alpha and
  beta; 1 for MatMul+Add), so the op's mean output on the calibration data is what it was in
  float (:func:`fp8core.weights.corrected_bias`). The bias is MatMul's following Add with a
  constant of N values (when the Add is the MatMul output's only reader) or Gemm's C of N values;
  ops without such a bias are left as they are. The corrected bias is a new initializer read by
  that op only.

A weight read by anything but this one op is left alone (changing it would change the others).
The model returned is a copy; the input model is untouched.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from fp8core.feature_moments import FeatureMoments
from fp8core.graph import GraphIndex, with_initializers, without_large_initializers
from fp8core.gptq import fp8_grid, gptq_round, output_error
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.weight_options import dequantized_weight
from fp8core.weights import corrected_bias


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """An FP8 MatMul/Gemm with a constant weight, seen as ``y = alpha * x @ W[K, N] + beta * b``."""

    name: str
    input: str  # the activation x
    feature_axis: int  # axis of x holding the K features
    weight: str
    trans_b: bool  # the stored weight is [N, K]
    params: QuantParams
    bias: str | None = None  # constant tensor of N values, or None
    bias_reader: str | None = None  # node that reads the bias (the Add, or the Gemm itself)
    bias_index: int = 0  # input position of the bias on that node
    alpha: float = 1.0
    beta: float = 1.0


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def linear_ops(model: onnx.ModelProto, plans: list[OpPlan]) -> list[LinearOp]:
    """The FP8 ops GPTQ and bias correction apply to, in graph order (module docstring)."""
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for plan in plans:
        if not plan.fp8 or plan.op_type not in ("MatMul", "Gemm"):
            continue
        node = nodes[plan.name]
        weights = [q for q in plan.input("weight") if q.index == 1 and q.params is not None]
        if not weights or index.is_constant(node.input[0]):
            continue
        w = index.constant_tensor(node.input[1])
        if len(w.dims) != 2 or len(index.consumers[node.input[1]]) != 1:
            continue
        n = w.dims[0] if _attr(node, "transB", 0) else w.dims[1]
        bias = reader = None
        bias_index = 0
        if plan.op_type == "Gemm":
            if len(node.input) > 2 and node.input[2] and _n_values(index, node.input[2]) == n:
                bias, reader, bias_index = node.input[2], node.name, 2
        else:
            readers = index.consumers[node.output[0]]
            if len(readers) == 1 and readers[0].op_type == "Add":
                add = readers[0]
                other = 1 if add.input[0] == node.output[0] else 0
                if _n_values(index, add.input[other]) == n and list(index.constant_tensor(add.input[other]).dims)[-1:] == [n]:
                    bias, reader, bias_index = add.input[other], add.name, other
        feature_axis = 0 if plan.op_type == "Gemm" and _attr(node, "transA", 0) else -1
        out.append(LinearOp(plan.name, node.input[0], feature_axis, node.input[1], bool(_attr(node, "transB", 0)),
                            weights[0].params, bias, reader, bias_index,
                            float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))))
    return out


def _n_values(index: GraphIndex, name: str) -> int | None:
    t = index.constant_tensor(name)
    return None if t is None else int(np.prod(t.dims, dtype=np.int64))


def moment_requests(ops: list[LinearOp], gptq: bool, bias_correction: bool) -> dict[str, tuple[int, bool]]:
    """What to capture per op input: (feature axis, Gram matrix needed)."""
    req: dict[str, tuple[int, bool]] = {}
    for op in ops:
        if gptq or (bias_correction and op.bias):
            axis, gram = req.get(op.input, (op.feature_axis, False))
            req[op.input] = (axis, gram or gptq)
    return req


def _grid(op: LinearOp):
    """Round-to-nearest FP8 grid of the op's weight in [K, N] layout (per-channel scales are per column)."""
    p = op.params
    if isinstance(p, RealScaleParams):
        scales = np.asarray(p.scales, np.float32)
        return fp8_grid(p.format, scales if p.axis is not None else scales[0])
    return fp8_grid(p.format, np.float32(2.0 ** p.scale))


def adjust_weights(model: onnx.ModelProto, plans: list[OpPlan], moments: dict[str, FeatureMoments],
                   gptq: bool, bias_correction: bool) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` with GPTQ-rounded weights and/or corrected biases, and one report row per op.

    A row gives, on the calibration rows, the summed squared output error ``tr(dW^T H dW)`` of
    round to nearest and of GPTQ (when the Gram matrix was captured), and the largest bias shift.
    """
    index = GraphIndex(model.graph)
    replaced: dict[str, np.ndarray] = {}  # weight name -> new float values
    new_bias: dict[str, tuple[str, int, np.ndarray]] = {}  # reader node -> (name, input index, values)
    report = []
    for op in linear_ops(model, plans):
        m = moments.get(op.input)
        if m is None or m.count == 0:
            continue
        w_stored = index.constant_value(op.weight)
        w = (w_stored.T if op.trans_b else w_stored).astype(np.float32)
        nearest = dequantized_weight(w_stored, op.params)
        nearest = nearest.T if op.trans_b else nearest
        row = {"op": op.name, "weight": op.weight, "rounding": "nearest"}
        wq = nearest
        if gptq and m.gram is not None:
            wq = gptq_round(w, m.gram, _grid(op))
            row.update(rounding="gptq", output_sq_error_nearest=output_error(w, nearest, m.gram),
                       output_sq_error_gptq=output_error(w, wq, m.gram))
            replaced[op.weight] = (wq.T if op.trans_b else wq).astype(w_stored.dtype)
        if bias_correction and op.bias:
            b = index.constant_value(op.bias)
            shift_free = corrected_bias(w, wq, np.zeros(w.shape[1], np.float32), m.mean)  # = -E[x] @ (Wq - W)
            corrected = b.reshape(-1).astype(np.float64) + op.alpha * shift_free.astype(np.float64) / op.beta
            new_bias[op.bias_reader] = (op.bias, op.bias_index, corrected.astype(b.dtype).reshape(b.shape))
            row.update(bias=op.bias, bias_max_shift=float(np.max(np.abs(corrected - b.reshape(-1)))))
        report.append(row)
    return _with_changes(model, replaced, new_bias), report


def _with_changes(model: onnx.ModelProto, replaced: dict[str, np.ndarray],
                  new_bias: dict[str, tuple[str, int, np.ndarray]]) -> onnx.ModelProto:
    light, large, added = without_large_initializers(model)
    large = [numpy_helper.from_array(replaced[t.name], t.name) if t.name in replaced else t for t in large]
    graph = light.graph
    inits = [numpy_helper.from_array(replaced[t.name], t.name) if t.name in replaced else t for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    for node in graph.node:  # weights held by Constant nodes
        if node.op_type == "Constant" and node.output[0] in replaced:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(replaced[node.output[0]], node.output[0]))
    taken = {t.name for t in graph.initializer} | {t.name for t in large} | {o for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name in new_bias:
            name, i, values = new_bias[node.name]
            fresh, k = f"{name}_bias_corrected", 1
            while fresh in taken:
                fresh, k = f"{name}_bias_corrected_{k}", k + 1
            taken.add(fresh)
            graph.initializer.append(numpy_helper.from_array(values, fresh))
            node.input[i] = fresh
    return with_initializers(light, large, added)
