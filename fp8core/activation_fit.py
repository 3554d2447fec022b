"""Weights fitted to the inputs the FP8 model gives them (``--weight_rounding gptaq``).

GPTQ (:mod:`fp8core.gptq`) rounds a weight ``W`` to the FP8 grid minimising
``tr((W - Q)^T H (W - Q))``, ``H`` the Gram matrix of the op's *float* input rows ``X``. In the
FP8 model the op reads ``X~`` instead: its own input rounded to FP8 plus every upstream op's
error. The output error that matters is (rows of one group, :mod:`fp8core.feature_moments`)

    ``E(Q) = || X W - X~ Q ||^2``      (FP32 target, FP8-model inputs)

With ``H~ = X~^T X~`` and ``C = X~^T X``, the real weight that minimises it is the least-squares
refit ``W* = H~^-1 C W``, and by the normal equations ``E(Q) = E(W*) + tr((W* - Q)^T H~ (W* - Q))``:
the FP8 weight is GPTQ of ``W*`` with the Hessian ``H~`` (the asymmetric objective of GPTAQ,
Li et al. 2025; AdaQuant's refit, Hubara et al. 2021, in closed form). Rules:

* ``W* = (H~ + lam I)^-1 (C W + lam W)``, ``lam = FIT_DAMP * mean(diag H~)``: where the rows
  do not determine a direction, ``W*`` stays at ``W``.
* The refit needs ``MIN_ROWS_PER_FEATURE * K`` rows, else ``W* = W`` (GPTQ with ``H~`` only).
* The bias shift below needs as many rows as inputs (:func:`fp8core.gptq.rows_determine`): the
  mean output shift of fewer rows follows their noise. PP-OCRv4 rec's squeeze-excitation convs
  read one pooled row per sample (32 rows for K = 60-480); fitted with their biases shifted they
  emptied 23 of 120 recognised lines. Their GPTQ weights alone help: CER 0.059 (nearest) -> 0.046
  (such ops left at nearest) -> 0.028 (their weights GPTQ'd, biases kept), and silero VAD v6
  (32-160 rows for K = 129-387) 0.982 -> 0.996 (real-model suite).
* The bias then removes the mean output shift that is left:
  ``b += alpha / beta * (mean(X) W - mean(X~) Q)`` (ops with a bias, as :mod:`fp8core.weight_adjust`).
* A Conv sample contributes at most ``ROWS_PER_PIECE`` of its im2col rows, at evenly spaced
  output positions (a 112x112 map gives 12544 rows that differ little from their neighbours).
* Sequential: the ops are fitted in ``passes`` chunks in graph order; a chunk's ``X~`` comes from
  the FP8 model in which every chunk before it already carries its fitted weights and biases.
  One paired pass over the calibration data per chunk (float and FP8 sessions on the same
  batches), and only that chunk's ``[G, K, K]`` matrices in memory. Ops of one chunk that feed
  each other each compensate the same upstream error, so the fit over-compensates unless a chunk
  holds independent ops (a 3-layer chain: 4 passes beat 1; EfficientNet-Lite0 in 4 passes: top-1
  0.01).
* ``local=True`` (what ``--weight_rounding gptaq`` runs): the target rows ``X`` are the op's input
  *in the FP8 model* before its own rounding, so each op compensates only the error it adds itself
  (the rounding of its input and weight), on the inputs the FP8 model really gives it. One pass
  over the data, one session, for every op at once; nothing is compensated twice.

Report per op, on the calibration rows: how much lower ``E`` is for the fitted ``Q`` than for
round to nearest of ``W``, relative to ``|| X~ W ||^2``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.capture import RUN_SAMPLES
from fp8core.feature_moments import Rows, moment_options
from fp8core.gptq import MIN_ROWS_PER_FEATURE, gptq_round_groups, rows_determine
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.rewrite import rewrite_to_fp8
from fp8core.stream import Tap, stream
from fp8core.weight_adjust import LinearOp, _grid, _with_changes, linear_ops
from fp8core.weight_scales import dequantized_weight

FIT_DAMP = 0.01
PASSES = 4
ROWS_PER_PIECE = 1024  # rows kept per sample of a Conv (im2col gives one per output position)


@dataclasses.dataclass
class PairedMoments:
    """Running sums over paired rows of one op: float rows ``X`` and FP8-model rows ``X~``."""

    count: int = 0
    h_fp8: np.ndarray | None = None  # [G, K, K]  X~^T X~
    cross: np.ndarray | None = None  # [G, K, K]  X~^T X
    sum_fp8: np.ndarray | None = None  # [G, K]
    sum_float: np.ndarray | None = None  # [G, K]

    def update(self, fp8_t: np.ndarray, float_t: np.ndarray) -> None:
        """Add rows of both as columns, ``[G, K, R]`` each (:meth:`~fp8core.feature_moments.Rows.columns`).
        A piece's products may be float32 (sums of at most ``ROWS_PER_PIECE`` rows); the running
        sums are float64."""
        g, k, r = fp8_t.shape
        if self.h_fp8 is None:
            self.h_fp8, self.cross = np.zeros((g, k, k)), np.zeros((g, k, k))
            self.sum_fp8, self.sum_float = np.zeros((g, k)), np.zeros((g, k))
        self.h_fp8 += fp8_t @ fp8_t.transpose(0, 2, 1)
        self.cross += fp8_t @ float_t.transpose(0, 2, 1)
        # float64: the bias shift is a small difference of two sums
        self.sum_fp8 += fp8_t.sum(axis=2, dtype=np.float64)
        self.sum_float += float_t.sum(axis=2, dtype=np.float64)
        self.count += r


def fitted_weight(w: np.ndarray, m: PairedMoments, damp: float = FIT_DAMP) -> np.ndarray:
    """``W*`` per group (module docstring); ``w`` is ``[G, K, N]`` float64."""
    out = np.array(w, np.float64)
    k = w.shape[1]
    if m.count < MIN_ROWS_PER_FEATURE * k:
        return out
    for g in range(w.shape[0]):
        h = m.h_fp8[g]
        energy = float(np.mean(np.diag(h)))
        if energy <= 0:  # the group never sees a non-zero input
            continue
        lam = damp * energy
        out[g] = np.linalg.solve(h + lam * np.eye(k), m.cross[g] @ w[g] + lam * w[g])
    return out


def asymmetric_error(w: np.ndarray, q: np.ndarray, m: PairedMoments) -> float:
    """``(sum_g || X W - X~ Q ||^2 - || X W ||^2) / || X~ W ||^2`` from the moments: the output
    error up to the constant ``|| X W ||^2`` (its Gram matrix would cost as much as the others),
    relative to the output's size. Differences between two ``Q`` are exact; lower is better."""
    w, q = np.asarray(w, np.float64), np.asarray(q, np.float64)

    def form(a, h, b):  # sum_g tr(a_g^T h_g b_g)
        return float(np.sum(a * (h @ b)))

    size = form(w, m.h_fp8, w)
    return (form(q, m.h_fp8, q) - 2 * form(q, m.cross, w)) / size if size > 0 else 0.0


