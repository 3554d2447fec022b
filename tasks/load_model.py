"""Task: load the input model, fingerprint it, and prepare it (fp8core.pipeline.load)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.pipeline import LoadConfig, Loaded, load


@task(name="load-model", cache_policy=NONE, **IO_RETRIES)
def load_model(path: str, config: LoadConfig) -> Loaded:
    return load(path, config)
