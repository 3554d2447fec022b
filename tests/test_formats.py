"""fp8core.formats: the SPEC section 2 table, and encode/decode bit for bit against references.

References, each independent of the code under test:
* the SPEC section 2 table, typed here by hand;
* ml_dtypes (``finfo`` and its decoding of all 256 bytes);
* a brute-force decoder from the bit layout and a brute-force nearest-value search;
* onnxruntime's ``QuantizeLinear`` / ``DequantizeLinear`` (opsets 19 and 21, ``saturate=1``,
  ``ORT_DISABLE_ALL``), compared byte for byte on a dense sweep of float32 and every float16.
"""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fp8core.formats import (
    ALIASES,
    FORMATS,
    FormatMismatchError,
    FP8Format,
    InvalidScaleError,
    UnknownFormatError,
    decode,
    encode,
    encode_to_dtype,
    format_for_onnx_type,
    get_format,
    representable_values,
    round_trip,
    scale_value,
)
from fp8core.scale import Scale

ALL_FORMATS = list(FORMATS.values())
SCALES = (-10, -3, 0, 3, 10)
OPSETS = (19, 21)

# ---------------------------------------------------------------------------------------------
# SPEC section 2, typed by hand: name, ONNX type, bias, max, min normal, min subnormal, has inf,
# NaN bytes, infinity bytes.
SPEC_TABLE = [
    ("F143", TensorProto.FLOAT8E4M3FNUZ, 8, 240.0, 2.0**-7, 2.0**-10, False, {0x80}, set()),
    ("F152", TensorProto.FLOAT8E5M2FNUZ, 16, 57344.0, 2.0**-15, 2.0**-17, False, {0x80}, set()),
    ("E4M3FN", TensorProto.FLOAT8E4M3FN, 7, 448.0, 2.0**-6, 2.0**-9, False, {0x7F, 0xFF}, set()),
    ("E5M2", TensorProto.FLOAT8E5M2, 15, 57344.0, 2.0**-14, 2.0**-16, True,
     {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}, {0x7C, 0xFC}),
]


@pytest.mark.parametrize("name, onnx_type, bias, vmax, min_normal, min_sub, has_inf, nans, infs",
                         SPEC_TABLE, ids=[row[0] for row in SPEC_TABLE])
def test_format_facts_are_the_spec_table(name, onnx_type, bias, vmax, min_normal, min_sub,
                                         has_inf, nans, infs):
    f = get_format(name)
    assert (f.bias, f.max, f.min_normal, f.min_subnormal) == (bias, vmax, min_normal, min_sub)
    assert f.has_inf is has_inf
    assert set(f.nan_codes) == nans
    assert f.onnx_type == onnx_type
    assert format_for_onnx_type(onnx_type) is f

    # The same facts as ml_dtypes sees them, byte by byte.
    info = ml_dtypes.finfo(f.dtype)
    assert (float(info.max), float(info.smallest_normal), float(info.smallest_subnormal)) == (
        vmax, min_normal, min_sub)
    every_byte = np.arange(256, dtype=np.uint8)
    values = every_byte.view(f.dtype).astype(np.float64)
    assert set(every_byte[np.isnan(values)].tolist()) == nans
    assert set(every_byte[np.isinf(values)].tolist()) == infs
    assert np.nanmax(values[np.isfinite(values)]) == vmax


def _decode_by_formula(f: FP8Format, code: int) -> float:
    """The value of one byte from the bit layout alone (finite codes only)."""
    sign = -1.0 if code & 0x80 else 1.0
    e = (code >> f.mantissa_bits) & (2**f.exponent_bits - 1)
    m = code & (2**f.mantissa_bits - 1)
    if e == 0:
        return sign * m / 2**f.mantissa_bits * 2.0 ** (1 - f.bias)
    return sign * (1 + m / 2**f.mantissa_bits) * 2.0 ** (e - f.bias)


@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_bit_layout_decodes_like_ml_dtypes(f):
    specials = set(f.nan_codes) | ({0x7C, 0xFC} if f.has_inf else set())
    if not f.has_negative_zero:
        specials.add(0x80)  # FNUZ: 0x80 is the NaN, there is no -0
    codes = np.array([c for c in range(256) if c not in specials], dtype=np.uint8)
    expected = np.array([_decode_by_formula(f, int(c)) for c in codes])
    got = decode(codes, f, dtype=np.float64)
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.signbit(got), np.signbit(expected))  # -0 where the format has it


