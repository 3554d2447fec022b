"""GPTQ rounding and bias correction applied to the float model before it is encoded to FP8.

Both work on FP8 *linear ops* with a constant weight, seen through :mod:`fp8core.feature_moments`
as ``y[r, g, n] = sum_k rows[r, g, k] W[g, k, n]`` (G groups of K input features, N outputs each):

* MatMul with a constant 2-D ``[K, N]`` weight; Gemm with a constant B (``[K, N]``, or ``[N, K]``
  with transB=1); G = 1.
* Conv (1-D, 2-D or 3-D, any group count incl. depthwise) with a constant weight
  ``[C_out, C_in / G, *kernel]``: rows are the zero-padded input patches (im2col), W is the weight
  viewed as ``[G, C_out / G, K]`` and transposed.

* ``--weight_rounding gptq``: the weight is replaced by its GPTQ rounding (:mod:`fp8core.gptq`),
  group by group, with the plan's format and scale(s); the values are exactly on the FP8 grid, so
  the encoder's round to nearest stores the GPTQ choice. ``H`` is the Gram matrix of the rows.
* ``--bias_correction``: the bias becomes ``b - alpha * E[rows] @ (Wq - W) / beta`` (Gemm's alpha
  and beta; 1 otherwise), so the op's mean output on the calibration data (for Conv: over every
  output position, padded borders included) is what it was in float. The bias is MatMul's
  following Add with a constant of N values (when the Add is the MatMul output's only reader),
  Gemm's C of N values, or Conv's B; ops without one are left as they are. The corrected bias is
  a new initializer read by that op only.

A weight read by anything but this one op is left alone (changing it would change the others).
The model returned is a copy; the input model is untouched.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from fp8core.feature_moments import AUTO_PADS, FeatureMoments, Rows
from fp8core.graph import (FreshNames, GraphIndex, node_attr, replace_constants, walk_graphs, with_initializers,
                           with_value, without_large_initializers)
from fp8core.gptq import fp8_grid, gptq_round_groups
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.scale import Scale
from fp8core.weight_scales import dequantized_weight


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """An FP8 MatMul/Gemm/Conv with a constant weight, ``y = alpha * rows @ W[G, K, N] + beta * b``."""

    name: str
    rows: Rows  # how the op reads its activation input
    weight: str
    layout: str  # how the stored weight maps to [G, K, N]: "kn", "nk" (Gemm transB) or "conv"
    params: QuantParams
    bias: str | None = None  # constant tensor of G * N values, or None
    bias_reader: str | None = None  # node that reads the bias (the Add, or the op itself)
    bias_index: int = 0  # input position of the bias on that node
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def input(self) -> str:
        return self.rows.tensor

    def to_groups(self, stored: np.ndarray) -> np.ndarray:
        """The stored weight as ``[G, K, N]``."""
        if self.layout == "kn":
            return stored[None]
        if self.layout == "nk":
            return stored.T[None]
        g = self.rows.group
        return stored.reshape(g, stored.shape[0] // g, -1).transpose(0, 2, 1)

    def groups_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``[G, K, N]`` of a stored weight of ``shape``, without reading it."""
        if self.layout == "kn":
            return 1, shape[0], shape[1]
        if self.layout == "nk":
            return 1, shape[1], shape[0]
        g = self.rows.group
        return g, int(np.prod(shape[1:])), shape[0] // g

    def from_groups(self, w_gkn: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Back from ``[G, K, N]`` to the stored layout ``shape``."""
        if self.layout == "kn":
            return w_gkn[0]
        if self.layout == "nk":
            return w_gkn[0].T
        return w_gkn.transpose(0, 2, 1).reshape(shape)


def linear_ops(model: onnx.ModelProto, plans: list[OpPlan], if_bodies: bool = False) -> list[LinearOp]:
    """The FP8 ops GPTQ and bias correction apply to, in graph order (module docstring).
    ``if_bodies``: ops inside the branches of ``If`` nodes too, those whose input the branch
    computes (a branch value reaches the capture as it is, or empty when the other branch ran:
    :mod:`fp8core.bodies`; a value of an outer graph is there whichever branch runs); ops inside
    Loop/Scan bodies, whose values come stacked over iterations, are left out."""
    root = GraphIndex(model.graph)
    nodes, indexes, readers = {}, {}, {}
    for g, path in walk_graphs(model.graph):
        for n in g.node:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1
        if path and not (if_bodies and all(holder.op_type == "If" for holder in path)):
            continue
        for n in g.node:
            nodes[n.name] = n
            indexes[n.name] = (g, bool(path))
    body_indexes: dict[int, GraphIndex] = {}
    out = []
    for plan in plans:
        if not plan.fp8 or plan.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        node = nodes.get(plan.name)
        if node is None:  # inside a body left out: its inputs are not top-level tensors; left as it is
            continue
        g, in_body = indexes[plan.name]
        index = body_indexes.setdefault(id(g), root.for_body(g)) if in_body else root
        weights = [q for q in plan.input("weight") if q.index == 1 and q.params is not None]
        if not weights or index.is_constant(node.input[0]):
            continue
        if in_body and node.input[0] not in index.producer:  # an outer value: runs that skip the
            continue  # branch read it too, and its rows would not be this op's
        w = index.constant_tensor(node.input[1])
        if readers.get(node.input[1], 0) != 1:  # a weight shared with another op (anywhere)
            continue
        op = _conv_op(index, node, w, weights[0].params) if plan.op_type == "Conv" else \
            _matmul_op(index, node, plan.op_type, w, weights[0].params)
        if op is not None:
            out.append(op)
    return out


def _matmul_op(index: GraphIndex, node: onnx.NodeProto, op_type: str, w: onnx.TensorProto,
               params: QuantParams) -> LinearOp | None:
    if len(w.dims) != 2:
        return None
    trans_b = bool(node_attr(node, "transB", 0))
    n = w.dims[0] if trans_b else w.dims[1]
    bias = reader = None
    bias_index = 0
    if op_type == "Gemm":
        if len(node.input) > 2 and node.input[2] and _n_values(index, node.input[2]) == n:
            bias, reader, bias_index = node.input[2], node.name, 2
    else:
        readers = index.consumers[node.output[0]]
        if len(readers) == 1 and readers[0].op_type == "Add":
            add = readers[0]
            other = 1 if add.input[0] == node.output[0] else 0
            if _n_values(index, add.input[other]) == n and list(index.constant_tensor(add.input[other]).dims)[-1:] == [n]:
                bias, reader, bias_index = add.input[other], add.name, other
    feature_axis = 0 if op_type == "Gemm" and node_attr(node, "transA", 0) else -1
    return LinearOp(node.name, Rows(node.input[0], feature_axis), node.input[1], "nk" if trans_b else "kn",
                    params, bias, reader, bias_index,
                    float(node_attr(node, "alpha", 1.0)), float(node_attr(node, "beta", 1.0)))


def _conv_op(index: GraphIndex, node: onnx.NodeProto, w: onnx.TensorProto, params: QuantParams) -> LinearOp | None:
    dims = list(w.dims)
    spatial = len(dims) - 2
    group = int(node_attr(node, "group", 1))
    auto_pad = node_attr(node, "auto_pad", "NOTSET") or "NOTSET"
    if not 1 <= spatial <= 3 or group < 1 or dims[0] % group or auto_pad not in AUTO_PADS:
        return None
    kernel = tuple(int(k) for k in (node_attr(node, "kernel_shape", None) or dims[2:]))
    rows = Rows(node.input[0], kernel=kernel,
                strides=tuple(node_attr(node, "strides", None) or [1] * spatial),
                dilations=tuple(node_attr(node, "dilations", None) or [1] * spatial),
                pads=tuple(node_attr(node, "pads", None) or [0] * 2 * spatial),
                auto_pad=auto_pad, group=group)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and _n_values(index, bias) != dims[0]:
        bias = None
    return LinearOp(node.name, rows, node.input[1], "conv", params, bias, node.name if bias else None, 2)


def _n_values(index: GraphIndex, name: str) -> int | None:
    t = index.constant_tensor(name)
    return None if t is None else int(np.prod(t.dims, dtype=np.int64))


def moment_requests(ops: list[LinearOp], gptq: bool, bias_correction: bool) -> dict[str, tuple[Rows, bool]]:
    """What to capture, keyed by :attr:`Rows.key`: (rows, Gram matrices needed)."""
    req: dict[str, tuple[Rows, bool]] = {}
    for op in ops:
        if gptq or (bias_correction and op.bias):
            _, gram = req.get(op.rows.key, (op.rows, False))
            req[op.rows.key] = (op.rows, gram or gptq)
    return req


def _grid(op: LinearOp, groups: int):
    """Round-to-nearest FP8 grid of the op's weight as ``[G, rows, N]`` (per-channel: per column)."""
    p = op.params
    if isinstance(p, RealScaleParams) and p.axis is not None:  # output channel g * N + n at [g, :, n]
        return fp8_grid(p.format, Scale.real(np.asarray(p.scales, np.float32).reshape(groups, 1, -1)))
    return fp8_grid(p.format, p.to_scale())


def corrected_bias(w: np.ndarray, w_quantized: np.ndarray, bias: np.ndarray | None,
                   input_mean: np.ndarray) -> np.ndarray:
    """Bias correction for a ``y = x @ W + b`` layer (MatMul, or Gemm with B as ``[K, N]``).

    Quantizing W shifts the layer's mean output by ``E[x] @ (Wq - W)``; the corrected bias
    ``b - E[x] @ (Wq - W)`` makes the mean output on the calibration data what it was in float.
    ``input_mean`` is ``E[x]`` per input feature (length K), e.g. streamed over calibration
    batches. Conv applies it per group to the mean im2col patch (:mod:`fp8core.weight_adjust`).
    """
    w64 = np.asarray(w, np.float64)
    if w64.ndim != 2 or np.shape(input_mean) != (w64.shape[0],):
        raise ValueError(
            f"bias correction needs a [K, N] weight and a length-K input mean; got {list(w64.shape)} "
            f"and {list(np.shape(input_mean))}")
    shift = np.asarray(input_mean, np.float64) @ (np.asarray(w_quantized, np.float64) - w64)
    b = np.zeros(w64.shape[1]) if bias is None else np.asarray(bias, np.float64)
    return (b - shift).astype(np.float32)


def output_error_groups(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``sum_g tr((W_g - Q_g)^T H_g (W_g - Q_g))``: the summed squared output error over the rows."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


def adjust_weights(model: onnx.ModelProto, plans: list[OpPlan], moments: dict[str, FeatureMoments],
                   gptq: bool, bias_correction: bool) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` with GPTQ-rounded weights and/or corrected biases, and one report row per op.

    A row gives, on the calibration rows, the summed squared output error ``tr(dW^T H dW)`` of
    round to nearest and of GPTQ (when the Gram matrices were captured), and the largest bias shift.
    """
    index = GraphIndex(model.graph)
    replaced: dict[str, np.ndarray] = {}  # weight name -> new float values
    new_bias: dict[str, tuple[str, int, np.ndarray]] = {}  # reader node -> (name, input index, values)
    report = []
    for op in linear_ops(model, plans):
        m = moments.get(op.rows.key)
        if m is None or m.count == 0:
            continue
        w_stored = index.constant_value(op.weight)
        w = op.to_groups(w_stored.astype(np.float32))
        wq = nearest = op.to_groups(dequantized_weight(w_stored, op.params))
        row = {"op": op.name, "op_type": "Conv" if op.layout == "conv" else "MatMul/Gemm",
               "weight": op.weight, "rounding": "nearest"}
        if gptq and m.gram is not None:
            wq = gptq_round_groups(w, m.gram, _grid(op, w.shape[0]))
            row.update(rounding="gptq", output_sq_error_nearest=output_error_groups(w, nearest, m.gram),
                       output_sq_error_gptq=output_error_groups(w, wq, m.gram))
            replaced[op.weight] = op.from_groups(wq, w_stored.shape).astype(w_stored.dtype)
        if bias_correction and op.bias:
            b = index.constant_value(op.bias)
            # -E[rows] @ (Wq - W), group by group: minus the mean output shift FP8 weights add
            shift = np.concatenate([corrected_bias(w[g], wq[g], None, m.mean[g]) for g in range(w.shape[0])])
            corrected = b.reshape(-1).astype(np.float64) + op.alpha * shift.astype(np.float64) / op.beta
            new_bias[op.bias_reader] = (op.bias, op.bias_index, corrected.astype(b.dtype).reshape(b.shape))
            row.update(bias=op.bias, bias_max_shift=float(np.max(np.abs(corrected - b.reshape(-1)))))
        report.append(row)
    return _with_changes(model, replaced, new_bias), report


def _with_changes(model: onnx.ModelProto, replaced: dict[str, np.ndarray],
                  new_bias: dict[str, tuple[str, int, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` whose constants named in ``replaced`` hold the new values, and whose
    nodes named in ``new_bias`` read their bias (input index) from a new initializer of its own."""
    light, large, added = without_large_initializers(model)
    large = [with_value(t, replaced) for t in large]
    graph = light.graph
    fresh = FreshNames(graph)
    for g, _ in walk_graphs(graph):  # weights of ops inside If branches are Constants there
        replace_constants(g, replaced)
        for node in g.node:
            if node.name in new_bias:  # a new initializer of the main graph: branches read outer values
                name, i, values = new_bias[node.name]
                node.input[i] = fresh(f"{name}_bias_corrected")
                graph.initializer.append(numpy_helper.from_array(values, node.input[i]))
    return with_initializers(light, large, added)
