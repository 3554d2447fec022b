"""The calibrated part of the pipeline: ingest -> capture -> search (mapped) -> apply -> log.

Called by :func:`flows.convert.fp8_convert` when ``--quantize`` is set. Captured activation
statistics are cached on disk (fp8core.cache): a re-run that changes only the loss or the formats re-uses
them and skips capture.
"""

from __future__ import annotations

import logging
import os

from prefect import get_run_logger

from tasks.params import ConvertParams, FP8Params
from flows.runners import capture_shards, map_search, task_runner
from fp8core.cache import StatsKey
from fp8core.model import Model
from fp8core.capture import activations_to_capture
from fp8core.plan import OpPlan, keep_unreached
from fp8core.quantize_log import apply_choices, quantize_report, write_quantize_logs
from fp8core.weight_scales import choose_weight_params
from tasks.cache import HIT, load_cached_stats, store_stats
from tasks.ingest import ingest_calibration_data
from tasks.search import weight_stats


def calibrate(model: Model, plans: list[OpPlan], params: ConvertParams, record, clock,
              log_folder: str) -> tuple[list[OpPlan], dict]:
    """Choose (format, scale) for every FP8 op input and weight; return updated plans and log paths.

    Weights the model left on disk are read from their data files by every step here
    (onnxruntime for capture, one weight at a time for search).
    """
    log = get_run_logger()
    if "fp8_params" in params.model_fields_set and params.fp8_params != FP8Params():  # a form submits the default
        log.warning("--fp8_params is ignored with --quantize: formats and scales are searched")
        logging.getLogger("fp8").warning("--fp8_params is ignored with --quantize: formats and scales are searched")

    with clock.stage("ingest"):
        source = ingest_calibration_data(params.data_preprocess, model, params.batch_size)
    record.tags({"calibration_fingerprint": source.fingerprint(), "calibration_samples": source.num_samples})

    with task_runner(params) as runner:  # the mapped steps' runner (flows/runners.py)
        with clock.stage("capture"):
            tensors = activations_to_capture(plans)
            stats = captured_statistics(model, tensors, source, params, record, runner)
            unreached = {name for name, s in stats.items() if s.total_count == 0}
            if unreached:
                plans, kept = keep_unreached(plans, unreached)
                stats = {k: v for k, v in stats.items() if k not in unreached}
                note = (f"{len(kept)} op(s) kept in original precision: the calibration data never reaches them "
                        f"(inside an If branch or loop no sample takes): {', '.join(kept[:6])}"
                        + (" ..." if len(kept) > 6 else ""))
                log.warning(note)
                logging.getLogger("fp8").warning(note)
            stats.update(weight_stats(model, plans))

        with clock.stage("search"):
            results = map_search(stats, params, runner)

    plans = apply_choices(plans, results)
    with clock.stage("weight_scales"):  # per_channel / float: real scales searched on the weights by the same loss
        plans = choose_weight_params(model, plans, params.weight_granularity, params.scale_kind,
                                     params.fp8_formats, params.quantize_loss_type)
    report = quantize_report(plans, results, stats, params.quantize_loss_type, source)
    paths = write_quantize_logs(report, log_folder)
    for p in paths.values():
        record.artifact(p)
    record.metrics({f"best_loss/{op['name']}": op["best_loss"] for op in report["ops"] if op["best_loss"] is not None})
    best_losses = {op["name"]: op["best_loss"] for op in report["ops"] if op["best_loss"] is not None}
    return plans, {"quantize_log": paths["log"], "quantize_json": paths["json"], "best_loss": best_losses}


def captured_statistics(model: Model, tensors: list[str], source, params: ConvertParams, record, runner) -> dict:
    """Activation statistics from the cache when (model, data, tensors, batch size) was captured before.

    Records tag ``calibration_cache`` (hit / miss / corrupt) and metric ``calibration_cache_hit`` (1/0).
    """
    if not tensors:
        return {}
    root = params.statistics_cache_dir
    # the model capture runs on: after opset conversion and input-shape fixing
    key = StatsKey.of(model.sha256(), source.fingerprint(), tensors, params.batch_size)
    stats, outcome = load_cached_stats(root, key)
    if stats is None:
        stats = capture_shards(model, tensors, source, params, runner)
        store_stats(root, key, stats)
    get_run_logger().info("calibration statistics cache %s: %s", outcome, key.digest[:12])
    record.tags({"calibration_cache": outcome, "calibration_cache_key": key.digest, "calibration_cache_dir": root})
    record.metrics({"calibration_cache_hit": 1.0 if outcome == HIT else 0.0})
    return dict(stats)
