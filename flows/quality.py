"""Accuracy steps of the pipeline: high-precision fallback before conversion, comparison after.

* ``--num_of_layers_keep_fp16 K``: keep in original precision the K ops whose return, each alone,
  improves the model output most (measured on a few samples; without data, the search loss);
* ``--accuracy_target METRIC=VALUE``: the same measurement in the target's metric, then a
  bisection on how many of the most helpful ops to keep (fp8core/fallback.py);
* ``--precision_compare``: every FP8 op output and model output, original vs FP8.
"""

from __future__ import annotations

from tasks.params import ConvertParams
from fp8core.plan import OpPlan
from tasks.compare import precision_compare
from fp8core.fallback import DOMINANCE_MIN_OPS
from tasks.fallback import accuracy_target_fallback, keep_dominant, keep_k, op_sensitivity, sensitivity_chart


def comparison_data(params: ConvertParams) -> str | None:
    return params.compare_data or params.data_preprocess


def _candidates(model, plans: list[OpPlan], params: ConvertParams, data: str) -> list[str]:
    """The FP8 ops measured one by one (fp8core.fallback.measurable_ops); a precision comparison
    on a few samples ranks them only on models with more than MAX_MEASURED_OPS."""
    from fp8core.calibration import open_dataset
    from fp8core.compare import compare_models
    from fp8core.fallback import MAX_MEASURED_OPS, measurable_ops
    from fp8core.rewrite import rewrite_to_fp8

    if sum(p.fp8 for p in plans) <= MAX_MEASURED_OPS:
        return measurable_ops(plans)
    report = compare_models(model, model.derive(rewrite_to_fp8(model, plans)), plans, open_dataset(data),
                            params.batch_size, params.compare_samples or params.accuracy_target_samples,
                            histogram_range="first_batch")
    return measurable_ops(plans, report)


def apply_fallback(model, plans: list[OpPlan], params: ConvertParams, best_loss: dict, record,
                   log_folder: str) -> tuple[list[OpPlan], dict]:
    """Plans with ops returned to original precision by K-most-sensitive and/or the accuracy target."""
    out: dict = {}
    data = comparison_data(params)
    # one by one measurements (K, target) cover at most MAX_MEASURED_OPS; group testing covers all
    needs_candidates = data and (params.num_of_layers_keep_fp16 or params.accuracy_target)
    candidates = _candidates(model, plans, params, data) if needs_candidates else None
    if params.num_of_layers_keep_fp16:
        if data:
            sensitivity = op_sensitivity(model, plans, data, params.batch_size, params.accuracy_target_samples,
                                         candidates)
            record.json_artifact(sensitivity.to_dict(), "op_sensitivity.json")
            record.artifact(sensitivity_chart(sensitivity, log_folder))
            plans, kept = keep_k(plans, params.num_of_layers_keep_fp16, sensitivity=sensitivity)
        else:
            plans, kept = keep_k(plans, params.num_of_layers_keep_fp16, op_losses=best_loss,
                                 source=f"search loss {params.quantize_loss_type}")
        record.tags({"num_of_layers_keep_fp16": ",".join(kept) or "none"})
        out["kept_fp16"] = kept
    if params.keeps_dominant_ops and sum(p.fp8 for p in plans) >= DOMINANCE_MIN_OPS:
        plans, dominance = keep_dominant(model, plans, data, params.batch_size, params.keep_dominant_share,
                                         [p.name for p in plans if p.fp8])
        record.json_artifact(dominance.to_dict(), "dominant_ops.json")
        record.tags({"kept_dominant_ops": ",".join(dominance.found) or "none"})
        record.metrics({"kept_dominant_ops": len(dominance.found), "dominant_search_trials": dominance.trials})
        if dominance.found:
            out.update(kept_dominant=list(dominance.found), kept_dominant_share=params.keep_dominant_share)
    if params.accuracy_target:
        candidates = [n for n in candidates if any(p.name == n and p.fp8 for p in plans)]
        result = accuracy_target_fallback(model, plans, data, params.accuracy_target, params.batch_size,
                                          params.accuracy_target_samples, max_keep=params.accuracy_target_max_keep,
                                          candidates=candidates)
        plans = result.plans
        record.json_artifact(result.to_dict(), "accuracy_target.json")
        if result.sensitivity is not None:
            record.artifact(sensitivity_chart(result.sensitivity, log_folder, "accuracy_target_sensitivity.png"))
        record.tags({"accuracy_target": result.message[:5000]})
        record.metrics({"accuracy_target_met": float(result.met), "accuracy_target_kept_ops": len(result.kept),
                        "accuracy_target_trials": result.trials})
        for step in result.steps:
            record.metrics({"accuracy_target_metric": step.metric}, step=step.step)
        out["accuracy_target"] = result.message
    return plans, out


def compare_precision(model, fp8_model, plans: list[OpPlan], params: ConvertParams, record,
                      log_folder: str) -> dict:
    """Run the comparison, log its files and metrics to the run; returns the summary entries."""
    cmp = precision_compare(model, fp8_model, plans, comparison_data(params), params.batch_size, log_folder,
                            params.compare_samples, show_progress=True)
    for path in cmp["paths"].values():
        record.artifact(path)
    record.metrics(cmp["metrics"])
    return {"precision_compare_log": cmp["paths"]["log"]}
