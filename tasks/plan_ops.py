"""Task: decide which ops become FP8 (and with which fast-mode params)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.plan import OpPlan, QuantParams, check_skip_names, plan_fp8_ops
from tasks.params import ConvertParams


@task(name="plan-fp8-ops", cache_policy=NONE)
def plan_ops(model, params: ConvertParams) -> list[OpPlan]:
    for warning in check_skip_names(model, params.fp8_skip_op_names):
        get_run_logger().warning(warning)
    fp = params.fp8_params
    return plan_fp8_ops(
        model,
        precision=params.precision,
        skip=params.fp8_skip_op_names,
        activation_params=QuantParams(fp.input_format, fp.input_scale),
        weight_params=QuantParams(fp.weight_format, fp.weight_scale),
    )
