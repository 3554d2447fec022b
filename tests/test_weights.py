"""fp8core.weights: per-channel real scales equal a brute-force search per channel; onnxruntime agrees."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from fp8core.formats import get_format, round_trip
from fp8core.losses import get_loss
from fp8core.runtime import make_session, reference_session
from fp8core.search import search_weight
from fp8core.weights import (
    SCALE_STEPS,
    STEPS_PER_OCTAVE,
    WeightQuantizationError,
    corrected_bias,
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
    with pytest.raises(WeightQuantizationError, match="Conv, MatMul, Gemm"):
        output_channel_axis("Add", 2)
    with pytest.raises(WeightQuantizationError, match="axis 2"):
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
    with pytest.raises(WeightQuantizationError, match="length-K input mean"):
        corrected_bias(w, wq, b, np.zeros(3))
