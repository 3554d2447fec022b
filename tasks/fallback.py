"""Task: keep in original precision the ops that matter most for the model outputs (the K most
helpful, the dominant ones, or the fewest that meet an accuracy target): fp8core.pipeline.fallback."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.pipeline import Fallback, FallbackConfig, fallback


@task(name="fallback", cache_policy=NONE)
def keep_in_original_precision(model, plans: list, config: FallbackConfig, best_loss: dict, folder: str,
                               activation_values: float | None = None) -> Fallback:
    return fallback(model, plans, config, best_loss, folder, get_run_logger(), activation_values)
