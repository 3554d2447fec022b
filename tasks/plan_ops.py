"""Task: decide which ops become FP8 (and with which fast-mode params)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.pipeline import PlanConfig, Planned, plan


@task(name="plan-fp8-ops", cache_policy=NONE)
def plan_ops(model, config: PlanConfig) -> Planned:
    return plan(model, config, get_run_logger())
