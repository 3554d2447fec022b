"""Small graphs shaped like real exports, one per way real models broke the converter (issue 9).

Each builder returns ``(model, calibration data)``: the data as ``fp8-convert`` reads it, one
row per sample with the batch axis removed (an input with no batch axis: its value per sample).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

SAMPLES = 12


def _w(rng, shape, scale=0.3, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _model(nodes, inputs, outputs, inits, opset, check=True):
    m = h.make_model(h.make_graph(nodes, "real_like", inputs, outputs, inits),
                     opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 7 if opset < 15 else 8
    if check:
        onnx.checker.check_model(m)
    return m


def if_branches():
    """``If(sr == 16000)`` with a Conv in each branch: the then-branch's weight is an outer-scope
    initializer, the else-branch's a Constant inside the body, and its input is computed inside
    the branch; ``sr`` is a scalar input (no batch axis), as in a streaming voice-activity model.
    The calibration data takes both branches (a batch of 6 holds one sample rate)."""
    rng = np.random.default_rng(1)
    w_then, w_else = _w(rng, (4, 3, 3, 3)), _w(rng, (4, 3, 3, 3))
    then_g = h.make_graph([h.make_node("Conv", ["x", "w_then"], ["c_then"], pads=[1, 1, 1, 1]),
                           h.make_node("Relu", ["c_then"], ["y_then"])], "then", [],
                          [h.make_tensor_value_info("y_then", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Constant", [], ["w_else"], value=nh.from_array(w_else, "w_else_value")),
                           h.make_node("Neg", ["x"], ["x_neg"]),  # computed in the branch: captured only if it runs
                           h.make_node("Conv", ["x_neg", "w_else"], ["c_else"], pads=[1, 1, 1, 1]),
                           h.make_node("Sigmoid", ["c_else"], ["y_else"])], "else", [],
                          [h.make_tensor_value_info("y_else", T.FLOAT, None)])
    nodes = [h.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             h.make_node("If", ["is16k"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8]),
                       h.make_tensor_value_info("sr", T.INT64, [])],
               [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])],
               [nh.from_array(w_then, "w_then"), nh.from_array(np.array(16000, np.int64), "sr16k")], 16)
    data = {"x": rng.standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32),
            "sr": np.repeat(np.array([16000, 8000], np.int64), SAMPLES // 2)}
    return m, data


def resize_opset11():
    """Opset 11: Conv -> Resize (scales form) -> Conv -> Resize (sizes form, from Shape) -> Conv."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array(_w(rng, (4, 3, 3, 3)), "w1"), nh.from_array(_w(rng, (4, 4, 3, 3)), "w2"),
             nh.from_array(_w(rng, (2, 4, 1, 1)), "w3"),
             nh.from_array(np.array([], np.float32), "roi"), nh.from_array(np.array([], np.float32), "no_scales"),
             nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([2], np.int64), "two"),
             nh.from_array(np.array([24, 24], np.int64), "hw")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["a"], ["a1"]),
             h.make_node("Resize", ["a1", "roi", "scales"], ["b"], mode="nearest"),
             h.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Shape", ["c"], ["c_shape"]),
             h.make_node("Slice", ["c_shape", "zero", "two"], ["nc"]),
             h.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             h.make_node("Resize", ["c", "roi", "no_scales", "sizes"], ["d"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
             h.make_node("Conv", ["d", "w3"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 6, 6])],
               [h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 24, 24])], inits, 11)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 6, 6)).astype(np.float32)}


def upsample_opset9():
    """Opset 9: Conv -> Upsample (nearest, scales input) -> Conv, as old exporters wrote."""
    rng = np.random.default_rng(3)
    inits = [nh.from_array(_w(rng, (4, 3, 3, 3)), "w1"), nh.from_array(_w(rng, (2, 4, 3, 3)), "w2"),
             nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             h.make_node("Upsample", ["a", "scales"], ["b"], mode="nearest"),
             h.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 6, 6])],
               [h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 12, 12])], inits, 9)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 6, 6)).astype(np.float32)}


