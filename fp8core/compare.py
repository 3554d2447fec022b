"""Precision comparison (SPEC section 6): where does the FP8 model depart from the original?

The original and the FP8 model are run on the same samples, batch by batch, in one stream
(:func:`fp8core.stream.stream` with ``paired=``), with the output tensor of every FP8 op exposed as an extra
graph output (the rewrite keeps an FP8 op's output name, so the same name is read from both
models). Each batch is folded into per-tensor accumulators and dropped: memory does not grow with
the number of samples.

For every FP8 op output and every model output, with ``x`` the original value, ``y`` the FP8
model's value and the error ``e = y - x`` (all in float64, over the N pairs where both ``x`` and
``y`` are finite; the other pairs are counted in ``nonfinite`` and left out):

* ``mse = sum e^2 / N``, ``mae = sum |e| / N``;
* ``snr = sum e^2 / sum x^2``: noise-to-signal power, lower is better, as the calibration loss
  :func:`fp8core.losses.snr` (0 when x is all zero); ``snr_db = -10 log10(snr)`` is the usual
  signal-to-noise ratio in dB (higher is better, inf without noise);
* ``cos_dist = 1 - <x, y> / (|x| |y|)`` (0 if x and y are both all zero, 1 if only one is). It is
  evaluated without the cancellation of ``1 - (a number close to 1)``: from
  ``|e|^2 = |x|^2 + |y|^2 - 2<x, y>`` follows ``cos_dist = (|e|^2 - (|y| - |x|)^2) / (2 |x| |y|)``,
  and ``|y| - |x| = sum e (x + y) / (|x| + |y|)``; both ``sum e^2`` and ``sum e (x + y)`` are
  accumulated directly, so a tiny distance keeps its digits;
* streaming statistics of x, y and e (:class:`ValueSummary`): mean, population std, min, max,
  skewness ``sqrt(n) M3 / M2^1.5``, excess kurtosis ``n M4 / M2^2 - 3`` (Pebay's mergeable
  moments, as :class:`fp8core.stats.TensorStats`), and a 32-bin histogram.

Histogram range. A fixed-range histogram must know its range before the first value arrives. Two
rules (``histogram_range``):

* ``"two_pass"`` (default): a first pass over the data runs both models and accumulates
  everything except the histograms, which gives the exact min and max of x, y and e; the second
  pass fills 32 equal bins over ``[min, max]``. The histogram then holds every value, and equals
  ``numpy.histogram(all_values, 32, (min, max))``. Costs a second run of both models.
* ``"first_batch"``: one pass; the range is the first batch's ``[min, max]`` widened by 50% of its
  width on each side, and values outside it are counted in ``underflow`` / ``overflow``.

Results are in graph order (op outputs by their op's position, then the model outputs).

An op's output error also carries every error made upstream, so a per-op ranking by ``snr``
blames every op after a bad one. Each op row therefore also records ``input_snr``, the largest
``snr`` of its activation inputs (the tensors as they reach the op in both models, before the FP8
op's own QuantizeLinear; 0 for a graph input), and ``added_snr = max(0, snr - input_snr)``: the
noise-to-signal the op adds itself. (Independent noises add in power, and a linear op carries
its input's relative noise through roughly unchanged, so the difference estimates the op's own
part.) The **worst ops** are those with the largest ``added_snr``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx

from fp8core.errors import FP8Error
from fp8core.calibration import CalibrationSource
from fp8core.charts import per_op_bar_chart
from fp8core.graph import GraphIndex, graph_inputs, nodes_by_name
from fp8core.model import Model
from fp8core.losses import snr_db
from fp8core.modelio import write_bytes_atomic
from fp8core.plan import OpPlan
from fp8core.stats import Moments
from fp8core.stream import Tap, accumulate, stream

HISTOGRAM_BINS = 32
FIRST_BATCH_MARGIN = 0.5  # "first_batch" range: widened by this fraction of its width per side
WORST_MARKED = 3  # ops marked as worst in precision_compare.log
HistogramRange = Literal["two_pass", "first_batch"]
HISTOGRAM_RANGES: tuple[str, ...] = ("two_pass", "first_batch")
METRICS: tuple[str, ...] = ("mse", "mae", "snr", "snr_db", "cos_dist")


class CompareError(FP8Error):
    """The comparison cannot run; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------
