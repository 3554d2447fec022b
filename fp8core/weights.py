"""Per-channel FP8 weight scales (``--weight_granularity per_channel``).

With a floating-point format, power-of-two per-channel scales only move each channel's range:
the relative rounding grid is the same for every power of two (measured: EfficientNet-Lite0 gave
the per-tensor accuracy). A real-valued scale moves the grid itself, so the per-channel scales
here are real numbers, chosen per output channel by the loss among

    ``scale_c = absmax_c / max_fp8 * 2^(j / STEPS_PER_OCTAVE)``  for j in ``SCALE_STEPS``

(``absmax_c / max_fp8`` maps the channel's largest magnitude onto the format's largest value;
smaller factors clip the few largest values for a finer grid, larger ones leave head-room).
A channel whose values are all zero gets scale 1.

Encoding is ONNX ``QuantizeLinear`` with a 1-D float scale and ``axis``: ``x / scale_c`` in
float32, rounded to the nearest FP8 value, ties to even, saturated to +-max
(:func:`fp8core.formats.round_trip` at scale 0); decoding is ``DequantizeLinear`` with the same
``axis``: ``q * scale_c``. :func:`dequantize_node` writes it; onnxruntime reproduces
:func:`PerChannelWeight.dequantized` bit for bit (tests/test_weights.py).

Ranking per channel: smallest loss, ties (within 1e-9 relative) to the smaller ``|j|``, then the
smaller j. ``mse``, ``mae``, ``snr`` and ``cos_dist`` are evaluated for every channel at once;
``kld`` (and any other registered loss) one channel at a time with :mod:`fp8core.losses`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp8core.formats import encode_to_dtype, get_format, round_trip
from fp8core.losses import get_loss

STEPS_PER_OCTAVE = 8
SCALE_STEPS = range(-16, 9)  # factors 2^-2 .. 2^1 around absmax / max
VECTORISED_LOSSES = ("mse", "mae", "snr", "cos_dist")
GRANULARITIES = ("per_tensor", "per_channel")


class WeightQuantizationError(ValueError):
    """A per-channel weight request that cannot be met; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PerChannelWeight:
    """A weight in FP8 with one real scale per output channel along ``axis``."""

    format: str
    axis: int
    scales: np.ndarray  # float32, one per channel
    steps: np.ndarray  # the chosen j per channel
    losses: np.ndarray  # the chosen loss per channel
    fp8: np.ndarray  # the FP8 values as ml_dtypes, same shape as the weight

    def dequantized(self) -> np.ndarray:
        """``DequantizeLinear(fp8, scales, axis)`` in float32."""
        return self.fp8.astype(np.float32) * _along(self.scales, self.axis, self.fp8.ndim)


def output_channel_axis(op_type: str, weight_rank: int, trans_b: int = 0) -> int:
    """The axis of a weight that indexes the op's output channels.

    Conv ``[M, C/group, k...]``: 0. Gemm B: 0 with ``transB=1`` (``[N, K]``), else 1.
    MatMul B ``[..., K, N]``: the last axis.
    """
    if op_type == "Conv":
        return 0
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return weight_rank - 1
    raise WeightQuantizationError(f"{op_type} has no FP8 weight; per-channel scales apply to Conv, MatMul, Gemm")


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def quantize_with_scales(w: np.ndarray, scales: np.ndarray, axis: int, fmt: str) -> np.ndarray:
    """Round trip of ``w`` with one real scale per channel: ``round(w / s_c) * s_c`` in float32."""
    w32 = np.asarray(w, dtype=np.float32)
    s = _along(np.asarray(scales, np.float32), axis, w32.ndim)
    return round_trip(w32 / s, fmt, 0) * s


