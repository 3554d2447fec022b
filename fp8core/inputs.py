"""Model inputs as real exported models declare them: dynamic dims, the batch axis, feeds.

Real exports are not all ``[N, ...]``. What this module reads from a model:

* a dim stored as ``dim_value`` -1 or 0 (Paddle, some tf2onnx exports) is *dynamic*, like a
  ``dim_param`` or an unset dim; :func:`normalize_dynamic_dims` rewrites them so that nothing
  downstream mistakes them for fixed sizes;
* the *batch axis* of each input, where the samples of a batch are stacked. It is axis 0 for
  most inputs, but a recurrent state is ``[layers, batch, hidden]`` (axis 1) and a sample rate is
  a scalar with no batch axis at all. :func:`batch_axes` finds it (see its rules) unless the user
  said (``--input_batch_axis state=1,sr=none``), which is recorded in the model's
  ``metadata_props`` under :data:`BATCH_AXES_KEY` so that every loop over the data (capture,
  comparison, evaluation, validation) reads the same layout from the model it runs;
* feeds: calibration samples are stored one per row with the batch axis removed (an input with
  no batch axis: its whole value per sample); :func:`stack_feeds` puts them back in the model's
  layout, and :func:`probe_feeds` makes inputs of shapes the model can take when there is no data.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping

import numpy as np
import onnx

from fp8core.errors import FP8Error
from fp8core.graph import graph_inputs
from fp8core.model import Model

BATCH_AXES_KEY = "fp8_pipeline.input_batch_axes"
BATCH_NAMES = ("batch", "batch_size", "n", "b", "bs", "n_batch", "batchsize", "unk__0")


class InputLayoutError(FP8Error):
    """An input layout flag does not fit the model; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: dtype, dims (int fixed, str named dynamic, None unnamed dynamic), batch axis."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown
    batch_axis: int | None

    @property
    def fixed_batch(self) -> int | None:
        if self.dims is None or self.batch_axis is None:
            return None
        d = self.dims[self.batch_axis]
        return d if isinstance(d, int) else None

    def sample_dims(self) -> tuple[int | str | None, ...] | None:
        """Dims of one stored sample: the batch axis removed (all dims when there is none)."""
        if self.dims is None:
            return None
        if self.batch_axis is None:
            return self.dims
        return self.dims[:self.batch_axis] + self.dims[self.batch_axis + 1:]


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def normalize_dynamic_dims(graph: onnx.GraphProto) -> list[str]:
    """Clear input dims stored as ``dim_value`` <= 0 (they mean "any"); returns the inputs changed."""
    changed = []
    for vi in graph_inputs(graph):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                if vi.name not in changed:
                    changed.append(vi.name)
    return changed


def recorded_batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    for prop in model.metadata_props:
        if prop.key == BATCH_AXES_KEY:
            return {k: (None if v is None else int(v)) for k, v in json.loads(prop.value).items()}
    return {}


def record_batch_axes(model: onnx.ModelProto, axes: Mapping[str, int | None]) -> None:
    """Store the user's batch axes in the model (validated against its inputs)."""
    if not axes:
        return
    specs = {vi.name: _dims(vi) for vi in graph_inputs(model.graph)}
    for name, axis in axes.items():
        if name not in specs:
            raise InputLayoutError(f"--input_batch_axis names {name!r}, which is not a model input; "
                                   f"inputs: {', '.join(specs)}")
        dims = specs[name]
        if axis is not None and dims is not None and not 0 <= axis < len(dims):
            raise InputLayoutError(f"--input_batch_axis {name}={axis}: input {name!r} has rank {len(dims)}; "
                                   f"use an axis in 0..{len(dims) - 1} or none")
    merged = {**recorded_batch_axes(model), **axes}
    keep = [p for p in model.metadata_props if p.key != BATCH_AXES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=BATCH_AXES_KEY, value=json.dumps(merged, sort_keys=True))


