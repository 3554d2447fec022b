"""Per-input-feature moments of op inputs, streamed over calibration batches.

A linear op sees its input as *rows* of K features in G groups, and computes each output from one
row of one group: ``y[r, g, n] = sum_k rows[r, g, k] W[g, k, n]``.

* MatMul / Gemm (G = 1): every axis but the feature axis indexes rows,
  ``rows = moveaxis(x, feature_axis, -1).reshape(-1, 1, K)``.
* Conv (G = ``group``): one row per output position and sample, the zero-padded input patch the
  kernel sees there (im2col), ``K = C_in / G * prod(kernel)``, ordered like the weight
  ``[C_out, C_in / G, *kernel]`` viewed as ``[G, C_out / G, K]``. Strides, dilations, pads and
  ``auto_pad`` follow the ONNX Conv definition; border patches include their padding zeros, so
  the moments describe exactly what the kernel multiplies.

The accumulators are, in float64, per group:

* ``total[g, k] = sum_rows x[g, k]``  (``mean = total / count``; bias correction), and, when asked,
* ``gram[g, j, k] = sum_rows x[g, j] x[g, k]``  (``H = X^T X``; GPTQ).

Memory is G K (+ G K^2) float64 per request, whatever the number of samples; patches are built
one sample at a time. :class:`MomentAccumulator` takes them from a stream (:mod:`fp8core.stream`):
the capture's own pass (``--weight_rounding gptq`` with ``--quantize``) or a pass of its own
(:func:`capture_feature_moments`, one onnxruntime run per data batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.model import Model
from fp8core.padding import kept_rows
from fp8core.runtime import session_options
from fp8core.stream import accumulate, stream

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


@dataclasses.dataclass(frozen=True)
class Rows:
    """How one op reads ``tensor`` as rows of features (module docstring).

    ``kernel`` is None for MatMul/Gemm (features on ``feature_axis``); for Conv it is the spatial
    kernel shape, with ``strides``, ``dilations``, ``pads`` (ONNX order: all begins, then all
    ends), ``auto_pad`` and ``group``.
    """

    tensor: str
    feature_axis: int = -1
    kernel: tuple[int, ...] | None = None
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    group: int = 1

    @property
    def key(self) -> str:
        """Requests with the same key share one accumulator (e.g. q, k and v reading one x)."""
        if self.kernel is None:
            return self.tensor if self.feature_axis == -1 else f"{self.tensor}|axis={self.feature_axis}"
        return (f"{self.tensor}|patches k={self.kernel} s={self.strides} d={self.dilations} "
                f"p={self.pads} {self.auto_pad} g={self.group}")

    def columns(self, x: np.ndarray, max_rows: int | None = None, dtype=np.float64,
                paired: np.ndarray | None = None, mask: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """The rows of a captured batch ``x`` as columns: ``[1, G, K, R]`` pieces of ``dtype``, each
        group's ``X^T`` (one piece per sample for Conv; with ``max_rows``, at most that many of a
        sample's rows, at evenly spaced positions). With ``paired`` (a tensor of ``x``'s shape)
        ``[2, G, K, R]``: ``x``'s then ``paired``'s, at the same positions, gathered together.
        ``mask``: the batch's padding mask (:mod:`fp8core.padding`); MatMul/Gemm rows that are its
        tokens are kept where it is non-zero.

        Transposed because that is how im2col gathers without a copy: a Conv's ``[G, R, K]`` rows
        (K = C / G taps) cost more to transpose than to multiply; every consumer multiplies
        ``X^T X`` or sums over R, which BLAS and numpy do as fast on this layout."""
        tensors = [np.asarray(x)] + ([] if paired is None else [np.asarray(paired)])
        if self.kernel is None:
            rows = [np.moveaxis(t, self.feature_axis, -1).reshape(-1, t.shape[self.feature_axis]) for t in tensors]
            keep = kept_rows(mask, np.delete(np.array(tensors[0].shape), self.feature_axis))
            if keep is not None:
                rows = [r[keep] for r in rows]
            yield np.stack(rows).astype(dtype, copy=False).transpose(0, 2, 1)[:, None]
            return
        for samples in zip(*tensors):
            yield self._patches(np.stack(samples), max_rows, dtype)

    def _begin_end_pads(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        d = len(spatial)
        if self.auto_pad in ("NOTSET", "") and self.pads:
            return list(self.pads[:d]), list(self.pads[d:])
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, dil in zip(spatial, self.kernel, self.strides, self.dilations):
                total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * dil + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else large)
                end.append(large if self.auto_pad == "SAME_UPPER" else small)
            return begin, end
        return [0] * d, [0] * d

    def _patches(self, samples: np.ndarray, max_rows: int | None = None, dtype=np.float64) -> np.ndarray:
        """im2col of ``n`` tensors of one sample ``[n, C, *spatial]`` as columns ``[n, G, C / G *
        prod(kernel), positions]``, by one gather of flat offsets (kernel tap + output position)
        into the padded tensors."""
        n, c, spatial = samples.shape[0], samples.shape[1], tuple(samples.shape[2:])
        d = len(spatial)
        begin, end = self._begin_end_pads(spatial)
        if all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides) and not any(begin + end):
            # a pointwise Conv's patches are its input's positions: no padded copy, no gather unless
            # rows are dropped (36 of ResNet50's 53 Convs). np.take, not flat[:, :, kept]: that
            # gives the values in another memory layout, which BLAS sums in another order (last
            # bits, then other FP8 roundings: PP-OCRv4 rec's string agreement 0.692 -> 0.650)
            flat = samples.reshape(n, c, -1)
            if max_rows is not None and flat.shape[2] > max_rows:
                flat = np.take(flat, np.linspace(0, flat.shape[2] - 1, max_rows).round().astype(np.int64), axis=2)
            return flat.reshape(n, self.group, -1, flat.shape[2]).astype(dtype, copy=False)
        padded = np.pad(samples, [(0, 0), (0, 0)] + list(zip(begin, end)))
        size = padded.shape[2:]
        span = [(k - 1) * dil + 1 for k, dil in zip(self.kernel, self.dilations)]
        positions = tuple((m - sp) // s + 1 for m, sp, s in zip(size, span, self.strides))
        flat_stride = [math.prod(size[i + 1:]) for i in range(d)]
        count = math.prod(positions)
        kept = np.arange(count)
        if max_rows is not None and count > max_rows:
            kept = np.linspace(0, count - 1, max_rows).round().astype(np.int64)
        corner = sum(o * s * fs for o, s, fs in zip(np.unravel_index(kept, positions), self.strides, flat_stride))
        taps = np.indices(self.kernel).reshape(d, -1)
        tap = sum(t * dil * fs for t, dil, fs in zip(taps, self.dilations, flat_stride))
        columns = np.take(padded.reshape(n, c, -1), tap[:, None] + corner[None, :], axis=2)  # [n, C, taps, R]
        return columns.reshape(n, self.group, -1, len(kept)).astype(dtype, copy=False)


@dataclasses.dataclass
class FeatureMoments:
    """Running per-group feature sums (and optionally Gram matrices) of one :class:`Rows` request."""

    rows: Rows
    with_gram: bool
    count: int = 0
    total: np.ndarray | None = None  # [G, K]
    gram: np.ndarray | None = None  # [G, K, K]

    def update(self, value: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add a captured batch; ``mask``: its padding mask (:mod:`fp8core.padding`)."""
        for [xt] in self.rows.columns(value, mask=mask):  # [G, K, R]
            if self.total is None:
                g, k, _ = xt.shape
                self.total = np.zeros((g, k))
                self.gram = np.zeros((g, k, k)) if self.with_gram else None
            self.count += xt.shape[2]
            self.total += xt.sum(axis=2)
            if self.gram is not None:
                self.gram += xt @ xt.transpose(0, 2, 1)

    @property
    def mean(self) -> np.ndarray:
        """``[G, K]``: the mean row of each group."""
        return self.total / max(self.count, 1)


