"""Small hand-built ONNX models for tests: each exercises one case of SPEC section 3."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _model(nodes, inputs, outputs, inits, opset=17, ir=None):
    g = h.make_graph(nodes, "test", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    if ir:
        m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def _w(rng, shape, scale=0.3, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def cnn(seed=0, opset=17, dtype=np.float32, batch="N", constant_weight=False, names=False):
    """Conv -> Relu -> depthwise Conv (group=8) -> Clip -> Reshape -> Gemm(transB) -> MatMul."""
    rng = np.random.default_rng(seed)
    et = T.FLOAT16 if dtype == np.float16 else T.FLOAT
    w1, b1 = _w(rng, (8, 3, 3, 3), dtype=dtype), _w(rng, (8,), 0.1, dtype)
    w2 = _w(rng, (8, 1, 3, 3), dtype=dtype)
    w3, b3 = _w(rng, (16, 8 * 4 * 4), 0.05, dtype), _w(rng, (16,), 0.1, dtype)
    w4 = _w(rng, (16, 10), 0.3, dtype)
    inits = [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w3, "w3"),
             nh.from_array(b3, "b3"), nh.from_array(w4, "w4"),
             nh.from_array(np.array([0, -1], np.int64), "shape"),
             nh.from_array(np.array(0, dtype), "lo"), nh.from_array(np.array(6, dtype), "hi")]
    nodes = []
    if constant_weight:
        nodes.append(h.make_node("Constant", [], ["w2"], value=nh.from_array(w2, "w2c")))
    else:
        inits.append(nh.from_array(w2, "w2"))
    nm = (lambda s: s) if names else (lambda s: "")
    nodes += [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=nm("first_conv")),
        h.make_node("Relu", ["c1"], ["r1"], name=nm("relu")),
        h.make_node("Conv", ["r1", "w2"], ["c2"], group=8, name=nm("dw_conv")),
        h.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name=nm("clip")),
        h.make_node("Reshape", ["r2", "shape"], ["f"], name=nm("flatten")),
        h.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1, name=nm("fc")),
        h.make_node("MatMul", ["g", "w4"], ["y"], name=nm("head")),
    ]
    x = h.make_tensor_value_info("x", et, [batch, 3, 8, 8])
    y = h.make_tensor_value_info("y", et, [batch, 10])
    return _model(nodes, [x], [y], inits, opset)


def attention(seed=0, opset=17):
    """MatMul with two activation inputs (q @ k^T), Softmax, then MatMul with v; Gemm transA."""
    rng = np.random.default_rng(seed)
    wq, wk, wv = (_w(rng, (16, 16)) for _ in range(3))
    wo = _w(rng, (8, 16))  # Gemm with transA on a [16, 8] activation
    inits = [nh.from_array(wq, "wq"), nh.from_array(wk, "wk"), nh.from_array(wv, "wv"), nh.from_array(wo, "wo")]
    nodes = [
        h.make_node("MatMul", ["x", "wq"], ["q"]),
        h.make_node("MatMul", ["x", "wk"], ["k"]),
        h.make_node("MatMul", ["x", "wv"], ["v"]),
        h.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        h.make_node("MatMul", ["q", "kt"], ["s"]),
        h.make_node("Softmax", ["s"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "v"], ["o"]),
        h.make_node("Transpose", ["o"], ["ot"], perm=[1, 0]),
        h.make_node("Gemm", ["ot", "wo"], ["y"], transA=1, transB=1),
    ]
    x = h.make_tensor_value_info("x", T.FLOAT, [8, 16])
    y = h.make_tensor_value_info("y", T.FLOAT, [8, 8])
    return _model(nodes, [x], [y], inits, opset)


def shared_weight(seed=0, opset=21, float_reader=True):
    """One weight read by two MatMuls and (``float_reader``) by an Add, which must keep the float copy."""
    rng = np.random.default_rng(seed)
    w = _w(rng, (16, 16))
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"),
        h.make_node("MatMul", ["a", "w"], ["b" if float_reader else "y"], name="mm_b"),
    ]
    if float_reader:
        nodes.append(h.make_node("Add", ["b", "w"], ["y"], name="add_w"))
    x = h.make_tensor_value_info("x", T.FLOAT, [16, 16])
    y = h.make_tensor_value_info("y", T.FLOAT, [16, 16])
    return _model(nodes, [x], [y], [nh.from_array(w, "w")], opset)


def matmul_chain(size=512, depth=3, seed=0, opset=21):
    """x @ w0 @ w1 @ ...: a weight-dominated model (``depth`` float32 ``size x size`` weights)."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(_w(rng, (size, size), 1 / np.sqrt(size)), f"w{i}") for i in range(depth)]
    names = ["x"] + [f"h{i}" for i in range(depth - 1)] + ["y"]
    nodes = [h.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(depth)]
    x = h.make_tensor_value_info("x", T.FLOAT, [4, size])
    y = h.make_tensor_value_info("y", T.FLOAT, [4, size])
    return _model(nodes, [x], [y], inits, opset)


