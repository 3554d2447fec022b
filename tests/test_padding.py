"""Padding tokens left out of the weight fit (fp8core/padding.py): which input is the mask, which
rows of a tensor it covers, and that the fitted weights do not depend on what padded positions
hold when it is used (and do without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp8core.activation_fit import fit_to_fp8_inputs
from fp8core.calibration import open_dataset
from fp8core.feature_moments import Rows
from fp8core.padding import PaddingMaskError, kept_rows, padding_mask_input
from fp8core.pipeline import AdjustConfig, CalibrateConfig, adjust_weights, calibrate, load, plan

T, K, N = 6, 16, 12


def encoder(mask_name: str = "attention_mask") -> onnx.ModelProto:
    """x [B, T, K] -> MatMul -> Relu -> MatMul -> mean over the unmasked tokens -> y [B, N]: a
    transformer's feed-forward block with masked mean pooling."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (K, 2 * K)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (2 * K, N)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (2 * K,)).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1], np.int64), "tokens")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["hw"], name="MatMul_1"),
             helper.make_node("Add", ["hw", "b1"], ["h"], name="Add_1"),
             helper.make_node("Relu", ["h"], ["r"], name="Relu_1"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="MatMul_2"),
             helper.make_node("Cast", [mask_name], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
             helper.make_node("Mul", ["z", "m3"], ["zm"]),
             helper.make_node("ReduceSum", ["zm", "tokens"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["m3", "tokens"], ["c"], keepdims=0),
             helper.make_node("Div", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, K]),
                                             helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["B", T])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def padded_data(pad_value: float, samples: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, T + 1, samples)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    x = rng.normal(0, 1, (samples, T, K)).astype(np.float32)
    x[mask == 0] = pad_value  # what padded positions hold: an embedding the output never reads
    return {"x": x, "attention_mask": mask}


def test_auto_finds_one_rank2_mask_input_and_none_or_a_name_overrides():
    model = encoder()
    assert padding_mask_input(model) == "attention_mask"
    assert padding_mask_input(model, "none") is None
    assert padding_mask_input(encoder("input_mask")) == "input_mask"
    assert padding_mask_input(encoder("tokens_valid")) is None  # not a mask's name: auto takes none
    assert padding_mask_input(encoder("tokens_valid"), "tokens_valid") == "tokens_valid"


def test_a_wrong_mask_name_or_rank_is_a_one_line_error():
    with pytest.raises(PaddingMaskError, match="no input of that name.*attention_mask"):
        padding_mask_input(encoder(), "mask")
    with pytest.raises(PaddingMaskError, match="rank 3"):
        padding_mask_input(encoder(), "x")


def test_kept_rows_cover_tensors_whose_rows_are_the_masks_tokens():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert kept_rows(mask, (2, 3)).tolist() == [True, True, False, True, False, False]
    assert kept_rows(mask, (6,)).tolist() == [True, True, False, True, False, False]  # [B * T, K]
    assert kept_rows(mask, (2, 4, 3)) is None  # attention heads: not the mask's tokens
    assert kept_rows(None, (2, 3)) is None


def test_rows_of_padding_tokens_are_dropped_from_matmul_columns_only():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    [cols] = list(Rows("x").columns(x, mask=mask))
    np.testing.assert_array_equal(cols[0, 0].T, x.reshape(6, 4)[[0, 1, 3]])
    [both] = list(Rows("x").columns(x, paired=x + 1, mask=mask))
    np.testing.assert_array_equal(both[1, 0].T, x.reshape(6, 4)[[0, 1, 3]] + 1)
    conv = Rows("x", kernel=(1,), strides=(1,), dilations=(1,), pads=(0, 0))
    plain = np.concatenate(list(conv.columns(x)), axis=0)
    np.testing.assert_array_equal(np.concatenate(list(conv.columns(x, mask=mask)), axis=0), plain)


def _calibrated(tmp_path: Path):
    onnx.save(encoder(), tmp_path / "enc.onnx")
    model = load(str(tmp_path / "enc.onnx")).model  # prepared as the CLI does (opset 21)
    clean = tmp_path / "clean.npz"
    np.savez(clean, **padded_data(0.0))
    return model, calibrate(model, plan(model).plans, open_dataset(clean), CalibrateConfig(batch_size=8)).plans


