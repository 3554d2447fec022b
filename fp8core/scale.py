"""What an FP8 scale is, and how an op of each float type stores one.

A :class:`Scale` maps FP8 values to reals, ``real = fp8 * scale``, and is one of

* a power of two ``2**exponent``, ``MIN_SCALE <= exponent <= MAX_SCALE`` so that it is a normal
  float32 (SPEC section 2: the per-tensor scales of activations and PopRT-style weights);
* a real multiplier: one float32 value, or a float32 array that broadcasts against the data the
  way numpy aligns shapes (from the last axis);
* one float32 value per index along ``axis`` (ONNX's per-axis scale: per-channel weights).

:func:`fp8core.formats.encode` and :func:`~fp8core.formats.decode` take any of them (or a plain
integer exponent); the values are float32 because ONNX's ``QuantizeLinear`` divides by a float32
``y_scale`` and onnxruntime's result is matched bit for bit.

Storage (the scale input of a ``DequantizeLinear`` / ``QuantizeLinear``) has the op's float type:

* float32 ops store any scale exactly;
* float16 ops store a power of two ``2**s`` exactly for ``s`` in :data:`FLOAT16_EXPONENTS`
  (-24..15, subnormals included) and refuse any other; a real scale is first kept at or above
  float16's smallest normal, :data:`FLOAT16_SMALLEST_NORMAL`, then rounded to float16
  (:func:`storable`), and the weight is encoded with the rounded value, so what is stored is
  what was encoded with.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

# 2**s must be a normal float32: ONNX stores y_scale as float32 and onnxruntime divides by it.
MIN_SCALE, MAX_SCALE = -126, 127
FLOAT16_EXPONENTS = range(-24, 16)
"""Exponents ``s`` whose ``2**s`` float16 holds exactly (2**-24 is its smallest subnormal, 2**15
its largest power of two)."""
FLOAT16_SMALLEST_NORMAL = 2.0 ** -14


class InvalidScaleError(ValueError):
    """A scale that is not an integer ``s`` with ``2**s`` a normal float32 (-126 <= s <= 127),
    or a real scale whose shape does not fit the data. Internal: ``--fp8_params`` bounds its
    scales to [-64, 64] and per-channel scales are built for their weight, so only a caller's
    mistake gets here."""


def checked_exponent(scale) -> int:
    """``scale`` as an int exponent in ``[MIN_SCALE, MAX_SCALE]``, or :class:`InvalidScaleError`."""
    try:
        s = int(scale)
        integral = s == scale
    except (TypeError, ValueError, OverflowError):
        integral = False
    if not integral or isinstance(scale, bool) or not MIN_SCALE <= s <= MAX_SCALE:
        raise InvalidScaleError(
            f"FP8 scale {scale!r} is not an integer in [{MIN_SCALE}, {MAX_SCALE}]; "
            "a scale s means value = fp8 * 2**s, give s as an integer such as -3")
    return s


def scale_value(scale: int) -> float:
    """The multiplier ``2**scale`` of an integer scale ``MIN_SCALE <= scale <= MAX_SCALE``."""
    return float(np.ldexp(1.0, checked_exponent(scale)))


@dataclasses.dataclass(frozen=True, eq=False)
class Scale:
    """A power of two, a real multiplier, or real multipliers along an axis (module docstring).

    Build one with :meth:`pow2`, :meth:`real` or :meth:`along`; exactly one of ``exponent`` and
    ``values`` is set.
    """

    exponent: int | None = None
    values: np.ndarray | None = None  # float32; 0-d, numpy-broadcastable, or 1-D along ``axis``
    axis: int | None = None

    @classmethod
    def pow2(cls, exponent: int) -> Scale:
        return cls(exponent=checked_exponent(exponent))

    @classmethod
    def real(cls, value) -> Scale:
        """One real multiplier (or an array of them that broadcasts against the data)."""
        return cls(values=np.asarray(value, np.float32))

    @classmethod
    def along(cls, values, axis: int) -> Scale:
        """One real multiplier per index along ``axis`` of the data."""
        v = np.asarray(values, np.float32)
        if v.ndim != 1:
            raise InvalidScaleError(f"a per-axis scale is 1-D; got shape {list(v.shape)}")
        return cls(values=v, axis=int(axis))

    @property
    def is_pow2(self) -> bool:
        return self.exponent is not None

    def multiplier(self, shape: tuple[int, ...]):
        """The float32 multiplier, shaped to broadcast against data of ``shape``."""
        if self.exponent is not None:
            return np.float32(scale_value(self.exponent))
        if self.axis is None:
            return self.values
        ndim = len(shape)
        if not -ndim <= self.axis < ndim or shape[self.axis] != len(self.values):
            raise InvalidScaleError(
                f"a scale of {len(self.values)} values along axis {self.axis} does not fit data of shape "
                f"{list(shape)}; give one value per index of that axis")
        along = [1] * ndim
        along[self.axis] = -1
        return self.values.reshape(along)

    def __repr__(self) -> str:
        if self.exponent is not None:
            return f"Scale.pow2({self.exponent})"
        if self.axis is None:
            return f"Scale.real({self.values.tolist()})"
        return f"Scale.along({len(self.values)} values, axis={self.axis})"


def storage_dtype(elem_type: int) -> type:
    """The numpy dtype an op of ONNX float type ``elem_type`` stores its scales in."""
    return np.float16 if elem_type == onnx.TensorProto.FLOAT16 else np.float32


def fits(exponent: int, elem_type: int) -> bool:
    """Whether an op of ``elem_type`` stores ``2**exponent`` exactly."""
    return elem_type != onnx.TensorProto.FLOAT16 or exponent in FLOAT16_EXPONENTS


def storable(values: np.ndarray, elem_type: int) -> np.ndarray:
    """Real scales (float32) as an op of ``elem_type`` stores them, back in float32: unchanged for
    float32; for float16 raised to :data:`FLOAT16_SMALLEST_NORMAL`, then rounded to float16."""
    if elem_type == onnx.TensorProto.FLOAT16:
        return np.maximum(values, FLOAT16_SMALLEST_NORMAL).astype(np.float16).astype(np.float32)
    return values.astype(np.float32)


def scale_initializer(name: str, scale: Scale, elem_type: int) -> onnx.TensorProto:
    """The scale input of a Q/DQ node of an ``elem_type`` op: a scalar, or 1-D for a per-axis scale.

    The values are stored as they are: a power of two outside :func:`fits`, or a real scale not
    made :func:`storable`, is the caller's to refuse or round first.
    """
    dtype = storage_dtype(elem_type)
    if scale.is_pow2:
        return numpy_helper.from_array(np.array(scale_value(scale.exponent), dtype=dtype), name)
    values = np.asarray(scale.values, dtype)
    return numpy_helper.from_array(values if scale.axis is not None else values.reshape(()), name)