def crnn_bad_declared_shape():
    """Conv1d -> LSTM -> Reshape -> MatMul with a fixed batch of 1, at opset 12, whose declared
    output shape has rank 2 where the graph makes rank 3 (as a real CRNN export does)."""
    rng = np.random.default_rng(4)
    hidden = 8
    inits = [nh.from_array(_w(rng, (8, 4, 3)), "wc"),
             nh.from_array(_w(rng, (1, 4 * hidden, 8)), "W"), nh.from_array(_w(rng, (1, 4 * hidden, hidden)), "R"),
             nh.from_array(np.array([0, 0, -1], np.int64), "shape3"), nh.from_array(_w(rng, (hidden, 5)), "wo")]
    nodes = [h.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1]),
             h.make_node("Relu", ["c"], ["c1"]),
             h.make_node("Transpose", ["c1"], ["seq"], perm=[2, 0, 1]),
             h.make_node("LSTM", ["seq", "W", "R"], ["Y"], hidden_size=hidden),
             h.make_node("Reshape", ["Y", "shape3"], ["Y3"]),
             h.make_node("MatMul", ["Y3", "wo"], ["logits"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 4, "T"])],
               [h.make_tensor_value_info("logits", T.FLOAT, ["T", 5])], inits, 12, check=False)
    return m, {"x": rng.standard_normal((SAMPLES, 4, 16)).astype(np.float32)}


def minus_one_dims():
    """A classifier whose input dims are stored as -1 (Paddle exports): Conv -> pool -> Gemm."""
    rng = np.random.default_rng(5)
    inits = [nh.from_array(_w(rng, (6, 3, 3, 3)), "w1"), nh.from_array(_w(rng, (4, 6)), "w2"),
             nh.from_array(_w(rng, (4,), 0.1), "b2")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["a"], ["a1"]),
             h.make_node("GlobalAveragePool", ["a1"], ["p"]),
             h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    x = h.make_tensor_value_info("x", T.FLOAT, [1, 3, 1, 1])
    for d in x.type.tensor_type.shape.dim:
        d.dim_value = -1
    for i in (1,):
        x.type.tensor_type.shape.dim[i].dim_value = 3
    m = _model(nodes, [x], [h.make_tensor_value_info("y", T.FLOAT, [-1, 4])], inits, 11, check=False)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 10, 10)).astype(np.float32)}


def fixed_batch_one():
    """Exported with a fixed batch of 1 (the most common export): Conv -> Relu -> Conv."""
    rng = np.random.default_rng(6)
    inits = [nh.from_array(_w(rng, (4, 3, 3, 3)), "w1"), nh.from_array(_w(rng, (2, 4, 3, 3)), "w2")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["a"], ["a1"]),
             h.make_node("Conv", ["a1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
               [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 8, 8])], inits, 13)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32)}


def state_batch_axis_one():
    """A recurrent step: ``x[N, 16]``, ``state[2, N, 8]`` (batch on axis 1) and a scalar ``sr``.
    ``h = x W1 + state[0] * sr / 16000``; outputs ``h W2`` and the new state ``[h, state[1]]``."""
    rng = np.random.default_rng(7)
    inits = [nh.from_array(_w(rng, (16, 8)), "w1"), nh.from_array(_w(rng, (8, 4)), "w2"),
             nh.from_array(np.array(0, np.int64), "i0"), nh.from_array(np.array(1, np.int64), "i1"),
             nh.from_array(np.array([0], np.int64), "ax0"), nh.from_array(np.array(16000.0, np.float32), "k")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["xw"]),
             h.make_node("Gather", ["state", "i0"], ["s0"], axis=0),
             h.make_node("Gather", ["state", "i1"], ["s1"], axis=0),
             h.make_node("Cast", ["sr"], ["srf"], to=T.FLOAT),
             h.make_node("Div", ["srf", "k"], ["gain"]),
             h.make_node("Mul", ["s0", "gain"], ["s0g"]),
             h.make_node("Add", ["xw", "s0g"], ["hid"]),
             h.make_node("Tanh", ["hid"], ["ht"]),
             h.make_node("MatMul", ["ht", "w2"], ["y"]),
             h.make_node("Unsqueeze", ["ht", "ax0"], ["hu"]),
             h.make_node("Unsqueeze", ["s1", "ax0"], ["s1u"]),
             h.make_node("Concat", ["hu", "s1u"], ["new_state"], axis=0)]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 16]),
                       h.make_tensor_value_info("state", T.FLOAT, [2, "batch", 8]),
                       h.make_tensor_value_info("sr", T.INT64, [])],
               [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4]),
                h.make_tensor_value_info("new_state", T.FLOAT, [2, "batch", 8])], inits, 16)
    data = {"x": rng.standard_normal((SAMPLES, 16)).astype(np.float32),
            "state": rng.standard_normal((SAMPLES, 2, 8)).astype(np.float32),
            "sr": np.full(SAMPLES, 16000, np.int64)}
    return m, data


