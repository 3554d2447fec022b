"""Tasks: the per-tensor (format, scale) search (mapped in parallel), real weight scales, and the
search's logs (quantize.log / quantize.json)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.pipeline import Calibrated, SearchReport, WeightScaleConfig, WeightScales, search_report, weight_scales
from fp8core.search import search


@task(name="search-format-scale", cache_policy=NONE, task_run_name="search-{label}", **IO_RETRIES)
def search_tensors(label: str, names: list[str], stats: list, loss: str, formats: tuple[str, ...]):
    """The best (format, scale) of each tensor of one group; ``label`` names the group in the UI."""
    log = get_run_logger()
    results = []
    for name, s in zip(names, stats):
        result = search(s, loss, formats)
        log.debug("search %s: %s scale %d, %s %.6g", name, result.format, result.scale, loss, result.loss)
        results.append(result)
    return results


@task(name="choose-weight-scales", cache_policy=NONE)
def choose_weight_scales(model, plans: list, config: WeightScaleConfig) -> WeightScales:
    return weight_scales(model, plans, config)


@task(name="write-quantize-log", cache_policy=NONE, **IO_RETRIES)
def write_search_report(calibrated: Calibrated, plans: list, folder: str) -> SearchReport:
    return search_report(calibrated, plans, folder)