def parse_batch_axes(text: str) -> dict[str, int | None]:
    """``state=1,sr=none`` -> ``{"state": 1, "sr": None}``."""
    out: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        value = value.strip().lower()
        if not sep or not name.strip() or not (value == "none" or value.isdigit()):
            raise InputLayoutError(f"--input_batch_axis {text!r}: expected NAME=AXIS or NAME=none, "
                                   "comma-separated, e.g. state=1,sr=none")
        out[name.strip()] = None if value == "none" else int(value)
    return out


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The batch axis of every real input: recorded by the user, else found by these rules.

    1. A scalar has none.
    2. A named dim shared with other inputs at axis 0 (or named like ``batch``) is the batch:
       ``input[batch, time]`` and ``state[2, batch, 128]`` give 0 and 1.
    3. Otherwise axis 0 when it is dynamic or 1 (a fixed-batch-1 export, ``[1, 1, 64, width]``);
       else the only dynamic dim (``state[2, ?, 128]``).
    4. An input with every dim fixed takes the first axis whose size is the batch size of the
       other inputs (1 for a fixed-batch-1 export), and has none when no axis has that size.
    """
    recorded = recorded_batch_axes(model)
    inputs = [(vi.name, _dims(vi)) for vi in graph_inputs(model.graph)]
    batch_names = _batch_dim_names(inputs)
    axes: dict[str, int | None] = {}
    for name, dims in inputs:
        if name in recorded:
            axes[name] = recorded[name]
        elif dims is None:
            axes[name] = 0
        elif not dims:
            axes[name] = None
        else:
            named = [i for i, d in enumerate(dims) if isinstance(d, str) and d in batch_names]
            dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
            if named:
                axes[name] = named[0]
            elif dims[0] == 1 or (dynamic and dynamic[0] == 0):
                axes[name] = 0
            elif len(dynamic) == 1:
                axes[name] = dynamic[0]
            elif dynamic:
                axes[name] = 0
    common = _common_fixed_batch(inputs, axes)
    for name, dims in inputs:
        if name not in axes and dims:
            sizes = [i for i, d in enumerate(dims) if d == common]
            axes[name] = sizes[0] if sizes else None
    return axes


def _batch_dim_names(inputs) -> set[str]:
    first = [dims[0] for _, dims in inputs if dims and isinstance(dims[0], str)]
    names = {d for d in first if first.count(d) > 1 or d.lower() in BATCH_NAMES}
    everywhere = [d for _, dims in inputs if dims for d in dims if isinstance(d, str)]
    names |= {d for d in everywhere if d.lower() in BATCH_NAMES}
    return names


def _common_fixed_batch(inputs, axes) -> int:
    """The batch size of the inputs whose batch axis is known and fixed (1 when none is)."""
    for name, dims in inputs:
        axis = axes.get(name)
        if dims and axis is not None and isinstance(dims[axis], int):
            return dims[axis]
    fixed_first = [dims[0] for _, dims in inputs if dims and isinstance(dims[0], int)]
    return 1 if 1 in fixed_first or not fixed_first else fixed_first[0]


def input_specs(model: Model | onnx.ModelProto) -> list[InputSpec]:
    model = Model.of(model).proto
    axes = batch_axes(model)
    return [InputSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)),
                      _dims(vi), axes[vi.name]) for vi in graph_inputs(model.graph)]


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The batch size the model was exported with, when its batch axes are fixed (else None)."""
    sizes = {s.fixed_batch for s in input_specs(model) if s.batch_axis is not None}
    sizes.discard(None)
    return min(sizes) if sizes else None


def stack_feeds(specs: Iterable[InputSpec], samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Model feeds from ``{name: array[n, *sample]}``: each input cast to its dtype, the sample
    axis moved to its batch axis; an input with no batch axis is fed as stored (every sample of
    the slice must hold the same value, else the slice cannot be one run)."""
    feeds = {}
    for spec in specs:
        values = np.asarray(samples[spec.name])
        if spec.batch_axis is None:
            first = values[0]
            if len(values) > 1 and not (values == first).all():
                raise InputLayoutError(
                    f"input {spec.name!r} has no batch axis but its value differs between the samples "
                    "of one batch; use --batch_size 1, or give its batch axis with --input_batch_axis")
            values = first
        elif spec.batch_axis:
            values = np.moveaxis(values, 0, spec.batch_axis)
        feeds[spec.name] = np.ascontiguousarray(values, dtype=spec.dtype)
    return feeds


PROBE_SIZES = (1, 16, 64, 224, 512)
"""Sizes tried for dynamic non-batch dims when a model must be run without data: 1 first (cheap),
then sizes real exports need (a reflect Pad, a stride-32 backbone, a 512-sample audio frame)."""


def probe_feeds(specs: list[InputSpec], size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One generated sample per input: batch 1, other dynamic dims ``size``; floats standard
    normal, integers zero (a scalar integer input such as a sample rate is a 16000 guess), bool
    tensors half True (a mask of all False would zero what it masks: the FP8 model would be
    checked on zeros), a scalar bool False (a flag)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dims = spec.dims if spec.dims is not None else (1,)
        shape = [d if isinstance(d, int) else (1 if i == spec.batch_axis else size) for i, d in enumerate(dims)]
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu" and not shape:
            feeds[spec.name] = np.array(16000, dtype=spec.dtype)
        elif spec.dtype.kind == "b" and shape:
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds
