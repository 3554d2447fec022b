"""The FP8 formats, as data, and the encode/decode rules.

Every format is one :class:`FP8Format` built from its primary parameters (exponent bits, mantissa
bits, bias, how it spells infinity and NaN). Everything else - largest finite value, smallest
normal and subnormal, the ONNX element type, the ml_dtypes dtype - is derived, never typed twice.

Scale semantics (SPEC section 2): the real value of an FP8 number ``q`` is ``q * scale``, the
scale a :class:`fp8core.scale.Scale`: a power of two ``2**s`` (given as the integer ``s``, or
``Scale.pow2(s)``), a real float32 multiplier, or one float32 multiplier per index along an axis.
Encoding a real ``x`` is exactly ONNX ``QuantizeLinear`` with ``y_scale = scale`` (a scalar, or
1-D with ``axis``), the FP8 zero point and ``saturate=1``:

* ``y = x / scale`` computed in float32 (as onnxruntime does, so results match it bit for bit;
  ``x`` is first converted to float32, exact for float16 and bfloat16);
* rounded to the nearest FP8 value, ties to even (a value halfway between max and the next
  power-of-two step, ``max + ulp/2``, is a tie too, and saturation then takes it to max);
* saturated: a value beyond the largest finite FP8 value becomes +-max, never inf or NaN. This
  includes +-inf, in every format, E5M2 too, and it includes a finite ``x`` whose ``x / scale``
  overflows float32;
* NaN (any NaN, quiet or signalling, either sign) stays NaN: 0x80 in the FNUZ formats, S.1111.111
  in E4M3FN, a top-exponent NaN in E5M2;
* -0 stays -0 where the format has one (E4M3FN, E5M2); in the FNUZ formats it is +0, and so is any
  negative value that rounds to zero (their 0x80 is NaN, not -0).

The infinity rule is onnxruntime's (1.32, QuantizeLinear opsets 19 and 21, checked bit for bit
by ``tests/test_formats.py``) and the current ONNX saturation table (Cast-24 on: "Inf -> FLT_MAX"
for every FP8 type). E5M2 could hold +-inf, but neither ONNX nor onnxruntime keeps it there, so
here it saturates as in every other format. The older ONNX table (Cast-19 to Cast-23) sent +-inf
to NaN in the FNUZ formats; onnxruntime never did, and the SPEC wants no NaN from a non-NaN input.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import ml_dtypes
import numpy as np
import onnx

from fp8core.errors import FP8Error
from fp8core.scale import MAX_SCALE, MIN_SCALE, InvalidScaleError, Scale, checked_exponent, scale_value

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
    def nan_codes(self) -> tuple[int, ...]:
        """Every byte that encodes NaN, ascending."""
        if self.nan_style == "fnuz":
            return (0x80,)
        top_exponent = (2**self.exponent_bits - 1) << self.mantissa_bits
        all_mantissa = 2**self.mantissa_bits - 1
        if self.nan_style == "fn":
            mantissas = [all_mantissa]
        else:  # ieee: mantissa 0 is infinity, every other mantissa is NaN
            mantissas = list(range(1, all_mantissa + 1))
        return tuple(sorted(sign | top_exponent | m for sign in (0x00, 0x80) for m in mantissas))

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


class UnknownFormatError(FP8Error, KeyError):
    """An FP8 format name, alias or ONNX element type that is not in :data:`FORMATS`.

    A ValueError (a bad parameter) and a KeyError (a failed lookup), so callers may catch either.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message like a dictionary key.
        return str(self.args[0]) if self.args else ""


class FormatMismatchError(TypeError):
    """FP8 data whose dtype is a different FP8 format than the one asked to decode it."""


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
    """The format whose ONNX TensorProto element type is ``elem_type``."""
    for f in FORMATS.values():
        if f.onnx_type == elem_type:
            return f
    fp8 = ", ".join(f"{f.onnx_type_name}={f.onnx_type}" for f in FORMATS.values())
    raise UnknownFormatError(f"ONNX element type {elem_type} is not an FP8 type; FP8 types: {fp8}")


def encode(x: np.ndarray, fmt: str | FP8Format, scale: Scale | int = 0) -> np.ndarray:
    """Encode real values to FP8 bytes (uint8), ``QuantizeLinear(y_scale=scale, saturate=1)``.

    ``scale`` is a :class:`~fp8core.scale.Scale` (a power of two, a real multiplier, or one
    multiplier per index along an axis) or an integer exponent ``s`` meaning ``2**s``. The rules
    are the module's (see its docstring): ``x / scale`` in float32, round to nearest, ties to
    even, saturate to +-max (+-inf included, in every format), NaN stays NaN. float16 and
    bfloat16 inputs are converted to float32 exactly, as onnxruntime does; float64 inputs (which
    QuantizeLinear does not take) are rounded to float32 first.
    """
    return encode_to_dtype(x, fmt, scale).view(np.uint8)


