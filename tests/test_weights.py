"""fp8core.weight_scales: per-channel real scales equal a brute-force search per channel; onnxruntime agrees."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from fp8core import weight_scales
from fp8core.formats import FORMATS, get_format, representable_values, round_to_grid, round_trip
from fp8core.losses import get_loss
from fp8core.runtime import make_session, reference_session
from fp8core.search import search_weight
from fp8core.scale import Scale
from fp8core.weight_adjust import corrected_bias
from fp8core.weight_scales import (
    SCALE_STEPS,
    STEPS_PER_OCTAVE,
    WeightQuantizationError,
    candidate_scales,
    dequantize_node,
    output_channel_axis,
    quantize_per_channel,
)


def conv_like_weight(seed=0, channels=6):
    """Output channels whose magnitudes differ by up to 2^9, heavy-tailed inside a channel."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (channels, 3, 3, 3)) * np.exp2(rng.integers(-6, 4, channels))[:, None, None, None]
    w[2] = 0.0  # an all-zero channel
    return w.astype(np.float32)


def brute_force_channel(x, fmt, loss):
    """Every candidate scale of one channel, each quantized and scored on its own."""
    absmax = float(np.abs(x).max())
    base = absmax / get_format(fmt).max if absmax > 0 else 1.0
    best = None
    for j in sorted(SCALE_STEPS, key=lambda j: (abs(j), j)):
        s = np.float32(base * 2.0 ** (j / STEPS_PER_OCTAVE))
        q = round_trip(x / s, fmt, 0) * s
        value = get_loss(loss)(x, q)
        if best is None or value < best[1] - 1e-9 * abs(best[1]):
            best = (j, value, s)
    return best


@pytest.mark.parametrize("loss", ["mse", "mae", "snr", "cos_dist", "kld"])
@pytest.mark.parametrize("fmt", ["F143", "E5M2"])
def test_per_channel_choice_equals_brute_force_per_channel(loss, fmt):
    w = conv_like_weight()
    got = quantize_per_channel(w, 0, fmt, loss)
    for c in range(w.shape[0]):
        j, value, s = brute_force_channel(w[c].reshape(-1), fmt, loss)
        assert got.steps[c] == j, (c, got.losses[c], value)
        assert got.scales[c] == s
        assert got.losses[c] == pytest.approx(value, rel=1e-9, abs=1e-15)
    assert got.scales[2] == 1.0 and got.losses[2] == 0.0  # the all-zero channel: scale 1, exact


def test_axis_other_than_zero_is_the_same_search_on_the_transposed_weight():
    w = conv_like_weight()[:, :, 0, 0]  # [6, 3]
    along_rows = quantize_per_channel(w, 0, "F143", "mse")
    along_cols = quantize_per_channel(w.T.copy(), 1, "F143", "mse")
    np.testing.assert_array_equal(along_rows.scales, along_cols.scales)
    np.testing.assert_array_equal(along_rows.dequantized(), along_cols.dequantized().T)


def test_real_per_channel_scales_beat_power_of_two_scales():
    w = conv_like_weight()
    per_tensor = search_weight(w, "mse", ("F143",))
    q_tensor = round_trip(w, "F143", per_tensor.scale)
    q_channel = quantize_per_channel(w, 0, "F143", "mse").dequantized()
    mse = get_loss("mse")
    # a floating format's per-tensor power of two already covers every channel's range, so the
    # gain is the moved rounding grid: modest, but per channel and never a loss
    assert mse(w, q_channel) < mse(w, q_tensor)
    # and per channel, the real grid beats the best power of two of that channel
    pow2_only = quantize_per_channel(w, 0, "F143", "mse", steps=range(-16, 9, STEPS_PER_OCTAVE))
    real = quantize_per_channel(w, 0, "F143", "mse")
    assert np.all(real.losses <= pow2_only.losses) and np.any(real.losses < 0.9 * pow2_only.losses)


