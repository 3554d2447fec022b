"""fp8core.bias_shift: the measured per-channel mean shift of the FP8 model is moved into the biases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from fp8core.bias_shift import correct_mean_shift
from fp8core.calibration import ArraySource
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session

K = 16


def chain(depth=3, seed=0):
    """x -> (MatMul -> Add bias -> Relu) * depth, then a Conv-free Gemm with C: every op has a bias."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(depth):
        inits += [nh.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), f"w{i}"),
                  nh.from_array(rng.standard_normal(K).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm_{i}"),
                  h.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add_{i}"),
                  h.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu_{i}")]
        prev = f"r{i}"
    inits += [nh.from_array((rng.standard_normal((K, 4)) / np.sqrt(K)).astype(np.float32), "wg"),
              nh.from_array(np.zeros(4, np.float32), "cg")]
    nodes.append(h.make_node("Gemm", [prev, "wg", "cg"], ["y"], name="gemm", beta=0.5))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["N", K])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], inits)
    return prepare_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), 21)


def test_measured_bias_correction_removes_the_mean_shift_saturation_adds():
    model = chain()
    before = model.SerializeToString()
    # activations at scale -7: F143 max 1.875, so the larger inputs saturate and every op's mean
    # output drops; the drift accumulates through the chain
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -7), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(1)
    calib = (rng.standard_normal((256, K)) + 1.0).astype(np.float32)
    held_out = (rng.standard_normal((256, K)) + 1.0).astype(np.float32)

    corrected, report = correct_mean_shift(model, plans, ArraySource(Path("c.npz"), {"x": calib}), batch_size=64,
                                            max_samples=256)
    assert model.SerializeToString() == before  # the input model is not modified
    assert {r["op"] for r in report} == {"mm_0", "mm_1", "mm_2", "gemm"}
    for row in report:
        assert len(row["shift_by_round"]) == 3
        assert row["shift_left"] < 0.2 * row["shift_by_round"][0], row

    ref = make_session(model).run(None, {"x": held_out})[0].astype(np.float64)

    def fp8_output(m):
        return make_session(rewrite_to_fp8(m, plans)).run(None, {"x": held_out})[0].astype(np.float64)

    plain, fixed = fp8_output(model), fp8_output(corrected)
    shift = lambda y: np.abs((y - ref).mean(axis=0)).max()  # noqa: E731  on samples it never saw
    assert shift(fixed) < 0.3 * shift(plain), (shift(fixed), shift(plain))
    assert np.mean((fixed - ref) ** 2) < np.mean((plain - ref) ** 2)
    # only biases changed: same names, same weights
    a = {t.name: nh.to_array(t) for t in model.graph.initializer}
    b = {t.name: nh.to_array(t) for t in corrected.graph.initializer}
    assert a.keys() == b.keys()
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    assert changed == {"b0", "b1", "b2", "cg"}


def test_nothing_to_correct_returns_the_model_itself():
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", K])], [h.make_tensor_value_info("y", T.FLOAT, ["N", K])],
                     [nh.from_array(np.eye(K, dtype=np.float32), "w")])
    model = prepare_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    x = np.ones((4, K), np.float32)
    out, report = correct_mean_shift(model, plans, ArraySource(Path("x.npz"), {"x": x}), batch_size=4)
    assert out is model and report == []
