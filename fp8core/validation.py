"""Run models on inputs of real shapes and compare them: the gate every written model passes.

A smoke run on 1x1 images or 1-sample clips crashes models that are fine (a reflect Pad needs
more samples than it pads, a YOLO neck concatenates a Resize output with a map of 1/32 the input
size), so the inputs are real ones: calibration samples where there are some, else generated
inputs of the first size in :data:`fp8core.inputs.PROBE_SIZES` the *input* model runs on. Then

* the prepared float model (names, shapes, opset upgrade) must give the input model's outputs
  within float rounding (:func:`check_same_outputs`): an opset conversion that changed what the
  model computes is caught here, before any FP8 work, and reported as such;
* the FP8 model must run on the same inputs with the same output shapes and no NaN/Inf where the
  float model has none (:func:`compare_outputs`); how close it comes (cosine, SNR, top-1
  agreement for classifier-shaped outputs) is returned as the run's quality metrics.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from fp8core.errors import first_line
from fp8core.graph import ModelError
from fp8core.inputs import PROBE_SIZES, InputLayoutError, input_specs, probe_feeds, stack_feeds
from fp8core.model import Model
from fp8core.runtime import reference_session

FLOAT_RTOL = 1e-3
"""Largest error of the prepared float model, relative to each output's absmax, still counted as
float rounding (a different summation order in an upgraded op gives ~1e-6)."""

VALIDATION_SAMPLES = 4  # calibration samples the written model is validated on


@dataclasses.dataclass
class Reference:
    """Inputs a float model runs on and its outputs there."""

    feeds: dict[str, np.ndarray]
    names: list[str]
    outputs: list[np.ndarray]
    source: str  # "calibration samples 0..3" or "generated inputs, dynamic dims 224"


def run_float(model, feeds) -> tuple[list[str], list[np.ndarray]]:
    session = reference_session(model)
    names = [o.name for o in session.get_outputs()]
    return names, session.run(names, feeds)


def probe_reference(model: Model | onnx.ModelProto) -> Reference | None:
    """Generated inputs of the first probe size the model runs on, and its outputs; None when it
    runs on none of them (then only calibration data can validate it)."""
    specs = input_specs(Model.of(model).proto)
    try:
        session = reference_session(model)
    except Exception as exc:
        raise ModelError(f"the input model does not load in onnxruntime: {first_line(exc)}") from None
    names = [o.name for o in session.get_outputs()]
    for size in PROBE_SIZES:
        feeds = probe_feeds(specs, size)
        try:
            outputs = session.run(names, feeds)
        except Exception:
            continue
        return Reference(feeds, names, outputs, f"generated inputs (dynamic dims {size})")
    return None


def calibration_reference(model: Model | onnx.ModelProto, source, batch_size: int) -> Reference:
    """The first calibration samples (a whole fixed batch, or up to :data:`VALIDATION_SAMPLES`)."""
    specs = input_specs(Model.of(model).proto)
    take = min(batch_size, VALIDATION_SAMPLES) if all(s.fixed_batch is None for s in specs) else batch_size
    batch = next(iter(source.iter_batches(take, [s.name for s in specs])))
    try:
        feeds = stack_feeds(specs, batch)
    except InputLayoutError:  # no-batch input differing between samples: validate on one sample
        feeds = stack_feeds(specs, {k: v[:1] for k, v in batch.items()})
    n = len(next(iter(batch.values())))
    names, outputs = run_float(model, feeds)
    return Reference(feeds, names, outputs, f"calibration samples 0..{n - 1}")


def as_array(value) -> np.ndarray:
    """An output as an array; a sequence of maps (scikit-learn's ZipMap: one ``{label: probability}``
    per sample) as ``[samples, labels]`` in label order, so it is compared like the tensor it wraps."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        if all(sorted(v) == keys for v in value):
            return np.array([[v[k] for k in keys] for v in value], dtype=np.float64)
    return np.asarray(value)


def check_same_outputs(reference: Reference, model, what: str) -> None:
    """``model`` must compute ``reference``'s outputs within float rounding, else ModelError."""
    try:
        names, outputs = run_float(model, reference.feeds)
    except Exception as exc:
        raise ModelError(f"{what}: the model no longer runs on {reference.source}: {first_line(exc)}") from None
    for name, want, got in zip(reference.names, reference.outputs, outputs):
        want, got = as_array(want), as_array(got)
        if want.shape != got.shape:
            raise ModelError(f"{what}: output {name!r} changed shape {want.shape} -> {got.shape}")
        want64 = want.astype(np.float64) if want.dtype.kind in "fiub" else None
        if want64 is None:
            continue
        got64 = np.asarray(got, np.float64)
        scale = float(np.max(np.abs(want64[np.isfinite(want64)]), initial=0.0))
        err = float(np.max(np.abs(np.where(np.isfinite(want64), want64 - got64, 0.0)), initial=0.0))
        if err > FLOAT_RTOL * max(scale, 1e-30) or (np.isfinite(want64) & ~np.isfinite(got64)).any():
            raise ModelError(f"{what}: output {name!r} differs from the input model's by {err:.3g} "
                             f"(outputs up to {scale:.3g}) on {reference.source}")


def compare_outputs(reference: Reference, outputs: list[np.ndarray]) -> dict[str, float]:
    """FP8 outputs against the float reference: shapes and finiteness must hold (else ModelError);
    returns the agreement metrics over all float outputs (cosine, SNR dB, top-1 agreement of
    classifier-shaped outputs), and over integer and string outputs (a classifier's labels, as
    scikit-learn exports them) the share of equal values."""
    cosines, snrs, agree, labels = [], [], [], []
    for name, want, got in zip(reference.names, reference.outputs, outputs):
        want, got = as_array(want), as_array(got)
        if want.shape != got.shape:
            raise ModelError(f"the FP8 model's output {name!r} has shape {got.shape}, the float model's "
                             f"{want.shape} (on {reference.source})")
        if want.dtype.kind in "iubUSO" and want.size:  # labels: integers or class names
            labels.append(float((want == got).mean()))
        if want.dtype.kind != "f":
            continue
        w, g = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        finite = np.isfinite(w)
        if (finite & ~np.isfinite(g)).any():
            raise ModelError(f"the FP8 model's output {name!r} has NaN/Inf where the float model has "
                             f"finite values (on {reference.source})")
        w, g = w[finite], g[finite]
        if not w.size:
            continue
        dot, nw, ng = float(w @ g), float(w @ w), float(g @ g)
        cosines.append(dot / math.sqrt(nw * ng) if nw > 0 and ng > 0 else float(nw == ng))
        noise = float(((w - g) ** 2).sum())
        snrs.append(10 * math.log10(nw / noise) if noise > 0 and nw > 0 else 120.0)
        if want.ndim == 2 and want.shape[-1] > 1:  # classifier-shaped: [batch, classes]
            agree.append(float((want.reshape(-1, want.shape[-1]).argmax(-1) ==
                                got.reshape(-1, got.shape[-1]).argmax(-1)).mean()))
    metrics = {}
    if cosines:
        metrics["output_cosine"] = min(cosines)
        metrics["output_snr_db"] = min(snrs)
    if agree:
        metrics["output_top1_agreement"] = min(agree)
    if labels:
        metrics["output_label_agreement"] = min(labels)
    return metrics
