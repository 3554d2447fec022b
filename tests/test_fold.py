"""fp8core.fold: weights computed from constants become initializers, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from fp8core.fold import fold_computed_weights
from fp8core.graph import assign_node_names
from fp8core.runtime import reference_session


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w16 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float16), "w16")
    wt = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "wt")
    nodes = [
        helper.make_node("Cast", ["w16"], ["w_cast"], to=T.FLOAT),                 # float16 weight cast up
        helper.make_node("MatMul", ["x", "w_cast"], ["a"]),
        helper.make_node("Transpose", ["wt"], ["w_t"], perm=[1, 0]),              # stored transposed
        helper.make_node("Identity", ["w_t"], ["w_shared"]),                      # a shared weight
        helper.make_node("MatMul", ["a", "w_shared"], ["b"]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([8, 8], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["w_fill"],
                         value=numpy_helper.from_array(np.array([0.25], np.float32))),
        helper.make_node("MatMul", ["b", "w_fill"], ["c"]),
        helper.make_node("Mul", ["x", "x"], ["w_live"]),                            # depends on the input
        helper.make_node("MatMul", ["c", "w_live"], ["d"]),
        helper.make_node("RandomNormal", [], ["w_rand"], shape=[8, 8], seed=1.0),  # never folded
        helper.make_node("MatMul", ["d", "w_rand"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [8, 8]),
                               helper.make_tensor_value_info("w_t", T.FLOAT, [8, 8])], [w16, wt])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assign_node_names(model.graph)
    return model


def test_computed_weights_become_initializers_and_the_outputs_stay():
    model = _model()
    folded_model = onnx.ModelProto()
    folded_model.CopyFrom(model)
    folded = fold_computed_weights(folded_model)
    assert sorted(folded) == ["w_cast", "w_fill", "w_shared"]
    onnx.checker.check_model(folded_model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in folded_model.graph.initializer}
    ops = [n.op_type for n in folded_model.graph.node]
    # the Cast, Identity, ConstantOfShape and its Constant are gone; w16 read by nobody is gone;
    # the Transpose stays (w_t is a graph output), as do the input-dependent and random weights
    assert "Cast" not in ops and "Identity" not in ops and "ConstantOfShape" not in ops and "Constant" not in ops
    assert {"Transpose", "Mul", "RandomNormal"} <= set(ops) and "w16" not in inits and "wt" in inits
    w16 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w16"))
    assert inits["w_cast"].dtype == np.float32 and np.array_equal(inits["w_cast"], w16.astype(np.float32))
    assert np.array_equal(inits["w_fill"], np.full((8, 8), 0.25, np.float32))
    # the same outputs, but for the random weight: compare up to the MatMul before it
    x = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    for m in (model, folded_model):
        m.graph.output.append(helper.make_tensor_value_info("d", T.FLOAT, [8, 8]))
    want = reference_session(model).run(["d", "w_t"], {"x": x})
    got = reference_session(folded_model).run(["d", "w_t"], {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


def test_weights_from_the_input_or_random_ops_are_not_folded():
    nodes = [helper.make_node("Mul", ["x", "x"], ["w_live"]),
             helper.make_node("MatMul", ["x", "w_live"], ["d"]),
             helper.make_node("RandomNormal", [], ["w_rand"], shape=[8, 8], seed=1.0),
             helper.make_node("MatMul", ["d", "w_rand"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assign_node_names(model.graph)
    before = model.SerializeToString()
    assert fold_computed_weights(model) == []
    assert model.SerializeToString() == before


def test_a_chain_onnxruntime_cannot_compute_is_left_as_it_was():
    """A Reshape to a shape that does not fit the weight: onnxruntime fails on it; nothing folds."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    shape = numpy_helper.from_array(np.array([3, 5], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w_r"]), helper.make_node("MatMul", ["x", "w_r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assign_node_names(model.graph)
    before = model.SerializeToString()
    assert fold_computed_weights(model) == []
    assert model.SerializeToString() == before
