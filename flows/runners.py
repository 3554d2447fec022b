"""How mapped work runs: the task runner from --task_runner, and the mapped capture and search.

thread: one process, ThreadPoolTaskRunner (numpy and onnxruntime release the GIL);
process: ProcessPoolTaskRunner; dask: prefect-dask's DaskTaskRunner against --dask_address, or a
temporary LocalCluster when no address is given.
"""

from __future__ import annotations

from prefect import unmapped

from flows.params import ConvertParams
from fp8core.stats import TensorStats
from tasks.capture import capture_activations
from tasks.search import search_tensor


def task_runner(params: ConvertParams):
    if params.task_runner == "dask" or params.dask_address:
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": params.max_workers or 2, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if params.task_runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=params.max_workers)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=params.max_workers)


def _shards(params: ConvertParams) -> int:
    # One onnxruntime session already uses every core of a machine; shards pay off across machines.
    return (params.max_workers or 2) if params.task_runner == "dask" else 1


def capture_shards(model, tensors: list[str], source, params: ConvertParams) -> dict[str, TensorStats]:
    """Capture on n disjoint shards of the batches (mapped), then merge the statistics."""
    n = _shards(params)
    if not tensors:
        return {}
    if n == 1:
        return capture_activations(model, tensors, source, params.batch_size, None, show_progress=True)
    futures = capture_activations.map(unmapped(model), unmapped(tensors), unmapped(source),
                                      unmapped(params.batch_size), [(i, n) for i in range(n)])
    merged: dict[str, TensorStats] = {}
    for part in futures.result():
        for name, s in part.items():
            if name in merged:
                merged[name].merge(s)
            else:
                merged[name] = s
    return merged


def map_search(stats: dict, params: ConvertParams) -> dict:
    """One search task per tensor, mapped over the runner; results keyed by (tensor, role)."""
    keys = list(stats)
    futures = search_tensor.map(keys, [stats[k] for k in keys], unmapped(params.quantize_loss_type),
                                unmapped(tuple(params.fp8_formats)))
    return dict(zip(keys, futures.result()))