def _data(tmp_path: Path, pad_value: float):
    np.savez(tmp_path / f"pad_{pad_value}.npz", **padded_data(pad_value))
    return open_dataset(tmp_path / f"pad_{pad_value}.npz")


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith(("w", "b"))}


def _fit(tmp_path: Path, pad_value: float, mask: str | None) -> tuple[list, list[dict]]:
    model, plans = _calibrated(tmp_path)  # the same scales whatever the padding holds
    proto, report = fit_to_fp8_inputs(model, plans, _data(tmp_path, pad_value), 8, passes=1, local=True,
                                      padding_mask=mask)
    return list(_weights(proto).values()), report


def test_fitted_weights_ignore_what_padded_positions_hold(tmp_path):
    masked_a, report = _fit(tmp_path, 0.0, "attention_mask")
    masked_b, _ = _fit(tmp_path, 7.5, "attention_mask")
    for a, b in zip(masked_a, masked_b):
        np.testing.assert_array_equal(a, b)
    tokens = int(padded_data(0.0)["attention_mask"].sum())
    assert [row["rows"] for row in report] == [tokens, tokens]
    every_a, every_report = _fit(tmp_path, 0.0, None)
    every_b, _ = _fit(tmp_path, 7.5, None)
    assert any(not np.array_equal(a, b) for a, b in zip(every_a, every_b))  # without the mask they do
    assert [row["rows"] for row in every_report] == [40 * T, 40 * T]


def test_the_cli_refuses_a_mask_that_is_not_an_input_in_one_line(tmp_path, capsys):
    from flows.cli import main

    model, data = tmp_path / "enc.onnx", tmp_path / "calib.npz"
    onnx.save(encoder(), model)
    np.savez(data, **padded_data(0.0))
    (tmp_path / "out").mkdir()
    before = model.read_bytes()
    code = main(["--input_model", str(model), "--output_model", str(tmp_path / "out" / "m.onnx"), "--quantize",
                 "--data_preprocess", str(data), "--padding_mask", "mask",
                 "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code != 0 and "--padding_mask mask" in err and "attention_mask" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "m.onnx").exists() and model.read_bytes() == before


def test_a_named_mask_without_quantize_is_refused(tmp_path, capsys):
    from flows.cli import main

    model = tmp_path / "enc.onnx"
    onnx.save(encoder(), model)
    code = main(["--input_model", str(model), "--output_model", str(tmp_path / "m.onnx"),
                 "--padding_mask", "attention_mask", "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code != 0 and "--padding_mask attention_mask" in err and "--quantize" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_gptq_moments_and_bias_correction_ignore_padded_positions_too(tmp_path, rounding):
    model, plans = _calibrated(tmp_path)

    def adjusted(pad_value: float, mask: str) -> dict[str, np.ndarray]:
        config = AdjustConfig(batch_size=8, weight_rounding=rounding, bias_correction=True, padding_mask=mask)
        return _weights(adjust_weights(model, plans, _data(tmp_path, pad_value), config).model.proto)

    a, b = adjusted(0.0, "auto"), adjusted(7.5, "auto")
    assert a.keys() == b.keys() and any(n != "b1" and n.startswith("b1") for n in a)  # a corrected bias
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    a, b = adjusted(0.0, "none"), adjusted(7.5, "none")
    assert any(not np.array_equal(a[n], b[n]) for n in a)


def test_the_closing_summary_says_the_padding_rows_were_left_out(tmp_path, capsys):
    from flows.cli import main

    model, data = tmp_path / "enc.onnx", tmp_path / "calib.npz"
    onnx.save(encoder(), model)
    np.savez(data, **padded_data(0.0))
    code = main(["--input_model", str(model), "--output_model", str(tmp_path / "m.onnx"), "--quantize",
                 "--data_preprocess", str(data), "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "weights: GPTAQ fit on 2 ops; rows of padding tokens (attention_mask == 0) left out" in out
