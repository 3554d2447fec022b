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
one sample at a time. One onnxruntime run per batch exposes every wanted tensor (the same capture
session as :mod:`fp8core.capture`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np
import onnx

from fp8core.errors import first_line
from fp8core.calibration import CalibrationSource
from fp8core.capture import CaptureError, input_feeds
from fp8core.graph import graph_inputs
from fp8core.model import Model
from fp8core.runtime import make_session, session_options

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

    def groups_of(self, x: np.ndarray, max_rows: int | None = None, dtype=np.float64) -> Iterator[np.ndarray]:
        """The rows of a captured batch ``x`` as ``[R, G, K]`` pieces of ``dtype`` (one per sample for
        Conv; with ``max_rows``, at most that many of a sample's rows, at evenly spaced positions)."""
        x = np.asarray(x)
        if self.kernel is None:
            k = x.shape[self.feature_axis]
            yield np.moveaxis(x, self.feature_axis, -1).reshape(-1, 1, k).astype(dtype)
            return
        for sample in x:
            yield self._patches(sample, max_rows, dtype)

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

    def _patches(self, sample: np.ndarray, max_rows: int | None = None, dtype=np.float64) -> np.ndarray:
        """im2col of one sample ``[C, *spatial]``: ``[positions, G, C / G * prod(kernel)]``."""
        c, spatial = sample.shape[0], tuple(sample.shape[1:])
        d = len(spatial)
        begin, end = self._begin_end_pads(spatial)
        padded = np.pad(sample, [(0, 0)] + list(zip(begin, end)))  # converted to dtype only for the rows kept
        span = [(k - 1) * dil + 1 for k, dil in zip(self.kernel, self.dilations)]
        windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=tuple(range(1, d + 1)))
        # windows: [C, *positions (stride 1), *span]; keep every stride-th position, every dilation-th tap
        windows = windows[(slice(None),) + tuple(slice(None, None, s) for s in self.strides)
                          + tuple(slice(None, None, dil) for dil in self.dilations)]
        positions = windows.shape[1:1 + d]
        order = list(range(1, d + 1)) + [0] + list(range(d + 1, 2 * d + 1))  # positions, C, kernel
        by_position = windows.transpose(order)
        count = math.prod(positions)
        if max_rows is not None and count > max_rows:
            keep = np.linspace(0, count - 1, max_rows).round().astype(np.int64)
            rows = by_position[np.unravel_index(keep, positions)].astype(dtype)
        else:
            rows = np.ascontiguousarray(by_position, dtype=dtype).reshape(count, c, -1)
        return rows.reshape(rows.shape[0], self.group, -1)


@dataclasses.dataclass
class FeatureMoments:
    """Running per-group feature sums (and optionally Gram matrices) of one :class:`Rows` request."""

    rows: Rows
    with_gram: bool
    count: int = 0
    total: np.ndarray | None = None  # [G, K]
    gram: np.ndarray | None = None  # [G, K, K]

    def update(self, value: np.ndarray) -> None:
        for piece in self.rows.groups_of(value):
            if self.total is None:
                _, g, k = piece.shape
                self.total = np.zeros((g, k))
                self.gram = np.zeros((g, k, k)) if self.with_gram else None
            self.count += piece.shape[0]
            self.total += piece.sum(axis=0)
            if self.gram is not None:
                by_group = piece.transpose(1, 0, 2)  # [G, R, K]
                self.gram += by_group.transpose(0, 2, 1) @ by_group

    @property
    def mean(self) -> np.ndarray:
        """``[G, K]``: the mean row of each group."""
        return self.total / max(self.count, 1)


def capture_feature_moments(model: Model | onnx.ModelProto, requests: dict[str, tuple[Rows, bool]],
                            source: CalibrationSource, batch_size: int) -> dict[str, FeatureMoments]:
    """``requests`` maps a key (:attr:`Rows.key`) to (rows, whether to accumulate Gram matrices)."""
    moments = {key: FeatureMoments(rows, gram) for key, (rows, gram) in requests.items()}
    tensors = list(dict.fromkeys(rows.tensor for rows, _ in requests.values()))
    if not tensors:
        return moments
    options = session_options()
    options.enable_cpu_mem_arena = False  # activations of each batch go back to the OS
    session = make_session(model, options, extra_outputs=tensors)
    model = Model.of(model).proto
    input_names = [vi.name for vi in graph_inputs(model.graph)]
    start = 0
    for batch in source.iter_batches(batch_size, input_names):
        n = len(next(iter(batch.values())))
        try:
            outputs = dict(zip(tensors, session.run(tensors, input_feeds(model, batch))))
        except Exception as exc:
            raise CaptureError(f"onnxruntime failed on calibration samples {start}..{start + n - 1}: "
                               f"{first_line(exc)}") from None
        for m in moments.values():
            m.update(outputs[m.rows.tensor])
        del outputs
        start += n
    return moments