@pytest.mark.parametrize("name, count", [("F143", 128), ("F152", 128), ("E4M3FN", 127),
                                         ("E5M2", 124)])
def test_representable_values(name, count):
    # FNUZ: bytes 0x00..0x7F, all finite; E4M3FN: 0x7F is NaN; E5M2: 0x7C..0x7F are inf/NaN.
    f = get_format(name)
    v = representable_values(name)
    assert len(v) == count
    assert v[0] == 0.0 and v[1] == f.min_subnormal and v[-1] == f.max
    assert np.all(np.diff(v) > 0)
    assert v[2**f.mantissa_bits] == f.min_normal  # the subnormals fill [0, min_normal)
    assert not v.flags.writeable  # it is cached, so callers must not change it


def test_aliases_and_case_insensitive_names():
    assert ALIASES == {"E4M3FNUZ": "F143", "E5M2FNUZ": "F152"}
    assert get_format("E4M3FNUZ") is FORMATS["F143"]
    assert get_format("E5M2FNUZ") is FORMATS["F152"]
    for spelling, name in [("f143", "F143"), (" F152 ", "F152"), ("e4m3fn", "E4M3FN"),
                           ("E5m2", "E5M2"), ("e4m3fnuz", "F143"), ("e5M2fNuZ", "F152")]:
        assert get_format(spelling) is FORMATS[name]
    assert get_format(FORMATS["E5M2"]) is FORMATS["E5M2"]


def test_unknown_format_name_is_a_clear_error():
    with pytest.raises(UnknownFormatError) as err:
        get_format("E3M4")
    message = str(err.value)
    assert message.startswith("unknown FP8 format 'E3M4'; known formats: F143, F152")
    assert "E4M3FNUZ" in message and "\n" not in message
    # Callers may treat it as a bad value or as a failed lookup.
    assert isinstance(err.value, ValueError) and isinstance(err.value, KeyError)


def test_unknown_onnx_type_is_a_clear_error():
    with pytest.raises(UnknownFormatError, match=r"ONNX element type 1 is not an FP8 type; FP8 "):
        format_for_onnx_type(TensorProto.FLOAT)


@pytest.mark.parametrize("bad", [2.5, 128, -127, "3", None, True])
def test_invalid_scale_is_a_clear_error(bad):
    with pytest.raises(InvalidScaleError, match=r"not an integer in \[-126, 127\]"):
        encode(np.ones(3, np.float32), "F143", bad)


def test_integral_scales_of_any_type_are_accepted():
    assert scale_value(np.int64(-3)) == scale_value(-3.0) == 0.125
    assert scale_value(127) == 2.0**127 and scale_value(-126) == 2.0**-126


def test_decode_refuses_another_fp8_dtype():
    q = encode_to_dtype(np.ones(3, np.float32), "E4M3FN")
    with pytest.raises(FormatMismatchError, match="cannot decode an array of dtype float8_e4m3fn"):
        decode(q, "F143")
    np.testing.assert_array_equal(decode(q, "E4M3FN"), [1, 1, 1])


def test_encode_keeps_shape_and_takes_scalars():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert encode(x, "F143", -1).shape == (3, 4)
    assert encode(np.float32(1.0), "F143").shape == ()
    assert int(encode(3.0, "E4M3FN", 1)) == int(encode(np.float32(1.5), "E4M3FN"))


# ---------------------------------------------------------------------------------------------
# onnxruntime as the reference for encode (QuantizeLinear) and decode (DequantizeLinear)


def _session(node: onnx.NodeProto, inputs, output, zero_point, opset: int) -> ort.InferenceSession:
    graph = helper.make_graph([node], node.op_type, inputs, [output], [zero_point])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # FP8 needs IR >= 9; 10 is what onnxruntime 1.32 reads for opset 21
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _quantize_session(f: FP8Format, float_type: int, opset: int) -> ort.InferenceSession:
    """``y = QuantizeLinear(x, y_scale, zero point 0 of f, saturate=1)``, scale as an input."""
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], saturate=1)
    inputs = [helper.make_tensor_value_info("x", float_type, [None]),
              helper.make_tensor_value_info("scale", float_type, [])]
    output = helper.make_tensor_value_info("y", f.onnx_type, [None])
    zero_point = helper.make_tensor("zero_point", f.onnx_type, [], [0.0])
    return _session(node, inputs, output, zero_point, opset)


