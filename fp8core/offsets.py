"""Activation offsets: a non-negative activation is rounded to FP8 as ``x - c``, and the op adds
``c`` back through its weight (``--activation_offset``).

Why. E4M3 has 3 mantissa bits at every magnitude, so its absolute error grows with the value: a
ReLU6 output near 6 is rounded in steps of 0.5, INT8 over [0, 6] in steps of 0.024. Rounding
``x - c`` instead puts the values that carry the error nearer 0, where the steps are finer, while
``x = 0`` (most of a ReLU output) becomes ``-c``, which is on the FP8 grid, so exact. On the 31
ReLU6 inputs of EfficientNet-Lite0 that can take one, SQNR rises by 1.7-7.9 dB (median 4.1) from
31-33 dB (``benchmarks/activation_offset_effect.py``).

How the graph carries it (zero point stays 0, as FP8 hardware wants it): ``Sub(x, c)`` ->
QuantizeLinear -> DequantizeLinear -> op, and since the op is linear in that input,
``op(x) = op(x - c) + c * sum_K W``: the op's bias takes ``c`` times the sum of its *FP8* weight
over the inputs each output reads (Conv, Gemm: the bias; MatMul: an Add after it). That is exact
only where every output reads the same number of inputs, hence the rules of :func:`allowed`: a
constant weight at input 1, the activation at input 0, and a Conv without implicit padding
(explicit Pad nodes, as TensorFlow-style exports write, are fine).

How ``c`` is chosen, per tensor: only tensors whose calibration minimum is >= 0 (every ReLU,
ReLU6, sigmoid output); candidates ``k/16`` of the maximum (k = 1..8) rounded to 2 significant
bits, so that ``-c`` is an FP8 value at the tensor's scale; each candidate's squared rounding error
is estimated from the statistics' bins (:func:`estimated_sq_error`), and one that lowers the error
by at least :data:`MIN_GAIN` replaces ``c = 0``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from fp8core.graph import GraphIndex, node_attr, walk_graphs
from fp8core.plan import OpPlan, QuantParams
from fp8core.stats import TensorStats

CANDIDATE_FRACTIONS = tuple(k / 16 for k in range(1, 9))
MIN_GAIN = 0.1
"""An offset must lower the estimated squared error by at least this share (0.46 dB): a smaller
gain is within the estimate's accuracy and not worth the Sub node."""
POINTS_PER_BIN = 8


def allowed(node: onnx.NodeProto, plan: OpPlan, index: GraphIndex) -> bool:
    """Whether ``node`` can take an offset on its activation input (module docstring)."""
    acts = plan.input("activation")
    weights = plan.input("weight")
    if not plan.fp8 or len(acts) != 1 or acts[0].index != 0 or len(weights) != 1 or weights[0].index != 1:
        return False
    if not index.is_constant(weights[0].tensor):
        return False
    rank = len(index.constant_tensor(weights[0].tensor).dims)
    if node.op_type == "Conv":
        pads = node_attr(node, "pads", None) or []
        return (node_attr(node, "auto_pad", "NOTSET") or "NOTSET") in ("NOTSET", "VALID") and not any(pads)
    if node.op_type == "Gemm":
        return rank == 2
    return node.op_type == "MatMul" and rank >= 2


def output_term(node: onnx.NodeProto, weight: np.ndarray, c: float) -> np.ndarray:
    """``op(x) - op(x - c)``: ``c`` times the (dequantized FP8) weight summed over the inputs of
    each output, float64, shaped to add to the op's output (Conv: ``[1, M, 1, ...]``, Gemm:
    ``[N]`` with alpha applied, MatMul: ``[..., 1, N]``)."""
    w = np.asarray(weight, np.float64)
    if node.op_type == "Conv":
        return (c * w.reshape(w.shape[0], -1).sum(axis=1)).reshape((1, w.shape[0]) + (1,) * (w.ndim - 2))
    if node.op_type == "Gemm":
        summed = w.sum(axis=1) if node_attr(node, "transB", 0) else w.sum(axis=0)
        return float(node_attr(node, "alpha", 1.0)) * c * summed
    return c * w.sum(axis=-2, keepdims=True)


