"""fp8core.compare: streamed metrics and statistics against numpy on the concatenated tensors."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fp8core.calibration import ArraySource, open_dataset
from fp8core.compare import (
    HISTOGRAM_BINS,
    CompareError,
    TensorComparison,
    compare_models,
    format_compare_log,
    mlflow_metrics,
    write_compare_logs,
)
from fp8core.graph import load_model
from fp8core.losses import cos_dist as cos_dist_loss
from fp8core.plan import QuantParams, plan_fp8_ops
from fp8core.rewrite import prepare_model, rewrite_to_fp8
from fp8core.runtime import make_session
import models

DATA = Path(__file__).resolve().parents[1] / "data"


def converted(model, act=-3, weight=-6):
    prepared = prepare_model(model, 21)
    plans = plan_fp8_ops(prepared, activation_params=QuantParams("F143", act),
                         weight_params=QuantParams("F143", weight))
    return prepared, plans, rewrite_to_fp8(prepared, plans)


def cnn_case(samples=23, seed=1):
    prepared, plans, fp8 = converted(models.cnn())
    x = np.random.default_rng(seed).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    return prepared, plans, fp8, ArraySource(Path("mem.npz"), {"x": x})


def all_values(model, tensors, source, batch_size):
    """Every value of every tensor over the data set, concatenated (the direct computation)."""
    tensors = list(dict.fromkeys(tensors))  # an op output may also be a model output
    session = make_session(model, extra_outputs=tensors)
    out = {t: [] for t in tensors}
    for batch in source.iter_batches(batch_size, ["x"]):
        for t, v in zip(tensors, session.run(tensors, batch)):
            out[t].append(v.astype(np.float64).reshape(-1))
    return {t: np.concatenate(v) for t, v in out.items()}


def numpy_summary(v):
    c = v - v.mean()
    m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
    return {"mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max(),
            "skewness": m3 / m2**1.5, "kurtosis": m4 / m2**2 - 3.0}


def test_every_metric_and_statistic_equals_numpy_on_the_concatenated_tensors():
    prepared, plans, fp8, source = cnn_case()
    report = compare_models(prepared, fp8, plans, source, batch_size=7)
    assert [r.label for r in report.op_rows] == [p.name for p in plans]  # graph order
    assert [r.label for r in report.output_rows] == ["y"]
    tensors = [r.tensor for r in report.rows]
    xs, ys = all_values(prepared, tensors, source, 7), all_values(fp8, tensors, source, 7)
    for row in report.rows:
        x, y = xs[row.tensor], ys[row.tensor]
        e = y - x
        assert row.count == x.size == 23 * (x.size // 23)
        assert row.mse == pytest.approx(np.mean(e**2), rel=1e-12)
        assert row.mae == pytest.approx(np.mean(np.abs(e)), rel=1e-12)
        assert row.snr == pytest.approx(np.sum(e**2) / np.sum(x**2), rel=1e-12)
        assert row.snr_db == pytest.approx(-10 * np.log10(np.sum(e**2) / np.sum(x**2)), rel=1e-12)
        cos = 1 - np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))
        assert row.cos_dist == pytest.approx(cos, rel=1e-6)
        assert row.cos_dist > 1e-6  # FP8 error is really measured
        for summary, v in ((row.original, x), (row.fp8, y), (row.error, e)):
            d = summary.to_dict()
            for key, want in numpy_summary(v).items():
                assert d[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (row.label, key)
            counts, _ = np.histogram(v, HISTOGRAM_BINS, (v.min(), v.max()))
            assert d["histogram"]["counts"] == counts.tolist()
            assert (d["histogram"]["underflow"], d["histogram"]["overflow"]) == (0, 0)
    assert report.output_metric("cos_dist") == report.output_rows[0].cos_dist


def test_first_batch_histogram_range_counts_values_outside_it():
    prepared, plans, fp8, source = cnn_case(samples=30)
    report = compare_models(prepared, fp8, plans, source, batch_size=4, histogram_range="first_batch")
    tensors = [r.tensor for r in report.rows]
    xs, first = all_values(prepared, tensors, source, 4), all_values(prepared, tensors, ArraySource(
        Path("first.npz"), {"x": next(source.iter_batches(4, ["x"]))["x"]}), 4)
    for row in report.rows:
        h = row.original.histogram
        lo, hi = first[row.tensor].min(), first[row.tensor].max()
        assert (h.low, h.high) == pytest.approx((lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)))
        x = xs[row.tensor]
        assert h.counts.tolist() == np.histogram(x, HISTOGRAM_BINS, (h.low, h.high))[0].tolist()
        assert h.underflow == np.count_nonzero(x < h.low) and h.overflow == np.count_nonzero(x > h.high)
        assert h.counts.sum() + h.underflow + h.overflow == row.count
    # the statistics themselves do not depend on the histogram rule
    two_pass = compare_models(prepared, fp8, plans, source, batch_size=4)
    assert [r.mse for r in report.rows] == [r.mse for r in two_pass.rows]


def test_max_samples_takes_the_first_samples_only():
    prepared, plans, fp8, source = cnn_case(samples=20)
    head = ArraySource(Path("head.npz"), {"x": next(source.iter_batches(9, ["x"]))["x"]})
    limited = compare_models(prepared, fp8, plans, source, batch_size=4, max_samples=9)
    direct = compare_models(prepared, fp8, plans, head, batch_size=4)
    assert limited.samples == 9
    assert [r.to_dict()["mse"] for r in limited.rows] == [r.to_dict()["mse"] for r in direct.rows]


def test_cos_dist_keeps_its_digits_when_the_distance_is_tiny():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100_000).astype(np.float32)
    bumped = rng.random(x.size) < 0.5  # one float32 ulp off on half of the values
    y = np.where(bumped, np.nextafter(x, np.float32(np.inf)), x).astype(np.float32)
    row = TensorComparison("t", "t", "op_output", "MatMul", 0)
    for i in range(0, x.size, 9973):
        row.update(x[i:i + 9973], y[i:i + 9973])
    reference = cos_dist_loss(x, y)  # the unit-vector form of fp8core.losses
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    naive = 1 - np.dot(x64, y64) / (np.linalg.norm(x64) * np.linalg.norm(y64))
    assert 0 < reference < 1e-14
    assert row.cos_dist == pytest.approx(reference, rel=1e-6)
    assert abs(naive - reference) > 0.05 * reference  # the naive form would have lost digits


def test_nonfinite_pairs_are_counted_and_left_out():
    row = TensorComparison("t", "t", "model_output", None, 0)
    row.update(np.array([1.0, np.nan, 2.0, 3.0]), np.array([1.5, 1.0, np.inf, 2.0]))
    assert (row.count, row.nonfinite) == (2, 2)
    assert row.mse == pytest.approx((0.25 + 1.0) / 2)
    assert row.original.min == 1.0 and row.original.max == 3.0


def test_memory_does_not_grow_with_the_number_of_samples():
    prepared, plans, fp8, _ = cnn_case()

    def peak(samples):
        x = np.random.default_rng(0).standard_normal((samples, 3, 8, 8)).astype(np.float32)
        source = ArraySource(Path("m.npz"), {"x": x})
        data_bytes = x.nbytes
        compare_models(prepared, fp8, plans, source, batch_size=8)  # warm up imports and caches
        tracemalloc.start()
        compare_models(prepared, fp8, plans, source, batch_size=8)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, data_bytes

    small, _ = peak(16)
    large, large_data = peak(512)
    assert large < small + 2_000_000  # 32x the samples, same working set
    assert large - small < large_data  # far less than holding the extra samples' tensors


def test_logs_json_and_chart(tmp_path):
    prepared = prepare_model(load_model(DATA / "demo_model.onnx"), 21)
    plans = plan_fp8_ops(prepared, activation_params=QuantParams("F143", -3), weight_params=QuantParams("F143", -6))
    fp8 = rewrite_to_fp8(prepared, plans)
    report = compare_models(prepared, fp8, plans, open_dataset(DATA / "eval.parquet"), batch_size=64, max_samples=100)
    paths = write_compare_logs(report, str(tmp_path))
    log = Path(paths["log"]).read_text()
    table = [line for line in log.splitlines() if line[:3].strip().isdigit()]
    assert [line.split()[1] for line in table] == [r.label for r in report.rows]
    worst = report.worst_ops()
    assert f"{worst[0].label}" in next(line for line in table if "<- worst #1" in line)
    assert sum("<- worst" in line for line in table) == min(3, len(report.op_rows))
    assert all(worst[0].snr >= r.snr for r in report.op_rows)
    data = json.loads(Path(paths["json"]).read_text())
    assert data["samples"] == 100 and data["worst_ops"] == [r.label for r in worst]
    assert data["model_outputs"]["cos_dist"] == report.output_metric("cos_dist")
    assert len(data["tensors"][0]["error"]["histogram"]["counts"]) == HISTOGRAM_BINS
    assert Path(paths["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = mlflow_metrics(report)
    assert metrics[f"compare/{worst[0].label}/snr_db"] == pytest.approx(worst[0].snr_db)
    assert all(math.isfinite(v) for v in metrics.values())
    assert "compare_output/cos_dist" in metrics
    assert format_compare_log(report) == log


def test_bad_arguments_raise_compare_error():
    prepared, plans, fp8, source = cnn_case(samples=4)
    with pytest.raises(CompareError, match="histogram_range"):
        compare_models(prepared, fp8, plans, source, histogram_range="auto")
    other_plans = plan_fp8_ops(prepare_model(models.mixed_names(), 21))
    with pytest.raises(CompareError, match="not in the model"):
        compare_models(prepared, fp8, other_plans, source)
    with pytest.raises(CompareError, match="metric"):
        TensorComparison("t", "t", "op_output", None, 0).metric("accuracy")
