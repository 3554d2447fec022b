"""Real-valued FP8 weight scales in a plan: ``--weight_granularity per_channel`` and ``--scale_kind float``.

Rules (scale choice per channel, candidates, tie-break: :mod:`fp8core.weights`):

* ``per_channel``: one real scale per output channel of a Conv/MatMul/Gemm weight
  (:func:`fp8core.weights.output_channel_axis`: Conv 0, MatMul last axis, Gemm 0 with transB=1
  else 1), written as ``DequantizeLinear(fp8, scales[C], axis)``.
* ``per_tensor`` with ``scale_kind float``: the same search with the whole weight as one channel,
  written as ``DequantizeLinear(fp8, scale)`` with a real scalar scale.
* The format is chosen among ``formats`` by the loss of the whole weight (every channel encoded
  with its own scale); ties go to the earlier format in ``formats``.
* A float16 op stores its scales in float16, so the scales are rounded to float16 (and kept at
  or above float16's smallest normal, 2**-14) before the weight is encoded with them.
* Activations keep the per-tensor power-of-two scales: the binned search statistics
  (:mod:`fp8core.stats`) are binned per power of two, so a real scale's loss cannot be
  evaluated exactly from them.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import numpy_helper

from fp8core.formats import encode_to_dtype, get_format
from fp8core.graph import node_attr
from fp8core.losses import get_loss
from fp8core.model import Model
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.weights import WeightQuantizationError, output_channel_axis, quantize_per_channel

GRANULARITIES = ("per_tensor", "per_channel")
SCALE_KINDS = ("pow2", "float")
FLOAT16_SMALLEST_NORMAL = 2.0 ** -14


def uses_real_scales(granularity: str, scale_kind: str) -> bool:
    """Whether weights get :class:`RealScaleParams` (anything but PopRT's per-tensor power of two)."""
    if granularity not in GRANULARITIES:
        raise WeightQuantizationError(f"weight granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if scale_kind not in SCALE_KINDS:
        raise WeightQuantizationError(f"scale kind {scale_kind!r}: use one of {', '.join(SCALE_KINDS)}")
    return granularity == "per_channel" or scale_kind == "float"


def _along(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return np.asarray(v, np.float32).reshape([1] * ndim)
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float32).reshape(shape)


def encode_real_scaled(w: np.ndarray, p: RealScaleParams) -> np.ndarray:
    """FP8 bytes (uint8) of ``w / scale`` in float32, nearest even, saturated (QuantizeLinear's rule)."""
    w32 = np.asarray(w, np.float32)
    return encode_to_dtype(w32 / _along(p.scales, p.axis, w32.ndim), p.format, 0).view(np.uint8)


def dequantize_real_scaled(w: np.ndarray, p: RealScaleParams) -> np.ndarray:
    """What ``DequantizeLinear`` makes of the encoded ``w``: ``fp8 * scale`` in float32."""
    w32 = np.asarray(w, np.float32)
    q = encode_real_scaled(w32, p).view(get_format(p.format).dtype).astype(np.float32)
    return q * _along(p.scales, p.axis, w32.ndim)


def dequantized_weight(w: np.ndarray, p: QuantParams) -> np.ndarray:
    """The weight as the FP8 model computes with it (power-of-two or real scales)."""
    if isinstance(p, RealScaleParams):
        return dequantize_real_scaled(w, p)
    from fp8core.formats import round_trip

    return round_trip(np.asarray(w, np.float32), p.format, p.scale)


def _stored_scales(scales: np.ndarray, elem_type: int) -> np.ndarray:
    if elem_type == onnx.TensorProto.FLOAT16:
        return np.maximum(scales, FLOAT16_SMALLEST_NORMAL).astype(np.float16).astype(np.float32)
    return scales.astype(np.float32)


def real_scale_params(w: np.ndarray, axis: int | None, formats: list[str] | tuple[str, ...], loss: str,
                      elem_type: int = onnx.TensorProto.FLOAT) -> RealScaleParams:
    """Search the real scale(s) of one weight (module docstring): per channel along ``axis``, or
    one scale for the whole weight when ``axis`` is None."""
    w32 = np.asarray(w, np.float32)
    loss_fn = get_loss(loss)
    best: RealScaleParams | None = None
    for fmt in formats:
        fmt = get_format(fmt).name
        if axis is None:
            chosen = quantize_per_channel(w32.reshape(1, -1), 0, fmt, loss)
        else:
            chosen = quantize_per_channel(w32, axis, fmt, loss)
        scales = _stored_scales(chosen.scales, elem_type)
        geomean = float(np.exp2(np.mean(np.log2(scales.astype(np.float64)))))
        p = RealScaleParams(fmt, round(math.log2(geomean)), "per_tensor" if axis is None else "per_channel",
                            axis, tuple(float(s) for s in scales))
        if np.array_equal(scales, chosen.scales):  # the search encoded w with these scales already
            dequantized = chosen.dequantized()
        else:
            dequantized = dequantize_real_scaled(w32, p)
        value = float(loss_fn(w32.reshape(-1), dequantized.reshape(-1)))
        p = dataclasses.replace(p, loss=value)
        if best is None or value < best.loss:
            best = p
    return best


def weight_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The output-channel axis of ``node``'s weight (Gemm reads its transB)."""
    trans_b = node_attr(node, "transB", 0)
    return output_channel_axis(node.op_type, weight_rank, trans_b)


def choose_weight_params(model: Model | onnx.ModelProto, plans: list[OpPlan], granularity: str, scale_kind: str,
                         formats: list[str] | tuple[str, ...], loss: str) -> list[OpPlan]:
    """Copies of ``plans`` whose FP8 weights carry real scales (unchanged for per_tensor pow2).

    A weight read by several FP8 ops is searched once per distinct (tensor, axis).
    """
    if not uses_real_scales(granularity, scale_kind):
        return plans
    index = Model.of(model).index()
    nodes = {n.name: n for n in model.graph.node}
    found: dict[tuple[str, int | None, int], RealScaleParams] = {}
    out = []
    for plan in plans:
        plan = dataclasses.replace(plan, inputs=[dataclasses.replace(q) for q in plan.inputs])
        if plan.fp8:
            for q in plan.input("weight"):
                if q.params is None:
                    continue
                value = index.constant_value(q.tensor)
                axis = weight_axis(nodes[plan.name], value.ndim) if granularity == "per_channel" else None
                key = (q.tensor, axis, plan.elem_type)
                if key not in found:
                    found[key] = real_scale_params(value, axis, formats, loss, plan.elem_type)
                q.params = found[key]
        out.append(plan)
    return out


def scale_initializer(name: str, p: RealScaleParams, elem_type: int) -> onnx.TensorProto:
    """The scale input of a real-scaled weight's DequantizeLinear: 1-D per channel, else a scalar."""
    dtype = np.float16 if elem_type == onnx.TensorProto.FLOAT16 else np.float32
    values = np.asarray(p.scales, dtype)
    return numpy_helper.from_array(values if p.axis is not None else values.reshape(()), name)
