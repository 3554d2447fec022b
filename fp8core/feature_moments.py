"""Per-input-feature moments of op inputs, streamed over calibration batches.

For an op input ``x`` whose feature axis has K entries, every other axis indexes samples
(rows): ``rows = moveaxis(x, feature_axis, -1).reshape(-1, K)``. The accumulators are, in float64,

* ``total[k] = sum_rows x[k]``  (so ``mean = total / count``; bias correction), and, when asked,
* ``gram[j, k] = sum_rows x[j] x[k]``  (``H = X^T X``; GPTQ).

Memory is K (+ K^2) float64 per tensor, whatever the number of samples; one onnxruntime run per
batch exposes every wanted tensor (the same capture model as :mod:`fp8core.capture`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from fp8core.calibration import CalibrationSource
from fp8core.capture import CaptureError, capture_model, input_feeds
from fp8core.graph import graph_inputs
from fp8core.runtime import make_session, session_options


@dataclasses.dataclass
class FeatureMoments:
    """Running per-feature sum (and optionally the Gram matrix) of one tensor."""

    feature_axis: int
    with_gram: bool
    count: int = 0
    total: np.ndarray | None = None
    gram: np.ndarray | None = None

    def update(self, value: np.ndarray) -> None:
        x = np.asarray(value)
        rows = np.moveaxis(x, self.feature_axis, -1).reshape(-1, x.shape[self.feature_axis]).astype(np.float64)
        if self.total is None:
            k = rows.shape[1]
            self.total = np.zeros(k)
            self.gram = np.zeros((k, k)) if self.with_gram else None
        self.count += rows.shape[0]
        self.total += rows.sum(axis=0)
        if self.gram is not None:
            self.gram += rows.T @ rows

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def capture_feature_moments(model: onnx.ModelProto, requests: dict[str, tuple[int, bool]],
                            source: CalibrationSource, batch_size: int) -> dict[str, FeatureMoments]:
    """``requests`` maps a tensor to (feature axis, whether to accumulate the Gram matrix)."""
    tensors = list(requests)
    moments = {t: FeatureMoments(axis, gram) for t, (axis, gram) in requests.items()}
    if not tensors:
        return moments
    options = session_options()
    options.enable_cpu_mem_arena = False  # activations of each batch go back to the OS
    session = make_session(capture_model(model, tensors).SerializeToString(), options)
    input_names = [vi.name for vi in graph_inputs(model.graph)]
    start = 0
    for batch in source.iter_batches(batch_size, input_names):
        n = len(next(iter(batch.values())))
        try:
            outputs = session.run(tensors, input_feeds(model, batch))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"onnxruntime failed on calibration samples {start}..{start + n - 1}: {msg}") from None
        for name, value in zip(tensors, outputs):
            moments[name].update(value)
        del outputs
        start += n
    return moments
