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
* Memory: a pass holds each of its ops' ``X~^T X~`` (``K x K``) and ``X~^T X`` or ``X~^T X W``
  (:class:`PairedMoments`), float32, and at most ``MOMENT_BUDGET`` bytes of them: ops past it
  wait for another pass, whose FP8 model carries the fits made before it (ResNet50 under
  ``--weight_rounding auto``, its K = 4608 Convs left out: 0.36 GB, 1 pass; the 14 real models
  and the demo: 1).

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
from fp8core.plan import OpPlan, QuantParams
from fp8core.rewrite import rewrite_to_fp8
from fp8core.stream import Tap, stream
from fp8core.weight_adjust import LinearOp, _grid, _with_changes, linear_ops
from fp8core.weight_scales import dequantized_weight

FIT_DAMP = 0.01
PASSES = 4
MOMENT_BUDGET = 512 << 20  # bytes of running sums per pass; ops past it wait for another pass
ROWS_PER_PIECE = 1024  # rows kept per sample of a Conv (im2col gives one per output position)
FLUSH_ROWS = 256  # rows that wait to be multiplied into an op's sums together


@dataclasses.dataclass
class PairedMoments:
    """Running sums over paired rows of one op whose float weight is ``w`` (``[G, K, N]``): float
    rows ``X`` and FP8-model rows ``X~``. ``C = X~^T X`` is only ever read as ``C W``, so the
    cheaper of two sums is kept: ``C`` itself (``K x K``, one product of ``K^2`` per row) when
    ``K < 2 N`` (a 1x1 Conv that widens: C_in 256 -> 1024), else ``C W`` (``K x N``, ``X W`` then
    ``X~^T (X W)``, ``2 K N`` per row; a 3x3 Conv of 512 channels holds 4608 x 512 values for it
    instead of 4608 x 4608).

    Rows are multiplied at least ``min(K, FLUSH_ROWS)`` at a time: a 7x7 map gives 49 rows per
    sample, and a product per sample would write the whole ``K x K`` sum (21M values for K = 4608)
    for each; a depthwise Conv (K = 9 or 25) multiplies each sample's rows at once, holding none.
    The products and their running sums have ``w``'s dtype: float32 in the fit (each product
    already sums hundreds of rows in float32; float64 sums doubled the memory and took ResNet50
    two passes over the data); the row sums of the bias shift, a small difference of two sums,
    are float64."""

    w: np.ndarray  # [G, K, N], the dtype the products and sums are computed in (float32 in the fit)
    count: int = 0
    _sums: tuple[np.ndarray, ...] | None = None  # X~^T X~, C or C W, sum X~, sum X
    _pending: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    _pending_rows: int = 0
    _cross_w: np.ndarray | None = None

    @staticmethod
    def sums_c(k: int, n: int) -> bool:
        """Whether ``C`` (not ``C W``) is summed for a weight of ``K`` inputs and ``N`` outputs."""
        return k < 2 * n

    @staticmethod
    def nbytes(g: int, k: int, n: int) -> int:
        """The running sums' size for a weight of ``[g, k, n]``, and the rows waiting to be added."""
        cross = k * k if PairedMoments.sums_c(k, n) else k * n
        return 4 * g * (k * k + cross) + 16 * g * k + 2 * 4 * g * k * min(k, FLUSH_ROWS)

    def update(self, fp8_t: np.ndarray, float_t: np.ndarray) -> None:
        """Add rows of both as columns, ``[G, K, R]`` each (:meth:`~fp8core.feature_moments.Rows.columns`)."""
        self._pending.append((fp8_t, float_t))
        self._pending_rows += fp8_t.shape[2]
        self.count += fp8_t.shape[2]
        if self._pending_rows >= min(fp8_t.shape[1], FLUSH_ROWS):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        fp8_t, float_t = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
                          for parts in zip(*self._pending))
        self._pending, self._pending_rows = [], 0
        g, k, _ = fp8_t.shape
        n = self.w.shape[2]
        sums_c = self.sums_c(k, n)
        if self._sums is None:
            dtype = self.w.dtype
            self._sums = (np.zeros((g, k, k), dtype), np.zeros((g, k, k if sums_c else n), dtype),
                          np.zeros((g, k)), np.zeros((g, k)))
        h, cross, sum_fp8, sum_float = self._sums
        h += fp8_t @ fp8_t.transpose(0, 2, 1)
        cross += fp8_t @ float_t.transpose(0, 2, 1) if sums_c else fp8_t @ (float_t.transpose(0, 2, 1) @ self.w)
        sum_fp8 += fp8_t.sum(axis=2, dtype=np.float64)
        sum_float += float_t.sum(axis=2, dtype=np.float64)
        self._cross_w = None

    def _sum(self, i: int) -> np.ndarray:
        self._flush()
        return self._sums[i]

    @property
    def cross_w(self) -> np.ndarray:
        """``[G, K, N]``  X~^T X W"""
        if self._cross_w is None:
            cross = self._sum(1)
            g, k, n = self.w.shape
            self._cross_w = cross.astype(np.float64) @ np.asarray(self.w, np.float64) if self.sums_c(k, n) else cross
        return self._cross_w

    h_fp8 = property(lambda self: self._sum(0), doc="[G, K, K]  X~^T X~")
    sum_fp8 = property(lambda self: self._sum(2), doc="[G, K]  sum of the rows of X~")
    sum_float = property(lambda self: self._sum(3), doc="[G, K]  sum of the rows of X")