class MomentAccumulator:
    """:class:`FeatureMoments` of several requests from one stream (:mod:`fp8core.stream`).

    ``requests`` maps a key (:attr:`Rows.key`) to (rows, whether to accumulate Gram matrices).
    The moments are the same, bit for bit, as those of whole data batches in one run each: a
    Conv request adds one sample at a time anyway, and the runs of a MatMul/Gemm request's data
    batch are put back together (along axis 0, the sample axis) before they are added, so
    every sum runs in the same order. When a run's tensor does not have its samples on axis 0
    (its axis 0 is not the run's sample count; e.g. a sequence-first layout), that order cannot
    be rebuilt: the accumulator stops and ``exact`` turns False (the caller then makes a pass of
    its own, :func:`capture_feature_moments`).
    """

    def __init__(self, requests: dict[str, tuple[Rows, bool]], padding_mask: str | None = None):
        self.moments = {key: FeatureMoments(rows, gram) for key, (rows, gram) in requests.items()}
        self.padding_mask = padding_mask  # the input whose zeros mark rows left out (fp8core.padding)
        self.tensors = list(dict.fromkeys(rows.tensor for rows, _ in requests.values()))
        self.exact = True
        self.runs = 0
        self._pending: dict[str, list[np.ndarray]] = {}  # MatMul/Gemm tensors: this data batch's runs so far
        self._pending_masks: list[np.ndarray] = []  # and those runs' padding masks

    @property
    def complete(self) -> bool:
        """The moments are those of a whole pass: runs were fed, all in the exact order."""
        return self.exact and self.runs > 0 and not self._pending

    def add_batch(self, batch) -> None:
        if not self.exact:
            return
        self.runs += 1
        whole = batch.last and not self._pending  # the data batch in one run
        values = {name: batch[name] for name in self.tensors}
        mask = batch.feeds.get(self.padding_mask) if self.padding_mask else None
        for m in self.moments.values():
            if m.rows.kernel is not None:
                m.update(values[m.rows.tensor])
        rows_tensors = {m.rows.tensor for m in self.moments.values() if m.rows.kernel is None}
        for name in rows_tensors:
            x = values[name]
            if not whole and (x.ndim == 0 or x.shape[0] != batch.count):
                self.exact = False
                self._pending.clear()
                self._pending_masks.clear()
                return
            self._pending.setdefault(name, []).append(x)
        if mask is not None and rows_tensors:
            self._pending_masks.append(mask)
        if batch.last:
            joined = {name: _joined(parts) for name, parts in self._pending.items()}
            masks = _joined(self._pending_masks) if self._pending_masks else None
            self._pending.clear()
            self._pending_masks.clear()
            for m in self.moments.values():
                if m.rows.kernel is None:
                    m.update(joined[m.rows.tensor], masks)
        for name in self.tensors:
            batch.take(name)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """A data batch's runs put back together along the sample axis."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def moment_options():
    """Options of a moments pass of its own: the activations of each batch go back to the OS."""
    return session_options(arena=False)


def capture_feature_moments(model: Model | onnx.ModelProto, requests: dict[str, tuple[Rows, bool]],
                            source: CalibrationSource, batch_size: int,
                            padding_mask: str | None = None) -> dict[str, FeatureMoments]:
    """``requests`` maps a key (:attr:`Rows.key`) to (rows, whether to accumulate Gram matrices);
    one pass over ``source``, each data batch in one run; rows of padding tokens left out."""
    acc = MomentAccumulator(requests, padding_mask)
    if not acc.tensors:
        return acc.moments
    accumulate(stream(model, source, acc.tensors, batch_size, options=moment_options()), [acc])
    return acc.moments


def gptq_requests(model: Model | onnx.ModelProto, plans) -> dict[str, tuple[Rows, bool]]:
    """The moment requests of ``--weight_rounding gptq`` for every FP8 linear op of ``plans``,
    whether or not its weight's format and scale are chosen yet (capture runs before the search;
    the ops GPTQ rounds later are among these)."""
    from fp8core.plan import QuantParams
    from fp8core.weight_adjust import linear_ops, moment_requests

    placeholder = QuantParams("F143", 0)
    chosen = []
    for plan in plans:
        if plan.fp8 and any(q.role == "weight" and q.params is None for q in plan.inputs):
            plan = dataclasses.replace(plan, inputs=[dataclasses.replace(q, params=placeholder)
                                                     if q.role == "weight" and q.params is None else q
                                                     for q in plan.inputs])
        chosen.append(plan)
    return moment_requests(linear_ops(Model.of(model).proto, chosen), True, False)
