"""Task: open the calibration data and check it against the model before any long work."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.pipeline import IngestConfig, Ingested, ingest


@task(name="ingest-calibration-data", cache_policy=NONE, **IO_RETRIES)
def ingest_calibration_data(model, config: IngestConfig) -> Ingested:
    return ingest(model, config, get_run_logger())
