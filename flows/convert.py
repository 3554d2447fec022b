"""The ``fp8-convert`` flow: load -> plan -> [ingest -> calibrate -> weight scales] -> [fallback]
-> [adjust weights] -> to FP8 -> [compare] -> [evaluate] -> record.

Read top to bottom, it is the pipeline: each stage (fp8core/pipeline.py) runs as a task (tasks/)
and returns a typed result that ``record.stage`` writes to MLflow (tasks/tracking.py); this file
only chains them. ``fp8core.pipeline.convert`` is the same chain without Prefect or MLflow.
"""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.calibrate import calibrate, ignored_fp8_params_note
from flows.errors import failed_state, is_user_error, one_line, quiet_user_error_tracebacks
from fp8core.pipeline import (AdjustConfig, CompareConfig, Conversion, EvaluateConfig, FallbackConfig, IngestConfig,
                              LoadConfig, PlanConfig, StageResult, ToFP8Config, WeightScaleConfig)
from fp8core.staging import StagedOutputs
from tasks import tracking
from tasks.compare import precision_compare
from tasks.convert_graph import convert_to_fp8
from tasks.evaluate import evaluate_accuracy
from tasks.fallback import keep_in_original_precision
from tasks.ingest import ingest_calibration_data
from tasks.load_model import load_model
from tasks.params import ConvertParams
from tasks.plan_ops import plan_ops
from tasks.search import choose_weight_scales, write_search_report
from tasks.weight_adjust import adjusted_weights


quiet_user_error_tracebacks()


@flow(name="fp8-convert", log_prints=False)
def fp8_convert(params: ConvertParams, verbose: int = 0) -> dict:
    """Convert one ONNX model to FP8 mixed precision and record the run in MLflow."""
    try:
        return convert(params, verbose)
    except Exception as exc:
        if not is_user_error(exc):
            raise  # internal: Prefect keeps the traceback
        get_run_logger().error(one_line(exc))
        return failed_state(exc)


def convert(params: ConvertParams, verbose: int) -> dict:
    """The pipeline, inside the flow run."""
    conversion = Conversion()
    # logs are staged and appear only if the run succeeds; the MLflow run records either outcome
    with StagedOutputs(params.logs_dir) as staging, tracking.conversion_run(params, run_title(params), verbose) as record:
        record.tags({"prefect_flow_run_id": str(flow_run.get_id() or ""), "mode": "quantize" if params.quantize else "fast"})

        def done(result: StageResult):
            """A stage's result: recorded in the MLflow run, told to the user, added to the summary."""
            record.stage(result)
            tell_user(result.notes)
            return conversion.add(result)

        loaded = done(load_model(params.input_model, LoadConfig.of(params)))
        params = params.with_batch_size(loaded.model.proto)
        model = loaded.model
        plans = done(plan_ops(model, PlanConfig.of(params))).plans
        best_loss, source, moments, activation_values = {}, None, None, None
        if params.quantize:
            tell_user(ignored_fp8_params_note(params))
            source = done(ingest_calibration_data(model, IngestConfig.of(params))).source
            calibrated = done(calibrate(model, plans, source, params))  # capture and search mapped (flows/calibrate.py)
            plans = done(choose_weight_scales(model, calibrated.plans, WeightScaleConfig.of(params))).plans
            best_loss = done(write_search_report(calibrated, plans, staging.path)).best_loss
            moments, activation_values = calibrated.gptq_moments, calibrated.activation_values
            del calibrated
        else:  # fast mode: real scales (per_channel / float) searched on the weights by mse (untimed)
            plans = choose_weight_scales(model, plans, WeightScaleConfig.of(params)).plans
        fallback, weights = FallbackConfig.of(params), None
        adjust = AdjustConfig.of(params, streamed=model.weights_dir is not None)
        tell_user(adjust.notes)
        if fallback.needed:
            plans = done(keep_in_original_precision(model, plans, fallback, best_loss, staging.path,
                                                    activation_values)).plans
        if adjust.needed:  # after the fallback: its trials measure round-to-nearest weights
            weights = done(adjusted_weights(model, plans, source, adjust, moments, show_progress=True)).model
        converted = done(convert_to_fp8(loaded, plans, ToFP8Config.of(params), weights))
        del weights
        if params.precision_compare:
            done(precision_compare(model, converted.model, plans, CompareConfig.of(params), staging.path,
                                   show_progress=True))
        if params.eval_data:
            done(evaluate_accuracy(model, converted.model, EvaluateConfig.of(params)))

        result = {**conversion.result(), "mlflow_run_id": record.run_id,
                  "mlflow_uri": tracking.tracking_uri(params.mlflow_tracking_uri)}
        record.metrics({f"seconds_{k}": v for k, v in result["seconds"].items()})
        result["registered_model_version"] = register_if_accurate(record, params, result)
        publish_prefect_artifacts(record, params, result, plans)
        get_run_logger().info("FP8 model: %s (%d FP8 ops, %d kept)", result["output_model"], result["fp8_ops"],
                              result["skipped_ops"])
        return staging.final_path(result)


