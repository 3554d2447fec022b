"""One activation stream over a data set, feeding pluggable accumulators.

Every step that reads activations on data (capture, GPTQ input moments, bias correction, the
GPTAQ fit, precision compare, the fallback probe, evaluation) runs the same loop: read a batch of
samples, put it in the model's layout (:func:`fp8core.inputs.stack_feeds`), run one onnxruntime
session with the wanted tensors exposed as extra outputs, hand the values to whatever
accumulates them, drop them. :func:`stream` is that loop, once:

* ``stream(model, source, tensors, batch_size)`` yields a :class:`Batch` per onnxruntime run:
  the feeds, the requested tensors' values (values inside If/Loop/Scan bodies too,
  :func:`fp8core.bodies.expose_values`), where it sits in the data (``index``, ``start``) and
  whether it ends its data batch (``last``). ``paired=`` runs a second model on the same feeds
  (the original and the FP8 model of a comparison); ``columns=`` passes other data columns
  through (a label); ``max_samples`` stops early; ``shard=(i, n)`` takes data batches i, i+n, ...
  (n workers, disjoint shards); ``run_samples`` runs each data batch in slices of that many
  samples when the batch dimension is dynamic (capture holds every captured tensor of a run).
* An *accumulator* (the GPTQ reference's ``add_batch``) has ``tensors`` (what it reads) and
  ``add_batch(batch)``. :func:`accumulate` feeds every accumulator from one pass, in the order
  given, so one read of the data serves all of them (capture's statistics and GPTQ's moments).
  ``batch.take(name)`` hands a value over and drops it once its last reader has taken it.
  With ``overlap=True`` the accumulators run on one thread while onnxruntime computes the next
  run (:mod:`fp8core.capture`: statistics fold in behind the runs); each accumulator still sees
  the batches one at a time, in order, in the same pieces, so its results are bit for bit those
  of a plain loop.

Data that does not fit the model fails before any run, with the ingest check's one-line message
(:func:`fp8core.calibration.check_fits`: a missing column, a wrong per-sample shape or dtype);
a run onnxruntime rejects is re-run one sample at a time and the message names the sample
(:class:`StreamError`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import onnx

from fp8core.bodies import expose_values
from fp8core.calibration import CalibrationSource, check_fits, model_input_specs
from fp8core.errors import FP8Error, first_line
from fp8core.graph import graph_inputs, pruned_to
from fp8core.inputs import input_specs, stack_feeds
from fp8core.model import Model


class StreamError(FP8Error):
    """A data batch made onnxruntime fail; the message names the samples and the model."""


def input_feeds(model: Model | onnx.ModelProto, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch in the model's layout and input dtypes (data was validated as castable): samples
    stacked along each input's batch axis (:mod:`fp8core.inputs`)."""
    return stack_feeds(input_specs(model), batch)


def batch_is_dynamic(model: onnx.ModelProto) -> bool:
    """Every input with a batch axis has a dynamic batch dimension (a run may take any count)."""
    specs = [s for s in input_specs(model) if s.batch_axis is not None]
    return bool(specs) and all(s.fixed_batch is None for s in specs)


