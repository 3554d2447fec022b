"""The conversion as typed stages, usable without Prefect or MLflow.

    load -> plan -> [ingest -> calibrate -> weight_scales -> search_report] -> [fallback]
         -> [adjust_weights] -> to_fp8 -> [compare] -> [evaluate]

Each stage takes a small frozen config that says which parameters it reads (``XConfig.of(params)``
carves it from :class:`tasks.params.ConvertParams`, or from anything with its field names) and
returns a frozen result: its payload (plans, statistics, the FP8 model...) and what a run records
of it, ``metrics``, ``tags``, ``artifacts`` and metrics by ``steps``, plus ``notes`` meant for the
user and ``seconds`` per part. The Prefect flow (flows/convert.py) runs the stages as tasks and
hands every result to ``record.stage``; :func:`convert` chains them in this process and writes
the same bytes as the CLI.

A stage that logs takes ``log``, any :class:`logging.Logger`-like object (the flow passes
Prefect's run logger); by default this module's logger.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping

from fp8core.graph import load_model as _load
from fp8core.model import Model
from fp8core.plan import OpPlan, QuantParams

logger = logging.getLogger(__name__)

CaptureFn = Callable[..., dict]
"""``(model, tensors, source, batch_size, also) -> {tensor: TensorStats}``: how a stage captures;
``also``: accumulators fed by the same pass (fp8core.capture.capture_stats), when it is one."""
SearchFn = Callable[[dict, str, tuple], dict]
"""``(stats, loss, formats) -> {tensor: SearchResult}``: how a stage searches."""


# --------------------------------------------------------------------------------------------
# What every stage returns


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A file a run keeps: ``path`` on disk, or ``data`` written as JSON under ``name``."""

    name: str
    path: str | None = None
    data: Any = None

    @classmethod
    def file(cls, path: str) -> Artifact:
        return cls(os.path.basename(path), path=path)

    @classmethod
    def json(cls, data, name: str) -> Artifact:
        return cls(name, data=data)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class StageResult:
    """What a run records of a stage; subclasses add the stage's payload."""

    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()
    steps: tuple[tuple[int, Mapping[str, float]], ...] = ()  # metrics logged at a step (accuracy-target trials)
    notes: tuple[str, ...] = ()  # one line each, shown to the user even when quiet
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)  # per part, in the order they ran

    def summary(self) -> dict:
        """This stage's entries of the result the CLI prints (fp8core.report.summary_lines)."""
        return {}


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# load


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    input_shape: Mapping[str, list[int]] = dataclasses.field(default_factory=dict)
    convert_version: int | None = None
    stream_weights: bool = False  # leave external weights on disk; every later step reads them there
    batch_axes: Mapping[str, int | None] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, params) -> LoadConfig:
        """Weights stay on disk unless GPTQ / bias correction write new float weights: every other
        step reads external weights from their data files (search and encoding one weight at a
        time; capture, evaluation, comparison and fallback trials through onnxruntime)."""
        return cls(dict(params.input_shape), params.convert_version, not AdjustConfig.of(params, streamed=True).needed,
                   dict(params.input_batch_axis))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Loaded(StageResult):
    path: str
    sha256: str
    bytes: int
    source_opset: int
    opset: int
    model: Model  # prepared: named nodes, fixed input shapes, target opset; large weights maybe on disk
    reference: Any = None  # fp8core.validation.Reference: generated inputs the model runs on, and its outputs

    def summary(self) -> dict:
        return {"opset": self.opset, "bytes_before": self.bytes, "notes": list(self.notes)}


def load(path: str, config: LoadConfig = LoadConfig()) -> Loaded:
    """Load, fingerprint and prepare the input model (names, shapes, opset).

    The prepared model is run on generated inputs of shapes the input model takes; when the opset
    was upgraded, it must give the input model's outputs there (an upgrade that changes what the
    model computes is an error, not a silently wrong FP8 model)."""
    from fp8core.graph import default_opset, files_sha256, model_files
    from fp8core.rewrite import prepare_model, target_opset
    from fp8core.validation import check_same_outputs, probe_reference

    clock = _Clock()
    with clock("load"):
        original = _load(path, load_weights=False)
        files = model_files(path, original)  # the .onnx and its external data: all of it is the model
        # hashed beside the work below (hashlib lets go of the GIL): 3.7 s of a 3 GB model's load
        hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fp8-sha256")
        sha256_of_files = hashing.submit(files_sha256, files)
        hashing.shutdown(wait=False)
        external = len(files) > 1
        if external and not config.stream_weights:
            original = _load(path)
        folder = os.path.dirname(os.path.abspath(path)) if external and config.stream_weights else None
        opset = target_opset(original, config.convert_version)
        notes: list[str] = []
        prepared = Model(prepare_model(original, opset, dict(config.input_shape), dict(config.batch_axes), notes), folder)
        upgraded = default_opset(original) < opset
        reference = probe_reference(Model(original, folder) if upgraded and not config.input_shape else prepared)
        if reference is not None and upgraded and not config.input_shape:
            check_same_outputs(reference, prepared, f"the opset upgrade {default_opset(original)} -> {opset} "
                               "changed what the model computes (an onnx.version_converter defect)")
        if reference is None:
            notes.append("the model ran on no generated inputs (dynamic dims tried: 1, 16, 64, 224, 512); "
                         "the FP8 model is validated on calibration data only (give --input_shape or --data_preprocess)")
        sha256, size = sha256_of_files.result(), sum(os.path.getsize(f) for f in files)
    return Loaded(path=os.path.abspath(path), sha256=sha256, bytes=size, source_opset=default_opset(original),
                  opset=opset, model=prepared, reference=reference, notes=tuple(notes), seconds=clock.seconds,
                  tags={"input_model_sha256": sha256, "input_opset": default_opset(original)},
                  metrics={"model_bytes_before": size})