def _dequantize_session(f: FP8Format, float_type: int, opset: int) -> ort.InferenceSession:
    """``y = DequantizeLinear(q, x_scale, zero point 0 of f)``, scale as an input."""
    node = helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])
    inputs = [helper.make_tensor_value_info("q", f.onnx_type, [None]),
              helper.make_tensor_value_info("scale", float_type, [])]
    output = helper.make_tensor_value_info("y", float_type, [None])
    zero_point = helper.make_tensor("zero_point", f.onnx_type, [], [0.0])
    return _session(node, inputs, output, zero_point, opset)


def _ort_quantize(session, f: FP8Format, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Run a quantize session; the FP8 output (no numpy type in ORT) is read back as bytes."""
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_cpu_input("scale", scale)
    out = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), f.onnx_type)
    binding.bind_ortvalue_output("y", out)
    session.run_with_iobinding(binding)
    raw = (ctypes.c_uint8 * x.size).from_address(out.data_ptr())
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _ort_dequantize(session, f: FP8Format, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    binding = session.io_binding()
    fp8_q = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(q, f.onnx_type)
    binding.bind_ortvalue_input("q", fp8_q)
    binding.bind_cpu_input("scale", scale)
    binding.bind_output("y")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def _assert_same_fp8(ours: np.ndarray, theirs: np.ndarray, f: FP8Format, x: np.ndarray, what: str):
    """Byte for byte, except that any NaN byte of the format equals any other."""
    both_nan = np.isin(ours, f.nan_codes) & np.isin(theirs, f.nan_codes)
    bad = np.flatnonzero((ours != theirs) & ~both_nan)
    if bad.size:
        bits = x.view(np.uint32 if x.dtype == np.float32 else np.uint16)
        shown = ", ".join(f"x={x[i]!r} (0x{int(bits[i]):x}): ours 0x{ours[i]:02x} "
                          f"ort 0x{theirs[i]:02x}" for i in bad[:8])
        pytest.fail(f"{what}: {bad.size} of {x.size} differ from onnxruntime, e.g. {shown}")


def _neighbourhood(centres: np.ndarray, radius: int) -> np.ndarray:
    """Every float32 bit pattern within ``radius`` steps of a centre, both signs."""
    magnitude = np.abs(centres.astype(np.float32)).view(np.uint32).astype(np.int64)
    around = (magnitude[:, None] + np.arange(-radius, radius + 1)).ravel()
    around = around[(around >= 0) & (around <= 0x7F800000)].astype(np.uint32)
    return np.concatenate([around, around | np.uint32(0x80000000)])


def _float32_sweep() -> np.ndarray:
    """float32 bit patterns: a stride through all 2**32, plus every place where rounding is hard.

    Dense neighbourhoods (64 patterns either side) of, for every format and every scale in
    SCALES (as real values ``v * 2**s``): every FP8 value, every tie halfway between adjacent
    FP8 values (including between 0 and the smallest subnormal), ``max + ulp/2`` (the tie
    just past max) and ``max + ulp``. Plus float32 subnormals, +-0, +-inf and NaNs.
    """
    stride = np.arange(0, 2**32, 2**10, dtype=np.uint64).astype(np.uint32)
    float32_subnormals = np.concatenate([np.arange(0, 4096), np.arange(0x7FF000, 0x801000)])
    parts = [stride, float32_subnormals.astype(np.uint32),
             float32_subnormals.astype(np.uint32) | np.uint32(0x80000000)]
    for f in ALL_FORMATS:
        v = representable_values(f)
        ulp_at_max = 2.0 ** (f.max_exponent - f.mantissa_bits)
        centres = np.concatenate([v, (v[:-1] + v[1:]) / 2, [f.max + ulp_at_max / 2,
                                                          f.max + ulp_at_max]])
        for s in SCALES:
            parts.append(_neighbourhood(centres * 2.0**s, radius=64))
    specials = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                0x7F800001, 0xFFBFFFFF, 0x7FFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF]
    parts.append(np.array(specials, dtype=np.uint32))
    return np.unique(np.concatenate(parts)).view(np.float32)


@pytest.fixture(scope="module")
def float32_sweep() -> np.ndarray:
    return _float32_sweep()


def test_sweep_contains_the_hard_cases(float32_sweep):
    # A guard on the sweep itself: the values the encode tests rely on are really in it.
    x = set(float32_sweep[np.isfinite(float32_sweep)].tolist())
    assert {248.0, 248.0 * 2**-10, 0.5 * 2.0**-10, 2.0**-149, -0.0, 464.0, 61440.0} <= x
    assert np.isnan(float32_sweep).sum() >= 4 and np.isinf(float32_sweep).sum() == 2
    assert len(float32_sweep) > 4_000_000


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_encode_float32_matches_onnxruntime_quantize(f, opset, float32_sweep):
    session = _quantize_session(f, TensorProto.FLOAT, opset)
    for s in SCALES:
        theirs = _ort_quantize(session, f, float32_sweep, np.array(2.0**s, np.float32))
        _assert_same_fp8(encode(float32_sweep, f, s), theirs, f, float32_sweep,
                         f"{f} scale {s} opset {opset}")


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_encode_every_float16_matches_onnxruntime_quantize(f, opset):
    x = np.arange(2**16, dtype=np.uint16).view(np.float16)
    session = _quantize_session(f, TensorProto.FLOAT16, opset)
    for s in SCALES:
        theirs = _ort_quantize(session, f, x, np.array(2.0**s, np.float16))
        _assert_same_fp8(encode(x, f, s), theirs, f, x, f"{f} float16 scale {s} opset {opset}")


@pytest.mark.parametrize("float_type, dtype", [(TensorProto.FLOAT, np.float32),
                                               (TensorProto.FLOAT16, np.float16)])
@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_decode_every_byte_matches_onnxruntime_dequantize(f, float_type, dtype):
    q = np.arange(256, dtype=np.uint8)
    session = _dequantize_session(f, float_type, opset=21)
    for s in SCALES:
        theirs = _ort_dequantize(session, f, q, np.array(2.0**s, dtype))
        ours = decode(q, f, s, dtype=dtype)
        assert ours.dtype == theirs.dtype == dtype
        bits = np.dtype(f"u{ours.itemsize}")
        same = (ours.view(bits) == theirs.view(bits)) | (np.isnan(ours) & np.isnan(theirs))
        assert same.all(), f"{f} scale {s}: {q[~same]} decode to {ours[~same]}, ORT {theirs[~same]}"


# ---------------------------------------------------------------------------------------------
# real scales (a scalar, or one per index along an axis) against onnxruntime


def _per_axis_session(op: str, f: FP8Format, float_type: int, rank: int, axis: int | None,
                      channels: int) -> ort.InferenceSession:
    """QuantizeLinear (saturate=1) or DequantizeLinear with a real scale input: a scalar when
    ``axis`` is None, else 1-D of ``channels`` values along ``axis``; zero point 0 of ``f``."""
    scale_shape = [] if axis is None else [channels]
    data, out = ("x", "y") if op == "QuantizeLinear" else ("q", "y")
    attrs = ({"saturate": 1} if op == "QuantizeLinear" else {}) | ({} if axis is None else {"axis": axis})
    node = helper.make_node(op, [data, "scale", "zero_point"], [out], **attrs)
    in_type, out_type = (float_type, f.onnx_type) if op == "QuantizeLinear" else (f.onnx_type, float_type)
    inputs = [helper.make_tensor_value_info(data, in_type, [None] * rank),
              helper.make_tensor_value_info("scale", float_type, scale_shape)]
    output = helper.make_tensor_value_info(out, out_type, [None] * rank)
    zero_point = helper.make_tensor("zero_point", f.onnx_type, scale_shape, [0.0] * (channels if scale_shape else 1))
    return _session(node, inputs, output, zero_point, opset=21)


def _random_data(rng, shape, dtype) -> np.ndarray:
    """Values of every magnitude (subnormal to beyond max after scaling), both signs, and a few
    specials: +-0, +-inf, NaN."""
    top = 15 if dtype == np.float16 else 20  # float16 holds up to 65504
    x = rng.choice([-1.0, 1.0], shape) * np.exp2(rng.uniform(-30, top, shape))
    flat = x.reshape(-1)
    flat[:5] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    return x.astype(dtype)


@pytest.mark.parametrize("float_type, dtype", [(TensorProto.FLOAT, np.float32),
                                               (TensorProto.FLOAT16, np.float16)])
@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_real_and_per_axis_scales_match_onnxruntime(f, float_type, dtype):
    """encode/decode with ``Scale.real`` and ``Scale.along`` against QuantizeLinear /
    DequantizeLinear with a float scale (scalar, and 1-D along each axis, negative included),
    on random data and random real scales in the input's own float type."""
    rng = np.random.default_rng(7)
    shape = (6, 5, 40)
    x = _random_data(rng, shape, dtype)
    for axis in (None, 0, 1, 2, -1):
        channels = 1 if axis is None else shape[axis]
        scales = np.exp2(rng.uniform(-12, 4, channels)).astype(dtype)  # real, rarely a power of two
        scale = Scale.real(scales[0]) if axis is None else Scale.along(scales, axis)
        ort_scale = scales.reshape(()) if axis is None else scales
        what = f"{f} {np.dtype(dtype).name} axis {axis}"

        session = _per_axis_session("QuantizeLinear", f, float_type, len(shape), axis, channels)
        ours = encode(x, f, scale)
        theirs = _ort_quantize(session, f, x, ort_scale).reshape(shape)
        _assert_same_fp8(ours.reshape(-1), theirs.reshape(-1), f, x.reshape(-1), what)

        session = _per_axis_session("DequantizeLinear", f, float_type, len(shape), axis, channels)
        theirs = _ort_dequantize(session, f, ours, ort_scale)
        back = decode(ours, f, scale, dtype=dtype)
        assert back.dtype == theirs.dtype == dtype
        bits = np.dtype(f"u{back.itemsize}")
        same = (back.view(bits) == theirs.view(bits)) | (np.isnan(back) & np.isnan(theirs))
        assert same.all(), f"{what}: {back[~same][:8]} against ORT {theirs[~same][:8]}"
        np.testing.assert_array_equal(round_trip(x, f, scale), decode(ours, f, scale))


@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_round_trip_by_table_is_decode_of_encode_bit_for_bit(f):
    """round_trip looks the FP8 value up directly (one table of float32 values per format, the
    scale's division and multiplication in the same blocks). Against decode(encode(x)) bit for
    bit: every high half of a float32 with ties, near-ties and random low halves, at scale 0, a
    power of two, real scales (one that overflows the largest values to +-max * m), from float16
    and float64 too; -0 and NaN where decode gives them."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    rng = np.random.default_rng(4)
    x = np.concatenate([(high[:, None] | lows[None, :]).reshape(-1),
                        high | rng.integers(0, 1 << 16, high.size, dtype=np.uint32)]).view(np.float32)
    for scale in (0, -5, 7, Scale.pow2(-12), Scale.real(0.3), Scale.real(np.float32(1e30))):
        for data in (x, x.astype(np.float64), x[:4096].astype(np.float16)):
            with np.errstate(over="ignore", invalid="ignore"):
                want = decode(encode(data, f, scale), f, scale)
                got = round_trip(data, f, scale)
            assert got.dtype == np.float32 and got.shape == data.shape
            same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
            assert same.all(), f"{f.name} scale {scale} {data.dtype}: {got[~same][:4]} against {want[~same][:4]}"


def test_scale_kinds_agree_where_they_mean_the_same():
    """An int exponent, ``Scale.pow2``, a real scalar 2**s and a per-axis vector of 2**s encode
    alike; a real scale divides in float32 (x / s, not x * (1 / s))."""
    x = np.random.default_rng(3).standard_normal((4, 7)).astype(np.float32) * 30
    want = encode(x, "F143", -3)
    for scale in (Scale.pow2(-3), Scale.real(2.0**-3), Scale.along(np.full(7, 2.0**-3), 1)):
        np.testing.assert_array_equal(encode(x, "F143", scale), want)
        np.testing.assert_array_equal(decode(want, "F143", scale), decode(want, "F143", -3))
    s = np.float32(0.37)
    np.testing.assert_array_equal(encode(x, "E4M3FN", Scale.real(s)), encode(x / s, "E4M3FN"))
    with pytest.raises(InvalidScaleError, match="not an integer"):
        Scale.pow2(0.5)
    with pytest.raises(InvalidScaleError, match="1-D"):
        Scale.along(np.ones((2, 2)), 0)
    with pytest.raises(InvalidScaleError, match="along axis 3 does not fit data of shape"):
        encode(x, "F143", Scale.along(np.ones(7), 3))
    with pytest.raises(InvalidScaleError, match="7 values along axis 0"):
        decode(encode(x, "F143"), "F143", Scale.along(np.ones(7), 0))


def test_saturation_rules_by_example():
    # The rules the sweep checks in bulk, spelled out (SPEC section 2 and ONNX saturate=1).
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    x = np.array([1e6, -1e6, inf, -inf, nan, 248.0, 247.9, -0.0, -1e-9], np.float32)
    assert encode(x, "F143").tolist() == [0x7F, 0xFF, 0x7F, 0xFF, 0x80, 0x7F, 0x7F, 0x00, 0x00]
    assert encode(x, "E5M2")[:4].tolist() == [0x7B, 0xFB, 0x7B, 0xFB]  # never inf
    assert encode(x, "E4M3FN")[-2:].tolist() == [0x80, 0x80]  # -0 kept where it exists
    assert encode(np.float32(3e38), "F152", -10) == 0x7F  # x / 2**-10 overflows float32: max


# ---------------------------------------------------------------------------------------------
# round_trip against ml_dtypes and against a brute-force nearest-value search


def _in_range_sample(f: FP8Format, s: int, n: int, seed: int) -> np.ndarray:
    """Random values of every magnitude from below the smallest subnormal up to max, times 2**s."""
    rng = np.random.default_rng(seed)
    exponents = rng.uniform(f.min_normal_exponent - f.mantissa_bits - 3, f.max_exponent + 1, n)
    x = rng.choice([-1.0, 1.0], n) * 2.0**exponents
    x = np.clip(x, -f.max, f.max) * 2.0**s
    return np.concatenate([x, representable_values(f) * 2.0**s]).astype(np.float32)


@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_round_trip_equals_ml_dtypes_cast_in_range(f, s):
    x = _in_range_sample(f, s, 200_000, seed=s + 100)
    step = np.float32(2.0**s)
    expected = (x / step).astype(f.dtype).astype(np.float32) * step
    got = round_trip(x, f, s)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_round_trip_is_the_nearest_value_ties_to_even(f):
    s = -3
    x = _in_range_sample(f, s, 20_000, seed=7)
    # Ties too: midpoints between adjacent values, where "even" decides.
    v = representable_values(f)
    x = np.concatenate([x, ((v[:-1] + v[1:]) / 2 * 2.0**s).astype(np.float32)])
    signed = np.concatenate([-v[::-1], v])
    codes = np.concatenate([encode(-v[::-1], f), encode(v, f)])
    distance = np.abs(x.astype(np.float64)[:, None] / 2.0**s - signed[None, :])
    best = distance.min(axis=1, keepdims=True)
    candidates = distance == best
    # Among equally near values, the one with an even last mantissa bit (an even byte).
    even = candidates & (codes[None, :] % 2 == 0)
    pick = np.where(candidates.sum(axis=1) > 1, even.argmax(axis=1), candidates.argmax(axis=1))
    np.testing.assert_array_equal(np.abs(round_trip(x, f, s)), np.abs(signed[pick]) * 2.0**s)


@pytest.mark.parametrize("f", ALL_FORMATS, ids=str)
def test_table_lookup_is_the_clip_and_cast_rule_on_every_high_half(f):
    """encode looks FP8 bytes up by a float32's bits 31..15 and "any of bits 15..0 set"
    (fp8core.formats.STICKY_BITS). Against the rule it stands for, computed by ml_dtypes alone:
    every one of the 2**16 high halves, with low halves that are exact ties (0x8000), just above
    and below them, zero, one, all ones and random. (benchmarks/bench_encode.py --exhaustive runs
    all 2**32 patterns.)"""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    rng = np.random.default_rng(3)
    x = np.concatenate([(high[:, None] | lows[None, :]).reshape(-1),
                        high | rng.integers(0, 1 << 16, high.size, dtype=np.uint32)]).view(np.float32)
    lim = np.float32(f.max)
    with np.errstate(invalid="ignore"):
        rule = np.clip(x, -lim, lim).astype(f.dtype).view(np.uint8)
    got = encode(x, f)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], rule[~nan])
    assert np.isnan(got[nan].view(f.dtype).astype(np.float32)).all()
    # the same through a real scale (the quotient is looked up) and from float64 input
    with np.errstate(over="ignore"):
        quotient = x[~nan] / np.float32(0.75)
    np.testing.assert_array_equal(encode(x[~nan].astype(np.float64), f, Scale.real(0.75)), encode(quotient, f))
