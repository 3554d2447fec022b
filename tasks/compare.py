"""Task: precision comparison of the original and the FP8 model (precision_compare.log/json/png)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.calibration import model_input_specs, open_dataset, validate_against_model
from fp8core.compare import compare_models, mlflow_metrics, write_compare_logs
from fp8core.fallback import (SENSITIVITY_METRIC, SENSITIVITY_SAMPLES, OutputProbe, Trials, measurable_ops,
                              measure_sensitivity)
from fp8core.report import ProgressLine


@task(name="precision-compare", cache_policy=NONE)
def precision_compare(float_model, fp8_model, plans, data_path: str, batch_size: int, log_dir: str,
                      max_samples: int | None = None, show_progress: bool = False) -> dict:
    """Compare on ``data_path``; write the logs; return the report, log paths and MLflow metrics."""
    log = get_run_logger()
    source = open_dataset(data_path)
    validate_against_model(source, model_input_specs(float_model), batch_size)
    line = ProgressLine("compare", enabled=show_progress)
    report = compare_models(float_model, fp8_model, plans, source, batch_size, max_samples,
                            progress=line.update)
    line.close()
    # which ops matter for the outputs: each kept alone, on a few samples (one switchable session);
    # on models with more FP8 ops than MAX_MEASURED_OPS, the ones adding the most noise
    probe = OutputProbe(float_model, source, batch_size, SENSITIVITY_SAMPLES)
    fp8_ops = measurable_ops(plans, report)
    sensitivity = measure_sensitivity(Trials(float_model, plans, probe), fp8_ops) if fp8_ops else None
    keep_gain = {n: sensitivity.gain(n) for n in fp8_ops} if sensitivity else None
    paths = write_compare_logs(report, log_dir, keep_gain, SENSITIVITY_METRIC)
    worst = ", ".join(f"{r.label} ({r.snr_db:.1f} dB)" for r in report.worst_ops())
    log.info("precision compare on %d samples: worst ops %s; model outputs cos_dist %.3g",
             report.samples, worst or "none", report.output_metric("cos_dist"))
    return {"report": report, "paths": paths, "metrics": mlflow_metrics(report)}
