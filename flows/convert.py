"""The ``fp8-convert`` flow: load model -> [ingest -> capture -> search] -> [fallback] -> convert -> [compare] -> record.

Read top to bottom, it is the pipeline. Numerics live in fp8core, steps in tasks/, MLflow in
tasks/tracking.py; this file only chains them.
"""

from __future__ import annotations

import contextlib
import os
import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.errors import failed_state, is_user_error, one_line, quiet_user_error_tracebacks
from tasks.params import ConvertParams
from flows.quality import apply_fallback, compare_precision
from fp8core.plan import already_quantized_note
from fp8core.report import fp8_config
from fp8core.staging import StagedOutputs
from fp8core.weight_scales import choose_weight_params
from tasks import tracking
from tasks.convert_graph import encode_weights, rewrite_graph, validate_and_save
from tasks.evaluate import evaluate_accuracy
from tasks.load_model import load_model, read_written_model
from tasks.plan_ops import plan_ops


quiet_user_error_tracebacks()


class Stopwatch:
    """Seconds per pipeline stage, in the order the stages ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


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
    eval_data = params.eval_data
    log = get_run_logger()
    clock = Stopwatch()
    run_name = run_title(params)
    # logs are staged and appear only if the run succeeds; the MLflow run records either outcome
    with StagedOutputs(params.logs_dir) as staging, tracking.conversion_run(params, run_name, verbose) as record:
        record.tags({"prefect_flow_run_id": str(flow_run.get_id() or ""), "mode": "quantize" if params.quantize else "fast"})

        with clock.stage("load"):
            loaded = load_model(params.input_model, params.input_shape, params.convert_version,
                                stream_weights=weights_can_stay_on_disk(params), batch_axes=params.input_batch_axis)
        record.tags({"input_model_sha256": loaded.sha256, "input_opset": loaded.source_opset})
        params = params.with_batch_size(loaded.model.proto)
        tell_user(loaded.notes)

        with clock.stage("plan"):
            plans = plan_ops(loaded.model.proto, params)
        tell_user([note for note in [already_quantized_note(loaded.model.proto, plans)] if note])

        if params.quantize:
            from flows.calibrate import calibrate

            plans, quantize_logs = calibrate(loaded.model, plans, params, record, clock, staging.path)
        else:
            quantize_logs = {}
            # fast mode: the weights are known, so real scales (per_channel / float) are searched
            # on them by mse in the --fp8_params weight format
            plans = choose_weight_params(loaded.model, plans, params.weight_granularity, params.scale_kind,
                                         [params.fp8_params.weight_format], "mse")

        fallback = {}
        if params.num_of_layers_keep_fp16 or params.accuracy_target or params.keeps_dominant_ops:
            with clock.stage("fallback"):
                plans, fallback = apply_fallback(loaded.model, plans, params, quantize_logs.get("best_loss", {}), record,
                                                 staging.path)

        to_encode, weight_adjust = loaded.model, []
        if params.weight_rounding != "nearest" or params.bias_correction:
            from flows.weight_adjust import adjusted_model

            with clock.stage("adjust_weights"):
                to_encode, weight_adjust = adjusted_model(loaded.model, plans, params, record)
        with clock.stage("encode"):
            encoded = encode_weights(to_encode, plans)
        with clock.stage("rewrite"):
            fp8_model = rewrite_graph(to_encode, plans, encoded)
        del to_encode, encoded
        with clock.stage("save"):
            streamed = loaded.model.weights_dir is not None  # then nothing below needs the FP8 model's weights
            bytes_after, agreement = validate_and_save(fp8_model, params.output_model, params.external_data,
                                                       release=streamed,
                                                       feeds=validation_reference(loaded, params))

        config = fp8_config(plans, loaded.opset)
        result = {
            "output_model": os.path.abspath(params.output_model),
            "fp8_ops": config["fp8_ops"],
            "skipped_ops": config["skipped_ops"],
            "opset": loaded.opset,
            "bytes_before": loaded.bytes,
            "bytes_after": bytes_after,
            "mlflow_run_id": record.run_id,
            "mlflow_uri": tracking.tracking_uri(params.mlflow_tracking_uri),
            "agreement": agreement,
            "notes": loaded.notes,
            **quantize_logs,
            **fallback,
            **({"weight_adjust": weight_adjust} if weight_adjust else {}),
        }
        if streamed and (params.precision_compare or eval_data):  # its weights were released once written
            fp8_model = read_written_model(params.output_model)  # FP8: a quarter of the float weights
        if params.precision_compare:
            with clock.stage("compare"):
                result.update(compare_precision(loaded.model, fp8_model, plans, params, record, staging.path))
        if eval_data:
            with clock.stage("evaluate"):
                result["evaluation"] = evaluate_accuracy(loaded.model, fp8_model, eval_data)
        result["seconds"] = dict(clock.seconds)

        record.metrics({
            "fp8_op_count": result["fp8_ops"],
            "skipped_op_count": result["skipped_ops"],
            "model_bytes_before": result["bytes_before"],
            "model_bytes_after": result["bytes_after"],
            **{f"seconds_{k}": v for k, v in clock.seconds.items()},
            **{f"eval_{k}": v for k, v in result.get("evaluation", {}).items()},
            **agreement,
        })
        record.json_artifact(config, "fp8_config.json")
        result["registered_model_version"] = register_if_accurate(record, params, result)
        publish_prefect_artifacts(record, params, result, plans)
        log.info("FP8 model: %s (%d FP8 ops, %d kept)", result["output_model"], result["fp8_ops"], result["skipped_ops"])
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
                                    (params.weight_rounding, params.weight_rounding != "nearest"),
                                    ("bias_correction", params.bias_correction)) if on]
    if params.num_of_layers_keep_fp16:
        parts.append(f"keep{params.num_of_layers_keep_fp16}")
    if params.accuracy_target:
        parts.append(f"target {params.accuracy_target}")
    return " ".join(parts)


def tell_user(notes: list[str]) -> None:
    """What was repaired or assumed about the input model: one line each, shown even when quiet."""
    import logging

    for note in notes:
        get_run_logger().warning(note)
        logging.getLogger("fp8").warning(note)


def validation_reference(loaded, params: ConvertParams):
    """Inputs the written FP8 model is validated on: the first calibration samples when there are
    some (real shapes, real values), else the generated inputs the input model ran on."""
    if params.data_preprocess:
        from fp8core.calibration import open_dataset
        from fp8core.validation import calibration_reference

        return calibration_reference(loaded.model, open_dataset(params.data_preprocess), params.batch_size)
    return loaded.reference


def weights_can_stay_on_disk(params: ConvertParams) -> bool:
    """Every step asked for reads external weights from their data files (search and encoding one
    weight at a time; capture, evaluation, comparison and fallback trials through onnxruntime):
    then large external weights are never loaded. GPTQ / bias correction write new float weights,
    so they need them in memory."""
    return not (params.weight_rounding != "nearest" or params.bias_correction)


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
    from flows.startup import wait_for_prefect_server

    tracking.open_store(params.mlflow_tracking_uri, verbose)  # while Prefect's server starts (flows/startup.py)
    wait_for_prefect_server()
    return fp8_convert(params, verbose=verbose)
