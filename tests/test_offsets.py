"""Activation offsets (fp8core/offsets.py): a non-negative input rounded as x - c, c added back
through the op's FP8 weight. Checked against a numpy reference of what the op should compute,
against brute-force rounding errors, and through the whole CLI pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp8core.formats import round_trip
from fp8core.graph import GraphIndex
from fp8core.offsets import allowed, best_offset, candidates, estimated_sq_error, with_offsets
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import encode_weights, prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session
from fp8core.stats import TensorStats

ACT = QuantParams("F143", -5)  # [0, 6] * 2^5 = 192 <= 240 (E4M3FNUZ's max)
WEIGHT = QuantParams("F143", -7)


def relu6_linear(op: str, seed: int = 0, pads=(0, 0, 0, 0), bias: bool = True) -> onnx.ModelProto:
    """x -> Clip(0, 6) -> op (1x1 Conv over 8 channels, Gemm transB, or MatMul) -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["a"], name="Clip_0")]
    if op == "Conv":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w"))
        ins = ["a", "w"] + (["b"] if bias else [])
        nodes.append(helper.make_node("Conv", ins, ["y"], name="Conv_1", pads=list(pads)))
        x_shape, y_shape = [2, 8, 6, 6], None
    elif op == "Gemm":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "w"))
        ins = ["a", "w"] + (["b"] if bias else [])
        nodes.append(helper.make_node("Gemm", ins, ["y"], name="Gemm_1", transB=1, alpha=0.5, beta=2.0))
        x_shape, y_shape = [5, 8], [5, 4]
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "w"))
        nodes.append(helper.make_node("MatMul", ["a", "w"], ["y"], name="MatMul_1"))
        x_shape, y_shape = [2, 5, 8], [2, 5, 4]
    if bias and op != "MatMul":
        inits.append(numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), "b"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def feed(model, seed=1):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).uniform(-2, 8, shape).astype(np.float32)}


def planned(model, offset):
    prepared = prepare_model(model, 21)
    plans = plan_fp8_ops(prepared, "fp8", [], ACT, WEIGHT)
    for p in plans:
        for q in p.input("activation"):
            q.params = dataclasses.replace(q.params, offset=offset)
    return prepared, plans


