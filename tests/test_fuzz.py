"""Property and fuzz tests (hypothesis, bounded: every test sets max_examples; the file runs in ~15 s).

1. ``formats.encode``/``decode`` vs onnxruntime ``QuantizeLinear``/``DequantizeLinear`` on arbitrary
   float32 arrays (NaN, inf, subnormals included), scales and formats, byte for byte.
2. The FP8 rewrite on random small graphs - chains and branches of Conv, MatMul, Gemm, Add, Relu,
   Reshape, initializer or Constant weights, a weight shared by two ops: the FP8 model passes the
   checker, runs through ``make_session`` and stays within an error bound derived from the format
   (see :func:`_error_bound`) of the float model.
3. Mutated and truncated model, Parquet, npz and pickle files fed to the loaders: each either loads
   or raises the module's own error class (ModelError / CalibrationDataError), never anything
   else, within a time limit.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from fp8core.calibration import CalibrationDataError, open_dataset
from fp8core.formats import FORMATS, decode, encode, get_format
from fp8core.graph import ModelError, load_model
from fp8core.modelio import validate_fp8_model
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import encode_weights, prepare_model, rewrite_to_fp8, target_opset
from fp8core.runtime import make_session, reference_session
from test_formats import _assert_same_fp8, _dequantize_session, _ort_dequantize, _ort_quantize, _quantize_session

DATA = Path(__file__).resolve().parents[1] / "data"
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------
# 1. encode/decode vs onnxruntime

_SESSIONS: dict = {}


def _sessions(name: str):
    if name not in _SESSIONS:
        f = get_format(name)
        _SESSIONS[name] = (_quantize_session(f, TensorProto.FLOAT, 21), _dequantize_session(f, TensorProto.FLOAT, 21))
    return _SESSIONS[name]


float32_arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=16),
                            elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))


# fp8 * 2**127 overflows to inf, as DequantizeLinear defines; formats.decode lets numpy warn about it
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=300, **FAST)
@given(x=float32_arrays, fmt=st.sampled_from(sorted(FORMATS)), scale=st.integers(-126, 127))
def test_encode_decode_equal_onnxruntime(x, fmt, scale):
    f = get_format(fmt)
    q_session, dq_session = _sessions(fmt)
    s = np.array(np.ldexp(1.0, scale), np.float32)
    flat = x.reshape(-1)
    ours = encode(x, fmt, scale).reshape(-1)
    _assert_same_fp8(ours, _ort_quantize(q_session, f, flat, s), f, flat, f"{fmt} scale {scale}")
    ours_back = decode(ours, fmt, scale)
    theirs_back = _ort_dequantize(dq_session, f, ours, s)
    np.testing.assert_array_equal(ours_back, theirs_back)  # NaN == NaN here


# ---------------------------------------------------------------------------------------------
# 2. random graphs
#
# A graph is a 4-D "conv stage" [N, C, H, W] (Conv, Relu, Add of an earlier tensor or a
# constant), a Reshape to [N, C*H*W], then a "dense stage" [N, D] (MatMul, Gemm, Relu, Add, a
# shape-keeping Reshape). Every op of one stage keeps the shape, so any earlier tensor of the
# stage can be a branch into an Add. Weights are initializers or Constant nodes; with
# ``share`` a MatMul reuses an earlier MatMul's weight.
#
# Error bound. Let u = 2**-(m+1) (m mantissa bits) and a = half the smallest subnormal times
# 2**s: encoding changes v by at most u*|v| + a = u*(|v| + a/u) when nothing saturates. Build the
# *magnitude model*: the same graph on |x| with every weight |W| (+ a/u where quantized), every
# quantized activation + a/u, Relu dropped (|relu(v)| <= |v|). Its value M bounds |v| of every
# tensor, and by induction over the FP8 ops (each one multiplies by at most (1+u)**2: one rounding
# of the weight, one of the input) |fp8 - float| <= ((1+u)**(2L) - 1) * M for L FP8 ops. Float32
# summation order adds a little slack. Scales are picked from M so that nothing saturates.

N, C, HW, D_SMALL = 2, 3, 4, 8


@dataclass
class _Builder:
    """Emits the float model and its magnitude model side by side."""

    rng: np.random.Generator
    a_over_u: dict[str, float]
    nodes: list = field(default_factory=list)
    mag_nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    mag_inits: list = field(default_factory=list)
    count: int = 0
    fp8_ops: int = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, as_node: bool, quantized: bool) -> str:
        name = self.name("w")
        tensor = numpy_helper.from_array(value.astype(np.float32), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=self.name("Constant_")))
        else:
            self.inits.append(tensor)
        mag = np.abs(value) + (self.a_over_u["weight"] if quantized else 0.0)
        self.mag_inits.append(numpy_helper.from_array(mag.astype(np.float32), name))
        return name

    def q_act(self, tensor: str) -> str:
        """The magnitude-model tensor that stands for a quantized activation: M + a/u."""
        out = self.name("qm")
        c = self.name("ac")
        self.mag_inits.append(numpy_helper.from_array(np.array(self.a_over_u["activation"], np.float32), c))
        self.mag_nodes.append(helper.make_node("Add", [tensor, c], [out]))
        return out

    def op(self, op_type, inputs, mag_inputs=None, fp8=False, **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(f"{op_type}_"), **attrs))
        if op_type == "Relu":
            self.mag_nodes.append(helper.make_node("Identity", inputs, [out]))
        else:
            self.mag_nodes.append(helper.make_node(op_type, mag_inputs or inputs, [out], **attrs))
        self.fp8_ops += fp8
        return out


op_choice = st.sampled_from(["main", "relu", "add_branch", "add_const"])


@st.composite
def graph_specs(draw):
    conv = draw(st.lists(st.tuples(op_choice, st.booleans(), st.integers(0, 99)), max_size=3))
    dense = draw(st.lists(st.tuples(st.sampled_from(["matmul", "gemm", "relu", "add_branch", "add_const", "reshape"]),
                                    st.booleans(), st.integers(0, 99)), min_size=1, max_size=4))
    return dict(conv=conv, dense=dense, share=draw(st.booleans()), fmt=draw(st.sampled_from(sorted(FORMATS))),
                seed=draw(st.integers(0, 2**16)))


def _build(spec, a_over_u) -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    rng = np.random.default_rng(spec["seed"])
    b = _Builder(rng, a_over_u)
    x = "x"
    stage = [x]
    for kind, flag, pick in spec["conv"]:
        cur = stage[-1]
        if kind == "main":  # Conv 3x3 pad 1 (or depthwise 1x1), optional bias
            depthwise = flag
            w_shape = (C, 1, 1, 1) if depthwise else (C, C, 3, 3)
            fan_in = 1 if depthwise else 9 * C
            w = b.const(rng.standard_normal(w_shape) / np.sqrt(fan_in), as_node=pick % 2 == 0, quantized=True)
            ins = [cur, w]
            if pick % 3 == 0:
                ins.append(b.const(rng.standard_normal(C) * 0.1, as_node=False, quantized=False))
            attrs = dict(group=C) if depthwise else dict(pads=[1, 1, 1, 1])
            stage.append(b.op("Conv", ins, [b.q_act(cur), *ins[1:]], fp8=True, **attrs))
        elif kind == "relu":
            stage.append(b.op("Relu", [cur]))
        elif kind == "add_branch":
            stage.append(b.op("Add", [cur, stage[pick % len(stage)]]))
        else:
            stage.append(b.op("Add", [cur, b.const(rng.standard_normal((C, 1, 1)), as_node=flag, quantized=False)]))
    flat = b.const(np.array([N, C * HW * HW]), as_node=False, quantized=False)
    b.inits[-1] = numpy_helper.from_array(np.array([N, C * HW * HW], np.int64), flat)
    b.mag_inits[-1] = b.inits[-1]
    stage = [b.op("Reshape", [stage[-1], flat])]
    width = C * HW * HW
    matmul_weights: list[tuple[str, int]] = []
    for kind, flag, pick in spec["dense"]:
        cur = stage[-1]
        if kind == "matmul":
            shared = [w for w in matmul_weights if w[1] == width]
            if spec["share"] and shared:
                w, out_w = shared[0][0], width
            else:
                out_w = width if flag else D_SMALL
                w = b.const(rng.standard_normal((width, out_w)) / np.sqrt(width), as_node=pick % 2 == 0, quantized=True)
                matmul_weights.append((w, width))
            stage = [b.op("MatMul", [cur, w], [b.q_act(cur), w], fp8=True)] if out_w != width else stage + [
                b.op("MatMul", [cur, w], [b.q_act(cur), w], fp8=True)]
            width = out_w
        elif kind == "gemm":
            trans_b = int(flag)
            out_w = D_SMALL if pick % 2 else width
            shape = (out_w, width) if trans_b else (width, out_w)
            w = b.const(rng.standard_normal(shape) / np.sqrt(width), as_node=pick % 3 == 0, quantized=True)
            bias = b.const(rng.standard_normal(out_w) * 0.1, as_node=False, quantized=False)
            out = b.op("Gemm", [cur, w, bias], [b.q_act(cur), w, bias], fp8=True, transB=trans_b)
            stage = stage + [out] if out_w == width else [out]
            width = out_w
        elif kind == "relu":
            stage.append(b.op("Relu", [cur]))
        elif kind == "add_branch":
            stage.append(b.op("Add", [cur, stage[pick % len(stage)]]))
        elif kind == "add_const":
            stage.append(b.op("Add", [cur, b.const(rng.standard_normal(width), as_node=flag, quantized=False)]))
        else:
            shape = b.const(np.array([0, -1]), as_node=False, quantized=False)
            b.inits[-1] = b.mag_inits[-1] = numpy_helper.from_array(np.array([0, -1], np.int64), shape)
            stage.append(b.op("Reshape", [cur, shape]))
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, C, HW, HW])]
    out = [helper.make_tensor_value_info(stage[-1], TensorProto.FLOAT, [N, width])]

    def model(nodes, inits):
        m = helper.make_model(helper.make_graph(nodes, "fuzz", inp, out, inits), opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        return m

    return model(b.nodes, b.inits), model(b.mag_nodes, b.mag_inits), b.fp8_ops


def _max_magnitudes(mag_model: onnx.ModelProto, x_abs: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(largest quantized-activation magnitude, largest weight magnitude, output magnitude)."""
    every = onnx.ModelProto()
    every.CopyFrom(mag_model)
    listed = {o.name for o in every.graph.output}
    for node in every.graph.node:
        if node.output[0].startswith("qm") and node.output[0] not in listed:
            every.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    values = reference_session(every).run(None, {"x": x_abs})
    acts = max((float(v.max()) for v in values[1:]), default=0.0)
    weights = max((float(np.abs(numpy_helper.to_array(t)).max()) for t in every.graph.initializer
                   if t.name.startswith("w") and t.data_type == TensorProto.FLOAT), default=0.0)
    return acts, weights, values[0]