def mixed_names(seed=0, opset=17):
    """Named and unnamed nodes; a named node already called ``MatMul_2`` (the name node 2 would get)."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(_w(rng, (8, 8)), f"w{i}") for i in range(3)]
    nodes = [
        h.make_node("MatMul", ["x", "w0"], ["a"]),
        h.make_node("Relu", ["a"], ["b"], name="my_relu"),
        h.make_node("MatMul", ["b", "w1"], ["c"]),
        h.make_node("MatMul", ["c", "w2"], ["d"], name="MatMul_2"),
        h.make_node("Neg", ["d"], ["y"]),
    ]
    x = h.make_tensor_value_info("x", T.FLOAT, [8, 8])
    y = h.make_tensor_value_info("y", T.FLOAT, [8, 8])
    return _model(nodes, [x], [y], inits, opset)


def if_reads_weight(seed=0, opset=21):
    """A MatMul weight that an If branch also reads from the outer scope (so its float copy stays)."""
    rng = np.random.default_rng(seed)
    w = _w(rng, (8, 8))
    then = h.make_graph([h.make_node("Add", ["a", "w"], ["t"])], "then", [],
                        [h.make_tensor_value_info("t", T.FLOAT, [8, 8])])
    other = h.make_graph([h.make_node("Identity", ["a"], ["e"])], "else", [],
                         [h.make_tensor_value_info("e", T.FLOAT, [8, 8])])
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             h.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="branch")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [8, 8]), h.make_tensor_value_info("cond", T.BOOL, [])]
    y = h.make_tensor_value_info("y", T.FLOAT, [8, 8])
    return _model(nodes, inputs, [y], [nh.from_array(w, "w")], opset)


# --- exact-arithmetic graphs for comparing onnxruntime optimization levels bit for bit ----------
#
# Optimized kernels re-associate float sums, and a one-ulp difference before a QuantizeLinear can
# flip an FP8 rounding. These graphs make every sum exact: inputs are small integers, weights are
# integers in [-3, 3] (exact in every FP8 format), biases are multiples of 1/4, and with FP8 scale
# 0 every quantized activation is a multiple of 1/4 below 2**8. Every partial sum is then a
# multiple of 1/4 below 2**15, exact in float32 in any order, so any correct evaluation order gives
# identical bits, and the FP8 roundings (values above 16 are rounded, above 240 saturate in F143)
# happen on identical inputs.

EXACT_ACTIVATION_SCALE = 0  # scales at which the sums above stay exact
EXACT_WEIGHT_SCALE = 0


def exact_input(shape, seed=0, low=-4, high=4):
    """Integer-valued float32 input in [low, high]."""
    return np.random.default_rng(seed).integers(low, high + 1, shape).astype(np.float32)


def _int_weight(rng, shape):
    return rng.integers(-3, 4, shape).astype(np.float32)


def _quarter_bias(rng, n):
    # odd multiples of 1/4 included, so rounding a bias to an integer changes it
    return (rng.integers(-8, 9, n) / 4 + 0.25).astype(np.float32)


def exact_conv_relu(seed=0, opset=17):
    """Conv(+bias) -> Relu -> Conv(+bias): a Relu right before an FP8 op's QuantizeLinear."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(_int_weight(rng, (4, 2, 3, 3)), "w1"), nh.from_array(_quarter_bias(rng, 4), "b1"),
             nh.from_array(_int_weight(rng, (3, 4, 3, 3)), "w2"), nh.from_array(_quarter_bias(rng, 3), "b2")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 2, 6, 6])
    y = h.make_tensor_value_info("y", T.FLOAT, [1, 3, 4, 4])
    return _model(nodes, [x], [y], inits, opset)


def exact_conv_clip(seed=0, opset=17):
    """Conv(+bias) -> Clip(0, 6) (ReLU6) -> Conv(+bias): a Clip right before an FP8 op."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(_int_weight(rng, (4, 2, 3, 3)), "w1"), nh.from_array(_quarter_bias(rng, 4), "b1"),
             nh.from_array(_int_weight(rng, (3, 4, 3, 3)), "w2"), nh.from_array(_quarter_bias(rng, 3), "b2"),
             nh.from_array(np.array(0, np.float32), "lo"), nh.from_array(np.array(6, np.float32), "hi")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             h.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 2, 6, 6])
    y = h.make_tensor_value_info("y", T.FLOAT, [1, 3, 4, 4])
    return _model(nodes, [x], [y], inits, opset)


def exact_matmul_reshape(seed=0, opset=17):
    """MatMul -> Reshape -> Gemm(transB, +bias): a Reshape between two FP8 ops."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(_int_weight(rng, (8, 8)), "w1"),
             nh.from_array(np.array([4, 16], np.int64), "shape"),
             nh.from_array(_int_weight(rng, (5, 16)), "w2"), nh.from_array(_quarter_bias(rng, 5), "b2")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]),
             h.make_node("Reshape", ["a", "shape"], ["r"]),
             h.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    x = h.make_tensor_value_info("x", T.FLOAT, [8, 8])
    y = h.make_tensor_value_info("y", T.FLOAT, [4, 5])
    return _model(nodes, [x], [y], inits, opset)