# --------------------------------------------------------------------------------------------
# plan


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    precision: str = "fp8"
    skip_op_names: tuple[str, ...] = ()
    activation: QuantParams = QuantParams("F143", 0)  # fast mode; --quantize searches them
    weight: QuantParams = QuantParams("F143", 0)

    @classmethod
    def of(cls, params) -> PlanConfig:
        fp = params.fp8_params
        return cls(params.precision, tuple(params.fp8_skip_op_names), QuantParams(fp.input_format, fp.input_scale),
                   QuantParams(fp.weight_format, fp.weight_scale))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Planned(StageResult):
    plans: list[OpPlan]


def plan(model: Model, config: PlanConfig = PlanConfig(), log=logger) -> Planned:
    """Which Conv/MatMul/Gemm become FP8, with the fast-mode params."""
    from fp8core.plan import already_quantized_note, check_skip_names, plan_fp8_ops

    clock = _Clock()
    with clock("plan"):
        for warning in check_skip_names(model.proto, list(config.skip_op_names)):
            log.warning(warning)
        plans = plan_fp8_ops(model.proto, precision=config.precision, skip=list(config.skip_op_names),
                             activation_params=config.activation, weight_params=config.weight)
    note = already_quantized_note(model.proto, plans)
    return Planned(plans=plans, notes=(note,) if note else (), seconds=clock.seconds)


# --------------------------------------------------------------------------------------------
# ingest, calibrate (capture + search), weight scales, search report


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    data: str
    batch_size: int
    padding_mask: str = "auto"  # checked here, before any long work; used by the weight adjustments

    @classmethod
    def of(cls, params) -> IngestConfig:
        return cls(params.data_preprocess, params.batch_size, params.padding_mask)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Ingested(StageResult):
    source: Any  # fp8core.calibration.CalibrationSource, checked against the model


def ingest(model: Model, config: IngestConfig, log=logger) -> Ingested:
    """Open the calibration data and check it against the model before any long work."""
    from fp8core.calibration import model_input_specs, open_dataset, validate_against_model
    from fp8core.padding import padding_mask_input

    clock = _Clock()
    with clock("ingest"):
        mask = padding_mask_input(model.proto, config.padding_mask)
        source = open_dataset(config.data)
        summary = validate_against_model(source, model_input_specs(model), config.batch_size)
    log.info("calibration data %s: %d samples, fingerprint %s", config.data, summary.num_samples,
             source.fingerprint()[:12])
    return Ingested(source=source, seconds=clock.seconds,
                    tags={"calibration_fingerprint": source.fingerprint(), "calibration_samples": source.num_samples,
                          "padding_mask": mask or "none"})


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    batch_size: int
    loss: str = "mse"
    formats: tuple[str, ...] = ("F143", "F152")
    cache_dir: str | None = None  # statistics cache (fp8core.cache); None: always capture
    gptq_moments: bool = False  # GPTQ's input moments ride along on the capture pass (--weight_rounding gptq)
    activation_offset: bool = False  # non-negative activations rounded as x - c (fp8core.offsets)
    padding_mask: str = "auto"  # GPTQ's moments leave out padding tokens' rows (fp8core.padding)

    @classmethod
    def of(cls, params) -> CalibrateConfig:
        return cls(params.batch_size, params.quantize_loss_type, tuple(params.fp8_formats),
                   params.statistics_cache_dir, params.weight_rounding == "gptq",
                   params.activation_offset == "auto", params.padding_mask)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Calibrated(StageResult):
    plans: list[OpPlan]  # every FP8 op input and weight set to its searched (format, scale)
    stats: dict  # tensor -> TensorStats (activations captured, weights computed)
    results: dict  # tensor -> fp8core.search.SearchResult
    loss: str
    source: Any
    gptq_moments: dict | None = None  # captured with the statistics (None: cached or sharded capture)

    @property
    def activation_values(self) -> float | None:
        """FP8 activation values per sample (every FP8 op's activation inputs): what a trial of
        the fallback costs (fp8core.fallback.DOMINANCE_SINGLES_BUDGET)."""
        samples = getattr(self.source, "num_samples", 0)
        if not samples:
            return None
        counted = [self.stats[q.tensor].count for p in self.plans if p.fp8 for q in p.input("activation")
                   if q.tensor in self.stats]
        return sum(counted) / samples


def capture_serially(model, tensors: list[str], source, batch_size: int, also=()) -> dict:
    """The default :data:`CaptureFn`: one process, every core (fp8core.capture.capture_stats)."""
    from fp8core.capture import capture_stats

    return capture_stats(model, tensors, source, batch_size, also=also)


def search_serially(stats: dict, loss: str, formats: tuple) -> dict:
    """The default :data:`SearchFn`: each tensor in turn (fp8core.search.search)."""
    from fp8core.search import search

    return {name: search(s, loss, formats) for name, s in stats.items()}


def weight_statistics(model: Model, plans: list[OpPlan]) -> dict:
    """Statistics of every FP8 op's weight; external weights are read one at a time."""
    from fp8core.stats import TensorStats

    index = model.index()
    out: dict = {}
    for p in plans:
        if p.fp8:
            for q in p.input("weight"):
                if q.tensor not in out:
                    s = TensorStats()
                    s.update(index.constant_value(q.tensor))
                    out[q.tensor] = s
    return out