def _paired_moments(float_model: Model | None, fp8_model: Model, ops: list[LinearOp], reads: dict[str, str],
                    source: CalibrationSource, batch_size: int,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, PairedMoments]:
    """One pass: each op's target rows and FP8 rows on the same batches, accumulated together.
    The target rows come from ``float_model``, or with None from the FP8 model itself (the op's
    input before its own rounding)."""
    float_tensors = list(dict.fromkeys(op.input for op in ops))
    fp8_tensors = list(dict.fromkeys(reads[op.name] for op in ops))
    runs = [(fp8_model, list(dict.fromkeys(fp8_tensors + (float_tensors if float_model is None else []))))]
    if float_model is not None:
        runs.append((float_model, float_tensors))
    taps = [Tap(model, tensors, moment_options(), label=label)
            for (model, tensors), label in zip(runs, ("the FP8 model", "the original model"))]
    moments = {op.name: PairedMoments() for op in ops}
    # RUN_SAMPLES per run, as capture: every op's input (twice) of a whole batch held at once
    # peaked at 1.9 GB on a 10 MB OCR model
    for batch in stream(taps[0], source, batch_size=batch_size, paired=taps[1] if len(taps) > 1 else None,
                        run_samples=RUN_SAMPLES, progress=progress):
        ys = batch.values
        xs = ys if float_model is None else batch.paired
        for op in ops:
            fp8_rows = dataclasses.replace(op.rows, tensor=reads[op.name])
            for fp8_t, float_t in fp8_rows.columns(ys[reads[op.name]], ROWS_PER_PIECE, np.float32, paired=xs[op.input]):
                moments[op.name].update(fp8_t, float_t)
    return moments