@pytest.mark.parametrize("fmt", ["F143", "F152", "E4M3FN", "E5M2"])
def test_onnxruntime_dequantize_with_axis_reproduces_the_weight_bit_for_bit(fmt):
    w = conv_like_weight()
    pcw = quantize_per_channel(w, 0, fmt, "mse")
    inits, node, out = dequantize_node(pcw, "w")
    graph = h.make_graph([node], "dq", [], [h.make_tensor_value_info(out, T.FLOAT, list(w.shape))], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    for session in (make_session(model), reference_session(model)):
        np.testing.assert_array_equal(session.run(None, {})[0], pcw.dequantized())


def test_conv_with_a_per_channel_fp8_weight_runs_close_to_float():
    w = conv_like_weight()
    w[2] = 0.5  # no zero channel here, so the relative error is defined per output channel
    pcw = quantize_per_channel(w, output_channel_axis("Conv", 4), "F143", "mse")
    inits, dq, out = dequantize_node(pcw, "w")
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    conv = h.make_node("Conv", ["x", out], ["y"])
    graph = h.make_graph([dq, conv], "c", [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    y = make_session(model).run(None, {"x": x})[0]
    ref_graph = h.make_graph([h.make_node("Conv", ["x", "w"], ["y"])], "r", list(graph.input), list(graph.output),
                             [onnx.numpy_helper.from_array(w, "w")])
    ref = make_session(h.make_model(ref_graph, opset_imports=[h.make_opsetid("", 21)])).run(None, {"x": x})[0]
    err = np.sqrt(((y - ref) ** 2).sum(axis=(0, 2, 3)))
    rel = err / np.sqrt((ref**2).sum(axis=(0, 2, 3)))
    assert rel.max() < 0.05  # every output channel keeps its own precision


def test_output_channel_axis_and_errors():
    assert output_channel_axis("Conv", 4) == 0
    assert output_channel_axis("Gemm", 2, trans_b=1) == 0 and output_channel_axis("Gemm", 2) == 1
    assert output_channel_axis("MatMul", 3) == 2
    with pytest.raises(ValueError, match="Conv, MatMul, Gemm"):
        output_channel_axis("Add", 2)
    with pytest.raises(ValueError, match="axis 2"):
        quantize_per_channel(np.ones((2, 2), np.float32), 2)
    with pytest.raises(WeightQuantizationError, match="NaN or inf"):
        quantize_per_channel(np.array([[1.0, np.nan]], np.float32), 0)


def test_bias_correction_restores_the_mean_output_and_lowers_the_output_error():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 32)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(32) * 0.1).astype(np.float32)
    x = (rng.standard_normal((4000, 64)) * 0.5 + 2.0).astype(np.float32)  # inputs with a large mean
    wq = round_trip(w, "E5M2", -8)  # 2 mantissa bits: a visible systematic shift
    calib, held_out = x[:2000], x[2000:]
    b_corr = corrected_bias(w, wq, b, calib.astype(np.float64).mean(axis=0))
    ref = held_out @ w + b
    plain, corrected = held_out @ wq + b, held_out @ wq + b_corr
    np.testing.assert_allclose((calib @ wq + b_corr).mean(axis=0), (calib @ w + b).mean(axis=0), atol=1e-4)
    assert np.abs((corrected - ref).mean(axis=0)).max() < 0.2 * np.abs((plain - ref).mean(axis=0)).max()
    assert np.mean((corrected - ref) ** 2) < 0.8 * np.mean((plain - ref) ** 2)
    with pytest.raises(ValueError, match="length-K input mean"):
        corrected_bias(w, wq, b, np.zeros(3))


# --- the fast search computes the same numbers as the direct one -------------------------------

def direct_channel_losses(w, axis, scales, fmt, loss):
    """One candidate's loss per channel, directly: the whole weight round-tripped, its rows in float64."""
    q = round_trip(w, fmt, Scale.along(scales, axis))
    x = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    y = np.moveaxis(np.asarray(q, np.float64), axis, 0).reshape(w.shape[axis], -1)
    if loss == "kld":
        return np.array([get_loss(loss)(x[c].astype(np.float32), y[c].astype(np.float32)) for c in range(len(x))])
    e = x - y
    if loss == "mse":
        return np.mean(e * e, axis=1)
    if loss == "mae":
        return np.mean(np.abs(e), axis=1)
    x_sq = np.sum(x * x, axis=1)
    if loss == "snr":
        return np.where(x_sq > 0, np.sum(e * e, axis=1) / np.where(x_sq > 0, x_sq, 1), 0.0)
    y_sq = np.sum(y * y, axis=1)
    nx, ny = np.sqrt(np.where(x_sq > 0, x_sq, 1)), np.sqrt(np.where(y_sq > 0, y_sq, 1))
    unit = x / nx[:, None] - y / ny[:, None]
    d = np.maximum(0.0, np.sum(unit * unit, axis=1) / 2)
    return np.where((x_sq == 0) | (y_sq == 0), np.where(x_sq == y_sq, 0.0, 1.0), d)


@pytest.mark.parametrize("loss", ["mse", "mae", "snr", "cos_dist", "kld"])
@pytest.mark.parametrize("fmt", ["F143", "F152"])
@pytest.mark.parametrize("case", ["conv_axis0", "matmul_last_axis", "middle_axis", "per_tensor_row"])
def test_blocked_loss_table_equals_the_direct_losses_bit_for_bit(monkeypatch, case, fmt, loss):
    """Small blocks, so that every path runs: blocks of rows, a row in pieces of numpy's
    pairwise tree (per tensor), strided channels in carried pieces (the last axis)."""
    monkeypatch.setattr(weight_scales, "BLOCK_VALUES", 256)
    monkeypatch.setattr(weight_scales, "KLD_BLOCK_VALUES", 256)
    rng = np.random.default_rng(11)
    w, axis = {
        "conv_axis0": (conv_like_weight(1, channels=40), 0),
        "matmul_last_axis": (rng.standard_t(4, (300, 24)).astype(np.float32), 1),
        "middle_axis": (rng.laplace(0, 0.1, (5, 12, 9)).astype(np.float32), 1),
        "per_tensor_row": (conv_like_weight(2, channels=40).reshape(1, -1), 0),
    }[case]
    absmax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    cands = candidate_scales(absmax, fmt)
    table = weight_scales._channel_loss_table(w, axis, cands, get_format(fmt), loss)
    for i, s in enumerate(cands):
        want = direct_channel_losses(w, axis, s, fmt, loss)
        if loss == "kld":  # one sum in another order
            np.testing.assert_allclose(table[i], want, rtol=1e-12, atol=1e-300)
        else:
            np.testing.assert_array_equal(table[i], want)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_grid_rounding_of_the_search_equals_the_round_trip(fmt):
    """The add-and-subtract rounding against ml_dtypes' cast: random float32 in [-max, max], every
    FP8 value, the midpoints between neighbours (ties) and the floats next to them, float32
    subnormals (checked once for every float32 in range: no difference)."""
    f = get_format(fmt)
    rng = np.random.default_rng(0)
    top = int(np.float32(f.max).view(np.uint32))
    v = representable_values(f).astype(np.float32)
    mid = ((v[1:].astype(np.float64) + v[:-1]) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    y = np.concatenate([rng.integers(0, top + 1, 1_000_000, dtype=np.uint32).view(np.float32), v, mid, near,
                        np.arange(0, 5000, dtype=np.uint32).view(np.float32)])
    y = np.concatenate([y, -y])
    np.testing.assert_array_equal(round_to_grid(y.copy(), f), round_trip(y, f, 0))


@pytest.mark.parametrize("n", [1, 7, 8, 129, 1000, 70_001, 300_007])
def test_pairwise_pieces_add_up_to_np_sum(n):
    a = np.random.default_rng(n).standard_normal(n) * np.exp2(np.random.default_rng(1).integers(-30, 30, n))
    tree = weight_scales._pairwise_leaves(n, 1000)
    assert weight_scales._tree_sum(tree, [np.sum(a[p]) for p in weight_scales._leaf_slices(tree)]) == np.sum(a)