def outlier_chain(depth=16, bad=None, size=16, seed=7, opset=21):
    """x -> (MatMul -> Relu) * depth, weights ~ N(0, 1/sqrt(size)). Op ``bad`` (if any; an index or
    several) reads its input through a Mul by ``s`` (channel 3 by 1e4, the others by 1e-2) and has
    its weight rows divided by ``s``: the float model computes the same, but that op's input and
    weight each span 1e6, more than FP8's range (E4M3: ~2^17) holds with any per-tensor scale, so
    that op alone carries most of the FP8 model's output noise whatever the scale search does (with
    several, each a part)."""
    rng = np.random.default_rng(seed)
    bads = () if bad is None else (bad,) if isinstance(bad, int) else tuple(bad)
    inits, nodes, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
        if i in bads:
            s = np.full(size, 1e-2, np.float32)
            s[3] = 1e4
            w = (w / s[:, None]).astype(np.float32)
            inits.append(nh.from_array(s, f"s{i}"))
            nodes.append(h.make_node("Mul", [prev, f"s{i}"], [f"spread{i}"], name=f"spread_{i}"))
            prev = f"spread{i}"
        inits.append(nh.from_array(w, f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm_{i}"))
        out = "y" if i == depth - 1 else f"r{i}"
        nodes.append(h.make_node("Relu", [f"m{i}"], [out], name=f"relu_{i}"))
        prev = out
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", size])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", size])], inits, opset)


def outlier_branches(branches=10, bad=(1, 4, 6, 8), size=16, seed=7, opset=21):
    """y = sum over branches of Relu(x W_i), weights ~ N(0, 1/sqrt(size)). Each ``bad`` branch reads
    x through ``outlier_chain``'s spreading Mul, so its FP8 output is mostly noise; bad branch j
    (in the order given) has its weight multiplied by 1 + j / 2, so each carries its own share of
    the output noise, the last the largest (keeping one alone removes 14%, 27%, 48% and 54% of it)."""
    rng = np.random.default_rng(seed)
    inits, nodes, outs = [], [], []
    for i in range(branches):
        w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
        prev = "x"
        if i in bad:
            s = np.full(size, 1e-2, np.float32)
            s[3] = 1e4
            w = (w * (1 + bad.index(i) / 2) / s[:, None]).astype(np.float32)
            inits.append(nh.from_array(s, f"s{i}"))
            nodes.append(h.make_node("Mul", ["x", f"s{i}"], [f"spread{i}"], name=f"spread_{i}"))
            prev = f"spread{i}"
        inits.append(nh.from_array(w, f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm_{i}"))
        nodes.append(h.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu_{i}"))
        outs.append(f"r{i}")
    nodes.append(h.make_node("Sum", outs, ["y"], name="sum"))
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", size])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", size])], inits, opset)


def cancelling_branches(size=16, seed=7, opset=21):
    """y = Relu(x' W_a) + Relu(x' W_b) - Relu(x' W_c) + the sum of five plain branches Relu(x W_i),
    with x' ``outlier_chain``'s spread input (its FP8 encoding mostly noise) and W_c = W_b = 3 W_a.
    In FP8, b's and c's errors are identical and cancel, so all the output noise is a's: keeping
    mm_a alone removes nearly all of it, while keeping mm_a with mm_b (or mm_b alone) lets c's
    error through, 9 times a's. MatMuls in graph order: mm_a, mm_b, three plain, mm_c last, so
    each half of the ops holds one of the cancelling pair and removes nothing: group testing
    drops both halves and finds no op; measuring each op alone finds mm_a."""
    rng = np.random.default_rng(seed)
    s = np.full(size, 1e-2, np.float32)
    s[3] = 1e4
    w = (rng.standard_normal((size, size)) / np.sqrt(size) / s[:, None]).astype(np.float32)
    inits = [nh.from_array(s, "s"), nh.from_array(w, "w_a"), nh.from_array(3 * w, "w_b"),
             nh.from_array(3 * w, "w_c")]
    nodes = [h.make_node("Mul", ["x", "s"], ["spread"], name="spread")]
    for name in ("a", "b"):
        nodes += [h.make_node("MatMul", ["spread", f"w_{name}"], [f"m_{name}"], name=f"mm_{name}"),
                  h.make_node("Relu", [f"m_{name}"], [f"r_{name}"], name=f"relu_{name}")]
    plain = []
    for i in range(5):
        inits.append(nh.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), f"w{i}"))
        nodes += [h.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm_{i}"),
                  h.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu_{i}")]
        plain.append(f"r{i}")
    nodes += [h.make_node("MatMul", ["spread", "w_c"], ["m_c"], name="mm_c"),
              h.make_node("Relu", ["m_c"], ["r_c"], name="relu_c"),
              h.make_node("Sum", ["r_a", "r_b", *plain], ["ab"], name="sum"),
              h.make_node("Sub", ["ab", "r_c"], ["y"], name="sub")]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", size])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", size])], inits, opset)
