"""--weight_granularity, --scale_kind, --weight_rounding gptq and --bias_correction: CLI end to end on
the demo model, per-channel scales against brute force on the written model, GPTQ and bias
correction against round to nearest on generated layers, bad flag values."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from flows.cli import main
from fp8core.calibration import ArraySource
from fp8core.feature_moments import capture_feature_moments
from fp8core.formats import FORMATS, get_format, representable_values, round_trip
from fp8core.gptq import fp8_grid, gptq_round, output_error
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import encode_weights, prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session
from fp8core.scale import Scale
from fp8core.weight_adjust import adjust_weights, linear_ops, moment_requests
from fp8core.weight_scales import SCALE_STEPS, STEPS_PER_OCTAVE

DATA = Path(__file__).resolve().parents[1] / "data"
F143_MAX = 240.0


def _args(tmp_path: Path, *flags: str) -> list[str]:
    return ["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(tmp_path / "m_fp8.onnx"),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment_name", "weights", *flags]


def _weight_dq(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """Original weight name -> (DequantizeLinear, fp8 values as float, scale) of the written model."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FNUZ:
            raw = np.frombuffer(inits[n.input[0]].raw_data, np.uint8).reshape(inits[n.input[0]].dims)
            q = raw.view(ml_dtypes.float8_e4m3fnuz).astype(np.float32)
            out[n.input[0].split("_F143")[0]] = (n, q, numpy_helper.to_array(inits[n.input[1]]))
    return out


def _f143(x: np.ndarray) -> np.ndarray:
    """Independent round to nearest F143: ml_dtypes' cast (nearest even) after saturating to +-240."""
    return np.clip(x, -F143_MAX, F143_MAX).astype(ml_dtypes.float8_e4m3fnuz).astype(np.float32)


def _brute_force_channel_scale(w: np.ndarray) -> np.float32:
    """Every candidate scale of one channel by mse; ties to the smaller |j|, then the smaller j."""
    absmax = float(np.max(np.abs(w)))
    base = absmax / F143_MAX if absmax > 0 else 1.0
    best = None
    for j in sorted(SCALE_STEPS, key=lambda j: (abs(j), j)):
        s = np.float32(base * 2.0 ** (j / STEPS_PER_OCTAVE))
        mse = float(np.mean((w.astype(np.float64) - _f143(w / s) * s) ** 2))
        if best is None or mse < best[0] - 1e-9 * best[0]:
            best = (mse, s)
    return best[1]


def test_per_channel_fast_mode_equals_brute_force_per_channel(tmp_path, capsys):
    assert main(_args(tmp_path, "--weight_granularity", "per_channel", "--precision", "fp8_weight")) == 0, capsys.readouterr()
    written = onnx.load(tmp_path / "m_fp8.onnx")
    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(DATA / "demo_model.onnx").graph.initializer}
    dq = _weight_dq(written)
    axes = {"conv1.weight": 0, "fc1.weight": 1, "fc2.weight": 0}  # Conv 0, MatMul [K,N] 1, Gemm transB=1 0
    for name, axis in axes.items():
        node, q, scales = dq[name]
        w = source[name]
        assert [a.i for a in node.attribute if a.name == "axis"] == [axis]
        assert scales.ndim == 1 and scales.shape[0] == w.shape[axis]
        for c in range(w.shape[axis]):
            wc = np.take(w, c, axis=axis)
            expected = _brute_force_channel_scale(wc)
            assert scales[c] == expected, (name, c)
            np.testing.assert_array_equal(np.take(q, c, axis=axis), _f143(wc / expected))
        assert len(set(scales.tolist())) > 1  # really one scale per channel
    # the written model computes with exactly those weights
    x = np.random.default_rng(0).random((5, 1, 8, 8), np.float32)
    float_model = onnx.load(DATA / "demo_model.onnx")
    def dequantized(name):
        node, q, scales = dq[name]
        shape = [1] * q.ndim
        shape[next(a.i for a in node.attribute if a.name == "axis")] = -1
        return numpy_helper.from_array(q * scales.reshape(shape), name)

    for t in float_model.graph.initializer:
        if t.name in dq:
            t.CopyFrom(dequantized(t.name))
    for n in float_model.graph.node:  # dwconv.weight is a Constant node
        if n.op_type == "Constant" and n.output[0] in dq:
            n.attribute[0].t.CopyFrom(dequantized(n.output[0]))
    name = float_model.graph.input[0].name
    ref = make_session(float_model.SerializeToString()).run(None, {name: x})
    got = make_session(written.SerializeToString()).run(None, {name: x})
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)