def _chunks(ops: list[LinearOp], passes: int) -> list[list[LinearOp]]:
    n = max(1, min(passes, len(ops)))
    bounds = [round(i * len(ops) / n) for i in range(n + 1)]
    return [ops[bounds[i]:bounds[i + 1]] for i in range(n) if bounds[i] < bounds[i + 1]]


def fit_to_fp8_inputs(model: Model | onnx.ModelProto, plans: list[OpPlan], source: CalibrationSource,
                      batch_size: int, passes: int = PASSES, gptq: bool = True, local: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` whose FP8 linear ops carry weights (on the FP8 grid) and biases fitted
    to the inputs the FP8 model gives them (module docstring), and one report row per op.
    ``gptq=False`` rounds ``W*`` to nearest instead of by GPTQ. ``progress(done, total)``: data
    batches streamed, over every pass."""
    model = Model.of(model)
    ops = linear_ops(model.proto, plans)
    index = model.index()
    replaced: dict[str, np.ndarray] = {}
    new_bias: dict[str, tuple[str, int, np.ndarray]] = {}
    report = []
    chunks = _chunks(ops, passes)
    for i, chunk in enumerate(chunks):
        current = model.derive(_with_changes(model.proto, replaced, new_bias))
        fp8 = rewrite_to_fp8(current, plans)
        reads = {n.name: n.input[0] for n in fp8.graph.node if n.input}  # each op's dequantized input
        told = (lambda done, total, before=i: progress(before * total + done, len(chunks) * total)) if progress else None
        moments = _paired_moments(None if local else model, model.derive(fp8), chunk, reads, source, batch_size, told)
        del fp8
        for op in chunk:
            m = moments[op.name]
            if m.count == 0:
                continue
            stored = index.constant_value(op.weight)
            w = op.to_groups(stored.astype(np.float32)).astype(np.float64)
            nearest = op.to_groups(dequantized_weight(stored, op.params)).astype(np.float64)
            row = {"op": op.name, "rows": m.count, "refit": m.count >= MIN_ROWS_PER_FEATURE * w.shape[1]}
            determined = rows_determine(m.count, w.shape[1])
            target = fitted_weight(w, m)
            grid = _grid(op, w.shape[0])
            if gptq:
                q = gptq_round_groups(target, m.h_fp8, grid).astype(np.float64)
            else:
                q = grid(target.astype(np.float32)).astype(np.float64)
            row["output_error_reduction"] = asymmetric_error(w, nearest, m) - asymmetric_error(w, q, m)
            replaced[op.weight] = op.from_groups(q, stored.shape).astype(stored.dtype)
            if op.bias and not determined:
                row["bias"] = "kept: fewer rows than inputs"
            elif op.bias:
                b = index.constant_value(op.bias)
                shift = np.concatenate([m.sum_float[g] @ w[g] - m.sum_fp8[g] @ q[g] for g in range(w.shape[0])])
                corrected = b.reshape(-1).astype(np.float64) + op.alpha * (shift / m.count) / op.beta
                new_bias[op.bias_reader] = (op.bias, op.bias_index, corrected.astype(b.dtype).reshape(b.shape))
                row["bias_max_shift"] = float(np.max(np.abs(corrected - b.reshape(-1))))
            report.append(row)
    return _with_changes(model.proto, replaced, new_bias), report