def calibrate(model: Model, plans: list[OpPlan], source, config: CalibrateConfig,
              capture: CaptureFn = capture_serially, search: SearchFn = search_serially,
              log=logger) -> Calibrated:
    """Capture the FP8 ops' inputs (or read them from the statistics cache), then search
    (format, scale) for every input and weight by ``config.loss``.

    ``capture`` / ``search`` say how (the flow maps them over its task runner). Ops the data never
    reaches (an If branch no sample takes) are kept in original precision. Records tag
    ``calibration_cache`` (hit / miss / corrupt) and metric ``calibration_cache_hit`` (1/0).
    """
    from fp8core.capture import activations_to_capture
    from fp8core.plan import keep_unreached
    from fp8core.quantize_log import apply_choices

    clock, notes, tags, metrics = _Clock(), [], {}, {}
    with clock("capture"):
        tensors = activations_to_capture(plans)
        also = []
        if config.gptq_moments:  # no second pass over the data for GPTQ when this one is a whole pass
            from fp8core.feature_moments import MomentAccumulator, gptq_requests

            from fp8core.padding import padding_mask_input

            also.append(MomentAccumulator(gptq_requests(model, plans),
                                          padding_mask_input(model.proto, config.padding_mask)))
        stats = {}
        if tensors:
            stats, outcome, key = _cached_capture(model, tensors, source, config, capture, log, notes, also)
            tags = {"calibration_cache": outcome, "calibration_cache_key": key.digest,
                    "calibration_cache_dir": config.cache_dir}
            metrics = {"calibration_cache_hit": 1.0 if outcome == "hit" else 0.0}
        unreached = {name for name, s in stats.items() if s.total_count == 0}
        if unreached:
            plans, kept = keep_unreached(plans, unreached)
            stats = {k: v for k, v in stats.items() if k not in unreached}
            note = (f"{len(kept)} op(s) kept in original precision: the calibration data never reaches them "
                    f"(inside an If branch or loop no sample takes): {', '.join(kept[:6])}"
                    + (" ..." if len(kept) > 6 else ""))
            notes.append(note)
        stats.update(weight_statistics(model, plans))
    with clock("search"):
        results = search(stats, config.loss, tuple(config.formats))
    moments = also[0].moments if also and also[0].complete else None  # not fed: a cache hit, a sharded capture
    plans = apply_choices(plans, results)
    if config.activation_offset:
        from fp8core.offsets import with_offsets

        with clock("search"):
            plans = with_offsets(model.proto, plans, stats)
        shifted = sorted({q.tensor for p in plans if p.fp8 for q in p.input("activation") if q.params.offset})
        log.info("activation offsets: %d of %d FP8 activation inputs rounded as x - c", len(shifted),
                 len({q.tensor for p in plans if p.fp8 for q in p.input("activation")}))
        metrics["activation_offset_count"] = float(len(shifted))
    return Calibrated(plans=plans, stats=stats, results=results, loss=config.loss,
                      source=source, gptq_moments=moments, tags=tags, metrics=metrics, notes=tuple(notes),
                      seconds=clock.seconds)


def _cached_capture(model: Model, tensors, source, config: CalibrateConfig, capture: CaptureFn, log,
                    notes: list[str], also: list):
    """Activation statistics from the cache when (model, data, tensors, batch size) was captured
    before, else captured and stored; a damaged entry is deleted and recomputed."""
    from fp8core.cache import CacheEntryCorrupt, StatsCache, StatsKey

    # the model capture runs on: after opset conversion and input-shape fixing
    key = StatsKey.of(model.sha256(), source.fingerprint(), tensors, config.batch_size)
    cache = StatsCache(config.cache_dir) if config.cache_dir else None
    stats, outcome = None, "miss"
    if cache is not None:
        try:
            stats = cache.load(key)
            outcome = "hit" if stats is not None else "miss"
        except CacheEntryCorrupt as exc:
            notes.append(f"calibration statistics cache entry {cache.path(key)} is corrupt ({exc}); recomputing")
            cache.discard(key)
            outcome = "corrupt"
        except OSError as exc:  # unreadable cache dir: run without the cache rather than fail
            log.warning("statistics cache unreadable (%s); capturing", exc)
    if stats is None:
        stats = capture(model, tensors, source, config.batch_size, also)
        if cache is not None:
            try:
                cache.store(key, stats)
            except OSError as exc:  # a cache that cannot be written only costs the next run a capture
                log.warning("could not write the statistics cache (%s)", exc)
    log.info("calibration statistics cache %s: %s", outcome, key.digest[:12])
    return dict(stats), outcome, key


@dataclasses.dataclass(frozen=True)
class WeightScaleConfig:
    granularity: str = "per_tensor"
    scale_kind: str = "pow2"
    formats: tuple[str, ...] = ("F143",)
    loss: str = "mse"

    @classmethod
    def of(cls, params) -> WeightScaleConfig:
        """--quantize: the searched formats and loss; fast mode: the --fp8_params weight format, mse."""
        if params.quantize:
            return cls(params.weight_granularity, params.scale_kind, tuple(params.fp8_formats),
                       params.quantize_loss_type)
        return cls(params.weight_granularity, params.scale_kind, (params.fp8_params.weight_format,), "mse")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class WeightScales(StageResult):
    plans: list[OpPlan]


def weight_scales(model: Model, plans: list[OpPlan], config: WeightScaleConfig = WeightScaleConfig()) -> WeightScales:
    """per_channel / float: real weight scales searched on the weights by ``config.loss``
    (the plans unchanged for per_tensor pow2)."""
    from fp8core.weight_scales import choose_weight_params

    clock = _Clock()
    with clock("weight_scales"):
        plans = choose_weight_params(model, plans, config.granularity, config.scale_kind, list(config.formats),
                                     config.loss)
    return WeightScales(plans=plans, seconds=clock.seconds)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SearchReport(StageResult):
    paths: dict[str, str]  # quantize.log, quantize.json, the loss chart
    best_loss: dict[str, float]  # op -> its best search loss

    def summary(self) -> dict:
        return {"quantize_log": self.paths["log"], "quantize_json": self.paths["json"], "best_loss": self.best_loss}