def encode_to_dtype(x: np.ndarray, fmt: str | FP8Format, scale: Scale | int = 0,
                    out: np.ndarray | None = None) -> np.ndarray:
    """As :func:`encode`, returning the ml_dtypes FP8 array instead of raw bytes; ``out``: a
    C-contiguous uint8 array of ``x``'s shape to write into."""
    f = get_format(fmt)
    x = np.asarray(x)
    m = _multiplier(scale, x.shape)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if m is not None and np.size(m) == 1:
        m = np.float32(np.reshape(m, ()))  # divided block by block
    elif m is not None:  # one value per index of an axis (it may broadcast x to a larger shape)
        # overflow to +-inf is fine (the lookup saturates it); NaN in, NaN out
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            x, m = np.divide(x, m, dtype=np.float32), None
    return _round_float32(x, f, m, out)


STICKY_BITS = 15
"""Rounding float32 to an FP8 format keeps at most 3 of its 23 mantissa bits (a subnormal FP8
value even fewer), so it reads bits 31..20 and whether any bit below the rounding position is set:
bits 14..0 matter only through "any of them set". A float32's FP8 value is therefore a function of
bits 31..15 with bit 15 replaced by "any of bits 15..0 set": 2**17 cases, one table per format
(:func:`_rounding_table`), looked up in blocks: 1.8-2.3 ns per value against 7.6-9.5 for the clip
and ml_dtypes cast it stands for (``benchmarks/bench_encode.py``, which also checks with
``--exhaustive`` that the two agree on every float32 in every format)."""


@functools.lru_cache(maxsize=None)
def _rounding_table(f: FP8Format) -> np.ndarray:
    """The FP8 byte of each of the 2**17 cases (:data:`STICKY_BITS`), by the rules of the module
    docstring: clip to +-max (inf included; NaN passes), then ml_dtypes' cast (round to nearest,
    ties to even, which after the clip never overflows)."""
    case = np.arange(1 << (32 - STICKY_BITS), dtype=np.uint32)
    # bits 31..16 of the case's float32 as they come, bit 0 set when "any of bits 15..0" is
    x = (((case >> 1) << 16) | (case & 1)).view(np.float32)
    lim = np.float32(f.max)
    with np.errstate(invalid="ignore"):  # numpy flags NaN -> FP8 NaN as "invalid"
        table = np.clip(x, -lim, lim).astype(f.dtype).view(np.uint8)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=None)
def _decoding_table(f: FP8Format) -> np.ndarray:
    """The float32 value of each of the 256 bytes (ml_dtypes' decoding)."""
    table = np.arange(256, dtype=np.uint8).view(f.dtype).astype(np.float32)
    table.setflags(write=False)
    return table


ROUNDING_BLOCK = 1 << 16  # values per block of the lookup: its temporaries (0.5 MB) stay in cache