def _scale_for(magnitude: float, fmt_max: float) -> int:
    """Smallest integer s with magnitude <= fmt_max * 2**s."""
    return int(np.ceil(np.log2(max(magnitude, 1e-30) / fmt_max)))


@settings(max_examples=200, **FAST)
@given(spec=graph_specs())
def test_random_graph_fp8_is_valid_and_within_the_format_bound(spec):
    f = get_format(spec["fmt"])
    u = 2.0 ** -(f.mantissa_bits + 1)
    x = np.random.default_rng(spec["seed"]).standard_normal((N, C, HW, HW)).astype(np.float32)
    model, mag0, fp8_ops = _build(spec, {"weight": 0.0, "activation": 0.0})
    growth = (1 + u) ** (2 * fp8_ops)
    # Scales from the magnitudes (x2 headroom for the error terms), then the bound with their a/u.
    act0, w0, _ = _max_magnitudes(mag0, np.abs(x))
    s_act, s_w = _scale_for(2 * growth * act0, f.max), _scale_for(2 * w0, f.max)
    a_over_u = {k: f.min_subnormal * 2.0**s / 2 / u for k, s in (("activation", s_act), ("weight", s_w))}
    model, mag, _ = _build(spec, a_over_u)
    act, w, m_out = _max_magnitudes(mag, np.abs(x))
    assume(growth * act <= f.max * 2.0**s_act and w <= f.max * 2.0**s_w)  # nothing saturates

    prepared = prepare_model(model, target_opset(model, None))
    plans = plan_fp8_ops(prepared, "fp8", [], QuantParams(f.name, s_act), QuantParams(f.name, s_w))
    assert sum(p.fp8 for p in plans) == fp8_ops
    fp8 = rewrite_to_fp8(prepared, plans, encode_weights(prepared, plans))
    validate_fp8_model(fp8, {"x": x})  # checker (full) + onnxruntime
    got = make_session(fp8).run(None, {"x": x})[0]
    want = reference_session(model).run(None, {"x": x})[0]
    bound = (growth - 1) * m_out + 1e-5 * m_out + 1e-6
    excess = np.abs(got.astype(np.float64) - want) - bound
    assert excess.max() <= 0, f"{spec}: error exceeds the format bound by {excess.max():.3g}"


