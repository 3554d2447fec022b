"""The FP8 formats, as data, and the encode/decode rules.

Every format is one :class:`FP8Format` built from its primary parameters (exponent bits, mantissa
bits, bias, how it spells infinity and NaN). Everything else - largest finite value, smallest
normal and subnormal, the ONNX element type, the ml_dtypes dtype - is derived, never typed twice.

Scale semantics (SPEC section 2): a scale is an integer ``s`` and the real value of an FP8 number
``q`` is ``q * 2**s``. Encoding a real ``x`` is exactly ONNX ``QuantizeLinear`` with
``y_scale = 2**s``, the FP8 zero point and ``saturate=1``:

* ``y = x / 2**s`` computed in float32 (as onnxruntime does, so results match it bit for bit);
* rounded to the nearest FP8 value, ties to even;
* saturated: a finite value beyond the largest finite FP8 value becomes +-max, never inf or NaN;
* +-inf becomes +-max, except in E5M2, the one format with infinities, where it stays +-inf;
* NaN stays NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import ml_dtypes
import numpy as np
import onnx

NanStyle = Literal["fnuz", "fn", "ieee"]


@dataclasses.dataclass(frozen=True)
class FP8Format:
    """One FP8 format, from its primary parameters only.

    nan_style:
      * ``fnuz``: finite, NaN is only 0x80, no negative zero (Graphcore F143/F152, AMD MI300).
      * ``fn``: finite, NaN is S.1111.111, the rest of the top exponent is finite (OCP E4M3FN).
      * ``ieee``: top exponent reserved for +-inf and NaN (OCP E5M2).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    nan_style: NanStyle
    ml_dtype_name: str
    onnx_type_name: str
    vendor: str

    # --- derived facts -------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        return self.nan_style == "ieee"

    @property
    def has_negative_zero(self) -> bool:
        return self.nan_style != "fnuz"

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value."""
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.nan_style == "ieee" else top) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m = self.mantissa_bits
        top_mantissa = 2**m - 2 if self.nan_style == "fn" else 2**m - 1
        return float(2.0**self.max_exponent * (1 + top_mantissa / 2**m))

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def min_normal(self) -> float:
        return float(2.0**self.min_normal_exponent)

    @property
    def min_subnormal(self) -> float:
        return float(2.0 ** (self.min_normal_exponent - self.mantissa_bits))

    @property
    def dtype(self) -> np.dtype:
        """The ml_dtypes numpy dtype holding this format."""
        return np.dtype(getattr(ml_dtypes, self.ml_dtype_name))

    @property
    def onnx_type(self) -> int:
        """The ONNX TensorProto element type."""
        return int(getattr(onnx.TensorProto, self.onnx_type_name))

    def __str__(self) -> str:
        return self.name


# The one table of formats (SPEC section 2).
F143 = FP8Format("F143", 4, 3, 8, "fnuz", "float8_e4m3fnuz", "FLOAT8E4M3FNUZ", "Graphcore")
F152 = FP8Format("F152", 5, 2, 16, "fnuz", "float8_e5m2fnuz", "FLOAT8E5M2FNUZ", "Graphcore")
E4M3FN = FP8Format("E4M3FN", 4, 3, 7, "fn", "float8_e4m3fn", "FLOAT8E4M3FN", "OCP / NVIDIA")
E5M2 = FP8Format("E5M2", 5, 2, 15, "ieee", "float8_e5m2", "FLOAT8E5M2", "OCP / NVIDIA")

FORMATS: dict[str, FP8Format] = {f.name: f for f in (F143, F152, E4M3FN, E5M2)}
ALIASES: dict[str, str] = {"E4M3FNUZ": "F143", "E5M2FNUZ": "F152"}


class UnknownFormatError(ValueError):
    pass


def get_format(name: str | FP8Format) -> FP8Format:
    """Look a format up by name or alias, case-insensitively."""
    if isinstance(name, FP8Format):
        return name
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        known = ", ".join(list(FORMATS) + list(ALIASES))
        raise UnknownFormatError(f"unknown FP8 format {name!r}; known formats: {known}")
    return FORMATS[key]


def format_for_onnx_type(elem_type: int) -> FP8Format:
    for f in FORMATS.values():
        if f.onnx_type == elem_type:
            return f
    raise KeyError(f"ONNX element type {elem_type} is not an FP8 type")


def scale_value(scale: int) -> float:
    """The multiplier ``2**scale`` of an integer scale."""
    return float(np.ldexp(1.0, int(scale)))


def encode(x: np.ndarray, fmt: str | FP8Format, scale: int = 0) -> np.ndarray:
    """Encode real values to FP8 bytes (uint8), ``QuantizeLinear(y_scale=2**scale, saturate=1)``.

    Round to nearest, ties to even; finite values saturate to +-max; +-inf saturates to +-max
    except in E5M2 where it stays +-inf; NaN stays NaN. float16/float64 inputs are first
    converted to float32 (exact for float16), as onnxruntime does.
    """
    return encode_to_dtype(x, fmt, scale).view(np.uint8)


def encode_to_dtype(x: np.ndarray, fmt: str | FP8Format, scale: int = 0) -> np.ndarray:
    """As :func:`encode`, returning the ml_dtypes FP8 array instead of raw bytes."""
    f = get_format(fmt)
    y = np.asarray(x, dtype=np.float32)
    if scale != 0:
        y = y / np.float32(scale_value(scale))
    else:
        y = y.copy()
    lim = np.float32(f.max)
    if f.has_inf:
        # Clip finite values only: E5M2 keeps infinities, as ONNX specifies even with saturate.
        finite = np.isfinite(y)
        np.clip(y, -lim, lim, out=y, where=finite)
    else:
        np.clip(y, -lim, lim, out=y)  # NaN passes through np.clip unchanged
    return y.astype(f.dtype)


def decode(q: np.ndarray, fmt: str | FP8Format, scale: int = 0, dtype=np.float32) -> np.ndarray:
    """Decode FP8 bytes (uint8 or the ml_dtypes dtype) to reals: ``q * 2**scale``."""
    f = get_format(fmt)
    q = np.asarray(q)
    if q.dtype != f.dtype:
        q = q.view(f.dtype)
    y = q.astype(np.float32)
    if scale != 0:
        y = y * np.float32(scale_value(scale))
    return y.astype(dtype, copy=False)


def round_trip(x: np.ndarray, fmt: str | FP8Format, scale: int = 0) -> np.ndarray:
    """``decode(encode(x))`` in float32: what an FP8 Q/DQ pair does to ``x``."""
    return decode(encode_to_dtype(x, fmt, scale), fmt, scale)


@functools.lru_cache(maxsize=None)
def representable_values(fmt: str | FP8Format) -> np.ndarray:
    """All distinct finite non-negative values of the format, ascending (scale 0)."""
    f = get_format(fmt)
    v = np.arange(256, dtype=np.uint8).view(f.dtype).astype(np.float64)
    v = np.unique(v[np.isfinite(v) & (v >= 0)])
    v.setflags(write=False)
    return v