def reference(model, op: str, offset: float, x: np.ndarray) -> np.ndarray:
    """What the op must compute: its FP8 weight on ``round(x - c) + c``, float64."""
    a = np.clip(x, 0, 6)
    a = (round_trip(a - np.float32(offset), "F143", ACT.to_scale()) + np.float32(offset)).astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = round_trip(inits["w"], "F143", WEIGHT.to_scale()).astype(np.float64)
    if op == "Conv":
        n, _, h, wd = a.shape
        out = np.zeros((n, 4, h - 2, wd - 2))
        for i in range(3):
            for j in range(3):
                out += np.einsum("nchw,oc->nohw", a[:, :, i:i + h - 2, j:j + wd - 2], w[:, :, i, j])
        return out + inits["b"].reshape(1, 4, 1, 1)
    if op == "Gemm":
        return 0.5 * a @ w.T + 2.0 * inits["b"]
    return a @ w


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_the_op_computes_its_fp8_weight_on_the_input_rounded_with_offset(op):
    model = relu6_linear(op)
    prepared, plans = planned(model, 1.5)
    fp8 = rewrite_to_fp8(prepared, plans, encode_weights(prepared, plans))
    onnx.checker.check_model(fp8, full_check=True)
    types = [n.op_type for n in fp8.graph.node]
    assert types.count("Sub") == 1 and types.index("Sub") < types.index("QuantizeLinear")
    x = feed(model)["x"]
    got = make_session(fp8).run(None, {"x": x})[0]
    want = reference(model, op, 1.5, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # and it differs from rounding x itself by more than that tolerance: the offset is really used
    assert np.abs(reference(model, op, 0.0, x) - want).max() > 1e-2


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_an_op_without_bias_gets_one(op):
    model = relu6_linear(op, bias=False)
    prepared, plans = planned(model, 1.0)
    fp8 = rewrite_to_fp8(prepared, plans, encode_weights(prepared, plans))
    x = feed(model)["x"]
    got = make_session(fp8).run(None, {"x": x})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    model_b = relu6_linear(op, bias=True)
    want = reference(model_b, op, 1.0, x)
    b = {t.name: numpy_helper.to_array(t) for t in model_b.graph.initializer}["b"]
    want -= (b.reshape(1, 4, 1, 1) if op == "Conv" else 2.0 * b)  # the reference's bias, not this model's
    assert "b" not in inits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_switched_op_kept_in_float_reads_the_input_itself():
    model = relu6_linear("Conv")
    prepared, plans = planned(model, 2.0)
    fp8 = rewrite_to_fp8(prepared, plans, encode_weights(prepared, plans), switches={"Conv_1": "keep_Conv_1"})
    x = feed(model)["x"]
    session = make_session(fp8)
    kept = session.run(None, {"x": x, "keep_Conv_1": np.array(True)})[0]
    np.testing.assert_allclose(kept, make_session(model).run(None, {"x": x})[0], rtol=1e-6, atol=1e-5)
    fp8_run = session.run(None, {"x": x, "keep_Conv_1": np.array(False)})[0]
    np.testing.assert_allclose(fp8_run, reference(model, "Conv", 2.0, x), rtol=1e-5, atol=1e-4)


def test_implicit_padding_refuses_an_offset():
    """Zero padding would read -c where the op expects 0: such a Conv takes no offset."""
    padded = prepare_model(relu6_linear("Conv", pads=(1, 1, 1, 1)), 21)
    plans = plan_fp8_ops(padded, "fp8", [], ACT, WEIGHT)
    conv = next(n for n in padded.graph.node if n.op_type == "Conv")
    assert not allowed(conv, plans[0], GraphIndex(padded.graph))
    stats = {"a": TensorStats.from_array(np.clip(feed(padded)["x"], 0, 6))}
    assert all(not q.params.offset for p in with_offsets(padded, plans, stats) for q in p.input("activation"))
    unpadded = prepare_model(relu6_linear("Conv"), 21)
    plans = plan_fp8_ops(unpadded, "fp8", [], ACT, WEIGHT)
    chosen = [q.params.offset for p in with_offsets(unpadded, plans, stats) for q in p.input("activation")]
    assert chosen[0] > 0


def brute_sq_error(x: np.ndarray, c: float) -> float:
    s = (x - np.float32(c)).astype(np.float32)
    return float(np.sum((round_trip(s, "F143", ACT.to_scale()).astype(np.float64) - s) ** 2))


def test_the_offset_lowers_the_brute_force_error_of_a_relu6_tensor():
    rng = np.random.default_rng(3)
    x = np.clip(rng.normal(1.5, 2.5, 200_000), 0, 6).astype(np.float32)  # zeros, a spread, a pile at 6
    stats = TensorStats.from_array(x)
    c = best_offset(stats, ACT)
    assert c > 0 and round_trip(np.float32([-c]), "F143", ACT.to_scale())[0] == -c  # zero stays exact
    assert brute_sq_error(x, c) < 0.9 * brute_sq_error(x, 0.0)
    # the binned estimate ranks every candidate as brute force does, within 10%
    for cand in [0.0, *candidates(6.0)]:
        assert estimated_sq_error(stats, ACT, cand) == pytest.approx(brute_sq_error(x, cand), rel=0.1)


def test_signed_tensors_get_no_offset():
    x = np.random.default_rng(4).normal(2, 2, 50_000).astype(np.float32)
    assert x.min() < 0
    assert best_offset(TensorStats.from_array(x), ACT) == 0.0


def test_the_cli_flag_writes_offsets_where_they_help_and_the_default_writes_none(tmp_path, capsys):
    from pathlib import Path

    from flows.cli import main

    data = Path(__file__).resolve().parents[1] / "data"

    def convert(out: str, *flags: str) -> onnx.ModelProto:
        (tmp_path / out).mkdir()
        code = main(["--input_model", str(data / "demo_model.onnx"), "--output_model", str(tmp_path / out / "m.onnx"),
                     "--quantize", "--data_preprocess", str(data / "calib.parquet"), "--keep_dominant_share", "0",
                     "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *flags])
        assert code == 0, capsys.readouterr().out
        return onnx.load(tmp_path / out / "m.onnx")

    default = convert("default")
    assert not [n for n in default.graph.node if n.op_type == "Sub"]
    shifted = convert("auto", "--activation_offset", "auto")
    subs = [n for n in shifted.graph.node if n.op_type == "Sub"]
    assert subs  # the demo's ReLU outputs
    log = (tmp_path / "auto" / "quantize.log").read_text()
    assert log.count("rounded as x - ") == len(subs)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    name = default.graph.input[0].name
    reference = make_session(onnx.load(data / "demo_model.onnx")).run(None, {name: x})[0]
    for model in (default, shifted):
        out = make_session(model).run(None, {name: x})[0]
        assert np.corrcoef(out.ravel(), reference.ravel())[0, 1] > 0.99


def test_the_flag_without_quantize_is_refused_in_one_line(tmp_path, capsys):
    from pathlib import Path

    from flows.cli import main

    model = Path(__file__).resolve().parents[1] / "data" / "demo_model.onnx"
    code = main(["--input_model", str(model), "--output_model", str(tmp_path / "m.onnx"),
                 "--activation_offset", "auto", "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code != 0 and "--activation_offset auto" in err and "--quantize" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