def test_the_bound_catches_a_wrong_weight_scale():
    """The same bound fails when the FP8 weights are decoded with a scale one off."""
    spec = dict(conv=[], dense=[("matmul", True, 1)], share=False, fmt="F143", seed=3)
    f = get_format("F143")
    u = 2.0 ** -(f.mantissa_bits + 1)
    x = np.random.default_rng(3).standard_normal((N, C, HW, HW)).astype(np.float32)
    model, mag, _ = _build(spec, {"weight": 0.0, "activation": 0.0})
    _, _, m_out = _max_magnitudes(mag, np.abs(x))
    prepared = prepare_model(model, 21)
    plans = plan_fp8_ops(prepared, "fp8", [], QuantParams("F143", 0), QuantParams("F143", -4))
    fp8 = rewrite_to_fp8(prepared, plans, encode_weights(prepared, plans))
    weight_scales = [t for t in fp8.graph.initializer if t.name.endswith("_scale") and t.name.startswith("w")]
    assert weight_scales
    for t in weight_scales:
        t.CopyFrom(numpy_helper.from_array(np.array(2.0**-3, np.float32), t.name))
    got = make_session(fp8).run(None, {"x": x})[0]
    want = reference_session(model).run(None, {"x": x})[0]
    assert (np.abs(got - want) > ((1 + u) ** 2 - 1) * m_out + 1e-5 * m_out + 1e-6).any()


