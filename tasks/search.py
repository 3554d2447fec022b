"""Tasks: statistics of weights, and the per-tensor (format, scale) search (mapped in parallel)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.search import search
from fp8core.stats import TensorStats


@task(name="weight-statistics", cache_policy=NONE)
def weight_stats(model, plans: list[OpPlan]) -> dict[str, TensorStats]:
    index = Model.of(model).index()  # external weights are read one at a time
    out: dict[str, TensorStats] = {}
    for plan in plans:
        if plan.fp8:
            for q in plan.input("weight"):
                if q.tensor not in out:
                    s = TensorStats()
                    s.update(index.constant_value(q.tensor))
                    out[q.tensor] = s
    return out


@task(name="search-format-scale", cache_policy=NONE, task_run_name="search-{label}", **IO_RETRIES)
def search_tensors(label: str, names: list[str], stats: list[TensorStats], loss: str, formats: tuple[str, ...]):
    """The best (format, scale) of each tensor of one group; ``label`` names the group in the UI."""
    log = get_run_logger()
    results = []
    for name, s in zip(names, stats):
        result = search(s, loss, formats)
        log.debug("search %s: %s scale %d, %s %.6g", name, result.format, result.scale, loss, result.loss)
        results.append(result)
    return results
