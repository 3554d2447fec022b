"""The calibrated stage on the task runner: capture (sharded on Dask) and the search, mapped.

Called by :func:`flows.convert.fp8_convert` when ``--quantize`` is set; the stage itself is
:func:`fp8core.pipeline.calibrate` (statistics cache, unreached ops, weight statistics), which
is handed the runner's mapped capture and search (flows/runners.py).
"""

from __future__ import annotations

from prefect import get_run_logger

from flows.runners import capture_shards, map_search, task_runner
from fp8core import pipeline
from fp8core.model import Model
from fp8core.plan import OpPlan
from tasks.params import ConvertParams, FP8Params


def calibrate(model: Model, plans: list[OpPlan], source, params: ConvertParams) -> pipeline.Calibrated:
    """(format, scale) searched for every FP8 op input and weight on the calibration data ``source``.

    Weights the model left on disk are read from their data files by every step here
    (onnxruntime for capture, one weight at a time for search)."""
    with task_runner(params) as runner:  # the mapped steps' runner (flows/runners.py)
        def capture(model, tensors, source, batch_size, also=()):
            return capture_shards(model, tensors, source, params, runner, also)

        def search(stats, loss, formats):
            return map_search(stats, params, runner)

        return pipeline.calibrate(model, plans, source, pipeline.CalibrateConfig.of(params), capture, search,
                                  get_run_logger())


def ignored_fp8_params_note(params: ConvertParams) -> list[str]:
    """--fp8_params given with --quantize: said once, since the search chooses formats and scales."""
    if "fp8_params" in params.model_fields_set and params.fp8_params != FP8Params():  # a form submits the default
        return ["--fp8_params is ignored with --quantize: formats and scales are searched"]
    return []
