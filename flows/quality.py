"""Accuracy steps of the pipeline: high-precision fallback before conversion, comparison after.

* ``--num_of_layers_keep_fp16 K``: keep the K ops that hurt most in original precision, ranked by
  the noise each op adds itself in a precision comparison (or, without data, the search loss);
* ``--accuracy_target METRIC=VALUE``: greedily keep the ops whose return to original precision
  improves the model output most until the target is met;
* ``--precision_compare``: every FP8 op output and model output, original vs FP8.
"""

from __future__ import annotations

from flows.params import ConvertParams
from fp8core.plan import OpPlan
from tasks.compare import precision_compare
from tasks.fallback import accuracy_target_fallback, keep_worst


def comparison_data(params: ConvertParams) -> str | None:
    return params.compare_data or params.data_preprocess


TARGET_CANDIDATES = 64
"""Ops (the noisiest first) the accuracy-target search may return to original precision. Each
greedy step tries every remaining candidate (a rewrite, a session and a run on a few samples);
with the encoded FP8 weights reused across trials that is about a second per trial on
MiniLM/EfficientNet. 8 candidates missed MiniLM's cos_dist=0.0025, which 3 kept ops can meet."""


def _rank_by_added_noise(model, plans: list[OpPlan], params: ConvertParams, data: str,
                         weights_dir: str | None) -> dict[str, float]:
    """Per FP8 op, the noise it adds itself, from one precision comparison on a few samples."""
    from fp8core.calibration import open_dataset
    from fp8core.compare import compare_models
    from fp8core.fallback import op_losses_from_comparison
    from fp8core.rewrite import rewrite_to_fp8

    report = compare_models(model, rewrite_to_fp8(model, plans, weights_dir=weights_dir), plans, open_dataset(data),
                            params.batch_size, params.compare_samples or params.accuracy_target_samples,
                            histogram_range="first_batch", weights_dir=weights_dir)
    return op_losses_from_comparison(report)


def apply_fallback(model, plans: list[OpPlan], params: ConvertParams, best_loss: dict, record,
                   weights_dir: str | None = None) -> tuple[list[OpPlan], dict]:
    """Plans with ops returned to original precision by K-worst and/or the accuracy target."""
    out: dict = {}
    data = comparison_data(params)
    ranked = _rank_by_added_noise(model, plans, params, data, weights_dir) if data else None
    if params.num_of_layers_keep_fp16:
        if ranked is not None:
            losses, ranked_by = ranked, "precision compare (noise each op adds)"
        else:
            losses, ranked_by = best_loss, f"search loss {params.quantize_loss_type}"
        plans, kept = keep_worst(plans, losses, params.num_of_layers_keep_fp16, ranked_by)
        record.tags({"num_of_layers_keep_fp16": ",".join(kept) or "none"})
        out["kept_fp16"] = kept
    if params.accuracy_target:
        # Each greedy step measures every candidate; the ops adding the most noise are the ones
        # worth trying, which keeps the search to minutes on models with hundreds of FP8 ops.
        fp8_names = [p.name for p in plans if p.fp8]
        noise = {n: v for n, v in ranked.items() if v == v}  # NaN (no signal) ranks last
        candidates = sorted(fp8_names, key=lambda n: -noise.get(n, float("-inf")))[:TARGET_CANDIDATES]
        result = accuracy_target_fallback(model, plans, data, params.accuracy_target, params.batch_size,
                                          params.accuracy_target_samples, max_keep=params.accuracy_target_max_keep,
                                          candidates=candidates, weights_dir=weights_dir)
        plans = result.plans
        record.json_artifact(result.to_dict(), "accuracy_target.json")
        record.tags({"accuracy_target": result.message[:5000]})
        record.metrics({"accuracy_target_met": float(result.met), "accuracy_target_kept_ops": len(result.kept)})
        for step in result.steps:
            record.metrics({"accuracy_target_metric": step.metric}, step=step.step)
        out["accuracy_target"] = result.message
    return plans, out


def compare_precision(model, fp8_model, plans: list[OpPlan], params: ConvertParams, record, log_folder: str,
                      weights_dir: str | None = None) -> dict:
    """Run the comparison, log its files and metrics to the run; returns the summary entries."""
    cmp = precision_compare(model, fp8_model, plans, comparison_data(params), params.batch_size, log_folder,
                            params.compare_samples, show_progress=True, weights_dir=weights_dir)
    for path in cmp["paths"].values():
        record.artifact(path)
    record.metrics(cmp["metrics"])
    return {"precision_compare_log": cmp["paths"]["log"]}