def fitted_weight(m: PairedMoments, damp: float = FIT_DAMP) -> np.ndarray:
    """``W*`` per group (module docstring), float64 ``[G, K, N]``."""
    w = np.asarray(m.w, np.float64)
    out = w.copy()
    k = w.shape[1]
    if m.count < MIN_ROWS_PER_FEATURE * k:
        return out
    for g in range(w.shape[0]):
        h = m.h_fp8[g]
        energy = float(np.mean(np.diag(h)))
        if energy <= 0:  # the group never sees a non-zero input
            continue
        lam = damp * energy
        damped = h.astype(np.float64)  # H~ + lam I, without a K x K identity beside it
        damped[np.diag_indices(k)] += lam
        out[g] = np.linalg.solve(damped, m.cross_w[g] + lam * w[g])
        del damped
    return out


def asymmetric_error(q: np.ndarray, m: PairedMoments) -> float:
    """``(sum_g || X W - X~ Q ||^2 - || X W ||^2) / || X~ W ||^2`` from the moments (``W`` = ``m.w``):
    the output error up to the constant ``|| X W ||^2`` (its Gram matrix would cost as much as the
    others), relative to the output's size. Differences between two ``Q`` are exact; lower is better."""
    w, q = np.asarray(m.w, np.float64), np.asarray(q, np.float64)
    size = float(np.sum(w * (m.h_fp8 @ w)))
    return (float(np.sum(q * (m.h_fp8 @ q))) - 2 * float(np.sum(q * m.cross_w))) / size if size > 0 else 0.0


def error_reduction(before: np.ndarray, after: np.ndarray, m: PairedMoments) -> float:
    """``asymmetric_error(before) - asymmetric_error(after)`` with two products by ``H~`` instead of
    four: ``(B - A) . H~ (B + A) - 2 (B - A) . C W``, relative to ``|| X~ W ||^2`` (the per-op
    report; on ResNet50 the four products took ~3 s)."""
    w, b, a = (np.asarray(v, np.float64) for v in (m.w, before, after))
    size = float(np.sum(w * (m.h_fp8 @ w)))
    d = b - a
    return (float(np.sum(d * (m.h_fp8 @ (b + a)))) - 2 * float(np.sum(d * m.cross_w))) / size if size > 0 else 0.0


def input_rounding(plans: list[OpPlan]) -> dict[str, QuantParams | None]:
    """Each op's format and scale of its activation input (input 0; None: not quantized)."""
    return {p.name: next((q.params for q in p.input("activation") if q.index == 0), None) for p in plans}


def _paired_moments(float_model: Model | None, fp8_model: Model, ops: list[LinearOp], weights: dict[str, np.ndarray],
                    reads: dict[str, str], rounding: dict[str, QuantParams | None], source: CalibrationSource,
                    batch_size: int, progress: Callable[[int, int], None] | None = None,
                    padding_mask: str | None = None) -> dict[str, PairedMoments]:
    """One pass: each op's target rows and FP8 rows on the same batches, accumulated together.
    ``weights``: each op's float weight as ``[G, K, N]``.

    With ``float_model``, the target rows are its op inputs and the FP8 rows the FP8 model's
    (``reads``: each op's dequantized input there). With None, both come from the FP8 model: the
    target rows are the op's input before its own rounding, and the FP8 rows are those rows
    rounded here by ``rounding[op]`` (the activation's format and scale; None: not rounded) as
    the op's Q/DQ pair does, bit for bit (:func:`fp8core.formats.round_trip`, checked against
    onnxruntime's QuantizeLinear): the model exposes each input once, not again after its Q/DQ
    (PP-OCRv4 det, library run: the pass's peak RSS 1.36 -> 1.18 GB). ``padding_mask``: the
    input whose zeros mark padding tokens, whose rows are left out (:mod:`fp8core.padding`)."""
    inputs = list(dict.fromkeys(op.input for op in ops))
    # a pass reads the inputs of a run of ops: the models are cut after the last of them
    if float_model is None:
        taps = [Tap(fp8_model, inputs, moment_options(), label="the FP8 model", prune=True)]
    else:
        taps = [Tap(fp8_model, list(dict.fromkeys(reads[op.name] for op in ops)), moment_options(),
                    label="the FP8 model", prune=True),
                Tap(float_model, inputs, moment_options(), label="the original model", prune=True)]
    moments = {op.name: PairedMoments(weights[op.name]) for op in ops}
    last_reader = {op.input: i for i, op in enumerate(ops)}
    # RUN_SAMPLES per run, as capture: every op's input of a whole batch held at once peaked at
    # 1.9 GB on a 10 MB OCR model
    for batch in stream(taps[0], source, batch_size=batch_size, paired=taps[1] if len(taps) > 1 else None,
                        run_samples=RUN_SAMPLES, progress=progress):
        mask = batch.feeds.get(padding_mask) if padding_mask else None
        for i, op in enumerate(ops):  # rows as the op reads its input
            if float_model is None:
                x, params = batch.values[op.input], rounding[op.name]
                fp8_x = x if params is None else params.round_trip(x)
                if last_reader[op.input] == i:  # each run's values go as soon as they are read
                    del batch.values[op.input]
            else:
                x, fp8_x = batch.paired[op.input], batch.values[reads[op.name]]
            if x.size == 0:  # inside an If branch this run did not take
                continue
            for fp8_t, float_t in op.rows.columns(fp8_x, ROWS_PER_PIECE, np.float32, paired=x, mask=mask):
                if fp8_t.shape[2]:  # not a batch of padding only
                    moments[op.name].update(fp8_t, float_t)
            del x, fp8_x
    return moments