def estimated_sq_error(stats: TensorStats, params: QuantParams, offset: float) -> float:
    """Sum of squared rounding errors of the tensor's values rounded as ``x - offset``.

    The bins hold each part's count, mean and spread, not the values: edge parts are exact
    points; an interior part is taken as :data:`POINTS_PER_BIN` points spread evenly with its mean
    and variance. Every candidate (``offset = 0`` too) is estimated the same way, so they compare
    on equal terms."""
    b = stats.binned_values()
    if b.key.size == 0:
        return 0.0
    n = b.count.astype(np.float64)
    mean_dev = b.sum_dev / n
    spread = np.sqrt(np.maximum(b.sum_dev_sq / n - mean_dev ** 2, 0.0) * 3.0)
    u = (2 * np.arange(POINTS_PER_BIN) + 1) / POINTS_PER_BIN - 1.0
    points = (b.reference + mean_dev)[:, None] + spread[:, None] * u[None, :]
    shifted = (points - offset).astype(np.float32)
    err = params.round_trip(shifted).astype(np.float64) - shifted.astype(np.float64)
    return float(np.sum(n[:, None] / POINTS_PER_BIN * err ** 2))


def candidates(maximum: float) -> list[float]:
    """Offsets tried for a tensor in ``[0, maximum]``: ``k/16`` of it with 2 significant bits."""
    out = []
    for f in CANDIDATE_FRACTIONS:
        v = maximum * f
        if v <= 0 or not np.isfinite(v):
            continue
        e = np.floor(np.log2(v))
        c = float(np.round(v / 2.0 ** (e - 1)) * 2.0 ** (e - 1))
        if c not in out:
            out.append(c)
    return out


def best_offset(stats: TensorStats, params: QuantParams) -> float:
    """The offset for a tensor with these statistics and FP8 params (module docstring), or 0."""
    if stats.count == 0 or stats.min < 0 or not stats.max > 0:
        return 0.0
    base = estimated_sq_error(stats, params, 0.0)
    best, best_err = 0.0, base * (1.0 - MIN_GAIN)
    for c in candidates(stats.max):
        if not params.round_trip(np.float32([-c]))[0] == np.float32(-c):  # zero must stay exact
            continue
        err = estimated_sq_error(stats, params, c)
        if err < best_err:
            best, best_err = c, err
    return best


def with_offsets(model: onnx.ModelProto, plans: list[OpPlan], stats: dict[str, TensorStats]) -> list[OpPlan]:
    """Copies of ``plans`` whose activation inputs carry the offset :func:`best_offset` finds,
    for tensors that every FP8 reader can take it on (:func:`allowed`)."""
    nodes = {n.name: (n, g, bool(path)) for g, path in walk_graphs(model.graph) for n in g.node}
    root = GraphIndex(model.graph)
    indexes: dict[int, GraphIndex] = {}
    ok: dict[str, bool] = {}
    for plan in plans:
        if not plan.fp8:
            continue
        node, g, in_body = nodes[plan.name]
        index = indexes.setdefault(id(g), root.for_body(g)) if in_body else root
        can = allowed(node, plan, index)
        for q in plan.input("activation"):
            ok[q.tensor] = ok.get(q.tensor, True) and can and q.params is not None
    chosen: dict[tuple[str, QuantParams], float] = {}
    out = []
    for plan in plans:
        plan = dataclasses.replace(plan, inputs=[dataclasses.replace(q) for q in plan.inputs])
        for q in plan.input("activation"):
            if plan.fp8 and ok.get(q.tensor) and q.tensor in stats:
                key = (q.tensor, q.params)
                if key not in chosen:
                    chosen[key] = best_offset(stats[q.tensor], q.params)
                if chosen[key]:
                    q.params = dataclasses.replace(q.params, offset=chosen[key])
        out.append(plan)
    return out
