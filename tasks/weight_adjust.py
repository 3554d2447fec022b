"""Task: GPTQ / gptaq weights and bias correction on the calibration data (fp8core.pipeline.adjust_weights)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.pipeline import AdjustConfig, Adjusted, adjust_weights
from fp8core.report import ProgressLine


@task(name="adjust-weights", cache_policy=NONE)
def adjusted_weights(model, plans: list, source, config: AdjustConfig, moments: dict | None = None,
                     show_progress: bool = False) -> Adjusted:
    line = ProgressLine("fit", enabled=show_progress)
    try:
        return adjust_weights(model, plans, source, config, moments, get_run_logger(), progress=line.update)
    finally:
        line.close()
