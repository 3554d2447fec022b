"""Tasks: measure each FP8 op's effect on the model output; keep the K that matter most, or the
fewest that meet an accuracy target, in original precision."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.calibration import model_input_specs, open_dataset, validate_against_model
from fp8core.charts import per_op_bar_chart
from fp8core.fallback import (SENSITIVITY_SAMPLES, AccuracyTarget, FallbackResult, OutputProbe, Sensitivity, Trials,
                              Dominance, fallback_for_target, find_dominant_ops, keep_dominant_ops, keep_most_sensitive,
                              keep_worst_ops, measure_sensitivity)
from fp8core.plan import OpPlan

CHART_OPS = 40


def _progress_every_tenth(log, what: str):
    def progress(done: int, total: int, name: str):
        if done == total or done % max(1, total // 10) == 0:
            log.info("%s: %d/%d ops measured", what, done, total)
    return progress


def _trials_on(float_model, plans: list[OpPlan], data_path: str, batch_size: int, samples: int) -> Trials:
    """The data checked against the model, then one switchable session probed on ``samples`` samples."""
    source = open_dataset(data_path)
    validate_against_model(source, model_input_specs(float_model), batch_size)
    return Trials(float_model, plans, OutputProbe(float_model, source, batch_size, samples))


@task(name="measure-op-sensitivity", cache_policy=NONE)
def op_sensitivity(float_model, plans: list[OpPlan], data_path: str, batch_size: int, max_samples: int | None,
                   candidates: list[str]) -> Sensitivity:
    """Each candidate kept alone in original precision on top of the full FP8 model, on a few samples."""
    log = get_run_logger()
    trials = _trials_on(float_model, plans, data_path, batch_size,
                        min(max_samples or SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES))
    sensitivity = measure_sensitivity(trials, candidates, progress=_progress_every_tenth(log, "op sensitivity"))
    top = sensitivity.ranked()[:5]
    log.info("ops that matter most (%s of the outputs %.4g with every op in FP8): %s", sensitivity.metric,
             sensitivity.all_fp8, ", ".join(f"{n} ({sensitivity.alone[n]:.4g})" for n in top))
    return sensitivity


def sensitivity_chart(sensitivity: Sensitivity, folder: str, name: str = "op_sensitivity.png") -> str:
    """Bars: how much keeping each op alone improves the output metric (the most helpful ops)."""
    names = sensitivity.ranked()[:CHART_OPS]
    path = os.path.join(folder, name)
    per_op_bar_chart(path, names, [max(sensitivity.gain(n), 0.0) for n in names],
                     f"{sensitivity.metric} of the outputs, improvement",
                     f"Keeping one op in original precision (all FP8: {sensitivity.metric} {sensitivity.all_fp8:.3g})")
    return path


@task(name="keep-ops", cache_policy=NONE)
def keep_k(plans: list[OpPlan], k: int, sensitivity: Sensitivity | None = None,
           op_losses: dict[str, float] | None = None, source: str = "") -> tuple[list[OpPlan], list[str]]:
    """--num_of_layers_keep_fp16: by measured sensitivity, or (no data) by a per-op loss."""
    if sensitivity is not None:
        plans, kept = keep_most_sensitive(plans, sensitivity, k)
        source = f"measured effect on the outputs ({sensitivity.metric})"
    else:
        plans, kept = keep_worst_ops(plans, op_losses, k, source)
    get_run_logger().info("--num_of_layers_keep_fp16 %d: kept %s (by %s)", k, ", ".join(kept) or "none", source)
    return plans, kept


@task(name="keep-dominant-ops", cache_policy=NONE)
def keep_dominant(float_model, plans: list[OpPlan], data_path: str, batch_size: int, share: float,
                  candidates: list[str]) -> tuple[list[OpPlan], Dominance]:
    """--keep_dominant_share: the ops that alone carry that share of the output noise, by group testing."""
    log = get_run_logger()
    trials = _trials_on(float_model, plans, data_path, batch_size, SENSITIVITY_SAMPLES)
    dominance = find_dominant_ops(trials, candidates, share)
    if dominance.found:
        log.info("kept in original precision (each alone carries >= %g of the outputs' FP8 noise): %s (%d trials)",
                 share, ", ".join(f"{n} ({v:.0%})" for n, v in dominance.found.items()), dominance.trials)
    else:
        log.info("no op carries %g of the outputs' FP8 noise alone; every planned op stays FP8 (%d trials)",
                 share, dominance.trials)
    return keep_dominant_ops(plans, dominance), dominance


@task(name="accuracy-target-fallback", cache_policy=NONE)
def accuracy_target_fallback(float_model, plans: list[OpPlan], data_path: str, target: str, batch_size: int,
                             max_samples: int | None = 32, max_keep: int | None = None,
                             candidates: list[str] | None = None) -> FallbackResult:
    """Sensitivity + bisection on ``max_samples`` samples of ``data_path``; every trial is logged."""
    log = get_run_logger()
    parsed = AccuracyTarget.parse(target)
    source = open_dataset(data_path)
    validate_against_model(source, model_input_specs(float_model), batch_size)

    def progress(step):
        log.info("accuracy target %s trial %d (%s, %d kept): %s %.6g%s", parsed, step.step, step.phase,
                 len(step.kept), parsed.metric, step.metric, " - met" if step.met else "")

    result = fallback_for_target(float_model, plans, source, parsed, batch_size, max_samples,
                                 candidates=candidates, max_keep=max_keep, progress=progress,
                                 sensitivity_progress=_progress_every_tenth(log, "accuracy target sensitivity"))
    (log.info if result.met else log.warning)(result.message)
    return result