class Tap:
    """One model in one onnxruntime session, with ``tensors`` readable after each run.

    ``label`` names the model in error messages ("the FP8 model"); ``options`` are the session's
    (:func:`fp8core.runtime.session_options`; each session needs its own)."""

    def __init__(self, model: Model | onnx.ModelProto, tensors: Sequence[str] = (), options=None,
                 label: str = "the model", what: str = "calibration", prune: bool = False):
        handle = Model.of(model)
        self.model, self.label, self.what = handle, label, what
        self.tensors = list(dict.fromkeys(tensors))
        exposed, readable = expose_values(handle.proto, self.tensors)
        self.names = [readable[t] for t in self.tensors]
        if prune:  # only what the tensors need is computed (the model's outputs are not read)
            exposed = pruned_to(exposed, self.names)
        self.session = handle.derive(exposed).session(options, extra_outputs=self.names)

    def run(self, feeds: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        """The tensors' values on ``feeds`` (samples ``start``...); onnxruntime's failure becomes a
        :class:`StreamError` naming the first sample that fails alone."""
        try:
            return dict(zip(self.tensors, self.session.run(self.names, feeds)))
        except Exception as exc:
            raise StreamError(self._failing_sample(feeds, start, first_line(exc))) from None

    def _failing_sample(self, feeds: dict[str, np.ndarray], start: int, why: str) -> str:
        specs = {s.name: s for s in input_specs(self.model.proto)}
        n = _count(feeds, specs)
        for i in range(n):
            one = {k: (v if specs.get(k) is None or specs[k].batch_axis is None
                       else np.take(v, [i], axis=specs[k].batch_axis)) for k, v in feeds.items()}
            try:
                self.session.run(self.names, one)
            except Exception as exc:
                return f"{self.what} sample {start + i} makes onnxruntime fail running {self.label}: {first_line(exc)}"
        # every sample runs alone: the model takes no batch of n (a shape fixed at export time)
        return (f"onnxruntime failed running {self.label} on {self.what} samples {start}..{start + n - 1} "
                f"together, though each runs alone ({why}): the model does not take batches of {n}; "
                "give --batch_size 1")


def _count(feeds: dict[str, np.ndarray], specs: dict) -> int:
    for name, v in feeds.items():
        spec = specs.get(name)
        if spec is not None and spec.batch_axis is not None:
            return int(np.shape(v)[spec.batch_axis])
    return 1


@dataclasses.dataclass
class Batch:
    """One onnxruntime run of the stream: samples ``start .. start + count - 1`` of data batch
    ``index`` (the last run of that batch has ``last``)."""

    index: int
    start: int
    count: int
    last: bool
    feeds: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    paired: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    readers: dict[str, int] = dataclasses.field(default_factory=dict)  # takers left per value

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def take(self, name: str) -> np.ndarray:
        """The value of ``name``; dropped from the batch once its last reader has taken it (its
        buffer can serve the run being computed)."""
        value = self.values[name]
        left = self.readers.get(name, 1) - 1
        if left <= 0:
            del self.values[name]
        else:
            self.readers[name] = left
        return value


class Accumulator(Protocol):
    """Folds the batches of a stream into a result (statistics, moments, comparisons)."""

    tensors: Sequence[str]

    def add_batch(self, batch: Batch) -> None: ...


def stream(
    model: Model | onnx.ModelProto | Tap,
    source: CalibrationSource,
    tensors: Sequence[str] = (),
    batch_size: int = 16,
    *,
    paired: Tap | tuple[Model | onnx.ModelProto, Sequence[str]] | None = None,
    columns: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    run_samples: int | None = None,
    max_samples: int | None = None,
    options=None,
    what: str = "calibration",
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Batch]:
    """The batches of ``source`` run through ``model`` (module docstring). ``progress(done, total)``
    is called after each data batch (skipped shard batches count)."""
    tap = model if isinstance(model, Tap) else Tap(model, tensors, options, what=what)
    proto = tap.model.proto
    if paired is not None and not isinstance(paired, Tap):
        paired = Tap(paired[0], paired[1], what=what, label="the FP8 model")
    names = [vi.name for vi in graph_inputs(proto.graph)]
    check_fits(source, model_input_specs(proto), batch_size)
    step = run_samples if run_samples and batch_is_dynamic(proto) else None
    samples = source.num_samples if max_samples is None else min(max_samples, source.num_samples)
    total = -(-samples // batch_size)
    start = 0
    for index, data in enumerate(source.iter_batches(batch_size, names + [c for c in columns if c not in names])):
        n = len(next(iter(data.values())))
        if max_samples is not None and start + n > max_samples:
            n = max_samples - start
            data = {k: v[:n] for k, v in data.items()}
        if n <= 0:
            return
        if shard is None or index % shard[1] == shard[0]:
            size = step or n
            for lo in range(0, n, size):
                part = {k: v[lo:lo + size] for k, v in data.items()} if size < n else data
                feeds = input_feeds(proto, {k: part[k] for k in names})
                count = len(next(iter(part.values())))
                batch = Batch(index, start + lo, count, lo + size >= n, feeds, tap.run(feeds, start + lo),
                              paired.run(feeds, start + lo) if paired is not None else {},
                              {c: part[c] for c in columns})
                yield batch
                del batch, feeds, part  # the consumer holds the values from here on
        start += n
        if progress:
            progress(index + 1, total)


def accumulate(batches: Iterable[Batch], accumulators: Sequence[Accumulator], overlap: bool = False) -> None:
    """Feed every batch to every accumulator, in order. ``overlap``: on one thread of its own,
    while the next batch is computed (``np.bincount`` and most numpy folds hold the GIL: one
    such thread, not more)."""
    readers: dict[str, int] = {}
    for acc in accumulators:
        for name in dict.fromkeys(acc.tensors):
            readers[name] = readers.get(name, 0) + 1

    def fold(batch: Batch) -> None:
        batch.readers = dict(readers)
        for acc in accumulators:
            acc.add_batch(batch)
        batch.values.clear()
        batch.paired.clear()

    if not overlap:
        for batch in batches:
            fold(batch)
        return
    folding = None  # the fold of the previous run, running while onnxruntime computes this one
    pool = ThreadPoolExecutor(1, "stream-fold")
    iterator = iter(batches)
    try:
        for batch in iterator:
            if folding is not None:
                folding.result()  # an accumulator's batches are folded in order, one at a time
            folding = pool.submit(fold, batch)
            del batch
        if folding is not None:
            folding.result()
    finally:  # on Ctrl-C or an error: no new fold starts, the running one ends with its run
        pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(iterator, "close", None)
        if close:
            close()


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
