"""Bias correction measured on the FP8 model: each op removes the mean output shift it adds itself.

A linear op in the FP8 model computes ``Wq @ Q(x~)`` where the float model computes ``W @ x``:
``x~`` is its input as the FP8 ops upstream compute it, ``Q`` the op's own activation
quantization, ``Wq`` its FP8 weight. The op's *own* share of the mean shift at its output is

    ``local = E[rows(Q(x~))] @ Wq - E[rows(x~)] @ W``        (per output channel)

(rows as in :mod:`fp8core.feature_moments`: im2col patches for Conv, borders included), and
``b - alpha * local / beta`` removes it (Gemm's alpha and beta; 1 otherwise). Measured on the FP8
model, this covers what float-input bias correction cannot see: the mean shift of rounding and
saturating the activations (E4M3 on a skewed input), and of the weights applied to the inputs
the op really gets.

Why each op's own share and not the whole shift at its output: the whole shift includes what
every op upstream adds, and correcting every op by its whole shift at once counts each upstream
shift again in every op downstream (measured on a YOLOv8n: the shifts grew tenfold in three
passes and the detector lost every box). Removing each op's own share leaves no shift to
propagate, to first order, in one pass over the calibration data.

The bias is Conv's B, Gemm's C, or the Add after a MatMul (:func:`fp8core.weight_adjust.linear_ops`);
ops without one are left as they are.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.feature_moments import capture_feature_moments
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.rewrite import rewrite_to_fp8
from fp8core.weight_adjust import _with_changes, linear_ops
from fp8core.weight_scales import dequantized_weight


def correct_mean_shift(model: Model | onnx.ModelProto, plans: list[OpPlan], source: CalibrationSource,
                       batch_size: int, padding_mask: str | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` whose FP8 ops' biases remove the mean shift each op adds itself in
    the FP8 model (module docstring), and one report row per corrected op; ``model`` itself when
    no FP8 op has a bias. ``padding_mask``: rows of padding tokens are left out of the means."""
    handle = Model.of(model)
    model = handle.proto
    targets = [op for op in linear_ops(model, plans) if op.bias]
    if not targets:
        return model, []
    fp8 = handle.derive(rewrite_to_fp8(handle, plans))
    reads = {n.name: n.input[0] for n in fp8.graph.node if n.input}  # each op's (dequantized) activation
    pairs = {op.name: (dataclasses.replace(op.rows, tensor=reads[op.name]), op.rows) for op in targets}
    requests = {rows.key: (rows, False) for pair in pairs.values() for rows in pair}
    moments = capture_feature_moments(fp8, requests, source, batch_size, padding_mask)
    del fp8

    index = handle.index()
    new_bias, report = {}, []
    for op in targets:
        quantized, unquantized = (moments[rows.key] for rows in pairs[op.name])
        if quantized.count == 0:
            continue
        stored = index.constant_value(op.weight)
        w = op.to_groups(stored.astype(np.float32)).astype(np.float64)
        wq = op.to_groups(dequantized_weight(stored, op.params)).astype(np.float64)
        local = np.concatenate([quantized.mean[g] @ wq[g] - unquantized.mean[g] @ w[g] for g in range(w.shape[0])])
        b = index.constant_value(op.bias)
        corrected = b.reshape(-1).astype(np.float64) - op.alpha * local / op.beta
        new_bias[op.bias_reader] = (op.bias, op.bias_index, corrected.astype(b.dtype).reshape(b.shape))
        report.append({"op": op.name, "bias": op.bias, "own_mean_shift_max": float(np.max(np.abs(local)))})
    return _with_changes(model, {}, new_bias), report
