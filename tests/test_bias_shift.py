"""fp8core.bias_shift: each FP8 op's bias removes the mean output shift it adds itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from fp8core.bias_shift import correct_mean_shift
from fp8core.calibration import ArraySource
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session

K = 16


def chain(depth=6, seed=0):
    """x -> (MatMul -> Add bias -> Relu) * depth, then a Gemm with C and beta 0.5: every op has a bias."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(depth):
        inits += [nh.from_array((rng.standard_normal((K, K)) / np.sqrt(K) * 1.5).astype(np.float32), f"w{i}"),
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


def test_each_op_removes_its_own_shift_and_the_chain_stays_unbiased():
    model = chain()
    before = model.SerializeToString()
    # activations at scale -6: F143 max 3.75, so the larger inputs saturate and each op's mean
    # output drops; six ops deep the drift accumulates (float-input bias correction cannot see it:
    # 0.686 -> 0.686 here, this one 0.269)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -6), weight_params=QuantParams("F143", -5))
    rng = np.random.default_rng(1)
    calib = (rng.standard_normal((256, K)) + 1.0).astype(np.float32)
    held_out = (rng.standard_normal((512, K)) + 1.0).astype(np.float32)

    corrected, report = correct_mean_shift(model, plans, ArraySource(Path("c.npz"), {"x": calib}), batch_size=64)
    assert model.SerializeToString() == before  # the input model is not modified
    assert {r["op"] for r in report} == {f"mm_{i}" for i in range(6)} | {"gemm"}

    ref = make_session(model).run(None, {"x": held_out})[0].astype(np.float64)

    def fp8_output(m):
        return make_session(rewrite_to_fp8(m, plans)).run(None, {"x": held_out})[0].astype(np.float64)

    plain, fixed = fp8_output(model), fp8_output(corrected)
    shift = lambda y: np.abs((y - ref).mean(axis=0)).max()  # noqa: E731  on samples it never saw
    assert shift(fixed) < 0.5 * shift(plain), (shift(fixed), shift(plain))
    assert np.mean((fixed - ref) ** 2) < np.mean((plain - ref) ** 2)
    # only the biases changed, each into a new initializer read by its op alone
    readers = {n.name: list(n.input) for n in corrected.graph.node}
    assert readers["add_0"][1] == "b0_bias_corrected" and readers["gemm"][2] == "cg_bias_corrected"
    old = {t.name: nh.to_array(t) for t in model.graph.initializer}
    new = {t.name: nh.to_array(t) for t in corrected.graph.initializer}
    assert all(np.array_equal(old[n], new[n]) for n in old if n in new and n.startswith("w"))


def test_own_share_matches_a_brute_force_measurement():
    """For one op the correction is exactly E[Q(x)] @ Wq - E[x] @ W, here checked against the FP8
    and float outputs of that op alone computed with numpy from onnxruntime's quantized input."""
    model = chain(depth=1)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -7), weight_params=QuantParams("F143", -5))
    x = (np.random.default_rng(3).standard_normal((128, K)) + 1.0).astype(np.float32)
    corrected, _ = correct_mean_shift(model, plans, ArraySource(Path("c.npz"), {"x": x}), batch_size=32)
    fp8 = rewrite_to_fp8(model, plans)
    dq_x = next(n.input[0] for n in fp8.graph.node if n.name == "mm_0")
    dq_w = next(n.input[1] for n in fp8.graph.node if n.name == "mm_0")
    xq, wq = make_session(fp8, extra_outputs=[dq_x, dq_w]).run([dq_x, dq_w], {"x": x})
    w = {t.name: nh.to_array(t) for t in model.graph.initializer}["w0"].astype(np.float64)
    want_shift = xq.astype(np.float64).mean(0) @ wq.astype(np.float64) - x.astype(np.float64).mean(0) @ w
    b_new = {t.name: nh.to_array(t) for t in corrected.graph.initializer}["b0_bias_corrected"]
    b_old = {t.name: nh.to_array(t) for t in model.graph.initializer}["b0"]
    np.testing.assert_allclose(b_old - b_new, want_shift, rtol=1e-5, atol=1e-6)


def test_a_model_with_constant_nodes_is_corrected_too():
    # Constant nodes have no inputs (exported CNNs are full of them); the op lookup must skip them
    model = chain(depth=2)
    bias = next(t for t in model.graph.initializer if t.name == "b1")
    model.graph.initializer.remove(bias)
    model.graph.node.insert(0, h.make_node("Constant", [], ["b1"], value=bias, name="b1_const"))
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", -6), weight_params=QuantParams("F143", -5))
    x = (np.random.default_rng(3).standard_normal((64, K)) + 1.0).astype(np.float32)
    corrected, report = correct_mean_shift(model, plans, ArraySource(Path("c.npz"), {"x": x}), batch_size=32)
    assert {r["op"] for r in report} >= {"mm_0", "gemm"}


def test_nothing_to_correct_returns_the_model_itself():
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", K])], [h.make_tensor_value_info("y", T.FLOAT, ["N", K])],
                     [nh.from_array(np.eye(K, dtype=np.float32), "w")])
    model = prepare_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), 21)
    plans = plan_fp8_ops(model, activation_params=QuantParams("F143", 0), weight_params=QuantParams("F143", -4))
    x = np.ones((4, K), np.float32)
    out, report = correct_mean_shift(model, plans, ArraySource(Path("x.npz"), {"x": x}), batch_size=4)
    assert out is model and report == []