def search_report(calibrated: Calibrated, plans: list[OpPlan], folder: str) -> SearchReport:
    """quantize.log / quantize.json / the loss chart in ``folder``, once every scale is chosen."""
    from fp8core.quantize_log import quantize_report, write_quantize_logs

    report = quantize_report(plans, calibrated.results, calibrated.stats, calibrated.loss, calibrated.source)
    paths = write_quantize_logs(report, folder)
    best = {op["name"]: op["best_loss"] for op in report["ops"] if op["best_loss"] is not None}
    return SearchReport(paths=paths, best_loss=best, artifacts=tuple(Artifact.file(p) for p in paths.values()),
                        metrics={f"best_loss/{name}": loss for name, loss in best.items()})


# --------------------------------------------------------------------------------------------
# fallback


DEFAULT_DOMINANT_SHARE = 0.15
"""--keep_dominant_share: each op (at most 3) whose return alone to original precision removes 15%
of the outputs' FP8 noise is kept. On the 14 real models, against 0.5 (one op carrying half the
noise): above on 4 (EfficientNet-Lite0 label agreement 0.571 -> 0.735 with its first Conv and two
early depthwise Convs kept, PP-OCRv4 det mask IoU 0.959 -> 0.974, its FP16 export 0.883 -> 0.922,
PP-OCRv4 rec 0.692 -> 0.708), equal on 10; 0.25 gains less (0.624 on EfficientNet-Lite0), 0.1 costs
YOLOv8n a box and MiniLM's search 48 trials (README "Defaults")."""


@dataclasses.dataclass(frozen=True)
class FallbackConfig:
    data: str | None = None  # --compare_data, else the calibration data
    batch_size: int = 16
    keep: int = 0  # --num_of_layers_keep_fp16
    keep_dominant: bool = False  # --keep_dominant_share applies
    dominant_share: float = DEFAULT_DOMINANT_SHARE
    accuracy_target: str | None = None
    target_samples: int = 32
    target_max_keep: int | None = None
    compare_samples: int | None = None
    loss: str = "mse"  # the search loss: ranks ops for K when there is no data

    @classmethod
    def of(cls, params) -> FallbackConfig:
        return cls(params.compare_data or params.data_preprocess, params.batch_size, params.num_of_layers_keep_fp16,
                   params.keeps_dominant_ops, params.keep_dominant_share, params.accuracy_target,
                   params.accuracy_target_samples, params.accuracy_target_max_keep, params.compare_samples,
                   params.quantize_loss_type)

    @property
    def needed(self) -> bool:
        return bool(self.keep or self.accuracy_target or self.keep_dominant)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Fallback(StageResult):
    plans: list[OpPlan]
    kept_fp16: list[str] | None = None  # --num_of_layers_keep_fp16
    dominance: Any = None  # fp8core.fallback.Dominance
    target: Any = None  # fp8core.fallback.FallbackResult
    dominant_share: float = DEFAULT_DOMINANT_SHARE

    def summary(self) -> dict:
        out: dict = {}
        if self.kept_fp16 is not None:
            out["kept_fp16"] = self.kept_fp16
        if self.dominance is not None and self.dominance.found:
            out.update(kept_dominant=list(self.dominance.found), kept_dominant_share=self.dominant_share)
        if self.target is not None:
            out["accuracy_target"] = self.target.message
        return out


SENSITIVITY_CHART_OPS = 40


def sensitivity_chart(sensitivity, folder: str, name: str = "op_sensitivity.png") -> str:
    """Bars: how much keeping each op alone improves the output metric (the most helpful ops)."""
    from fp8core.charts import per_op_bar_chart

    names = sensitivity.ranked()[:SENSITIVITY_CHART_OPS]
    path = os.path.join(folder, name)
    per_op_bar_chart(path, names, [max(sensitivity.gain(n), 0.0) for n in names],
                     f"{sensitivity.metric} of the outputs, improvement",
                     f"Keeping one op in original precision (all FP8: {sensitivity.metric} {sensitivity.all_fp8:.3g})")
    return path


