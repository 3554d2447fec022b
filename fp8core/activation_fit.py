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
* A fit is kept only where it generalises (:func:`held_out_gain`): the onnxruntime runs take turns
  between ``FOLDS`` folds of rows; fitted (weight and bias) on all folds but one and measured on
  that one, in turn, it must give a lower output error than round to nearest, else the op stays at round to nearest,
  bias included. No rows-per-input rule tells this apart: PP-OCRv4 rec's squeeze-excitation convs
  (one pooled row per sample, 32 rows for K = 60-480) fitted in-sample emptied 31 of 120
  recognised lines, while silero VAD v6's convs (32-160 rows for K = 129-387) gain from the fit
  (decision agreement 0.982 -> 0.996); a rule of one row per input kept both at nearest.
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

Report per op: ``held_out_reduction``, the fit's gain over round to nearest on the rows it was not
fitted on (the rule above), and ``output_error_reduction``, the same on all calibration rows for
the fit that is kept, both relative to ``|| X~ W ||^2``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.capture import RUN_SAMPLES
from fp8core.feature_moments import Rows, moment_options
from fp8core.gptq import MIN_ROWS_PER_FEATURE, gptq_round_groups
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.rewrite import rewrite_to_fp8
from fp8core.stream import Tap, stream
from fp8core.weight_adjust import LinearOp, _grid, _with_changes, linear_ops
from fp8core.weight_scales import dequantized_weight

FIT_DAMP = 0.01
PASSES = 4
FOLDS = 4  # fitted on three quarters of the rows, measured on the fourth: close to the fit on all
ROWS_PER_PIECE = 1024  # rows kept per sample of a Conv (im2col gives one per output position)