# Streaming accumulators
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FixedHistogram:
    """Counts of values in ``bins`` equal bins over ``[low, high]`` (numpy.histogram's rule: the
    last bin is closed), plus counts below and above the range."""

    low: float
    high: float
    bins: int = HISTOGRAM_BINS
    counts: np.ndarray = None  # type: ignore[assignment]
    underflow: int = 0
    overflow: int = 0

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)
        if not self.high > self.low:  # a constant tensor: a unit-wide range around it
            self.low, self.high = self.low - 0.5, self.low + 0.5

    def update(self, v: np.ndarray) -> None:
        counts, _ = np.histogram(v, self.bins, (self.low, self.high))
        self.counts += counts
        self.underflow += int(np.count_nonzero(v < self.low))
        self.overflow += int(np.count_nonzero(v > self.high))

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "counts": self.counts.tolist(),
                "underflow": self.underflow, "overflow": self.overflow}


@dataclasses.dataclass
class ValueSummary:
    """Streaming moments, min, max and (once its range is set) a histogram of one value stream."""

    moments: Moments = dataclasses.field(default_factory=lambda: Moments(0, 0.0, 0.0, 0.0, 0.0))
    min: float = math.inf
    max: float = -math.inf
    histogram: FixedHistogram | None = None

    def update_moments(self, v: np.ndarray) -> None:
        """Fold a batch of finite float64 values into the moments, min and max."""
        if v.size == 0:
            return
        mean = float(v.sum()) / v.size
        c = v - mean
        c2 = c * c
        self.moments = self.moments.merged(
            Moments(v.size, mean, float(c2.sum()), float((c2 * c).sum()), float((c2 * c2).sum())))
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def start_histogram(self, low: float, high: float) -> None:
        self.histogram = FixedHistogram(low, high)

    @property
    def count(self) -> int:
        return self.moments.n

    @property
    def mean(self) -> float:
        return self.moments.mean if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.moments.m2 / self.count) if self.count else math.nan

    @property
    def skewness(self) -> float:
        m = self.moments
        return math.sqrt(m.n) * m.m3 / m.m2**1.5 if m.n and m.m2 > 0 else 0.0

    @property
    def kurtosis(self) -> float:
        m = self.moments
        return m.n * m.m4 / m.m2**2 - 3.0 if m.n and m.m2 > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "mean": self.mean, "std": self.std, "min": self.min if self.count else math.nan,
            "max": self.max if self.count else math.nan, "skewness": self.skewness,
            "kurtosis": self.kurtosis,
            "histogram": None if self.histogram is None else self.histogram.to_dict(),
        }


