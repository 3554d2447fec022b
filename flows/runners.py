"""How mapped work runs: the task runner from --task_runner, and the mapped capture and search.

thread: one process, ThreadPoolTaskRunner (numpy and onnxruntime release the GIL);
process: ProcessPoolTaskRunner; dask: prefect-dask's DaskTaskRunner against --dask_address, or a
temporary LocalCluster when no address is given.

The mapped steps submit to a started :func:`task_runner` (``with task_runner(params) as runner``),
not to the flow's own task runner: a deployed flow's runner is fixed when it is deployed, so this is what makes a deployment
run honour its ``task_runner`` and ``dask_address`` parameters, as the CLI does.
"""

from __future__ import annotations

import os

from prefect import unmapped

from tasks.params import ConvertParams
from fp8core.stats import TensorStats
from tasks.capture import capture_activations
from tasks.search import search_tensors


SEARCH_TASKS_PER_WORKER = 2
"""Search tasks per worker: a search takes ~15 ms and a Prefect task run ~10 ms of bookkeeping, so
tensors are searched in a few groups (still mapped, still balanced over the workers)."""


def workers(params: ConvertParams) -> int:
    """--max_workers, else one per CPU. Prefect's thread runner would otherwise run every mapped
    task at once (sys.maxsize threads): on ResNet50 104 GIL-bound searches take 12 s that way, 2 s
    with one worker per CPU."""
    return params.max_workers or os.cpu_count() or 1


def uses_dask(params: ConvertParams) -> bool:
    return params.task_runner == "dask" or bool(params.dask_address)


def task_runner(params: ConvertParams):
    """The runner --task_runner / --dask_address / --max_workers ask for; enter it to submit to it."""
    if uses_dask(params):
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers(params), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if params.task_runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers(params))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers(params))


def _shards(params: ConvertParams) -> int:
    # One onnxruntime session already uses every core of a machine; shards pay off across machines.
    return workers(params) if uses_dask(params) else 1


def capture_shards(model, tensors: list[str], source, params: ConvertParams, runner, also=()) -> dict[str, TensorStats]:
    """Capture on n disjoint shards of the batches (mapped), then merge the statistics. ``also``:
    accumulators fed by the same pass when it is one (not sharded); sharded, they are left unfed."""
    n = _shards(params)
    if not tensors:
        return {}
    if n == 1:
        return capture_activations(model, tensors, source, params.batch_size, None, show_progress=True, also=also)
    futures = runner.map(capture_activations, {
        "model": unmapped(model), "tensors": unmapped(tensors), "source": unmapped(source),
        "batch_size": unmapped(params.batch_size), "shard": [(i, n) for i in range(n)]})
    merged: dict[str, TensorStats] = {}
    for part in futures.result():
        for name, s in part.items():
            if name in merged:
                merged[name].merge(s)
            else:
                merged[name] = s
    return merged


def map_search(stats: dict, params: ConvertParams, runner) -> dict:
    """Search every tensor, in groups mapped over the runner; results keyed like ``stats``."""
    keys = list(stats)
    groups = search_groups(keys, SEARCH_TASKS_PER_WORKER * workers(params))
    labels = [f"{g[0]}" if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups]
    futures = runner.map(search_tensors, {
        "label": labels, "names": groups, "stats": [[stats[k] for k in g] for g in groups],
        "loss": unmapped(params.quantize_loss_type), "formats": unmapped(tuple(params.fp8_formats))})
    results: dict = {}
    for group, found in zip(groups, futures.result()):
        results.update(zip(group, found))
    return results


def search_groups(keys: list, count: int) -> list[list]:
    """``keys`` cut into at most ``count`` contiguous groups whose sizes differ by at most one."""
    count = max(1, min(count, len(keys)))
    size, extra = divmod(len(keys), count)
    groups, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        groups.append(keys[start:stop])
        start = stop
    return [g for g in groups if g]