def float16_cnn():
    """An FP16 model (weights, activations and outputs float16): Conv -> Relu -> Conv -> MatMul."""
    rng = np.random.default_rng(8)
    f16 = np.float16
    inits = [nh.from_array(_w(rng, (4, 3, 3, 3), dtype=f16), "w1"), nh.from_array(_w(rng, (4, 4, 3, 3), dtype=f16), "w2"),
             nh.from_array(_w(rng, (8, 5), dtype=f16), "w3")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["a"], ["a1"]),
             h.make_node("Conv", ["a1", "w2"], ["b"], pads=[1, 1, 1, 1]),
             h.make_node("MatMul", ["b", "w3"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT16, ["N", 3, 8, 8])],
               [h.make_tensor_value_info("y", T.FLOAT16, ["N", 4, 8, 5])], inits, 17)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 8, 8)).astype(f16)}


def conv_integer():
    """Already quantized (as onnxruntime's quantize_dynamic writes it): DynamicQuantizeLinear ->
    ConvInteger -> Cast -> Mul, then one float MatMul that can still become FP8."""
    rng = np.random.default_rng(9)
    wq = rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8)
    inits = [nh.from_array(wq, "wq"), nh.from_array(np.array(128, np.uint8), "wzp"),
             nh.from_array(np.array(0.01, np.float32), "wscale"), nh.from_array(_w(rng, (8, 6)), "w2")]
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
             h.make_node("ConvInteger", ["xq", "wq", "xzp", "wzp"], ["ci"], pads=[1, 1, 1, 1]),
             h.make_node("Cast", ["ci"], ["cf"], to=T.FLOAT),
             h.make_node("Mul", ["xs", "wscale"], ["sc"]),
             h.make_node("Mul", ["cf", "sc"], ["deq"]),
             h.make_node("MatMul", ["deq", "w2"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
               [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 6])], inits, 13)
    return m, {"x": rng.standard_normal((SAMPLES, 3, 8, 8)).astype(np.float32)}


def loop_body_matmul():
    """A ``Loop`` (3 iterations) whose body multiplies the carried state by an outer-scope weight:
    ``h <- tanh(h W)``, then a top-level MatMul head."""
    rng = np.random.default_rng(10)
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]),
         h.make_node("MatMul", ["h_in", "w_loop"], ["hw"]),
         h.make_node("Tanh", ["hw"], ["h_out"])], "body",
        [h.make_tensor_value_info("iter", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("h_in", T.FLOAT, None)],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("h_out", T.FLOAT, None)])
    inits = [nh.from_array(_w(rng, (8, 8), 0.5), "w_loop"), nh.from_array(_w(rng, (8, 3)), "w_head"),
             nh.from_array(np.array(3, np.int64), "trips"), nh.from_array(np.array(True), "go")]
    nodes = [h.make_node("Loop", ["trips", "go", "x"], ["h_final"], body=body),
             h.make_node("MatMul", ["h_final", "w_head"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
               [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])], inits, 16)
    return m, {"x": rng.standard_normal((SAMPLES, 8)).astype(np.float32)}


