"""Checking calibration data against the model's inputs (names, shapes, dtypes, NaN/Inf)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx

from fp8core.calibration.source import CalibrationDataError, CalibrationSource, _check_batch_size, _quoted


# --------------------------------------------------------------------------------------------
# Checking the data against the model
# --------------------------------------------------------------------------------------------
Dim = int | str | None
ModelInputSpec = tuple[np.dtype, tuple[Dim, ...] | None, int | None]


def model_input_specs(model: onnx.ModelProto) -> dict[str, ModelInputSpec]:
    """``{name: (numpy dtype, shape, batch axis)}`` of the graph inputs that are not initializers.

    A dimension is an int when fixed, None when symbolic (``dim_param``), unknown, or stored as -1
    or 0; the shape is None when the rank is unknown. The batch axis is where samples are stacked
    (:func:`fp8core.inputs.batch_axes`), None for an input that has none (fed as stored).
    """
    from fp8core.inputs import input_specs

    for graph_input in model.graph.input:
        if graph_input.type.WhichOneof("value") != "tensor_type":
            raise CalibrationDataError(
                f"model input {graph_input.name!r} is not a tensor; calibration supports tensor "
                "inputs only"
            )
    return {spec.name: (spec.dtype, None if spec.dims is None else
                        tuple(d if isinstance(d, int) else None for d in spec.dims), spec.batch_axis)
            for spec in input_specs(model)}


@dataclasses.dataclass(frozen=True)
class InputSummary:
    sample_shape: tuple[int, ...]
    data_dtype: np.dtype
    model_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class ValidationSummary:
    num_samples: int
    inputs: dict[str, InputSummary]


def validate_against_model(
    source: CalibrationSource,
    model_inputs: Mapping[str, tuple],
    batch_size: int,
) -> ValidationSummary:
    """Check that the data set can feed the model, before any long work starts.

    Rules, in order: the data set has samples; every model input has a column; the column holds
    numeric tensors; the per-sample shape has the model's rank minus the batch axis (the whole
    shape for an input with no batch axis: ``(dtype, shape, None)``; a 2-tuple means axis 0) and
    equals every fixed model dimension; a fixed model batch dimension equals ``batch_size`` and divides
    the sample count; the dtype casts to the model's under numpy ``same_kind`` casting (float64 ->
    float32 yes, float -> int64 no). Then one streamed pass: no NaN or Inf, and no value beyond the
    model dtype's range (it would become Inf or wrap). The first failure raises
    :class:`CalibrationDataError`.
    """
    _check_batch_size(batch_size)
    if source.num_samples == 0:
        raise CalibrationDataError(
            f"calibration data {source.path} holds no samples; add samples (PopRT used 20-50)"
        )
    summaries = check_fits(source, model_inputs, batch_size)
    _scan_values(source, summaries, batch_size)
    return ValidationSummary(source.num_samples, summaries)


def check_fits(
    source: CalibrationSource,
    model_inputs: Mapping[str, tuple],
    batch_size: int,
) -> dict[str, InputSummary]:
    """The rules of :func:`validate_against_model` that read no values (columns, per-sample
    shapes, batch size, dtypes): what every pass over data checks before its first run
    (:func:`fp8core.stream.stream`), so data that does not fit a model fails with one message."""
    _check_batch_size(batch_size)
    missing = [name for name in model_inputs if name not in source.columns]
    if missing:
        raise CalibrationDataError(
            f"calibration data {source.path} lacks model input(s) {_quoted(missing)}; its columns "
            f"are {_quoted(source.columns)}; name one column after each model input"
        )
    summaries = {}
    for name, spec in model_inputs.items():
        model_dtype, model_shape = np.dtype(spec[0]), spec[1]
        batch_axis = spec[2] if len(spec) > 2 else 0
        sample_shape, data_dtype = source.sample_shape(name), source.dtype(name)
        _check_shape(name, sample_shape, model_shape, batch_axis, batch_size, source.num_samples)
        if model_dtype.kind == "O" and data_dtype.kind != "U":  # an ONNX string input: text only
            raise CalibrationDataError(
                f"calibration input {name!r} is {data_dtype} but the model takes strings; store it "
                "as a numpy unicode (str) array"
            )
        if not np.can_cast(data_dtype, model_dtype, casting="same_kind"):
            raise CalibrationDataError(
                f"calibration input {name!r} is {data_dtype} but the model takes {model_dtype}, "
                f"and {data_dtype} does not convert to it safely; store it as {model_dtype}"
            )
        summaries[name] = InputSummary(sample_shape, data_dtype, model_dtype)
    return summaries


def _check_shape(
    name: str,
    sample_shape: tuple[int, ...],
    model_shape: tuple[Dim, ...] | None,
    batch_axis: int | None,
    batch_size: int,
    num_samples: int,
) -> None:
    if model_shape is None:
        return  # rank unknown: anything goes
    if batch_axis is None:
        expected = tuple(model_shape)
        where = "(the whole input: it has no batch axis)"
    else:
        expected = tuple(model_shape[:batch_axis]) + tuple(model_shape[batch_axis + 1:])
        where = "(batch axis excluded, ? = any)" if batch_axis == 0 else f"(batch axis {batch_axis} excluded, ? = any)"
    fits = len(expected) == len(sample_shape) and all(
        not isinstance(want, int) or want == have for want, have in zip(expected, sample_shape)
    )
    if not fits:
        shown = "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in expected) + ")"
        raise CalibrationDataError(
            f"calibration input {name!r} samples have shape {sample_shape} but the model takes "
            f"{shown} per sample {where}; store samples of the model's shape"
            + ("" if batch_axis is None else ", or give the input's batch axis with --input_batch_axis")
        )
    batch_dim = None if batch_axis is None else model_shape[batch_axis]
    if isinstance(batch_dim, int):
        if batch_size != batch_dim:
            raise CalibrationDataError(
                f"model input {name!r} has a fixed batch size of {batch_dim} but batch size "
                f"{batch_size} was asked; use batch size {batch_dim}"
            )
        if num_samples % batch_dim:
            raise CalibrationDataError(
                f"calibration data has {num_samples} samples, not a multiple of model input "
                f"{name!r}'s fixed batch size {batch_dim}; add or drop samples, or export the "
                "model with a dynamic batch dimension"
            )


def _scan_values(
    source: CalibrationSource, summaries: Mapping[str, InputSummary], batch_size: int
) -> None:
    first_sample = 0
    for batch in source.iter_batches(batch_size, names=list(summaries)):
        for name, values in batch.items():
            problem = _first_bad_sample(values, summaries[name].model_dtype)
            if problem is not None:
                index, what = problem
                raise CalibrationDataError(
                    f"calibration input {name!r} sample {first_sample + index} {what}; fix or "
                    "drop that sample"
                )
        first_sample += len(next(iter(batch.values()))) if batch else 0


def _first_bad_sample(values: np.ndarray, model_dtype: np.dtype) -> tuple[int, str] | None:
    """(sample index within the batch, problem) of the first sample that is not finite in the
    model's dtype, or None. Samples are the first axis."""
    rows = values.reshape(len(values), -1)
    nan = inf = np.zeros(len(rows), bool)
    if values.dtype.kind == "f":
        nan, inf = np.isnan(rows).any(axis=1), np.isinf(rows).any(axis=1)
    if model_dtype.kind == "f":
        finite_rows = np.where(np.isfinite(rows), rows, 0) if values.dtype.kind == "f" else rows
        too_big = (np.abs(finite_rows) > np.finfo(model_dtype).max).any(axis=1)
    elif model_dtype.kind in "iu" and values.dtype.kind in "iu":
        limits = np.iinfo(model_dtype)
        too_big = ((rows < limits.min) | (rows > limits.max)).any(axis=1)
    else:
        return None
    bad = np.flatnonzero(nan | inf | too_big)
    if not bad.size:
        return None
    index = int(bad[0])
    found = [word for word, flags in (("NaN", nan), ("Inf", inf)) if flags[index]]
    if found:
        return index, "contains " + " and ".join(found)
    return index, f"has values beyond the {model_dtype} range"
