"""Automatic high-precision fallback: which FP8 ops go back to their original precision.

Two rules:

* ``--num_of_layers_keep_fp16 K`` (PopRT 1.5), :func:`keep_worst_ops`: keep the K ops with the
  worst per-op loss in original precision. The loss is either the precision comparison's
  added noise-to-signal ratio of each op's output (:func:`op_losses_from_comparison`: the op's
  own share of its output error, comparable across ops because it is relative) or the calibration search's chosen loss per op (input + weight).
  Ties go to the op earlier in graph order.
* ``--accuracy_target METRIC=VALUE``, :func:`fallback_for_target`: greedy on the measured model
  output. Starting from every planned op in FP8, each step tries keeping each remaining candidate
  op in original precision (one rewrite and one run of the subset per candidate), and keeps the
  one whose model output metric is best; it stops as soon as the target is met. Before the
  search it measures the model with *every* candidate kept: when even that misses the target, no
  subset can be trusted to meet it and the result says so (and keeps nothing). The
  metric is the worst model output's value (:meth:`fp8core.compare.ComparisonReport.output_metric`)
  of ``mse``, ``mae``, ``snr``, ``cos_dist`` (met when ``<= VALUE``), ``snr_db`` or
  ``top1_agreement`` (argmax of the first output over its last axis; met when ``>= VALUE``).
  Cost: ``1 + 1 + sum over steps of (candidates left)`` rewrites and runs of the subset; the
  subset (``max_samples`` first samples, default 32) and the original model's outputs on it are
  held in memory, so memory is bounded by the subset, not the data set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.compare import ComparisonReport, CompareError, TensorComparison, sample_batches
from fp8core.plan import OpPlan
from fp8core.rewrite import encode_weights, rewrite_to_fp8
from fp8core.runtime import make_session

LOWER_IS_BETTER = ("mse", "mae", "snr", "cos_dist")
HIGHER_IS_BETTER = ("snr_db", "top1_agreement")
TARGET_METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
KEEP_REASON_WORST = "kept: among the {k} worst ops by {source} (--num_of_layers_keep_fp16)"
KEEP_REASON_TARGET = "kept: needed for --accuracy_target {target} (step {step})"


class FallbackError(ValueError):
    """A fallback flag has a bad value; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AccuracyTarget:
    """``METRIC=VALUE`` on the model outputs, e.g. ``cos_dist=0.001``."""

    metric: str
    value: float

    def __post_init__(self):
        if self.metric not in TARGET_METRICS:
            raise FallbackError(f"--accuracy_target: unknown metric {self.metric!r}; use one of {', '.join(TARGET_METRICS)}")
        if not math.isfinite(self.value):
            raise FallbackError(f"--accuracy_target {self}: the value must be a finite number")
        if self.metric in LOWER_IS_BETTER and self.value < 0:
            raise FallbackError(f"--accuracy_target {self}: {self.metric} is never negative; give a value >= 0")
        if self.metric == "top1_agreement" and not 0 <= self.value <= 1:
            raise FallbackError(f"--accuracy_target {self}: top1_agreement is a fraction; give a value in 0..1")

    @classmethod
    def parse(cls, text: str) -> AccuracyTarget:
        name, sep, value = str(text).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise FallbackError(f"--accuracy_target {text!r}: expected METRIC=VALUE, e.g. cos_dist=0.001")
        try:
            number = float(value)
        except ValueError:
            raise FallbackError(f"--accuracy_target {text!r}: {value.strip()!r} is not a number") from None
        return cls(name.strip().lower(), number)

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def met(self, measured: float) -> bool:
        if math.isnan(measured):
            return False
        return measured >= self.value if self.higher_is_better else measured <= self.value

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` strictly better than ``b`` (NaN is worst)?"""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------
def fp8_op_names(plans: list[OpPlan]) -> list[str]:
    return [p.name for p in plans if p.fp8]


def keep_ops(plans: list[OpPlan], names: Iterable[str], reason: str) -> list[OpPlan]:
    """Copies of ``plans`` with the named FP8 ops kept in original precision (params cleared)."""
    names = set(names)
    unknown = names - set(fp8_op_names(plans))
    if unknown:
        raise FallbackError(f"cannot keep {', '.join(sorted(unknown))}: not an FP8 op of this plan")
    out = []
    for plan in plans:
        if plan.name in names:
            plan = dataclasses.replace(plan, fp8=False, reason=reason,
                                       inputs=[dataclasses.replace(q, params=None) for q in plan.inputs])
        out.append(plan)
    return out


# --------------------------------------------------------------------------------------------
# K worst ops
# --------------------------------------------------------------------------------------------
def op_losses_from_comparison(report: ComparisonReport, metric: str = "added_snr") -> dict[str, float]:
    """Per-op loss from the precision comparison, larger = worse (``snr_db`` is negated).

    The default ``added_snr`` is the noise each op adds itself; ``snr`` would also blame every op
    downstream of a bad one (see :mod:`fp8core.compare`).
    """
    sign = -1.0 if metric == "snr_db" else 1.0
    return {r.label: sign * r.metric(metric) for r in report.op_rows}


def worst_ops(plans: list[OpPlan], op_losses: dict[str, float], k: int) -> list[str]:
    """The ``k`` FP8 ops with the largest loss, worst first (ties: earlier in graph order).

    NaN losses rank worst (an op whose loss cannot be computed is not trusted in FP8).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FallbackError(f"--num_of_layers_keep_fp16 {k!r}: give a whole number >= 0")
    fp8 = [p for p in plans if p.fp8]
    missing = [p.name for p in fp8 if p.name not in op_losses]
    if missing:
        raise FallbackError(f"no loss for FP8 op(s) {', '.join(missing)}; losses must come from this plan")
    ranked = sorted(fp8, key=lambda p: (-_nan_high(op_losses[p.name]), p.position))
    return [p.name for p in ranked[:k]]


def _nan_high(v: float) -> float:
    return math.inf if math.isnan(v) else v


def keep_worst_ops(plans: list[OpPlan], op_losses: dict[str, float], k: int,
                   source: str = "loss") -> tuple[list[OpPlan], list[str]]:
    """Plans with the ``k`` worst FP8 ops kept in original precision, and their names.

    ``k`` larger than the number of FP8 ops keeps them all.
    """
    names = worst_ops(plans, op_losses, k)
    return keep_ops(plans, names, KEEP_REASON_WORST.format(k=k, source=source)), names


# --------------------------------------------------------------------------------------------
# Accuracy target
# --------------------------------------------------------------------------------------------
class OutputProbe:
    """Model-output metrics of candidate FP8 models on a fixed subset of samples.

    The subset's inputs and the original model's outputs on it are computed once and kept.
    """

    def __init__(self, float_model: onnx.ModelProto, source: CalibrationSource, batch_size: int = 16,
                 max_samples: int | None = 32, weights_dir: str | None = None):
        self.output_names = [o.name for o in float_model.graph.output]
        self.weights_dir = weights_dir  # external float weights (of the original and of kept ops)
        session = make_session(float_model, weights_dir=weights_dir)
        self.batches: list[tuple[dict, list[np.ndarray]]] = []
        for _, feeds in sample_batches(source, float_model, batch_size, max_samples):
            self.batches.append((feeds, session.run(self.output_names, feeds)))
        if not self.batches:
            raise FallbackError(f"data {source.path} has no samples; the accuracy target needs at least one")
        self.samples = sum(len(next(iter(f.values()))) for f, _ in self.batches)

    def measure(self, model: onnx.ModelProto) -> dict[str, float]:
        """Every target metric of ``model``'s outputs against the original's on the subset."""
        session = make_session(model, weights_dir=self.weights_dir)
        rows = [TensorComparison(n, n, "model_output", None, 0) for n in self.output_names]
        agree = total = 0
        for feeds, reference in self.batches:
            try:
                outputs = session.run(self.output_names, feeds)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CompareError(f"onnxruntime failed on a candidate FP8 model: {first}") from None
            for row, x, y in zip(rows, reference, outputs):
                row.update(x, y)
            a, b = reference[0], outputs[0]
            agree += int(np.count_nonzero(a.argmax(axis=-1) == b.argmax(axis=-1)))
            total += a.size // a.shape[-1] if a.ndim else 1
        report = ComparisonReport(rows, self.samples)
        out = {m: report.output_metric(m) for m in TARGET_METRICS if m != "top1_agreement"}
        out["top1_agreement"] = agree / total if total else math.nan
        return out


@dataclasses.dataclass
class FallbackStep:
    """One greedy step: the op added (None for the start), every kept op so far, the metric."""

    step: int
    added: str | None
    kept: list[str]
    metric: float
    met: bool
    tried: dict[str, float] = dataclasses.field(default_factory=dict)  # candidate -> metric


@dataclasses.dataclass
class FallbackResult:
    target: AccuracyTarget
    plans: list[OpPlan]
    kept: list[str]
    met: bool
    steps: list[FallbackStep]
    all_kept_metric: float
    samples: int
    message: str

    def to_dict(self) -> dict:
        return {"target": str(self.target), "met": self.met, "kept": self.kept, "samples": self.samples,
                "all_kept_metric": _json(self.all_kept_metric), "message": self.message,
                "steps": [{"step": s.step, "added": s.added, "kept": s.kept, "metric": _json(s.metric),
                           "met": s.met, "tried": {k: _json(v) for k, v in s.tried.items()}} for s in self.steps]}

    def format_log(self) -> str:
        t = self.target
        lines = [f"accuracy target {t} on the model outputs ({self.samples} samples)"]
        for s in self.steps:
            what = "all planned ops in FP8" if s.added is None else f"+ keep {s.added}"
            lines.append(f"  step {s.step}: {what:<32} {t.metric} {s.metric:.6g}"
                         f"{'  target met' if s.met else ''}")
        lines.append(self.message)
        return "\n".join(lines) + "\n"


def _json(v: float):
    return v if math.isfinite(v) else str(v)


def fallback_for_target(
    float_model: onnx.ModelProto,
    plans: list[OpPlan],
    source: CalibrationSource,
    target: AccuracyTarget | str,
    batch_size: int = 16,
    max_samples: int | None = 32,
    candidates: Iterable[str] | None = None,
    max_keep: int | None = None,
    progress: Callable[[FallbackStep], None] | None = None,
    weights_dir: str | None = None,
) -> FallbackResult:
    """The fewest FP8 ops to keep in original precision so the model outputs meet ``target``.

    ``candidates``: the ops that may be kept (default every FP8 op); ``max_keep``: give up after
    keeping this many. ``progress`` is called after each step. ``weights_dir``: where the float
    model's external weights are, when it was loaded without them. See the module docstring.
    """
    target = AccuracyTarget.parse(target) if isinstance(target, str) else target
    fp8 = fp8_op_names(plans)
    pool = list(fp8) if candidates is None else [n for n in fp8 if n in set(candidates)]
    if candidates is not None and len(pool) != len(set(candidates)):
        unknown = sorted(set(candidates) - set(fp8))
        raise FallbackError(f"candidate op(s) {', '.join(unknown)} are not FP8 ops of this plan")
    if max_keep is not None and max_keep < 0:
        raise FallbackError(f"max_keep {max_keep} must be >= 0")
    probe = OutputProbe(float_model, source, batch_size, max_samples, weights_dir)
    encoded = encode_weights(float_model, plans, weights_dir)  # every trial reuses these FP8 weight bytes

    def measured(kept: list[str]) -> float:
        trial = keep_ops(plans, kept, "kept: trial")
        # rewrite_to_fp8 takes the entries it copies out of the dict it is given: a shallow copy
        # per trial keeps them for the next trials (they were re-encoded on every trial before)
        return probe.measure(rewrite_to_fp8(float_model, trial, dict(encoded), weights_dir))[target.metric]

    def result(kept, met, steps, all_kept, message) -> FallbackResult:
        reason = KEEP_REASON_TARGET.format(target=target, step="{}")
        out = plans
        for i, name in enumerate(kept):
            out = keep_ops(out, [name], reason.format(i + 1))
        return FallbackResult(target, out, list(kept), met, steps, all_kept, probe.samples, message)

    start = measured([])
    steps = [FallbackStep(0, None, [], start, target.met(start))]
    if progress:
        progress(steps[0])
    if target.met(start):
        return result([], True, steps, math.nan, f"target {target} met with every planned op in FP8 "
                      f"({target.metric} {start:.6g}); nothing kept")
    all_kept = measured(pool)
    if not target.met(all_kept):
        scope = "every FP8 op" if len(pool) == len(fp8) else f"all {len(pool)} candidate ops"
        return result([], False, steps, all_kept,
                      f"target {target} cannot be met: even with {scope} in original precision "
                      f"{target.metric} is {all_kept:.6g}; nothing kept - relax the target")
    kept: list[str] = []
    limit = len(pool) if max_keep is None else min(max_keep, len(pool))
    position = {p.name: p.position for p in plans}
    while len(kept) < limit:
        tried = {name: measured(kept + [name]) for name in pool if name not in kept}
        best = None
        for name in sorted(tried, key=position.get):  # ties: earlier op wins
            if best is None or target.better(tried[name], tried[best]):
                best = name
        kept.append(best)
        step = FallbackStep(len(kept), best, list(kept), tried[best], target.met(tried[best]), tried)
        steps.append(step)
        if progress:
            progress(step)
        if step.met:
            return result(kept, True, steps, all_kept,
                          f"target {target} met keeping {len(kept)} op(s) in original precision: "
                          f"{', '.join(kept)} ({target.metric} {step.metric:.6g})")
    return result(kept, False, steps, all_kept,
                  f"target {target} not met after keeping {len(kept)} op(s) (max_keep {max_keep}): "
                  f"{target.metric} {steps[-1].metric:.6g}; with every candidate kept it is "
                  f"{all_kept:.6g} - raise max_keep or relax the target")
