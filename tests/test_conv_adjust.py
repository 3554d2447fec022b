"""GPTQ and bias correction on Conv: im2col rows against onnxruntime's Conv, grouped GPTQ against
per-group GPTQ, and both lowering the error of real Conv layers through the model rewrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fp8core.calibration import ArraySource
from fp8core.feature_moments import Rows, capture_feature_moments
from fp8core.gptq import fp8_grid, gptq_round, gptq_round_groups
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import encode_weights, prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session
from fp8core.weight_adjust import adjust_weights, linear_ops, moment_requests

CONV_CASES = {
    "plain 3x3": dict(c_in=4, c_out=6, kernel=(3, 3), attrs={}),
    "strided padded": dict(c_in=4, c_out=6, kernel=(3, 3), attrs=dict(strides=[2, 2], pads=[1, 0, 2, 1])),
    "dilated": dict(c_in=3, c_out=4, kernel=(3, 2), attrs=dict(dilations=[2, 3], pads=[2, 1, 2, 1])),
    "grouped": dict(c_in=6, c_out=4, kernel=(3, 3), attrs=dict(group=2, pads=[1, 1, 1, 1])),
    "depthwise": dict(c_in=5, c_out=5, kernel=(5, 5), attrs=dict(group=5, pads=[2, 2, 2, 2], strides=[2, 1])),
    "same upper": dict(c_in=3, c_out=4, kernel=(4, 3), attrs=dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same lower": dict(c_in=3, c_out=4, kernel=(4, 3), attrs=dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    "valid": dict(c_in=3, c_out=4, kernel=(2, 2), attrs=dict(auto_pad="VALID")),
    "1-D": dict(c_in=4, c_out=3, kernel=(5,), attrs=dict(pads=[2, 1], strides=[2])),
    # a pointwise Conv's rows are its input's positions, taken without a padded copy
    "pointwise": dict(c_in=4, c_out=6, kernel=(1, 1), attrs={}),
    "pointwise grouped": dict(c_in=6, c_out=4, kernel=(1, 1), attrs=dict(group=2)),
    "pointwise 1-D": dict(c_in=4, c_out=3, kernel=(1,), attrs={}),
    "pointwise strided": dict(c_in=4, c_out=6, kernel=(1, 1), attrs=dict(strides=[2, 2])),
}


def _conv_model(w: np.ndarray, b: np.ndarray | None, spatial: tuple[int, ...], attrs: dict,
                dtype=np.float32) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)], "conv",
        [helper.make_tensor_value_info("x", elem, ["n", w.shape[1] * attrs.get("group", 1), *spatial])],
        [helper.make_tensor_value_info("y", elem, None)], inits)
    return prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), 21)


def _case(name: str, seed: int = 0):
    c = CONV_CASES[name]
    rng = np.random.default_rng(seed)
    group = c["attrs"].get("group", 1)
    w = (rng.normal(size=(c["c_out"], c["c_in"] // group, *c["kernel"])) * 0.2).astype(np.float32)
    spatial = (11, 9)[: len(c["kernel"])]
    x = (rng.normal(size=(3, c["c_in"], *spatial)) + 0.5).astype(np.float32)
    return w, x, spatial, c["attrs"]


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_rows_times_the_grouped_weight_equal_onnxruntime_conv(name):
    w, x, spatial, attrs = _case(name)
    model = _conv_model(w, None, spatial, attrs)
    [op] = linear_ops(model, plan_fp8_ops(model, "fp8_weight", weight_params=QuantParams("F143", -7)))
    expected = make_session(model.SerializeToString()).run(None, {"x": x})[0]  # [N, C_out, *out]
    w_gkn = op.to_groups(w).astype(np.float64)
    for i, [columns] in enumerate(op.rows.columns(x)):
        rows = columns.transpose(0, 2, 1)  # [G, R, K]
        y = np.einsum("grk,gkn->rgn", rows, w_gkn).reshape(rows.shape[1], -1)  # [positions, C_out]
        np.testing.assert_allclose(y, expected[i].reshape(w.shape[0], -1).T, rtol=1e-4, atol=1e-5)
        [[some]] = op.rows.columns(x[i:i + 1], max_rows=7)  # evenly spaced positions, the ends included
        keep = np.linspace(0, rows.shape[1] - 1, 7).round().astype(int) if rows.shape[1] > 7 else slice(None)
        np.testing.assert_array_equal(some, columns[..., keep])
        # the layout too: BLAS sums a strided copy in another order (other last bits, other GPTQ roundings)
        assert some.flags.c_contiguous and columns.flags.c_contiguous
        [pair] = op.rows.columns(x[i:i + 1], paired=2 * x[i:i + 1])  # x's columns, then the pair's
        np.testing.assert_array_equal(pair, np.stack([columns, 2 * columns]))
    assert np.array_equal(op.from_groups(op.to_groups(w), w.shape), w)
    assert op.groups_shape(w.shape) == op.to_groups(w).shape


def test_grouped_gptq_equals_gptq_of_each_group():
    rng = np.random.default_rng(3)
    g, k, n = 4, 12, 3
    w = (rng.normal(size=(g, k, n)) * 0.1).astype(np.float32)
    x = rng.normal(size=(g, 300, k)) @ rng.normal(size=(g, k, k))
    h = x.transpose(0, 2, 1) @ x
    h[1, 5, :] = h[1, :, 5] = 0.0  # a dead feature in one group only
    scales = (np.abs(w).max(axis=1) / 240).astype(np.float32)  # [G, N] per-column scales
    together = gptq_round_groups(w, h, fp8_grid("F143", scales[:, None, :]))
    for i in range(g):
        np.testing.assert_array_equal(together[i], gptq_round(w[i], h[i], fp8_grid("F143", scales[i])))
    assert np.all(together[1, 5] == 0)


@pytest.mark.parametrize("name", ["strided padded", "depthwise", "grouped"])
def test_gptq_and_bias_correction_on_conv_through_the_rewrite(name):
    w, x, spatial, attrs = _case(name, seed=5)
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(64, *x.shape[1:])) * 0.5 + 1.0).astype(np.float32)  # non-zero mean input
    b = rng.normal(size=w.shape[0]).astype(np.float32)
    model = _conv_model(w, b, spatial, attrs)
    plans = plan_fp8_ops(model, "fp8_weight", weight_params=QuantParams("F143", -6))
    ops = linear_ops(model, plans)
    assert [(o.name, o.bias) for o in ops] == [("conv", "b")]
    moments = capture_feature_moments(model, moment_requests(ops, True, True), ArraySource(Path("x.npz"), {"x": x}), 16)
    ref = make_session(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)

    def fp8_output(gptq, bias):
        adjusted, report = adjust_weights(model, plans, moments, gptq, bias)
        fp8 = rewrite_to_fp8(adjusted, plans, encode_weights(adjusted, plans))
        return make_session(fp8.SerializeToString()).run(None, {"x": x})[0].astype(np.float64), report

    (plain, _), (corrected, _), (gptq, report) = fp8_output(False, False), fp8_output(False, True), fp8_output(True, False)
    channel_shift = lambda y: np.abs((y - ref).mean(axis=(0, *range(2, y.ndim)))).max()  # noqa: E731
    assert channel_shift(corrected) < 1e-4 < channel_shift(plain)
    assert np.sum((gptq - ref) ** 2) < 0.9 * np.sum((plain - ref) ** 2)
    [row] = report
    assert row["op_type"] == "Conv" and row["output_sq_error_gptq"] < row["output_sq_error_nearest"]
    # the reported output error is the summed squared error of the op's output (its rows * weight)
    assert row["output_sq_error_nearest"] == pytest.approx(np.sum((plain - ref) ** 2), rel=1e-3)


@pytest.mark.parametrize("g, k", [(1, 300), (3, 129), (4, 128), (2, 7), (1, 1)])
def test_inverse_cholesky_upper_is_the_cholesky_factor_of_the_inverse(g, k):
    """GPTQ's U (H^-1 = U^T U, upper, positive diagonal) without inverting H: the reference is
    the factor of numpy's inverse; sizes on both sides of the halving's 128."""
    from fp8core.gptq import inverse_cholesky_upper

    rng = np.random.default_rng(k)
    x = rng.standard_normal((g, k, 2 * k + 3))
    h = x @ x.transpose(0, 2, 1) + 0.01 * k * np.eye(k)
    u = inverse_cholesky_upper(h)
    reference = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    assert np.array_equal(np.triu(u), u)
    np.testing.assert_allclose(u, reference, rtol=0, atol=1e-10 * np.abs(reference).max())
