"""Empirical bias correction: the mean output shift of the whole FP8 prefix, measured and removed.

Analytic bias correction (:func:`fp8core.weight_adjust.adjust_weights`) removes what an op's own
FP8 weight adds to its mean output, assuming float inputs. In the converted model an op reads
FP8-quantized activations computed by FP8 ops upstream, and their errors add up: each op's
per-channel mean output drifts from the float model's, and every later op inherits the drift.

:func:`correct_mean_shift` runs the FP8 model on calibration samples, measures the per-channel
mean output of each op with a bias (Conv's B, Gemm's C, the Add after a MatMul) against the
float model's, and moves the bias by the difference. A correction upstream changes what the ops
downstream see, so it is done in ``rounds`` passes, each correcting what is left (the report
gives the largest shift measured before each pass, and after the last). One session serves every pass: in the measured
model the biases are graph inputs, fed with their current values.

This is the "bias correction of the accumulated per-channel output mean shift" of sequential
PTQ (Nagel et al. 2019, empirical variant): it needs no gradient and no Gram matrix, and costs
``rounds + 2`` runs over ``max_samples`` samples.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp8core.calibration import CalibrationSource
from fp8core.compare import sample_batches
from fp8core.errors import FP8Error, first_line
from fp8core.graph import GraphIndex
from fp8core.plan import OpPlan
from fp8core.rewrite import rewrite_to_fp8
from fp8core.runtime import make_session
from fp8core.weight_adjust import LinearOp, linear_ops

ROUNDS = 3
MAX_SAMPLES = 64


def _correctable(model: onnx.ModelProto, plans: list[OpPlan]) -> list[tuple[LinearOp, str, int]]:
    """(op, the tensor its bias is added into, channel axis) for each FP8 linear op whose bias is a
    top-level initializer read by that op alone."""
    index = GraphIndex(model.graph)
    initializers = {t.name for t in model.graph.initializer}
    readers = {n.name: n for n in model.graph.node}
    out = []
    for op in linear_ops(model, plans):
        if op.bias is None or op.bias not in initializers or len(index.consumers[op.bias]) != 1:
            continue
        out.append((op, readers[op.bias_reader].output[0], 1 if op.layout == "conv" else -1))
    return out


def _channel_sums(y: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    flat = y.reshape(-1, y.shape[-1])
    return flat.sum(axis=0), flat.shape[0]


def _means(session, outputs: list[str], axes: list[int], batches, extra: dict, which: str) -> list[np.ndarray]:
    sums: list[np.ndarray | None] = [None] * len(outputs)
    counts = [0] * len(outputs)
    for start, feeds in batches:
        try:
            values = session.run(outputs, {**feeds, **extra})
        except Exception as exc:
            raise FP8Error(f"bias correction: onnxruntime failed running the {which} model on samples from "
                           f"{start}: {first_line(exc)}") from None
        for i, (y, axis) in enumerate(zip(values, axes)):
            s, n = _channel_sums(y, axis)
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] += n
    return [s / max(n, 1) for s, n in zip(sums, counts)]


def correct_mean_shift(model: onnx.ModelProto, plans: list[OpPlan], source: CalibrationSource, batch_size: int,
                       max_samples: int = MAX_SAMPLES, rounds: int = ROUNDS,
                       weights_dir: str | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` whose FP8 ops' biases undo the per-channel mean shift the FP8 model
    has at their outputs on ``max_samples`` samples, and one report row per corrected op."""
    targets = _correctable(model, plans)
    if not targets:
        return model, []
    outputs = [t for _, t, _ in targets]
    axes = [a for _, _, a in targets]
    index = GraphIndex(model.graph)
    bias = {op.bias: index.constant_value(op.bias) for op, _, _ in targets}
    feeds_data = list(sample_batches(source, model, batch_size, max_samples))  # a few samples, held once
    if not feeds_data:
        raise FP8Error(f"bias correction: calibration data {source.path} has no samples")

    reference = _means(make_session(model, extra_outputs=outputs, weights_dir=weights_dir), outputs, axes,
                       feeds_data, {}, "float")

    measured = onnx.ModelProto()
    measured.CopyFrom(model)  # biases become graph inputs of the measured copy
    graph = measured.graph
    kept = [t for t in graph.initializer if t.name not in bias]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, value in bias.items():
        graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                         list(value.shape)))
    session = make_session(rewrite_to_fp8(measured, plans, weights_dir=weights_dir), extra_outputs=outputs,
                           weights_dir=weights_dir)
    del measured, graph

    current = {name: value.astype(np.float64) for name, value in bias.items()}
    rows = {op.name: {"op": op.name, "bias": op.bias, "output": t, "shift_by_round": []} for op, t, _ in targets}
    for _ in range(rounds):
        feeds = {name: v.astype(bias[name].dtype) for name, v in current.items()}
        got = _means(session, outputs, axes, feeds_data, feeds, "FP8")
        for (op, _, _), want, have in zip(targets, reference, got):
            shift = want - have  # per output channel
            rows[op.name]["shift_by_round"].append(float(np.max(np.abs(shift))))
            scale = op.beta if op.layout != "conv" and op.bias_reader == op.name else 1.0  # Gemm: beta * C
            current[op.bias] = current[op.bias] + (shift / scale).reshape(current[op.bias].shape)
    final = {name: v.astype(bias[name].dtype) for name, v in current.items()}
    left = _means(session, outputs, axes, feeds_data, final, "FP8")
    for (op, _, _), want, have in zip(targets, reference, left):
        rows[op.name]["shift_left"] = float(np.max(np.abs(want - have)))
    for op, _, _ in targets:
        rows[op.name]["bias_max_change"] = float(np.max(np.abs(final[op.bias].astype(np.float64)
                                                               - bias[op.bias].astype(np.float64))))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in final:
            t.CopyFrom(numpy_helper.from_array(final[t.name], t.name))
    return out, list(rows.values())