@dataclasses.dataclass
class PairedMoments:
    """Running sums over paired rows of one op: float rows ``X`` and FP8-model rows ``X~``."""

    count: int = 0
    h_fp8: np.ndarray | None = None  # [G, K, K]  X~^T X~
    cross: np.ndarray | None = None  # [G, K, K]  X~^T X
    sum_fp8: np.ndarray | None = None  # [G, K]
    sum_float: np.ndarray | None = None  # [G, K]

    def update(self, x: np.ndarray, x_fp8: np.ndarray) -> None:
        """Add rows ``[R, G, K]`` of both. A piece's products may be float32 (sums of at most
        ``ROWS_PER_PIECE`` rows); the running sums are float64."""
        g, k = x.shape[1], x.shape[2]
        if self.h_fp8 is None:
            self.h_fp8, self.cross = np.zeros((g, k, k)), np.zeros((g, k, k))
            self.sum_fp8, self.sum_float = np.zeros((g, k)), np.zeros((g, k))
        both = np.concatenate([x_fp8, x], axis=2).transpose(1, 0, 2).copy()  # [G, R, 2K], contiguous
        # [G, K, 2K]: X~^T [X~, X] in one product; a contiguous left operand keeps it on BLAS
        products = np.ascontiguousarray(both[:, :, :k].transpose(0, 2, 1)) @ both
        self.h_fp8 += products[:, :, :k]
        self.cross += products[:, :, k:]
        sums = both.sum(axis=1, dtype=np.float64)
        self.sum_fp8 += sums[:, :k]
        self.sum_float += sums[:, k:]
        self.count += x.shape[0]

    def __add__(self, other: PairedMoments) -> PairedMoments:
        if self.h_fp8 is None or other.h_fp8 is None:
            return self if other.h_fp8 is None else other
        return PairedMoments(self.count + other.count, self.h_fp8 + other.h_fp8, self.cross + other.cross,
                             self.sum_fp8 + other.sum_fp8, self.sum_float + other.sum_float)

    def output_shift(self, w: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``sum over rows of (X W - X~ Q)``, the output columns of every group in a row ``[N]``."""
        return np.concatenate([self.sum_float[g] @ w[g] - self.sum_fp8[g] @ q[g] for g in range(w.shape[0])])


def fitted_weight(w: np.ndarray, m: PairedMoments, damp: float = FIT_DAMP, refit: bool | None = None) -> np.ndarray:
    """``W*`` per group (module docstring); ``w`` is ``[G, K, N]`` float64. ``refit`` None: when
    ``m`` has ``MIN_ROWS_PER_FEATURE`` rows per input."""
    out = np.array(w, np.float64)
    k = w.shape[1]
    if not (m.count >= MIN_ROWS_PER_FEATURE * k if refit is None else refit):
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


def output_error(w: np.ndarray, q: np.ndarray, d: np.ndarray | None, m: PairedMoments) -> float:
    """``sum over rows of || X W - X~ Q - d ||^2`` up to the constant ``|| X W ||^2``: the output
    error of FP8 weight ``q`` whose bias moved the output by ``-d`` (``[N]``, every group's
    columns in a row; None for no move), from the moments of other rows than those it was fitted on."""
    def form(a, h, b):
        return float(np.sum(a * (h @ b)))

    error = form(q, m.h_fp8, q) - 2 * form(q, m.cross, w)
    if d is not None:
        error += -2 * float(d @ m.output_shift(w, q)) + m.count * float(d @ d)
    return error


def _fit(op: LinearOp, w: np.ndarray, m: PairedMoments, grid, gptq: bool, refit: bool):
    """FP8 weight ``q`` fitted on ``m``'s rows, and the mean output shift ``d`` its bias removes."""
    target = fitted_weight(w, m, refit=refit)
    q = gptq_round_groups(target, m.h_fp8, grid) if gptq else grid(target.astype(np.float32))
    q = np.asarray(q, np.float64)
    return q, (m.output_shift(w, q) / m.count if op.bias else None)


def held_out_gain(op: LinearOp, w: np.ndarray, nearest: np.ndarray, folds: list[PairedMoments],
                  grid, gptq: bool, refit: bool) -> float:
    """How much lower the output error of the fit is than round to nearest on rows it was not
    fitted on: fitted on all folds but one, measured on that one, summed over the folds, relative
    to ``|| X~ W ||^2``; NaN with fewer than two folds of rows. Positive where the rows carry a fit
    that generalises."""
    folds = [f for f in folds if f.count]
    if len(folds) < 2:
        return float("nan")
    gain = size = 0.0
    for i, test_on in enumerate(folds):
        q, d = _fit(op, w, sum(folds[:i] + folds[i + 1:], PairedMoments()), grid, gptq, refit)
        gain += output_error(w, nearest, None, test_on) - output_error(w, q, d, test_on)
        size += float(np.sum(w * (test_on.h_fp8 @ w)))
    return gain / size if size > 0 else 0.0


def _paired_moments(float_model: Model | None, fp8_model: Model, ops: list[LinearOp], reads: dict[str, str],
                    source: CalibrationSource, batch_size: int) -> dict[str, list[PairedMoments]]:
    """One pass: each op's target rows and FP8 rows on the same batches, accumulated together in
    ``FOLDS`` folds (onnxruntime runs take turns, so one sample's rows stay in one fold).
    The target rows come from ``float_model``, or with None from the FP8 model itself (the op's
    input before its own rounding)."""
    float_tensors = list(dict.fromkeys(op.input for op in ops))
    fp8_tensors = list(dict.fromkeys(reads[op.name] for op in ops))
    runs = [(fp8_model, list(dict.fromkeys(fp8_tensors + (float_tensors if float_model is None else []))))]
    if float_model is not None:
        runs.append((float_model, float_tensors))
    taps = [Tap(model, tensors, moment_options(), label=label)
            for (model, tensors), label in zip(runs, ("the FP8 model", "the original model"))]
    moments = {op.name: [PairedMoments() for _ in range(FOLDS)] for op in ops}
    run = 0
    # RUN_SAMPLES per run, as capture: every op's input (twice) of a whole batch held at once
    # peaked at 1.9 GB on a 10 MB OCR model
    for batch in stream(taps[0], source, batch_size=batch_size, paired=taps[1] if len(taps) > 1 else None,
                        run_samples=RUN_SAMPLES):
        fold = run % FOLDS
        run += 1
        ys = batch.values
        xs = ys if float_model is None else batch.paired
        for op in ops:
            fp8_rows = dataclasses.replace(op.rows, tensor=reads[op.name])
            for x, y in zip(op.rows.groups_of(xs[op.input], ROWS_PER_PIECE, np.float32),
                            fp8_rows.groups_of(ys[reads[op.name]], ROWS_PER_PIECE, np.float32)):
                moments[op.name][fold].update(x, y)
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
    ``gptq=False`` rounds ``W*`` to nearest instead of by GPTQ."""
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
        moments = _paired_moments(None if local else model, model.derive(fp8), chunk, reads, source, batch_size)
        del fp8
        for op in chunk:
            folds = moments[op.name]
            m = sum(folds, PairedMoments())
            if m.count == 0:
                continue
            stored = index.constant_value(op.weight)
            w = op.to_groups(stored.astype(np.float32)).astype(np.float64)
            nearest = op.to_groups(dequantized_weight(stored, op.params)).astype(np.float64)
            refit = m.count >= MIN_ROWS_PER_FEATURE * w.shape[1]
            grid = _grid(op, w.shape[0])
            gain = held_out_gain(op, w, nearest, folds, grid, gptq, refit)
            row = {"op": op.name, "rows": m.count, "refit": refit, "held_out_reduction": gain}
            if not gain > 0:
                report.append({**row, "output_error_reduction": 0.0})
                continue
            q, d = _fit(op, w, m, grid, gptq, refit)
            row["output_error_reduction"] = asymmetric_error(w, nearest, m) - asymmetric_error(w, q, m)
            replaced[op.weight] = op.from_groups(q, stored.shape).astype(stored.dtype)
            if op.bias:
                b = index.constant_value(op.bias)
                corrected = b.reshape(-1).astype(np.float64) + op.alpha * d / op.beta
                new_bias[op.bias_reader] = (op.bias, op.bias_index, corrected.astype(b.dtype).reshape(b.shape))
                row["bias_max_shift"] = float(np.max(np.abs(corrected - b.reshape(-1))))
            report.append(row)
        if progress:
            progress(i + 1, len(chunks))
    return _with_changes(model.proto, replaced, new_bias), report
