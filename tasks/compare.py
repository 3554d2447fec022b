"""Task: precision comparison of the original and the FP8 model (precision_compare.log/json/png)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from fp8core.pipeline import CompareConfig, Compared, compare
from fp8core.report import ProgressLine


@task(name="precision-compare", cache_policy=NONE)
def precision_compare(float_model, fp8_model, plans: list, config: CompareConfig, folder: str,
                      show_progress: bool = False) -> Compared:
    line = ProgressLine("compare", enabled=show_progress)
    try:
        return compare(float_model, fp8_model, plans, config, folder, progress=line.update, log=get_run_logger())
    finally:
        line.close()