def _channel_losses(w: np.ndarray, q: np.ndarray, axis: int, loss: str) -> np.ndarray:
    """The loss of every channel (rows of the weight moved to ``axis`` first)."""
    x = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    y = np.moveaxis(np.asarray(q, np.float64), axis, 0).reshape(w.shape[axis], -1)
    if loss not in VECTORISED_LOSSES:
        fn = get_loss(loss)
        return np.array([fn(x[c].astype(np.float32), y[c].astype(np.float32)) for c in range(x.shape[0])])
    e = x - y
    if loss == "mse":
        return np.mean(e * e, axis=1)
    if loss == "mae":
        return np.mean(np.abs(e), axis=1)
    x_sq = np.sum(x * x, axis=1)
    if loss == "snr":
        return np.where(x_sq > 0, np.sum(e * e, axis=1) / np.where(x_sq > 0, x_sq, 1), 0.0)
    y_sq = np.sum(y * y, axis=1)  # cos_dist as |x/|x| - y/|y||^2 / 2 (no cancellation)
    nx, ny = np.sqrt(np.where(x_sq > 0, x_sq, 1)), np.sqrt(np.where(y_sq > 0, y_sq, 1))
    unit = x / nx[:, None] - y / ny[:, None]
    d = np.maximum(0.0, np.sum(unit * unit, axis=1) / 2)
    return np.where((x_sq == 0) | (y_sq == 0), np.where(x_sq == y_sq, 0.0, 1.0), d)


def candidate_scales(absmax: np.ndarray, fmt: str, steps=SCALE_STEPS) -> np.ndarray:
    """``[len(steps), channels]`` float32 scales ``absmax / max * 2^(j / STEPS_PER_OCTAVE)``."""
    base = np.where(absmax > 0, absmax / get_format(fmt).max, 1.0)
    factors = np.exp2(np.asarray(list(steps), np.float64) / STEPS_PER_OCTAVE)
    return (factors[:, None] * base[None, :]).astype(np.float32)


def quantize_per_channel(w: np.ndarray, axis: int, fmt: str = "F143", loss: str = "mse",
                         steps=SCALE_STEPS) -> PerChannelWeight:
    """Choose every channel's real scale by ``loss`` (module docstring) and encode the weight."""
    w = np.asarray(w)
    if w.ndim < 1 or not -w.ndim <= axis < w.ndim:
        raise WeightQuantizationError(f"axis {axis} is outside a weight of shape {list(w.shape)}")
    axis %= w.ndim
    if not np.isfinite(w).all():
        raise WeightQuantizationError("the weight has NaN or inf values; fix the model before quantizing it")
    get_loss(loss)  # unknown names fail here, with the list of losses
    fmt = get_format(fmt).name
    steps = list(steps)
    absmax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    cands = candidate_scales(absmax, fmt, steps)
    table = np.stack([_channel_losses(w, quantize_with_scales(w, s, axis, fmt), axis, loss) for s in cands])
    order = sorted(range(len(steps)), key=lambda i: (abs(steps[i]), steps[i]))  # tie-break order
    best = np.full(w.shape[axis], order[0])
    for i in order[1:]:
        cur = table[best, np.arange(best.size)]
        better = table[i] < cur - 1e-9 * np.abs(cur)
        best = np.where(better, i, best)
    channels = np.arange(best.size)
    scales = cands[best, channels]
    fp8 = encode_to_dtype(np.asarray(w, np.float32) / _along(scales, axis, w.ndim), fmt, 0)
    return PerChannelWeight(fmt, axis, scales, np.asarray(steps)[best], table[best, channels], fp8)


def dequantize_node(weight: PerChannelWeight, base: str, elem_type: int = onnx.TensorProto.FLOAT
                    ) -> tuple[list[onnx.TensorProto], onnx.NodeProto, str]:
    """Initializers (FP8 weight, 1-D scale) and the ``DequantizeLinear(axis)`` node; its output name."""
    dtype = np.float16 if elem_type == onnx.TensorProto.FLOAT16 else np.float32
    q = numpy_helper.from_array(weight.fp8.view(np.uint8), f"{base}_fp8")
    q.data_type = get_format(weight.format).onnx_type  # the bytes are FP8
    s = numpy_helper.from_array(weight.scales.astype(dtype), f"{base}_scale")
    out = f"{base}_dq"
    node = helper.make_node("DequantizeLinear", [q.name, s.name], [out], name=f"{base}_DequantizeLinear",
                            axis=weight.axis)
    return [q, s], node, out


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
        raise WeightQuantizationError(
            f"bias correction needs a [K, N] weight and a length-K input mean; got {list(w64.shape)} "
            f"and {list(np.shape(input_mean))}")
    shift = np.asarray(input_mean, np.float64) @ (np.asarray(w_quantized, np.float64) - w64)
    b = np.zeros(w64.shape[1]) if bias is None else np.asarray(bias, np.float64)
    return (b - shift).astype(np.float32)