def run_title(params: ConvertParams) -> str:
    """The MLflow run name: the model and what tells this run apart from its neighbours."""
    parts = [os.path.basename(params.input_model)]
    if params.quantize:
        parts += ["quantize", params.quantize_loss_type]
    else:
        parts += ["fast", params.fp8_params.as_flag()]
    if params.precision != "fp8":
        parts.append(params.precision)
    parts += [flag for flag, on in (("per_channel", params.weight_granularity == "per_channel"),
                                    ("float_scales", params.scale_kind == "float"),
                                    (params.weight_rounding, params.weight_rounding not in ("auto", "nearest")),
                                    ("bias_correction", params.bias_correction)) if on]
    if params.num_of_layers_keep_fp16:
        parts.append(f"keep{params.num_of_layers_keep_fp16}")
    if params.accuracy_target:
        parts.append(f"target {params.accuracy_target}")
    return " ".join(parts)


def tell_user(notes) -> None:
    """What was repaired, assumed or left out: one line each, shown even when quiet."""
    for note in notes:
        get_run_logger().warning(note)
        logging.getLogger("fp8").warning(note)


def register_if_accurate(record, params: ConvertParams, result: dict) -> str | None:
    """Register the FP8 model in MLflow's registry when asked and every accuracy target is met."""
    if not params.register_model:
        return None
    unmet = tracking.unmet_accuracy_targets(params, result.get("evaluation"))
    if unmet:
        get_run_logger().warning("FP8 model not registered: %s", "; ".join(unmet))
        record.tags({"model_registry": "not registered: " + "; ".join(unmet)})
        return None
    version = record.register_model(result["output_model"], params.model_registry_name,
                                    description=f"from {os.path.basename(params.input_model)}")
    record.tags({"model_registry": f"registered {params.model_registry_name} version {version}"})
    get_run_logger().info("registered %s version %s", params.model_registry_name, version)
    return version


def op_table(plans, best_loss: dict[str, float]) -> list[dict]:
    """One row per Conv/MatMul/Gemm: what the Prefect table artifact shows."""
    rows = []
    for plan in plans:
        d = plan.to_dict()
        act, weight = d["input"] or {}, d["weight"] or {}
        rows.append({
            "name": plan.name, "type": plan.op_type, "precision": "fp8" if plan.fp8 else "skipped",
            "input_format": act.get("format", "") if plan.fp8 else "",
            "input_scale": act.get("scale", "") if plan.fp8 else "",
            "weight_format": weight.get("format", "") if plan.fp8 else "",
            "weight_scale": weight.get("scale", "") if plan.fp8 else "",
            "best_loss": "" if best_loss.get(plan.name) is None else f"{best_loss[plan.name]:.6g}",
            "reason": plan.reason,
        })
    return rows


def artifact_key(input_model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    stem = os.path.splitext(os.path.basename(input_model))[0].lower()
    return "fp8-ops-" + ("".join(c if c.isalnum() else "-" for c in stem).strip("-") or "model")


def publish_prefect_artifacts(record, params: ConvertParams, result: dict, plans) -> None:
    """On the flow run: the per-op table, and where the MLflow run is (a link when it is a server)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    create_table_artifact(op_table(plans, result.get("best_loss", {})), key=artifact_key(params.input_model),
                          description=f"FP8 ops of {os.path.basename(params.input_model)}")
    uri = result["mlflow_uri"]
    url = record.web_url(uri)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {record.run_id}", key="mlflow-run",
                             description="the MLflow run of this conversion")
    lines = [f"**MLflow run** `{record.run_id}` in `{uri}`" + (f": [open]({url})" if url else ""),
             f"* FP8 model: `{result['output_model']}` ({result['fp8_ops']} FP8 ops, {result['skipped_ops']} kept)"]
    if result.get("evaluation"):
        ev = result["evaluation"]
        lines.append(f"* accuracy FP32 {ev['accuracy_fp32']:.4f}, FP8 {ev['accuracy_fp8']:.4f}, agreement {ev['agreement']:.4f}")
    if result.get("registered_model_version"):
        lines.append(f"* registered model `{params.model_registry_name}` version {result['registered_model_version']}")
    create_markdown_artifact("\n".join(lines), key="mlflow-run-summary", description="MLflow run of this conversion")


def run_conversion(params: ConvertParams, verbose: int = 0) -> dict:
    """Run the flow (its mapped steps use the task runner the parameters ask for: flows/runners.py)."""
    from flows.startup import use_prefect_server

    tracking.open_store(params.mlflow_tracking_uri, verbose)  # while Prefect's server starts (flows/startup.py)
    use_prefect_server()
    return fp8_convert(params, verbose=verbose)