def _progress_every_tenth(log, what: str):
    def progress(done: int, total: int, name: str):
        if done == total or done % max(1, total // 10) == 0:
            log.info("%s: %d/%d ops measured", what, done, total)
    return progress


def _checked_source(model: Model, data: str, batch_size: int):
    from fp8core.calibration import model_input_specs, open_dataset, validate_against_model

    source = open_dataset(data)
    validate_against_model(source, model_input_specs(model), batch_size)
    return source


def _trials_on(model: Model, plans: list[OpPlan], data: str, batch_size: int, samples: int):
    """The data checked against the model, then one switchable session probed on ``samples`` samples."""
    from fp8core.fallback import OutputProbe, Trials

    return Trials(model, plans, OutputProbe(model, _checked_source(model, data, batch_size), batch_size, samples))


def _candidates(model: Model, plans: list[OpPlan], config: FallbackConfig) -> list[str]:
    """The FP8 ops measured one by one (fp8core.fallback.measurable_ops); a precision comparison
    on a few samples ranks them only on models with more than MAX_MEASURED_OPS."""
    from fp8core.calibration import open_dataset
    from fp8core.compare import compare_models
    from fp8core.fallback import MAX_MEASURED_OPS, measurable_ops
    from fp8core.rewrite import rewrite_to_fp8

    if sum(p.fp8 for p in plans) <= MAX_MEASURED_OPS:
        return measurable_ops(plans)
    report = compare_models(model, model.derive(rewrite_to_fp8(model, plans)), plans, open_dataset(config.data),
                            config.batch_size, config.compare_samples or config.target_samples,
                            histogram_range="first_batch")
    return measurable_ops(plans, report)


def fallback(model: Model, plans: list[OpPlan], config: FallbackConfig, best_loss: Mapping[str, float] | None = None,
             folder: str = ".", log=logger, activation_values: float | None = None) -> Fallback:
    """Plans with ops returned to original precision, measured on the model outputs:

    * ``keep`` K: the K ops whose return, each alone, helps most (without data: the K worst by
      the search loss ``best_loss``);
    * ``keep_dominant``: each op (at most 3) that alone carries ``dominant_share`` of the FP8 noise,
      every op measured alone where ``activation_values`` (FP8 activation values per sample,
      :attr:`Calibrated.activation_values`) says trials are cheap, else by group testing;
    * ``accuracy_target``: the fewest most helpful ops that meet it (fp8core/fallback.py).

    Charts are written into ``folder``.
    """
    from fp8core.fallback import (DOMINANCE_MAX_KEPT, DOMINANCE_MIN_OPS, DOMINANCE_SINGLES_BUDGET, SENSITIVITY_SAMPLES,
                                  dominance_samples, find_dominant_ops, keep_dominant_ops, keep_most_sensitive,
                                  keep_worst_ops, measure_sensitivity)

    clock, tags, metrics, artifacts, steps = _Clock(), {}, {}, [], []
    kept_fp16 = dominance = target = None
    with clock("fallback"):
        data = config.data
        # one by one measurements (K, target) cover at most MAX_MEASURED_OPS; group testing covers all
        needs_candidates = data and (config.keep or config.accuracy_target)
        candidates = _candidates(model, plans, config) if needs_candidates else None
        if config.keep:
            if data:
                trials = _trials_on(model, plans, data, config.batch_size,
                                    min(config.target_samples or SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES))
                sensitivity = measure_sensitivity(trials, candidates,
                                                  progress=_progress_every_tenth(log, "op sensitivity"))
                top = sensitivity.ranked()[:5]
                log.info("ops that matter most (%s of the outputs %.4g with every op in FP8): %s", sensitivity.metric,
                         sensitivity.all_fp8, ", ".join(f"{n} ({sensitivity.alone[n]:.4g})" for n in top))
                artifacts += [Artifact.json(sensitivity.to_dict(), "op_sensitivity.json"),
                              Artifact.file(sensitivity_chart(sensitivity, folder))]
                plans, kept_fp16 = keep_most_sensitive(plans, sensitivity, config.keep)
                source = f"measured effect on the outputs ({sensitivity.metric})"
            else:
                source = f"search loss {config.loss}"
                plans, kept_fp16 = keep_worst_ops(plans, dict(best_loss or {}), config.keep, source)
            log.info("--num_of_layers_keep_fp16 %d: kept %s (by %s)", config.keep, ", ".join(kept_fp16) or "none",
                     source)
            tags["num_of_layers_keep_fp16"] = ",".join(kept_fp16) or "none"
        if config.keep_dominant and sum(p.fp8 for p in plans) >= DOMINANCE_MIN_OPS:
            samples, group_samples = dominance_samples(activation_values)
            trials = _trials_on(model, plans, data, config.batch_size, samples)
            names = [p.name for p in plans if p.fp8]
            one_by_one = activation_values is not None and len(names) * activation_values <= DOMINANCE_SINGLES_BUDGET
            dominance = find_dominant_ops(trials, names, config.dominant_share, samples=samples,
                                          group_samples=group_samples, one_by_one=one_by_one)
            if dominance.found:
                log.info("kept in original precision (each alone carries >= %g of the outputs' FP8 noise): %s "
                         "(%d trials, %s)", config.dominant_share,
                         ", ".join(f"{n} ({v:.0%})" for n, v in dominance.found.items()), dominance.trials,
                         "every op alone" if dominance.method == "singles" else "group testing")
            if dominance.passed_over:
                log.info("also above that share but left FP8 (at most %d ops are kept): %s", DOMINANCE_MAX_KEPT,
                         ", ".join(f"{n} ({v:.0%})" for n, v in dominance.passed_over.items()))
            elif not dominance.found:
                log.info("no op carries %g of the outputs' FP8 noise alone; every planned op stays FP8 (%d trials)",
                         config.dominant_share, dominance.trials)
            plans = keep_dominant_ops(plans, dominance)
            artifacts.append(Artifact.json({**dominance.to_dict(), "activation_values_per_sample": activation_values,
                                            "singles_budget": DOMINANCE_SINGLES_BUDGET}, "dominant_ops.json"))
            tags["kept_dominant_ops"] = ",".join(dominance.found) or "none"
            tags["dominant_search"] = dominance.method
            metrics.update(kept_dominant_ops=len(dominance.found), dominant_search_trials=dominance.trials)
        if config.accuracy_target:
            candidates = [n for n in candidates if any(p.name == n and p.fp8 for p in plans)]
            target = _accuracy_target(model, plans, config, candidates, log)
            plans = target.plans
            artifacts.append(Artifact.json(target.to_dict(), "accuracy_target.json"))
            if target.sensitivity is not None:
                artifacts.append(Artifact.file(sensitivity_chart(target.sensitivity, folder,
                                                                 "accuracy_target_sensitivity.png")))
            tags["accuracy_target"] = target.message[:5000]
            metrics.update(accuracy_target_met=float(target.met), accuracy_target_kept_ops=len(target.kept),
                           accuracy_target_trials=target.trials)
            steps += [(step.step, {"accuracy_target_metric": step.metric}) for step in target.steps]
    return Fallback(plans=plans, kept_fp16=kept_fp16, dominance=dominance, target=target,
                    dominant_share=config.dominant_share, tags=tags, metrics=metrics, artifacts=tuple(artifacts),
                    steps=tuple(steps), seconds=clock.seconds)


def _accuracy_target(model: Model, plans: list[OpPlan], config: FallbackConfig, candidates: list[str], log):
    """Sensitivity + bisection on ``config.target_samples`` samples; every trial is logged."""
    from fp8core.fallback import AccuracyTarget, fallback_for_target

    parsed = AccuracyTarget.parse(config.accuracy_target)
    source = _checked_source(model, config.data, config.batch_size)

    def progress(step):
        log.info("accuracy target %s trial %d (%s, %d kept): %s %.6g%s", parsed, step.step, step.phase,
                 len(step.kept), parsed.metric, step.metric, " - met" if step.met else "")

    result = fallback_for_target(model, plans, source, parsed, config.batch_size, config.target_samples,
                                 candidates=candidates, max_keep=config.target_max_keep, progress=progress,
                                 sensitivity_progress=_progress_every_tenth(log, "accuracy target sensitivity"))
    (log.info if result.met else log.warning)(result.message)
    return result


# --------------------------------------------------------------------------------------------
# adjust weights


def weight_rounding_for(requested: str, quantize: bool, streamed: bool) -> str:
    """What ``--weight_rounding auto`` (the default) runs: ``gptaq`` wherever it can (with
    ``--quantize``, the weights in memory), else ``nearest``. gptaq is above round to nearest on 8 of
    the 14 real models, equal on 5 and 0.0006 below on MiniLM's cosine (README, Defaults); it needs the
    calibration data, and every float weight in memory, which a model streamed from its external
    data files (past 2 GB) is loaded precisely to avoid."""
    if requested != "auto":
        return requested
    return "gptaq" if quantize and not streamed else "nearest"


AUTO_FIT_MAX_FEATURES = 4096
"""``--weight_rounding auto`` fits ops with at most this many inputs K (C_in x kernel for a Conv)
and rounds larger ones to nearest: a fit holds a ``K x K`` matrix per op and inverts it (K^3).
Every op of the 14 real models has K <= 2880; ResNet50's three 3x3 Convs over 512 channels
(K = 4608) alone took 1.0 GB and 2/3 of its inversion time."""


@dataclasses.dataclass(frozen=True)
class AdjustConfig:
    batch_size: int
    weight_rounding: str = "nearest"  # nearest, gptq, gptaq (auto resolved by weight_rounding_for)
    bias_correction: bool = False
    notes: tuple[str, ...] = ()
    max_features: int | None = None  # gptaq: ops with more inputs stay at nearest (auto's limit)
    padding_mask: str = "auto"  # the input marking padding tokens (fp8core.padding): auto, none or a name
    fit_samples: int | None = None  # gptaq: at most this many calibration samples, evenly spaced (None: all)

    @classmethod
    def of(cls, params, streamed: bool = False) -> AdjustConfig:
        """``streamed``: the model's weights stay in their external data files."""
        rounding = weight_rounding_for(params.weight_rounding, params.quantize, streamed)
        notes = ()
        if params.weight_rounding == "auto" and params.quantize and streamed:
            notes = ("weights rounded to nearest: the model's weights are streamed from its external data; "
                     "--weight_rounding gptaq fits them to the FP8 model's inputs with every weight in memory",)
        limit = AUTO_FIT_MAX_FEATURES if params.weight_rounding == "auto" else None
        return cls(params.batch_size, rounding, params.bias_correction, notes, limit, params.padding_mask,
                   params.weight_fit_samples)

    @property
    def needed(self) -> bool:
        return self.weight_rounding != "nearest" or self.bias_correction


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Adjusted(StageResult):
    model: Model  # a float model with GPTQ weights / corrected biases, to encode
    report: list[dict]  # one row per op
    what: str = ""  # the techniques that ran, for the closing summary ("GPTAQ fit", "bias correction")
    padding_mask: str | None = None  # the input whose padding rows were left out

    def summary(self) -> dict:
        if not self.report:
            return {}
        return {"weight_adjust": self.report, "weight_adjust_what": self.what, "padding_mask": self.padding_mask}


ADJUST_METRICS = ("output_sq_error_nearest", "output_sq_error_gptq", "own_mean_shift_max", "output_error_reduction")


def adjust_weights(model: Model, plans: list[OpPlan], source, config: AdjustConfig, moments: dict | None = None,
                   log=logger, progress: Callable[[int, int], None] | None = None) -> Adjusted:
    """``gptq`` / ``gptaq`` / bias correction on the calibration data ``source``; run after the
    fallback (its trials measure round-to-nearest weights).

    ``gptaq`` fits each op's weight and bias to the input the FP8 model gives it
    (fp8core/activation_fit.py); bias correction is measured on the FP8 model: each op's bias
    removes the mean output shift the op adds itself, activations included (fp8core/bias_shift.py).
    ``moments``: GPTQ's input moments captured with the statistics (:attr:`Calibrated.gptq_moments`);
    a pass of their own when they are missing. ``progress(done, total)``: gptaq's data batches.
    """
    from fp8core.activation_fit import fit_to_fp8_inputs
    from fp8core.bias_shift import correct_mean_shift
    from fp8core.calibration import evenly_spaced
    from fp8core.feature_moments import capture_feature_moments
    from fp8core.padding import padding_mask_input
    from fp8core.weight_adjust import adjust_weights as gptq_weights, linear_ops, moment_requests

    clock = _Clock()
    with clock("adjust_weights"):
        gptq = config.weight_rounding == "gptq"
        proto, report = model.proto, []
        mask = padding_mask_input(model.proto, config.padding_mask)
        if mask:
            log.info("weight adjustments: rows of padding tokens (%s == 0) left out", mask)
        fit_source = source
        if config.weight_rounding == "gptaq":
            # the fit's cost grows with the samples (one FP8 run and K x K products per op each)
            fit_source = evenly_spaced(source, config.fit_samples) if config.fit_samples else source
            if fit_source is not source:
                log.info("weight fit: %d of the %d calibration samples, evenly spaced (--weight_fit_samples)",
                         fit_source.num_samples, source.num_samples)
            # one pass, each op fitted to its own input rounding in the FP8 model: a fit to the float
            # model's inputs in a few passes over-compensates (EfficientNet-Lite0: top-1 0.01)
            proto, report = fit_to_fp8_inputs(model, plans, fit_source, config.batch_size, passes=1, local=True,
                                              progress=progress, max_features=config.max_features,
                                              padding_mask=mask)
        if gptq:
            requests = moment_requests(linear_ops(proto, plans), True, False)
            if moments is None or not all(key in moments for key in requests):
                moments = capture_feature_moments(proto, requests, source, config.batch_size, mask)
            proto, report = gptq_weights(proto, plans, moments, True, False)
        if config.bias_correction:
            # after GPTQ: the shift of the weights as they will be stored
            proto, shifts = correct_mean_shift(model.derive(proto), plans, source, config.batch_size, mask)
            by_op = {row["op"]: row for row in report}
            for row in shifts:
                by_op.setdefault(row["op"], {"op": row["op"]}).update(row)
            report = list(by_op.values())
    left = [row["op"] for row in report if "fit" in row]
    techniques = ", ".join(f for f, on in (("GPTQ", gptq), ("GPTAQ fit", config.weight_rounding == "gptaq"),
                                           ("bias correction", config.bias_correction)) if on)
    what = f"{techniques} on {len(report) - len(left)} ops"
    if fit_source is not source:
        what += f" over {fit_source.num_samples} of the {source.num_samples} calibration samples"
    if left:
        what += f" ({len(left)} with more than {config.max_features} inputs left at nearest)"
    log.info("weight adjustments: %s", what)
    metrics = {f"{key}/{row['op']}": row[key] for row in report for key in ADJUST_METRICS if key in row}
    artifact = Artifact.json({"weight_rounding": config.weight_rounding, "bias_correction": config.bias_correction,
                              "ops": report}, "weight_adjust.json")
    return Adjusted(model=model.derive(proto), report=report, what=what, padding_mask=mask, metrics=metrics,
                    artifacts=(artifact,), tags={"weight_rounding_used": config.weight_rounding}, seconds=clock.seconds)


# --------------------------------------------------------------------------------------------
# to_fp8: encode, rewrite, validate, save


@dataclasses.dataclass(frozen=True)
class ToFP8Config:
    output_model: str
    external_data: str = "auto"  # auto, always, never
    validation_data: str | None = None  # calibration data: the written model is validated on its first samples
    batch_size: int = 16
    keep_model: bool = True  # a later stage reads the FP8 model (re-read from disk when its weights were released)

    @classmethod
    def of(cls, params) -> ToFP8Config:
        return cls(params.output_model, params.external_data, params.data_preprocess, params.batch_size,
                   bool(params.precision_compare or params.eval_data))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Converted(StageResult):
    model: Model | None  # the FP8 model (None when its weights were released and no later stage needs it)
    path: str
    bytes_after: int
    agreement: dict[str, float]  # the written model's outputs against the float model's
    config: dict  # fp8_config.json

    def summary(self) -> dict:
        return {"output_model": self.path, "fp8_ops": self.config["fp8_ops"],
                "skipped_ops": self.config["skipped_ops"], "bytes_after": self.bytes_after,
                "agreement": self.agreement}


def validation_reference(loaded: Loaded, config: ToFP8Config):
    """Inputs the written FP8 model is validated on: the first calibration samples when there are
    some (real shapes, real values), else the generated inputs the input model ran on."""
    if config.validation_data:
        from fp8core.calibration import open_dataset
        from fp8core.validation import calibration_reference

        return calibration_reference(loaded.model, open_dataset(config.validation_data), config.batch_size)
    return loaded.reference


def to_fp8(loaded: Loaded, plans: list[OpPlan], config: ToFP8Config, weights: Model | None = None) -> Converted:
    """Encode the FP8 weights of ``weights`` (default the loaded model), rewrite the graph, and
    write it atomically (external data past 2 GB), validated before it replaces ``output_model``.

    A model whose weights stay on disk (streamed) gives its FP8 weights up as they are written;
    nothing after needs them in memory unless ``keep_model``, when the written model is read back
    (FP8: a quarter of the float weights).
    """
    from fp8core.modelio import validate_fp8_model
    from fp8core.report import fp8_config
    from fp8core.rewrite import encode_weights, rewrite_to_fp8

    clock = _Clock()
    to_encode = weights if weights is not None else loaded.model
    with clock("encode"):
        encoded = encode_weights(to_encode, plans)
    with clock("rewrite"):
        fp8 = to_encode.derive(rewrite_to_fp8(to_encode, plans, encoded))
    del to_encode, encoded
    with clock("save"):
        streamed = loaded.model.weights_dir is not None  # then nothing below needs the FP8 model's weights
        reference = validation_reference(loaded, config)
        agreement: dict[str, float] = {}

        def check(written: str) -> None:
            agreement.update(validate_fp8_model(written, reference))

        size = fp8.save(config.output_model, config.external_data, check=check, release=streamed)
    if streamed:
        fp8 = Model(_load(config.output_model)) if config.keep_model else None
    cfg = fp8_config(plans, loaded.opset)
    return Converted(model=fp8, path=os.path.abspath(config.output_model), bytes_after=size, agreement=agreement,
                     config=cfg, seconds=clock.seconds, artifacts=(Artifact.json(cfg, "fp8_config.json"),),
                     metrics={"fp8_op_count": cfg["fp8_ops"], "skipped_op_count": cfg["skipped_ops"],
                              "model_bytes_after": size, **agreement})


# --------------------------------------------------------------------------------------------
# compare, evaluate


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    data: str
    batch_size: int = 16
    samples: int | None = None

    @classmethod
    def of(cls, params) -> CompareConfig:
        return cls(params.compare_data or params.data_preprocess, params.batch_size, params.compare_samples)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Compared(StageResult):
    report: Any  # fp8core.compare.ComparisonReport
    paths: dict[str, str]  # precision_compare.log / .json / chart

    def summary(self) -> dict:
        return {"precision_compare_log": self.paths["log"]}


def compare(float_model: Model, fp8_model, plans: list[OpPlan], config: CompareConfig, folder: str = ".",
            progress: Callable[[int, int], None] | None = None, log=logger) -> Compared:
    """Every FP8 op output and model output, original vs FP8 (precision_compare.log/json/png in
    ``folder``), and which ops matter for the outputs: each kept alone, on a few samples (one
    switchable session); on models with more FP8 ops than MAX_MEASURED_OPS, the ones adding the most noise."""
    from fp8core.compare import compare_models, mlflow_metrics, write_compare_logs
    from fp8core.fallback import (SENSITIVITY_METRIC, SENSITIVITY_SAMPLES, OutputProbe, Trials, measurable_ops,
                                  measure_sensitivity)

    clock = _Clock()
    with clock("compare"):
        source = _checked_source(float_model, config.data, config.batch_size)
        report = compare_models(float_model, fp8_model, plans, source, config.batch_size, config.samples,
                                progress=progress)
        probe = OutputProbe(float_model, source, config.batch_size, SENSITIVITY_SAMPLES)
        fp8_ops = measurable_ops(plans, report)
        sensitivity = measure_sensitivity(Trials(float_model, plans, probe), fp8_ops) if fp8_ops else None
        keep_gain = {n: sensitivity.gain(n) for n in fp8_ops} if sensitivity else None
        paths = write_compare_logs(report, folder, keep_gain, SENSITIVITY_METRIC)
    worst = ", ".join(f"{r.label} ({r.snr_db:.1f} dB)" for r in report.worst_ops())
    log.info("precision compare on %d samples: worst ops %s; model outputs cos_dist %.3g",
             report.samples, worst or "none", report.output_metric("cos_dist"))
    return Compared(report=report, paths=paths, metrics=mlflow_metrics(report), seconds=clock.seconds,
                    artifacts=tuple(Artifact.file(p) for p in paths.values()))


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    data: str  # labelled data: model inputs + a 'label' column

    @classmethod
    def of(cls, params) -> EvaluateConfig:
        return cls(params.eval_data)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Evaluated(StageResult):
    evaluation: dict  # samples, accuracy_fp32, accuracy_fp8, agreement

    def summary(self) -> dict:
        return {"evaluation": self.evaluation}


def evaluate(float_model: Model, fp8_model, config: EvaluateConfig) -> Evaluated:
    """Top-1 accuracy of both models on labelled data, and how often they agree."""
    from fp8core.evaluate import evaluate_top1

    clock = _Clock()
    with clock("evaluate"):
        evaluation = evaluate_top1(float_model, fp8_model, config.data)
    return Evaluated(evaluation=evaluation, metrics={f"eval_{k}": v for k, v in evaluation.items()},
                     seconds=clock.seconds)


# --------------------------------------------------------------------------------------------
# the whole conversion


class Conversion:
    """What the stages of one conversion add up to, stage by stage: the result the CLI prints,
    seconds per part, and everything a run records. Payloads (models, statistics) are not kept."""

    def __init__(self):
        self.summary: dict = {}
        self.seconds: dict[str, float] = {}
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[Artifact] = []
        self.plans: list[OpPlan] = []

    def add(self, result: StageResult) -> StageResult:
        self.summary.update(result.summary())
        for k, v in result.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.metrics.update(result.metrics)
        self.tags.update(result.tags)
        self.artifacts += result.artifacts
        return result

    def result(self) -> dict:
        """The CLI's result (without the MLflow run): every stage's summary, and ``seconds``."""
        return {**self.summary, "seconds": dict(self.seconds)}


def convert(params, log=logger) -> Conversion:
    """One conversion in this process, the stages of the ``fp8-convert`` flow in its order, without
    Prefect or MLflow: the same FP8 model bytes and logs (quantize.log, precision_compare.*...).

    ``params``: :class:`tasks.params.ConvertParams` (``with_batch_size`` and the field names).
    Calibration runs serially in this process (the CLI maps it over a task runner). The user's
    notes go to ``log`` as warnings.
    """
    from fp8core.staging import StagedOutputs

    conversion = Conversion()

    def done(result: StageResult):
        for note in result.notes:
            log.warning(note)
        return conversion.add(result)

    with StagedOutputs(params.logs_dir) as staging:
        loaded = done(load(params.input_model, LoadConfig.of(params)))
        params = params.with_batch_size(loaded.model.proto)
        model = loaded.model
        plans = done(plan(model, PlanConfig.of(params), log)).plans
        best_loss, source, moments, activation_values = {}, None, None, None
        if params.quantize:
            source = done(ingest(model, IngestConfig.of(params), log)).source
            calibrated = done(calibrate(model, plans, source, CalibrateConfig.of(params), log=log))
            plans = done(weight_scales(model, calibrated.plans, WeightScaleConfig.of(params))).plans
            best_loss = done(search_report(calibrated, plans, staging.path)).best_loss
            moments, activation_values = calibrated.gptq_moments, calibrated.activation_values
            del calibrated
        else:  # fast mode: real scales (per_channel / float) searched on the weights by mse (untimed)
            plans = weight_scales(model, plans, WeightScaleConfig.of(params)).plans
        keep, weights = FallbackConfig.of(params), None
        adjust = AdjustConfig.of(params, streamed=model.weights_dir is not None)
        for note in adjust.notes:
            log.warning(note)
        if keep.needed:
            plans = done(fallback(model, plans, keep, best_loss, staging.path, log, activation_values)).plans
        if adjust.needed:  # after the fallback: its trials measure round-to-nearest weights
            weights = done(adjust_weights(model, plans, source, adjust, moments, log)).model
        converted = done(to_fp8(loaded, plans, ToFP8Config.of(params), weights))
        del weights
        if params.precision_compare:
            done(compare(model, converted.model, plans, CompareConfig.of(params), staging.path, log=log))
        if params.eval_data:
            done(evaluate(model, converted.model, EvaluateConfig.of(params)))
        conversion.plans = plans
    conversion.summary = staging.final_path(conversion.summary)
    conversion.artifacts = [dataclasses.replace(a, path=staging.final_path(a.path)) for a in conversion.artifacts]
    return conversion
