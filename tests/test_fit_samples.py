"""The gptaq weight fit reads at most ``--weight_fit_samples`` calibration samples, evenly spaced
(fp8core.calibration.EvenlySpaced): which samples, whatever the file's row groups and the batch
size, and that the fit on them is the fit on a data set holding exactly those samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fp8core.calibration import ArraySource, EvenlySpaced, evenly_spaced, open_dataset, write_parquet
from fp8core.pipeline import AdjustConfig, CalibrateConfig, adjust_weights, calibrate, load, plan
from test_padding import encoder, padded_data


def _numbered(n: int) -> dict[str, np.ndarray]:
    """Sample i holds the value i everywhere, so a batch says which samples it carries."""
    return {"x": np.repeat(np.arange(n, dtype=np.float32)[:, None, None], 3, axis=1).repeat(2, axis=2),
            "k": np.arange(n, dtype=np.int64)}


@pytest.mark.parametrize("n, count", [(50, 8), (50, 49), (7, 3), (64, 64), (10, 1)])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_the_subset_is_samples_i_n_over_count_in_order_for_any_batching(tmp_path, n, count, batch_size):
    path = write_parquet(_numbered(n), tmp_path / "d.parquet", row_group_size=4)  # row groups cut batches
    for source in (open_dataset(path), ArraySource(tmp_path / "d.npz", _numbered(n))):
        subset = evenly_spaced(source, count)
        batches = list(subset.iter_batches(batch_size))
        taken = np.concatenate([b["k"] for b in batches])
        expected = [i * n // count for i in range(count)] if count < n else list(range(n))
        assert taken.tolist() == expected
        assert subset.num_samples == len(expected)
        assert all(len(b["k"]) == batch_size for b in batches[:-1])
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:, 0, 0], taken)


def test_a_source_with_no_more_samples_is_used_as_it_is_and_a_subset_has_its_own_fingerprint(tmp_path):
    np.savez(tmp_path / "d.npz", **_numbered(20))
    source = open_dataset(tmp_path / "d.npz")
    assert evenly_spaced(source, 20) is source and evenly_spaced(source, 64) is source
    subset = evenly_spaced(source, 5)
    assert isinstance(subset, EvenlySpaced)
    assert subset.fingerprint() != source.fingerprint()
    assert subset.fingerprint() == EvenlySpaced(open_dataset(tmp_path / "d.npz"), 5).fingerprint()
    assert subset.fingerprint() != evenly_spaced(source, 6).fingerprint()
    assert subset.columns == source.columns and subset.sample_shape("x") == (3, 2)


def _weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith(("w", "b"))}


def test_the_fit_on_a_capped_source_is_the_fit_on_those_samples_and_the_summary_says_so(tmp_path):
    onnx.save(encoder(), tmp_path / "enc.onnx")
    model = load(str(tmp_path / "enc.onnx")).model
    data = padded_data(0.0, samples=40)
    np.savez(tmp_path / "all.npz", **data)
    every = open_dataset(tmp_path / "all.npz")
    plans = calibrate(model, plan(model).plans, every, CalibrateConfig(batch_size=8)).plans
    picked = [i * 40 // 12 for i in range(12)]
    np.savez(tmp_path / "picked.npz", **{k: v[picked] for k, v in data.items()})

    def fit(source, samples):
        config = AdjustConfig(batch_size=8, weight_rounding="gptaq", fit_samples=samples)
        return adjust_weights(model, plans, source, config)

    capped, alone = fit(every, 12), fit(open_dataset(tmp_path / "picked.npz"), None)
    uncapped = fit(every, None)
    for name, value in _weights(capped.model.proto).items():
        np.testing.assert_array_equal(value, _weights(alone.model.proto)[name])
    assert any(not np.array_equal(v, _weights(uncapped.model.proto)[k]) for k, v in _weights(capped.model.proto).items())
    tokens = int(data["attention_mask"][picked].sum())
    assert [row["rows"] for row in capped.report] == [tokens, tokens]  # the padding rule still holds
    assert capped.what == f"GPTAQ fit on {len(capped.report)} ops over 12 of the 40 calibration samples"
    assert "calibration samples" not in uncapped.what and "calibration samples" not in fit(every, 40).what


def test_the_cli_flag_reaches_the_fit_and_the_run_records_it(tmp_path, capsys):
    import mlflow

    from flows.cli import main

    model, data = tmp_path / "enc.onnx", tmp_path / "calib.npz"
    onnx.save(encoder(), model)
    np.savez(data, **padded_data(0.0, samples=40))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--input_model", str(model), "--output_model", str(tmp_path / "m.onnx"), "--quantize",
                 "--data_preprocess", str(data), "--weight_fit_samples", "10", "--mlflow_tracking_uri", uri])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "weights: GPTAQ fit on 2 ops over 10 of the 40 calibration samples; rows of padding tokens" in out
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("fp8-convert").experiment_id])[0]
    assert run.data.params["weight_fit_samples"] == "10"
    assert main(["--input_model", str(model), "--quantize", "--data_preprocess", str(data),
                 "--weight_fit_samples", "0", "--mlflow_tracking_uri", uri]) != 0
    err = capsys.readouterr()
    assert "--weight_fit_samples" in err.err + err.out and "Traceback" not in err.err + err.out
