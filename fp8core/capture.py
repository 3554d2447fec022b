"""Capture the inputs of FP8 ops on calibration data, streaming them into per-tensor statistics.

The float model is run over the data by :func:`fp8core.stream.stream` with every wanted activation
exposed as an extra graph output; each run's tensors are folded into
:class:`fp8core.stats.TensorStats` (:class:`StatsAccumulator`) and dropped, so memory does not
grow with the number of samples. A tensor read by several ops is captured once. Other
accumulators can ride along on the same pass (``also=``: GPTQ's input moments,
:class:`fp8core.feature_moments.MomentAccumulator`), so the data is read once.

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

from collections.abc import Sequence
from typing import Callable

import onnx

from fp8core.calibration import CalibrationSource
from fp8core.model import Model
from fp8core.plan import OpPlan
from fp8core.runtime import session_options
from fp8core.stats import TensorStats
from fp8core.stream import Accumulator, Batch, StreamError, Tap, accumulate, input_feeds, stream, usable_cpus

CaptureError = StreamError  # the name callers know: a calibration batch made onnxruntime fail

__all__ = ["CaptureError", "RUN_SAMPLES", "StatsAccumulator", "activations_to_capture", "capture_stats",
           "capture_options", "input_feeds", "onnxruntime_threads", "usable_cpus"]


def activations_to_capture(plans: list[OpPlan]) -> list[str]:
    """Distinct activation tensors read by FP8 ops, in graph order."""
    names: list[str] = []
    for plan in plans:
        if plan.fp8:
            for q in plan.input("activation"):
                if q.tensor not in names:
                    names.append(q.tensor)
    return names


RUN_SAMPLES = 2
"""Samples per onnxruntime run. Every captured tensor of a run is held at once (ResNet50: ~36 MB
per sample; two runs while one is folded in and the next computed), so capture runs small slices
of each batch; CPU throughput barely depends on it. The statistics' float64 rounding follows the
arrays they are fed: changing it changes the last bits of the statistics (and the cache key does
not know)."""


def onnxruntime_threads() -> int:
    """onnxruntime's threads in the capture session: every CPU but the one the fold thread uses."""
    return max(1, usable_cpus() - 1)


def capture_options():
    """The capture session's options: :func:`onnxruntime_threads` threads, arena on (no spinning,
    as every session: the fold thread gets the CPU whenever they wait).

    The arena stays on: every run has the same shapes, so after the first run each one reuses
    the same buffers (without it every activation is a fresh mmap, page-faulted and unmapped:
    about a third of ResNet50's capture CPU time in onnxruntime)."""
    return session_options(onnxruntime_threads())


class StatsAccumulator:
    """:class:`fp8core.stats.TensorStats` of each tensor, one run at a time, in order."""

    def __init__(self, tensors: Sequence[str]):
        self.tensors = list(dict.fromkeys(tensors))
        self.stats = {name: TensorStats() for name in self.tensors}

    def add_batch(self, batch: Batch) -> None:
        for name in self.tensors:
            self.stats[name].update(batch.take(name))


def capture_stats(
    model: Model | onnx.ModelProto,
    tensors: list[str],
    source: CalibrationSource,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
    also: Sequence[Accumulator] = (),
) -> dict[str, TensorStats]:
    """Statistics of every tensor in ``tensors`` over the calibration data (or one shard of it).

    ``shard=(i, n)`` takes batches i, i+n, i+2n, ...: n workers capture disjoint shards whose
    statistics merge into the same result. Batches are read ``batch_size`` samples at a time and
    run :data:`RUN_SAMPLES` at a time when the model's batch dimension is dynamic. ``also``:
    accumulators fed from the same runs, before the statistics (they read what they need first,
    the statistics then drop each value).
    """
    stats = StatsAccumulator(tensors)
    wanted = list(dict.fromkeys(list(stats.tensors) + [t for acc in also for t in acc.tensors]))
    tap = Tap(model, wanted, capture_options())
    batches = stream(tap, source, batch_size=batch_size, shard=shard, run_samples=RUN_SAMPLES, progress=progress)
    accumulate(batches, [*also, stats], overlap=True)
    return stats.stats