def sklearn_zipmap(string_labels: bool = False):
    """As skl2onnx exports a scikit-learn MLP classifier: a Scaler (``ai.onnx.ml``), two MatMuls,
    then an int64 label output (ArgMax) and the probabilities as a sequence of maps (ZipMap), the
    default of its exporter: no output of the model is a float tensor. ``string_labels``: classes
    named by strings, as a classifier fitted on string targets exports them (the label looked up
    by ArrayFeatureExtractor, the maps keyed by the names)."""
    rng = np.random.default_rng(11)
    inits = [nh.from_array(_w(rng, (16, 32)), "w1"), nh.from_array(_w(rng, (32,), 0.1), "b1"),
             nh.from_array(_w(rng, (32, 5)), "w2")]
    nodes = [h.make_node("Scaler", ["x"], ["xs"], domain="ai.onnx.ml", offset=[0.5] * 16, scale=[2.0] * 16),
             h.make_node("MatMul", ["xs", "w1"], ["h1"]), h.make_node("Add", ["h1", "b1"], ["h2"]),
             h.make_node("Relu", ["h2"], ["h3"]), h.make_node("MatMul", ["h3", "w2"], ["logits"]),
             h.make_node("Softmax", ["logits"], ["probs"], axis=1),
             h.make_node("ArgMax", ["probs"], ["index_2d"], axis=1, keepdims=1)]
    inits.append(nh.from_array(np.array([-1], np.int64), "flat"))
    if string_labels:
        names = ["cat", "dog", "emu", "fox", "gnu"]
        inits.append(h.make_tensor("classes", T.STRING, [5], [n.encode() for n in names]))
        nodes += [h.make_node("ArrayFeatureExtractor", ["classes", "index_2d"], ["label_2d"], domain="ai.onnx.ml"),
                  h.make_node("Reshape", ["label_2d", "flat"], ["label"]),
                  h.make_node("ZipMap", ["probs"], ["probability"], domain="ai.onnx.ml", classlabels_strings=names)]
    else:
        nodes += [h.make_node("Reshape", ["index_2d", "flat"], ["label"]),
                  h.make_node("ZipMap", ["probs"], ["probability"], domain="ai.onnx.ml",
                              classlabels_int64s=list(range(5)))]
    key, label_type = (T.STRING, T.STRING) if string_labels else (T.INT64, T.INT64)
    seq_map = h.make_sequence_type_proto(h.make_map_type_proto(key, h.make_tensor_type_proto(T.FLOAT, None)))
    graph = h.make_graph(nodes, "skl2onnx_like", [h.make_tensor_value_info("x", T.FLOAT, [None, 16])],
                         [h.make_tensor_value_info("label", label_type, [None]),
                          h.make_value_info("probability", seq_map)], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 15), h.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m, {"x": rng.random((SAMPLES, 16)).astype(np.float32)}


CATEGORIES = ["red", "green", "blue", "cyan", "gray"]


def sklearn_string_input():
    """A model that reads text: four categorical columns as an ONNX string tensor ``[N, 4]``, each
    category mapped to a number by LabelEncoder (``ai.onnx.ml``) before an MLP, as skl2onnx
    exports a pipeline fitted on string features (a text pipeline's StringNormalizer needs the
    machine's en_US locale in onnxruntime, so a lookup stands in for it). Calibration data: a
    numpy str array."""
    rng = np.random.default_rng(12)
    inits = [nh.from_array(_w(rng, (4, 16)), "w1"), nh.from_array(_w(rng, (16,), 0.1), "b1"),
             nh.from_array(_w(rng, (16, 3)), "w2")]
    nodes = [h.make_node("LabelEncoder", ["text"], ["codes"], domain="ai.onnx.ml", keys_strings=CATEGORIES,
                         values_floats=[0.1, 0.7, -0.4, 1.3, -1.1], default_float=0.0),
             h.make_node("MatMul", ["codes", "w1"], ["h1"]), h.make_node("Add", ["h1", "b1"], ["h2"]),
             h.make_node("Relu", ["h2"], ["h3"]), h.make_node("MatMul", ["h3", "w2"], ["y"])]
    graph = h.make_graph(nodes, "string_features", [h.make_tensor_value_info("text", T.STRING, [None, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [None, 3])], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 15), h.make_opsetid("ai.onnx.ml", 2)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m, {"text": rng.choice(CATEGORIES, (SAMPLES, 4))}


def sklearn_zipmap_strings():
    """:func:`sklearn_zipmap` with classes named by strings."""
    return sklearn_zipmap(string_labels=True)


ALL = {f.__name__: f for f in (sklearn_zipmap, sklearn_zipmap_strings, sklearn_string_input, if_branches, resize_opset11, upsample_opset9, crnn_bad_declared_shape,
                               minus_one_dims, fixed_batch_one, state_batch_axis_one, float16_cnn, conv_integer,
                               loop_body_matmul)}