def test_float_scale_kind_writes_real_per_tensor_scales(tmp_path, capsys):
    assert main(_args(tmp_path, "--scale_kind", "float")) == 0, capsys.readouterr()
    dq = _weight_dq(onnx.load(tmp_path / "m_fp8.onnx"))
    assert {"conv1.weight", "fc1.weight", "fc2.weight"} <= set(dq)
    for node, _, scale in dq.values():
        assert scale.ndim == 0 and not any(a.name == "axis" for a in node.attribute)
        assert np.log2(scale) != np.round(np.log2(scale))  # not a power of two


def test_quantize_with_every_new_flag(tmp_path, capsys):
    code = main(_args(tmp_path, "--quantize", "--data_preprocess", str(DATA / "calib.parquet"),
                      "--weight_granularity", "per_channel", "--weight_rounding", "gptq", "--bias_correction", "--keep_dominant_share", "0",
                      "--quantize_loss_type", "mse", "--eval_data", str(DATA / "eval.parquet")))
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "quantize.json").read_text())
    weights = [t for op in report["ops"] for t in op["tensors"] if t["role"] == "weight"]
    assert weights and all(t["chosen"]["scale"] == "per_channel" for t in weights)
    activations = [t for op in report["ops"] for t in op["tensors"] if t["role"] == "activation"]
    assert activations and all(isinstance(t["chosen"]["scale"], int) for t in activations)  # still pow2
    assert "real scales (axis 0)" in (tmp_path / "quantize.log").read_text()
    written = onnx.load(tmp_path / "m_fp8.onnx")
    inits = {t.name for t in written.graph.initializer}
    assert {"conv1.bias_bias_corrected", "dwconv.bias_bias_corrected", "fc1.bias_bias_corrected",
            "fc2.bias_bias_corrected"} <= inits
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("weights").experiment_id])[0]
    assert run.data.params["weight_rounding"] == "gptq" and run.data.params["weight_granularity"] == "per_channel"
    adjusted = [k.split("/", 1)[1] for k in run.data.metrics if k.startswith("output_sq_error_gptq/")]
    # every op, MatMul_7 too (64 rows for 256 inputs: GPTQ with the damped Hessian still lowers the
    # error on them; on real models such ops gained, PP-OCRv4 rec 0.508 -> 0.650)
    assert len(adjusted) == 4 and {"Gemm_10", "MatMul_7"} <= set(adjusted)
    for op in adjusted:
        assert run.data.metrics[f"output_sq_error_gptq/{op}"] < run.data.metrics[f"output_sq_error_nearest/{op}"]
    assert "weight_adjust.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    rows = {r["op"]: r for r in json.loads(open(client.download_artifacts(run.info.run_id, "weight_adjust.json")).read())["ops"]}
    assert rows["MatMul_7"]["rounding"] == "gptq"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_gptq_grid_is_the_round_trip_bit_for_bit(fmt):
    """GPTQ's arithmetic grid against :func:`round_trip` (the table, checked against onnxruntime's
    QuantizeLinear in test_formats.py), compared as bits so -0 and +0 differ: float64 rows (rounded
    to float32 first, as the encoder does), every FP8 value and the ties between them, values past
    the largest, +-inf, NaN and tiny negatives; at a power of two, a real scalar and one real scale
    per column. NaN stays NaN."""
    f = get_format(fmt)
    rng = np.random.default_rng(3)
    v = representable_values(f)
    ties = (v[1:] + v[:-1]) / 2
    special = np.array([f.max * 1.04, f.max * 1.2, 1e30, np.inf, -np.inf, np.nan, -1e-30, -0.0, 0.0])
    base = np.concatenate([v, ties, rng.normal(scale=f.max / 8, size=4000), rng.normal(scale=1e-3, size=2000), special])
    base = np.concatenate([base, -base])
    base = base[: base.size // 8 * 8].reshape(-1, 8)
    per_column = rng.uniform(0.3, 3.0, size=8).astype(np.float32)
    for scale, m in ((Scale.pow2(0), 1.0), (Scale.pow2(-3), 2.0 ** -3), (Scale.real(0.37), 0.37), (per_column, per_column)):
        x = base * m
        expected = round_trip(x, f, scale if isinstance(scale, Scale) else Scale.along(per_column, 1))
        got = fp8_grid(fmt, scale)(x)
        assert got.dtype == np.float32 and got.shape == x.shape
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan) and nan.any()  # NaN stays NaN (its sign bit is no value)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_gptq_lowers_the_output_error_of_a_generated_layer():
    rng = np.random.default_rng(1)
    k, n, rows = 48, 24, 4000
    x = rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) * 0.3 + 0.2  # correlated features
    w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
    h = x.T @ x
    for grid in (fp8_grid("F143", np.float32(2.0 ** -10)), fp8_grid("F152", np.abs(w).max(0) / 57344)):
        nearest, gptq = grid(w), gptq_round(w, h, grid)
        assert np.array_equal(grid(gptq), gptq)  # on the FP8 grid: encoding again keeps GPTQ's choice
        e_nearest, e_gptq = output_error(w, nearest, h), output_error(w, gptq, h)
        assert e_gptq < 0.7 * e_nearest, (e_gptq, e_nearest)
        direct = lambda q: float(np.sum((x @ w - x @ q.astype(np.float64)) ** 2))  # noqa: E731
        assert direct(gptq) < direct(nearest)
        assert output_error(w, gptq, h) == pytest.approx(direct(gptq), rel=1e-6)