@dataclasses.dataclass
class TensorComparison:
    """Everything compared for one tensor: error sums, and summaries of x, y and e = y - x."""

    label: str  # op name for an op output, the tensor name for a model output
    tensor: str
    kind: Literal["op_output", "model_output"]
    op_type: str | None
    position: int  # graph order of the op; model outputs come after every op
    count: int = 0
    nonfinite: int = 0
    sq_err: float = 0.0  # sum e^2
    abs_err: float = 0.0  # sum |e|
    x_sq: float = 0.0  # sum x^2
    y_sq: float = 0.0  # sum y^2
    e_dot_sum: float = 0.0  # sum e (x + y) = |y|^2 - |x|^2
    original: ValueSummary = dataclasses.field(default_factory=ValueSummary)
    fp8: ValueSummary = dataclasses.field(default_factory=ValueSummary)
    error: ValueSummary = dataclasses.field(default_factory=ValueSummary)
    input_tensors: tuple[str, ...] = ()  # activation inputs of the op (op rows only)
    input_snr: float | None = None  # largest snr of those inputs, set after the run

    def pairs(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The finite (x, y) pairs of a batch as float64, and e = y - x."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if x.shape != y.shape:
            raise CompareError(
                f"{self.tensor!r} has {x.size} values in the original model but {y.size} in the "
                "FP8 model; the FP8 model must come from this model")
        return x, y, y - x

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """First-pass update: error sums, moments, min, max (and histograms if started)."""
        x, y, e = self.pairs(x, y)
        finite = np.isfinite(x) & np.isfinite(y)
        if not finite.all():
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x, y, e = x[finite], y[finite], e[finite]
        self.count += x.size
        self.sq_err += float(np.sum(e * e))
        self.abs_err += float(np.sum(np.abs(e)))
        self.x_sq += float(np.sum(x * x))
        self.y_sq += float(np.sum(y * y))
        self.e_dot_sum += float(np.sum(e * (x + y)))
        for summary, v in ((self.original, x), (self.fp8, y), (self.error, e)):
            summary.update_moments(v)
            if summary.histogram is not None:
                summary.histogram.update(v)

    def update_histograms(self, x: np.ndarray, y: np.ndarray) -> None:
        """Second-pass update (two_pass rule): the histograms only."""
        x, y, e = self.pairs(x, y)
        finite = np.isfinite(x) & np.isfinite(y)
        for summary, v in ((self.original, x), (self.fp8, y), (self.error, e)):
            summary.histogram.update(v[finite])

    def start_histograms(self, margin: float = 0.0) -> None:
        """Fix every histogram's range: [min, max] seen so far, widened by ``margin`` * width."""
        for s in (self.original, self.fp8, self.error):
            low, high = (s.min, s.max) if s.count else (0.0, 0.0)
            pad = margin * (high - low)
            s.start_histogram(low - pad, high + pad)

    # --- metrics ---------------------------------------------------------------------------
    @property
    def mse(self) -> float:
        return self.sq_err / self.count if self.count else math.nan

    @property
    def mae(self) -> float:
        return self.abs_err / self.count if self.count else math.nan

    @property
    def snr(self) -> float:
        """Noise-to-signal power ``sum e^2 / sum x^2`` (0 when x is all zero)."""
        return self.sq_err / self.x_sq if self.x_sq > 0 else 0.0

    @property
    def snr_db(self) -> float:
        return snr_db(self.snr)

    @property
    def added_snr(self) -> float:
        """``max(0, snr - input_snr)``: the noise-to-signal this op adds (module docstring)."""
        return self.snr if self.input_snr is None else max(0.0, self.snr - self.input_snr)

    @property
    def cos_dist(self) -> float:
        """``1 - cos(x, y)``, without cancellation (see the module docstring)."""
        if self.x_sq == 0.0 or self.y_sq == 0.0:
            return 0.0 if self.x_sq == self.y_sq else 1.0
        nx, ny = math.sqrt(self.x_sq), math.sqrt(self.y_sq)
        radial = self.e_dot_sum / (nx + ny)  # |y| - |x|
        return min(2.0, max(0.0, (self.sq_err - radial * radial) / (2.0 * nx * ny)))

    def metric(self, name: str) -> float:
        if name not in METRICS + ("added_snr",):
            raise CompareError(f"unknown comparison metric {name!r}; use one of {', '.join(METRICS)}, added_snr")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {
            "label": self.label, "tensor": self.tensor, "kind": self.kind, "op_type": self.op_type,
            "position": self.position, "count": self.count, "nonfinite": self.nonfinite,
            **{m: _json_float(self.metric(m)) for m in METRICS},
            "input_snr": None if self.input_snr is None else _json_float(self.input_snr),
            "added_snr": _json_float(self.added_snr),
            "original": _json_floats(self.original.to_dict()),
            "fp8": _json_floats(self.fp8.to_dict()),
            "error": _json_floats(self.error.to_dict()),
        }


@dataclasses.dataclass
class ComparisonReport:
    """The comparison of every compared tensor, in graph order."""

    rows: list[TensorComparison]
    samples: int
    data: str | None = None
    histogram_range: str = "two_pass"
    body_ops: tuple[str, ...] = ()  # FP8 ops inside If/Loop/Scan bodies: not compared one by one

    @property
    def op_rows(self) -> list[TensorComparison]:
        return [r for r in self.rows if r.kind == "op_output"]

    @property
    def output_rows(self) -> list[TensorComparison]:
        return [r for r in self.rows if r.kind == "model_output"]

    def worst_ops(self, k: int = WORST_MARKED) -> list[TensorComparison]:
        """The k ops that add the most noise (largest ``added_snr``), worst first."""
        return sorted(self.op_rows, key=lambda r: (-_nan_low(r.added_snr), r.position))[:k]

    def output_metric(self, name: str) -> float:
        """A metric over the model outputs: the worst output's value (max; min for snr_db)."""
        values = [r.metric(name) for r in self.output_rows]
        if not values:
            raise CompareError("the comparison has no model outputs")
        return min(values) if name == "snr_db" else max(values)

    def to_dict(self) -> dict:
        worst = [r.label for r in self.worst_ops()]
        return {
            "samples": self.samples, "data": self.data, "histogram_range": self.histogram_range,
            "histogram_bins": HISTOGRAM_BINS, "worst_ops": worst, "body_ops": list(self.body_ops),
            "model_outputs": {m: _json_float(self.output_metric(m)) for m in METRICS} if self.output_rows else {},
            "tensors": [r.to_dict() for r in self.rows],
        }


def _nan_low(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _json_float(v):
    """JSON has no inf/NaN: they become strings, so the file stays standard JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _json_floats(d: dict) -> dict:
    return {k: _json_float(v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Running the two models
# --------------------------------------------------------------------------------------------
def comparison_targets(float_model: onnx.ModelProto, plans: list[OpPlan]) -> list[TensorComparison]:
    """Empty accumulators for every FP8 op's output and every model output, in graph order."""
    nodes = {n.name: n for n in float_model.graph.node}
    in_bodies = nodes_by_name(float_model.graph).keys() - nodes.keys()
    index = GraphIndex(float_model.graph)
    fed = {vi.name for vi in graph_inputs(float_model.graph)}  # identical in both models: snr 0
    rows = []
    for plan in sorted((p for p in plans if p.fp8), key=lambda p: p.position):
        node = nodes.get(plan.name)
        if node is None and plan.name in in_bodies:  # its output lives in a body: body_ops
            continue
        if node is None:
            raise CompareError(f"plan names op {plan.name!r}, which is not in the model; plan the same model")
        inputs = tuple(t for t in node.input if t and t not in fed and not index.is_constant(t))
        rows.append(TensorComparison(plan.name, node.output[0], "op_output", plan.op_type, plan.position,
                                     input_tensors=inputs))
    end = len(float_model.graph.node)
    for out in float_model.graph.output:
        rows.append(TensorComparison(out.name, out.name, "model_output", None, end))
    return rows


class Comparison:
    """Accumulator (:mod:`fp8core.stream`): every row's statistics from the paired runs of the
    original (``batch.values``) and the FP8 model (``batch.paired``); the first pass."""

    def __init__(self, rows: list[TensorComparison], op_inputs: dict[str, TensorComparison], first_batch: bool):
        self.rows, self.op_inputs, self.first_batch = rows, op_inputs, first_batch
        self.tensors = [r.tensor for r in rows] + list(op_inputs)

    def add_batch(self, batch) -> None:
        xs, ys = batch.values, batch.paired
        for name, acc in self.op_inputs.items():
            acc.update(xs[name], ys[name])
        for row in self.rows:
            row.update(xs[row.tensor], ys[row.tensor])
            if self.first_batch and row.original.histogram is None:
                row.start_histograms(FIRST_BATCH_MARGIN)  # the first batch is then binned too
                row.update_histograms(xs[row.tensor], ys[row.tensor])


class Histograms:
    """Accumulator: the histograms over ranges known from a first pass (``"two_pass"``)."""

    def __init__(self, rows: list[TensorComparison]):
        self.rows = rows
        self.tensors = [r.tensor for r in rows]

    def add_batch(self, batch) -> None:
        for row in self.rows:
            row.update_histograms(batch.values[row.tensor], batch.paired[row.tensor])


def compare_models(
    float_model: Model | onnx.ModelProto,
    fp8_model: Model | onnx.ModelProto,
    plans: list[OpPlan],
    source: CalibrationSource,
    batch_size: int = 16,
    max_samples: int | None = None,
    histogram_range: HistogramRange = "two_pass",
    progress: Callable[[int, int], None] | None = None,
) -> ComparisonReport:
    """Compare every FP8 op output and model output of the two models on ``source``'s samples.

    ``float_model`` is the prepared float model the plans were made on; ``fp8_model`` its rewrite.
    ``max_samples`` limits the samples (the first ones). See the module docstring for the rules.
    """
    if histogram_range not in HISTOGRAM_RANGES:
        raise CompareError(f"unknown histogram_range {histogram_range!r}; use one of {', '.join(HISTOGRAM_RANGES)}")
    if batch_size < 1:
        raise CompareError(f"batch_size {batch_size} must be >= 1")
    rows = comparison_targets(Model.of(float_model).proto, plans)
    op_inputs = {t: TensorComparison(t, t, "op_output", None, -1) for r in rows for t in r.input_tensors}
    samples = source.num_samples if max_samples is None else min(max_samples, source.num_samples)
    if samples == 0:
        raise CompareError(f"comparison data {source.path} has no samples; give data with at least one sample")
    first = Comparison(rows, op_inputs, histogram_range == "first_batch")
    original = Tap(float_model, first.tensors, label="the original model", what="comparison")
    fp8 = Tap(fp8_model, first.tensors, label="the FP8 model", what="comparison")
    passes = 2 if histogram_range == "two_pass" else 1
    per_pass = -(-samples // batch_size)

    def runs(done_before: int):
        told = (lambda done, _: progress(done_before + done, passes * per_pass)) if progress else None
        return stream(original, source, batch_size=batch_size, paired=fp8, max_samples=max_samples, progress=told)

    accumulate(runs(0), [first])
    for row in rows:
        if row.kind == "op_output":
            row.input_snr = max((op_inputs[t].snr for t in row.input_tensors), default=0.0)
    if passes == 2:
        for row in rows:
            row.start_histograms()
        accumulate(runs(per_pass), [Histograms(rows)])
    compared = {r.label for r in rows}
    body_ops = tuple(p.name for p in plans if p.fp8 and p.name not in compared)
    return ComparisonReport(rows, samples, str(source.path), histogram_range, body_ops)


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def _num(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def format_compare_log(report: ComparisonReport, keep_gain: dict[str, float] | None = None,
                       gain_metric: str = "snr") -> str:
    """precision_compare.log: one table in graph order, worst ops marked, then the statistics.

    ``keep_gain`` (op label -> how much keeping that op alone in original precision lowers the
    model outputs' ``gain_metric``, see :class:`fp8core.fallback.Sensitivity`) adds a column and
    marks the ops that matter most for the output, which are often not the noisiest ones."""
    worst = {r.label: i + 1 for i, r in enumerate(report.worst_ops())}
    keep_gain = keep_gain or {}
    matters = {n: i + 1 for i, n in enumerate(sorted((n for n in keep_gain if keep_gain[n] == keep_gain[n]),
                                                     key=lambda n: -keep_gain[n])[:WORST_MARKED])}
    lines = [f"FP8 precision comparison on {report.samples} samples"
             + (f" of {report.data}" if report.data else ""),
             f"x = original, y = FP8, e = y - x; snr = sum e^2 / sum x^2 (noise/signal), "
             f"snr_db = -10 log10(snr); added_snr = snr - snr of the op's input (the op's own part); histograms: {HISTOGRAM_BINS} bins, range {report.histogram_range}",
             *([f"keep_gain = how much the model outputs' {gain_metric} drops when this op alone is kept in "
                f"original precision (measured; the ops that matter most are marked)"] if keep_gain else []),
             *([f"{len(report.body_ops)} FP8 op(s) inside If/Loop/Scan bodies are not compared one by one "
                f"(their effect is in the model outputs): {', '.join(report.body_ops)}"] if report.body_ops else []),
             ""]
    header = (f"{'#':>3}  {'tensor':<28} {'kind':<12} {'mse':>10} {'mae':>10} {'snr':>10} {'snr_db':>8} "
              f"{'cos_dist':>10} {'added_snr':>10}  " + (f"{'keep_gain':>10}  " if keep_gain else ""))
    lines.append(header)
    lines.append("-" * len(header))
    for i, r in enumerate(report.rows):
        marks = [f"<- worst #{worst[r.label]}"] if r.kind == "op_output" and r.label in worst else []
        marks += [f"<- matters #{matters[r.label]}"] if r.kind == "op_output" and r.label in matters else []
        kind = r.op_type if r.kind == "op_output" else "output"
        added = _num(r.added_snr) if r.kind == "op_output" else ""
        gain = (f"{_num(keep_gain[r.label]) if r.label in keep_gain else '':>10}  ") if keep_gain else ""
        lines.append(f"{i:>3}  {r.label:<28} {kind:<12} {_num(r.mse):>10} {_num(r.mae):>10} {_num(r.snr):>10} "
                     f"{_num(r.snr_db):>8} {_num(r.cos_dist):>10} {added:>10}  {gain}{' '.join(marks)}".rstrip())
    lines.append("")
    lines.append("statistics (mean, std, min, max, skewness, kurtosis; histogram counts low..high)")
    for r in report.rows:
        lines.append("")
        extra = f", {r.nonfinite} non-finite pairs left out" if r.nonfinite else ""
        lines.append(f"{r.label} (tensor {r.tensor}, {r.count} values{extra})")
        for name, s in (("original", r.original), ("fp8", r.fp8), ("error", r.error)):
            lines.append(f"  {name:<8} mean {_num(s.mean)}  std {_num(s.std)}  min {_num(s.min)}  max {_num(s.max)}  "
                         f"skew {_num(s.skewness)}  kurt {_num(s.kurtosis)}")
            h = s.histogram
            if h is not None:
                out = (f"  under {h.underflow} over {h.overflow}" if h.underflow or h.overflow else "")
                lines.append(f"           hist [{_num(h.low)}, {_num(h.high)}]: {' '.join(map(str, h.counts.tolist()))}{out}")
    return "\n".join(lines) + "\n"


def snr_chart(report: ComparisonReport, path: str) -> None:
    """PNG: snr_db of every FP8 op output in graph order (model outputs as the last bars)."""
    rows = report.rows
    values = [r.snr_db for r in rows]
    cap = max([v for v in values if math.isfinite(v)], default=0.0) + 10.0  # "no noise" bars drawn at a cap
    heights = [cap if v == math.inf else (0.0 if not math.isfinite(v) else v) for v in values]
    worst = {r.label for r in report.worst_ops()}
    colors = ["#cc3311" if r.label in worst and r.kind == "op_output" else
              ("#228833" if r.kind == "model_output" else "#4477aa") for r in rows]
    per_op_bar_chart(path, [r.label for r in rows], heights, "SNR (dB), higher is better",
                     "FP8 vs original per op output, graph order (red: worst ops, green: model outputs)", colors)


def write_compare_logs(report: ComparisonReport, folder: str, keep_gain: dict[str, float] | None = None,
                       gain_metric: str = "snr") -> dict[str, str]:
    """Write precision_compare.log, precision_compare.json and precision_compare_snr.png."""
    os.makedirs(folder, exist_ok=True)
    paths = {"log": os.path.join(folder, "precision_compare.log"),
             "json": os.path.join(folder, "precision_compare.json"),
             "chart": os.path.join(folder, "precision_compare_snr.png")}
    write_bytes_atomic(format_compare_log(report, keep_gain, gain_metric).encode(), paths["log"])
    data = report.to_dict()
    if keep_gain:
        data["keep_gain"] = {"metric": gain_metric, "ops": {k: (v if math.isfinite(v) else str(v))
                                                            for k, v in keep_gain.items()}}
    write_bytes_atomic((json.dumps(data, indent=1) + "\n").encode(), paths["json"])
    snr_chart(report, paths["chart"])
    return paths


_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_metrics(report: ComparisonReport) -> dict[str, float]:
    """Finite per-op and overall metrics under MLflow-safe keys.

    ``compare/<op>/<metric>`` for each op output, ``compare_output/<tensor>/<metric>`` for each model
    output, and ``compare_output/<metric>`` for the worst model output (see
    :meth:`ComparisonReport.output_metric`).
    """
    out: dict[str, float] = {}
    for r in report.rows:
        prefix = "compare" if r.kind == "op_output" else "compare_output"
        label = _METRIC_KEY_BAD.sub("_", r.label)
        for m in METRICS:
            v = r.metric(m)
            if math.isfinite(v):
                out[f"{prefix}/{label}/{m}"] = float(v)
    if report.output_rows:
        for m in METRICS:
            v = report.output_metric(m)
            if math.isfinite(v):
                out[f"compare_output/{m}"] = float(v)
    return out