def _round_float32(x: np.ndarray, f: FP8Format, m: np.float32 | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """The FP8 values of float32 ``x / m`` (``m`` a float32 scalar or None), saturating, as
    ``f.dtype``. Block by block, the quotient included: no temporary the size of ``x`` (fresh
    memory costs a page fault per 4 KB; two encoder threads faulting at once took 6.3 s for
    3 GB of weights against 2.0 s without)."""
    flat = x.reshape(-1)  # 1-D: numpy gives 0-d results back as scalars
    if out is not None and not (out.flags.c_contiguous and out.size == flat.size and out.dtype == np.uint8):
        raise ValueError(f"out must be a C-contiguous uint8 array of {flat.size} values")
    result = np.empty(flat.size, np.uint8) if out is None else out.reshape(-1)
    _look_up(flat, _rounding_table(f), m, result)
    return result.reshape(x.shape).view(f.dtype)


def _look_up(flat: np.ndarray, table: np.ndarray, m: np.float32 | None, result: np.ndarray,
             times_m: bool = False) -> None:
    """``result = table[case(flat / m)]`` (:data:`STICKY_BITS`), block by block; ``times_m``:
    multiplied by ``m`` again (a round trip's dequantization, in float32 as onnxruntime does)."""
    block = min(flat.size, ROUNDING_BLOCK)
    quotient = np.empty(block, np.float32) if m is not None else None
    case = np.empty(block, np.uint32)
    low = np.empty(block, np.uint32)
    # overflow of the quotient to +-inf is fine (the table saturates it); NaN in, NaN out
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for start in range(0, flat.size, ROUNDING_BLOCK):
            stop = min(start + ROUNDING_BLOCK, flat.size)
            n = stop - start
            if m is None:
                bits = flat[start:stop].view(np.uint32)
            else:
                bits = np.divide(flat[start:stop], m, out=quotient[:n]).view(np.uint32)
            np.right_shift(bits, STICKY_BITS, out=case[:n])
            np.bitwise_and(bits, (1 << STICKY_BITS) - 1, out=low[:n])
            np.bitwise_or(case[:n], low[:n] != 0, out=case[:n])
            np.take(table, case[:n], out=result[start:stop])
            if times_m and m is not None:
                np.multiply(result[start:stop], m, out=result[start:stop])


def decode(q: np.ndarray, fmt: str | FP8Format, scale: Scale | int = 0, dtype=np.float32) -> np.ndarray:
    """Decode FP8 data to reals: ``q * scale``, as ONNX ``DequantizeLinear(y_scale=scale)``.

    ``scale`` as in :func:`encode`. ``q`` is raw bytes (uint8/int8, read as ``fmt``) or already
    the format's ml_dtypes dtype; an array of a different FP8 dtype raises
    :class:`FormatMismatchError` rather than being reinterpreted. The product is taken in float32
    (exact for a power-of-two scale, rounded once for a real one, as onnxruntime does), then
    rounded once to ``dtype`` (float16 overflows to +-inf beyond 65504, as onnxruntime does).
    """
    f = get_format(fmt)
    q = np.asarray(q)
    m = _multiplier(scale, q.shape)
    if q.dtype in (np.uint8, np.int8):
        q = q.view(f.dtype)
    elif q.dtype != f.dtype:
        raise FormatMismatchError(
            f"cannot decode an array of dtype {q.dtype} as {f.name}; pass the raw bytes (uint8) "
            f"or an array of dtype {f.dtype}")
    y = _decoding_table(f)[q.view(np.uint8).reshape(-1)].reshape(q.shape)  # = q.astype(np.float32), 4x faster
    with np.errstate(over="ignore"):  # large scales overflow to +-inf, as onnxruntime does
        if m is not None:
            if np.broadcast_shapes(y.shape, np.shape(m)) == y.shape:
                y *= m
            else:
                y = y * m
        return y.astype(dtype, copy=False)


def _multiplier(scale: Scale | int, shape: tuple[int, ...]):
    """The float32 multiplier of ``scale`` against data of ``shape``; None for ``2**0``."""
    if isinstance(scale, Scale):
        return None if scale.exponent == 0 else scale.multiplier(shape)
    s = checked_exponent(scale)
    return np.float32(scale_value(s)) if s else None


def round_trip(x: np.ndarray, fmt: str | FP8Format, scale: Scale | int = 0) -> np.ndarray:
    """``decode(encode(x))`` in float32: what an FP8 Q/DQ pair does to ``x``. With one scale for
    the whole array, one lookup per value in a table of the FP8 values themselves
    (:func:`_round_trip_table`), the scale's division and multiplication in the same blocks:
    no byte array, no second pass (gptaq rounds every activation it reads this way)."""
    f = get_format(fmt)
    x = np.asarray(x)
    m = _multiplier(scale, x.shape)
    if m is not None and np.size(m) != 1:
        return decode(encode_to_dtype(x, f, scale), f, scale)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    flat = x.reshape(-1)
    result = np.empty(flat.size, np.float32)
    _look_up(flat, _round_trip_table(f), None if m is None else np.float32(np.reshape(m, ())), result, times_m=True)
    return result.reshape(x.shape)


def round_to_grid(y: np.ndarray, f: FP8Format) -> np.ndarray:
    """``y`` (float32, within +-max) rounded to the FP8 grid, nearest, ties to even, in place.

    ``c = 1.5 * 2^23 * step``, with ``step = 2^(max(exponent(y), min normal) - mantissa bits)`` the
    grid step at ``y``: ``y + c`` lies in c's binade, whose float32 spacing is ``step``, so the
    float32 addition does the FP8 rounding and ``- c`` is exact. c's significand is even, so ties
    go to even. Equals :func:`round_trip` at scale 0 except that -0 may come back +0.
    """
    e = y.view(np.uint32) & np.uint32(0x7F800000)
    np.maximum(e, np.uint32((f.min_normal_exponent + 127) << 23), out=e)
    e += np.uint32(((23 - f.mantissa_bits) << 23) | 0x00400000)
    c = e.view(np.float32)
    y += c
    y -= c
    return y


def round_trip_into(x32: np.ndarray, s, f: FP8Format, out: np.ndarray, signed_zero: bool = False) -> np.ndarray:
    """``round_trip(x32, f, Scale.real(s))`` in float32 (``s``: float32 multipliers that broadcast
    against ``x32``), into ``out``, by arithmetic (:func:`round_to_grid`) instead of a table: a few
    passes over the data, but no per-call set-up, which is what a small array pays for (GPTQ
    rounds one weight row at a time: 25 us against 65 us a call). ``signed_zero``: a negative value
    that rounds to zero gives -0 where the format has it, bit for bit :func:`round_trip`."""
    lim = np.float32(f.max)
    np.divide(x32, s, out=out)
    np.clip(out, -lim, lim, out=out)
    round_to_grid(out, f)
    out *= s
    if signed_zero and f.has_negative_zero:
        np.copysign(out, x32, out=out)
    return out


@functools.lru_cache(maxsize=None)
def _round_trip_table(f: FP8Format) -> np.ndarray:
    """The float32 value of the FP8 byte of each rounding case (:func:`_rounding_table`)."""
    table = _decoding_table(f)[_rounding_table(f)]
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=None)
def representable_values(fmt: str | FP8Format) -> np.ndarray:
    """All distinct finite non-negative values of the format, ascending (scale 0)."""
    f = get_format(fmt)
    v = np.arange(256, dtype=np.uint8).view(f.dtype).astype(np.float64)
    v = np.unique(v[np.isfinite(v) & (v >= 0)])
    v.setflags(write=False)
    return v
