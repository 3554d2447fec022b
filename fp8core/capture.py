"""Capture the inputs of FP8 ops on calibration data, streaming them into per-tensor statistics.

The float model is run in onnxruntime with every wanted activation exposed as an extra graph
output (``make_session(..., extra_outputs=...)``); each batch's tensors are folded into :class:`fp8core.stats.TensorStats` and dropped, so
memory does not grow with the number of samples. A tensor read by several ops is captured once.

Folding a run's tensors in overlaps the next run: one thread folds run i while onnxruntime computes
run i+1 on the other cores (:func:`onnxruntime_threads`: all but one). One fold thread, because
``np.bincount`` holds the GIL: two fold threads were slower than one. Each tensor sees its batches
in the same order and in the same pieces as a plain loop, so the statistics are bit for bit the
same. On 2 CPUs (ResNet50, 50 samples, quiet machine): capture 6.0-6.6 s with onnxruntime on one
thread and the fold on the other, 7.8-8.0 s with onnxruntime on both (they contend), 8.9-9.0 s
folding after each run; a model with far more compute per captured value (MatMul 1024 -> 4096 ->
1024) captures 15-25% slower on one onnxruntime thread than on two, still ~2.4x its inference.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import onnx

from fp8core.errors import FP8Error, first_line
from fp8core.bodies import expose_values
from fp8core.calibration import CalibrationSource
from fp8core.graph import graph_inputs
from fp8core.model import Model
from fp8core.inputs import input_specs, stack_feeds
from fp8core.plan import OpPlan
from fp8core.runtime import make_session, session_options
from fp8core.stats import TensorStats


class CaptureError(FP8Error):
    """A calibration batch made onnxruntime fail; the message names the samples."""


def activations_to_capture(plans: list[OpPlan]) -> list[str]:
    """Distinct activation tensors read by FP8 ops, in graph order."""
    names: list[str] = []
    for plan in plans:
        if plan.fp8:
            for q in plan.input("activation"):
                if q.tensor not in names:
                    names.append(q.tensor)
    return names


def input_feeds(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch in the model's layout and input dtypes (data was validated as castable): samples
    stacked along each input's batch axis (:mod:`fp8core.inputs`)."""
    return stack_feeds(input_specs(model), batch)


RUN_SAMPLES = 2
"""Samples per onnxruntime run. Every captured tensor of a run is held at once (ResNet50: ~36 MB
per sample; two runs while one is folded in and the next computed), so capture runs small slices
of each batch; CPU throughput barely depends on it. The statistics' float64 rounding follows the
arrays they are fed: changing it changes the last bits of the statistics (and the cache key does
not know)."""


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def onnxruntime_threads() -> int:
    """onnxruntime's threads in the capture session: every CPU but the one the fold thread uses."""
    return max(1, usable_cpus() - 1)


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    specs = [s for s in input_specs(model) if s.batch_axis is not None]
    return bool(specs) and all(s.fixed_batch is None for s in specs)


def _failing_sample(session, tensors, model, batch, start) -> str:
    """Re-run a failed slice one sample at a time to name the sample that breaks onnxruntime."""
    n = len(next(iter(batch.values())))
    for i in range(n):
        try:
            session.run(tensors, input_feeds(model, {k: v[i:i + 1] for k, v in batch.items()}))
        except Exception as exc:
            return f"calibration sample {start + i} makes onnxruntime fail: {first_line(exc)}"
    return f"onnxruntime failed on calibration samples {start}..{start + n - 1}"


def capture_stats(
    model: Model | onnx.ModelProto,
    tensors: list[str],
    source: CalibrationSource,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, TensorStats]:
    """Statistics of every tensor in ``tensors`` over the calibration data (or one shard of it).

    ``shard=(i, n)`` takes batches i, i+n, i+2n, ...: n workers capture disjoint shards whose
    statistics merge into the same result. Batches are read ``batch_size`` samples at a time and
    run :data:`RUN_SAMPLES` at a time when the model's batch dimension is dynamic.
    """
    handle = Model.of(model)
    model = handle.proto
    options = session_options(onnxruntime_threads())
    # The arena stays on: every run has the same shapes, so after the first run each one reuses
    # the same buffers (without it every activation was a fresh mmap, page-faulted and unmapped:
    # about a third of ResNet50's capture CPU time in onnxruntime). onnxruntime's threads do not
    # spin between ops: the fold thread gets the CPU whenever they wait.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model_for_run, readable = expose_values(model, tensors)  # values inside If/Loop/Scan bodies too
    session = make_session(handle.derive(model_for_run), options, extra_outputs=[readable[t] for t in tensors])
    run_names = [readable[t] for t in tensors]
    input_names = [vi.name for vi in graph_inputs(model.graph)]
    step = RUN_SAMPLES if _batch_is_dynamic(model) else batch_size
    stats = {name: TensorStats() for name in tensors}
    total = -(-source.num_samples // batch_size)
    start = 0
    folding = None  # the fold of the previous run, running while onnxruntime computes this one
    pool = ThreadPoolExecutor(1, "capture-fold")
    try:
        for index, batch in enumerate(source.iter_batches(batch_size, input_names)):
            n = len(next(iter(batch.values())))
            if shard is None or index % shard[1] == shard[0]:
                for lo in range(0, n, step):
                    part = {k: v[lo:lo + step] for k, v in batch.items()}
                    feeds = input_feeds(model, part)
                    try:
                        outputs = session.run(run_names, feeds)
                    except Exception:
                        raise CaptureError(_failing_sample(session, run_names, model, part, start + lo)) from None
                    if folding is not None:
                        folding.result()  # a tensor's batches are folded in order, one at a time
                    folding = pool.submit(_fold_in, stats, tensors, outputs)
                    del outputs
            start += n
            if progress:
                progress(index + 1, total)
        if folding is not None:
            folding.result()
    finally:  # on Ctrl-C or an error: no new fold starts, the running one ends with its run
        pool.shutdown(wait=True, cancel_futures=True)
    return stats


def _fold_in(stats: dict[str, TensorStats], tensors: list[str], outputs: list[np.ndarray]) -> None:
    """Update each tensor's statistics with its output of one run, dropping each output once
    folded in (its buffer can serve the run being computed)."""
    for i, name in enumerate(tensors):
        stats[name].update(outputs[i])
        outputs[i] = None