def _linear_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Add", ["mm", "b"], ["y"], name="add")],
        "linear", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), 21)


def test_bias_correction_and_gptq_through_the_model_rewrite():
    rng = np.random.default_rng(2)
    k, n = 32, 16
    x = (rng.normal(size=(512, k)) @ rng.normal(size=(k, k)) * 0.2 + 1.0).astype(np.float32)  # non-zero mean
    model = _linear_model((rng.normal(size=(k, n)) * 0.1).astype(np.float32), rng.normal(size=n).astype(np.float32))
    plans = plan_fp8_ops(model, "fp8_weight", weight_params=QuantParams("F143", -7))
    ops = linear_ops(model, plans)
    assert [(o.name, o.bias) for o in ops] == [("mm", "b")]
    moments = capture_feature_moments(model, moment_requests(ops, True, True), ArraySource(Path("x.npz"), {"x": x}), 100)
    np.testing.assert_allclose(moments["x"].mean[0], x.astype(np.float64).mean(0), rtol=1e-9)
    np.testing.assert_allclose(moments["x"].gram[0], x.astype(np.float64).T @ x, rtol=1e-9)
    ref = make_session(model.SerializeToString()).run(None, {"x": x})[0]

    def fp8_output(gptq, bias):
        adjusted, _ = adjust_weights(model, plans, moments, gptq, bias)
        fp8 = rewrite_to_fp8(adjusted, plans, encode_weights(adjusted, plans))
        return make_session(fp8.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)

    plain, corrected, gptq = fp8_output(False, False), fp8_output(False, True), fp8_output(True, False)
    mean_shift = lambda y: np.abs((y - ref).mean(0)).max()  # noqa: E731
    assert mean_shift(corrected) < 1e-4 < mean_shift(plain)
    assert np.mean((gptq - ref) ** 2) < np.mean((plain - ref) ** 2)


@pytest.mark.parametrize("flags, words", [
    (["--weight_granularity", "per_row"], "--weight_granularity"),
    (["--scale_kind", "real"], "--scale_kind"),
    (["--weight_rounding", "stochastic"], "--weight_rounding"),
    (["--weight_rounding", "gptq"], "add --quantize"),
    (["--bias_correction"], "add --quantize"),
])
def test_bad_values_of_the_weight_flags(tmp_path, capfd, flags, words):
    code = main(_args(tmp_path, *flags))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "m_fp8.onnx").exists()


def test_gptaq_fits_every_linear_op_to_its_fp8_input_and_keeps_the_demo_accuracy(tmp_path, capsys):
    args = _args(tmp_path, "--quantize", "--data_preprocess", str(DATA / "calib.parquet"), "--weight_rounding", "gptaq",
                 "--keep_dominant_share", "0", "--eval_data", str(DATA / "eval.parquet"))
    assert main(args) == 0, capsys.readouterr().out
    first = (tmp_path / "m_fp8.onnx").read_bytes()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("weights").experiment_id])[0]
    assert run.data.params["weight_rounding"] == "gptaq"
    fitted = [k.split("/", 1)[1] for k in run.data.metrics if k.startswith("output_error_reduction/")]
    assert len(fitted) == 4 and {"MatMul_7", "Gemm_10"} <= set(fitted)
    assert all(run.data.metrics[f"output_error_reduction/{op}"] >= 0 for op in fitted)
    assert run.data.metrics["eval_accuracy_fp8"] >= run.data.metrics["eval_accuracy_fp32"] - 0.02
    assert main(args) == 0  # the same run again gives the same bytes
    assert (tmp_path / "m_fp8.onnx").read_bytes() == first
