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


def shared_weight(seed=0, opset=21):
    """One weight read by two MatMuls and by an Add (which must keep the float copy)."""
    rng = np.random.default_rng(seed)
    w = _w(rng, (16, 16))
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"),
        h.make_node("MatMul", ["a", "w"], ["b"], name="mm_b"),
        h.make_node("Add", ["b", "w"], ["y"], name="add_w"),
    ]
    x = h.make_tensor_value_info("x", T.FLOAT, [16, 16])
    y = h.make_tensor_value_info("y", T.FLOAT, [16, 16])
    return _model(nodes, [x], [y], [nh.from_array(w, "w")], opset)