# ---------------------------------------------------------------------------------------------
# 3. damaged files


@contextlib.contextmanager
def _time_limit(seconds: int):
    """A hang becomes a test failure (SIGALRM interrupts the loader)."""
    def _raise(signum, frame):
        raise TimeoutError(f"loader did not finish in {seconds} s")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("splice"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
)


def _damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "flip":
        out = bytearray(data)
        for pos, xor in arg:
            out[int(pos * len(out))] ^= xor
        return bytes(out)
    pos, blob = arg
    i = int(pos * len(data))
    return data[:i] + blob + data[i + len(blob):]


def _read_all(path: Path) -> None:
    source = open_dataset(path)
    for _ in source.iter_batches(7):
        pass


MODEL_BYTES = (DATA / "demo_model.onnx").read_bytes()
PARQUET_BYTES = (DATA / "calib.parquet").read_bytes()
NPZ_BYTES = (DATA / "calib.npz").read_bytes()


def _pickle_bytes() -> bytes:
    with np.load(DATA / "calib.npz") as z:
        arrays = {k: z[k][:8] for k in z.files}
    buf = io.BytesIO()
    pickle.dump(arrays, buf, protocol=4)
    return buf.getvalue()


PICKLE_BYTES = _pickle_bytes()


@settings(max_examples=150, **FAST)
@given(how=damage)
def test_damaged_model_file_is_a_model_error(tmp_path_factory, how):
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    path.write_bytes(_damaged(MODEL_BYTES, how))
    with _time_limit(20):
        try:
            load_model(path)
        except ModelError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize("suffix, data", [(".parquet", PARQUET_BYTES), (".npz", NPZ_BYTES), (".pkl", PICKLE_BYTES)],
                         ids=["parquet", "npz", "pickle"])
@settings(max_examples=150, **FAST)
@given(how=damage)
# Found by CI: a flipped byte inside an .npy header makes numpy's header parser raise
# tokenize.TokenError, which is neither ValueError nor OSError.
@example(how=("flip", [(0.056640625, 9)]))
def test_damaged_calibration_file_is_a_calibration_error(tmp_path_factory, suffix, data, how):
    path = tmp_path_factory.mktemp("d") / f"calib{suffix}"
    path.write_bytes(_damaged(data, how))
    with _time_limit(20):
        try:
            _read_all(path)
        except CalibrationDataError as exc:
            assert "\n" not in str(exc)
