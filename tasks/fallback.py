"""Tasks: keep the K worst FP8 ops, or the fewest ops that meet an accuracy target, in original precision."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.calibration import model_input_specs, open_dataset, validate_against_model
from fp8core.fallback import AccuracyTarget, FallbackResult, fallback_for_target, keep_worst_ops
from fp8core.plan import OpPlan


@task(name="keep-worst-ops", cache_policy=NONE)
def keep_worst(plans: list[OpPlan], op_losses: dict[str, float], k: int, source: str) -> tuple[list[OpPlan], list[str]]:
    plans, kept = keep_worst_ops(plans, op_losses, k, source)
    get_run_logger().info("--num_of_layers_keep_fp16 %d: kept %s (by %s)", k, ", ".join(kept) or "none", source)
    return plans, kept


@task(name="accuracy-target-fallback", cache_policy=NONE)
def accuracy_target_fallback(float_model, plans: list[OpPlan], data_path: str, target: str, batch_size: int,
                             max_samples: int | None = 32, max_keep: int | None = None,
                             candidates: list[str] | None = None, weights_dir: str | None = None) -> FallbackResult:
    """Greedy fallback on ``max_samples`` samples of ``data_path``; every step is logged."""
    log = get_run_logger()
    parsed = AccuracyTarget.parse(target)
    source = open_dataset(data_path)
    validate_against_model(source, model_input_specs(float_model), batch_size)

    def progress(step):
        what = "all planned ops in FP8" if step.added is None else f"keep {step.added}"
        log.info("accuracy target %s step %d (%s): %s %.6g%s", parsed, step.step, what, parsed.metric,
                 step.metric, " - met" if step.met else "")

    result = fallback_for_target(float_model, plans, source, parsed, batch_size, max_samples,
                                 candidates=candidates, max_keep=max_keep, progress=progress, weights_dir=weights_dir)
    (log.info if result.met else log.warning)(result.message)
    return result