def _chunks(ops: list[LinearOp], passes: int, sizes: dict[str, int], budget: int) -> list[list[LinearOp]]:
    """``passes`` runs of consecutive ops (graph order), each cut again where its ops' running
    sums (``sizes``) would pass ``budget`` bytes: ResNet50's in one pass would hold 1.1 GB."""
    n = max(1, min(passes, len(ops)))
    bounds = [round(i * len(ops) / n) for i in range(n + 1)]
    chunks = []
    for part in (ops[bounds[i]:bounds[i + 1]] for i in range(n) if bounds[i] < bounds[i + 1]):
        chunks.append([])
        held = 0
        for op in part:
            if chunks[-1] and held + sizes[op.name] > budget:
                chunks.append([])
                held = 0
            chunks[-1].append(op)
            held += sizes[op.name]
    return chunks


def fit_to_fp8_inputs(model: Model | onnx.ModelProto, plans: list[OpPlan], source: CalibrationSource,
                      batch_size: int, passes: int = PASSES, gptq: bool = True, local: bool = False,
                      progress: Callable[[int, int], None] | None = None, budget: int = MOMENT_BUDGET,
                      max_features: int | None = None, padding_mask: str | None = None,
                      ) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` whose FP8 linear ops carry weights (on the FP8 grid) and biases fitted
    to the inputs the FP8 model gives them (module docstring), and one report row per op.
    ``gptq=False`` rounds ``W*`` to nearest instead of by GPTQ. ``progress(done, total)``: data
    batches streamed, over every pass. At least ``passes`` passes, more where one would hold
    more than ``budget`` bytes of running sums (a later pass's FP8 model then carries the
    weights and biases fitted before it). ``max_features``: ops with more inputs ``K`` are left
    as they are (round to nearest), their report row says so. ``padding_mask``: the input marking
    padding tokens, whose rows the fit leaves out (:mod:`fp8core.padding`; None: every row)."""
    model = Model.of(model)
    ops = linear_ops(model.proto, plans, if_bodies=local)  # a branch's values are its own op's inputs
    index = model.index()
    replaced: dict[str, np.ndarray] = {}
    new_bias: dict[str, tuple[str, int, np.ndarray]] = {}
    shapes = {op.name: op.groups_shape(tuple(index.constant_tensor(op.weight).dims)) for op in ops}
    report = [{"op": op.name, "fit": f"skipped: {shapes[op.name][1]} inputs > {max_features}"}
              for op in ops if max_features is not None and shapes[op.name][1] > max_features]
    skipped = {row["op"] for row in report}
    ops = [op for op in ops if op.name not in skipped]
    rounding = input_rounding(plans)
    chunks = _chunks(ops, passes, {name: PairedMoments.nbytes(*shape) for name, shape in shapes.items()}, budget)
    for i, chunk in enumerate(chunks):
        current = model.derive(_with_changes(model.proto, replaced, new_bias))
        fp8 = rewrite_to_fp8(current, plans)
        reads = {n.name: n.input[0] for n in fp8.graph.node if n.input}  # each op's dequantized input
        told = (lambda done, total, before=i: progress(before * total + done, len(chunks) * total)) if progress else None
        weights = {op.name: np.ascontiguousarray(op.to_groups(index.constant_value(op.weight).astype(np.float32)))
                   for op in chunk}
        moments = _paired_moments(None if local else model, model.derive(fp8), chunk, weights, reads, rounding,
                                  source, batch_size, told, padding_mask)
        del fp8, weights
        for op in chunk:
            m = moments.pop(op.name)
            if m.count == 0:
                continue
            stored = index.constant_value(op.weight)
            w = np.asarray(m.w, np.float64)
            nearest = op.to_groups(dequantized_weight(stored, op.params)).astype(np.float64)
            row = {"op": op.name, "rows": m.count, "refit": m.count >= MIN_ROWS_PER_FEATURE * w.shape[1]}
            determined = rows_determine(m.count, w.shape[1])
            target = fitted_weight(m)
            grid = _grid(op, w.shape[0])
            if gptq:
                q = gptq_round_groups(target, m.h_fp8, grid).astype(np.float64)
            else:
                q = grid(target.astype(np.float32)).astype(np.float64)
            row["output_error_reduction"] = error_reduction(nearest, q, m)
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
