"""The ``fp8-convert`` flow: load model -> [ingest -> capture -> search] -> convert -> compare -> record.

Read top to bottom, it is the pipeline. Numerics live in fp8core, steps in tasks/, MLflow in
tasks/tracking.py; this file only chains them.
"""

from __future__ import annotations

import contextlib
import os
import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.params import ConvertParams
from fp8core.report import fp8_config
from tasks import tracking
from tasks.convert_graph import encode_weights, rewrite_graph, validate_and_save
from tasks.evaluate import evaluate_accuracy
from tasks.load_model import load_model
from tasks.plan_ops import plan_ops


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
    eval_data = params.eval_data
    log = get_run_logger()
    clock = Stopwatch()
    run_name = f"{os.path.basename(params.input_model)} {'quantize' if params.quantize else 'fast'}"
    with tracking.conversion_run(params, run_name, verbose) as record:
        record.tags({"prefect_flow_run_id": str(flow_run.get_id() or ""), "mode": "quantize" if params.quantize else "fast"})

        with clock.stage("load"):
            loaded = load_model(params.input_model, params.input_shape, params.convert_version)
        record.tags({"input_model_sha256": loaded.sha256, "input_opset": loaded.source_opset})

        with clock.stage("plan"):
            plans = plan_ops(loaded.model, params)

        if params.quantize:
            from flows.calibrate import calibrate

            plans, quantize_logs = calibrate(loaded.model, plans, params, record, clock)
        else:
            quantize_logs = {}

        with clock.stage("encode"):
            encoded = encode_weights(loaded.model, plans)
        with clock.stage("rewrite"):
            fp8_model = rewrite_graph(loaded.model, plans, encoded)
        with clock.stage("save"):
            bytes_after = validate_and_save(fp8_model, params.output_model)

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
            **quantize_logs,
        }
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
        })
        record.json_artifact(config, "fp8_config.json")
        log.info("FP8 model: %s (%d FP8 ops, %d kept)", result["output_model"], result["fp8_ops"], result["skipped_ops"])
        return result


def run_conversion(params: ConvertParams, verbose: int = 0) -> dict:
    """Run the flow with the task runner the parameters ask for (thread, process or Dask)."""
    from flows.runners import task_runner

    return fp8_convert.with_options(task_runner=task_runner(params))(params, verbose=verbose)
