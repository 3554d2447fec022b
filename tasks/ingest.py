"""Task: open the calibration data and check it against the model before any long work."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.calibration import CalibrationSource, model_input_specs, open_dataset, validate_against_model


@task(name="ingest-calibration-data", cache_policy=NONE, **IO_RETRIES)
def ingest_calibration_data(path: str, model, batch_size: int) -> CalibrationSource:
    source = open_dataset(path)
    summary = validate_against_model(source, model_input_specs(model), batch_size)
    get_run_logger().info("calibration data %s: %d samples, fingerprint %s", path, summary.num_samples, source.fingerprint()[:12])
    return source
