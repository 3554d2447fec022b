"""--quantize end to end on the demo model: every loss, the logs, the MLflow run, the accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from fp8core.calibration import open_dataset
from fp8core.formats import get_format
from fp8core.losses import get_loss
from fp8core.runtime import make_session

DATA = Path(__file__).resolve().parents[1] / "data"
LOSSES = ["mse", "mae", "snr", "kld", "cos_dist"]


def _eval_images() -> np.ndarray:
    batches = list(open_dataset(DATA / "eval.parquet").iter_batches(300, ["image"]))
    return np.concatenate([b["image"] for b in batches])


def _rel_error(fp8_path: Path, images: np.ndarray) -> float:
    """Relative L2 distance of the FP8 model's logits from the FP32 model's on held-out data."""
    ref = make_session(str(DATA / "demo_model.onnx")).run(["logits"], {"image": images})[0]
    out = make_session(str(fp8_path)).run(["logits"], {"image": images})[0]
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _run(tmp_path: Path, name: str, *flags: str) -> tuple[Path, str]:
    out = tmp_path / name / "model_fp8.onnx"
    out.parent.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(out),
                 "--mlflow_tracking_uri", uri, "--experiment_name", "quantize-tests", *flags])
    assert code == 0
    return out, uri


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize")
    fast, uri = _run(tmp, "fast")  # fast-mode defaults: F143, scale 0
    calibrated = {}
    for loss in LOSSES:
        calibrated[loss], _ = _run(tmp, loss, "--quantize", "--quantize_loss_type", loss,
                                   "--data_preprocess", str(DATA / "calib.parquet"), "--batch_size", "16")
    return {"fast": fast, "calibrated": calibrated, "uri": uri}


@pytest.mark.parametrize("loss", LOSSES)
def test_quantize_log_lists_every_candidate_and_marks_the_chosen_one(runs, loss):
    folder = runs["calibrated"][loss].parent
    report = json.loads((folder / "quantize.json").read_text())
    text = (folder / "quantize.log").read_text()
    assert report["loss"] == loss
    config = {o["name"]: o for o in json.loads(json.dumps(report))["ops"]}
    assert set(config) == {"Conv_0", "Conv_3", "MatMul_7", "Gemm_10"}
    model = onnx.load(runs["calibrated"][loss])
    inits = {t.name: t for t in model.graph.initializer}
    for op in report["ops"]:
        roles = sorted(t["role"] for t in op["tensors"])
        assert roles == ["activation", "weight"]
        for t in op["tensors"]:
            losses = [c["loss"] for c in t["candidates"] if c["loss"] is not None]
            # losses within TIE_RTOL * |best| + the loss's tie_atol of the minimum tie (kld: 1e-3
            # nats); the tie-break then decides (fp8core.search)
            best = min(losses)
            assert best <= t["loss"] <= best + 1e-8 * abs(best) + get_loss(loss).tie_atol
            assert {"mean", "variance", "skewness", "kurtosis", "absmax"} <= set(t["statistics"])
            assert f"{op['name']} ({op['op_type']})" in text
        # the chosen weight params are the ones written into the model
        w = next(t for t in op["tensors"] if t["role"] == "weight")
        fmt = get_format(w["chosen"]["format"])
        fp8_inits = [i for n, i in inits.items() if n.startswith(w["tensor"] + "_") and n.endswith("_fp8")]
        assert len(fp8_inits) == 1 and fp8_inits[0].data_type == fmt.onnx_type
        scale = onnx.numpy_helper.to_array(inits[fp8_inits[0].name.replace("_fp8", "_scale")])
        assert float(scale) == 2.0 ** w["chosen"]["scale"]
    assert text.count("<- best") == sum(len(o["tensors"]) for o in report["ops"])


@pytest.mark.parametrize("loss", LOSSES)
def test_calibrated_model_is_at_least_as_close_to_fp32_as_fast_mode(runs, loss):
    images = _eval_images()
    fast = _rel_error(runs["fast"], images)
    calibrated = _rel_error(runs["calibrated"][loss], images)
    assert calibrated <= fast * 1.02, (loss, calibrated, fast)


def test_mlflow_run_has_logs_metrics_chart_and_data_fingerprint(runs):
    client = MlflowClient(tracking_uri=runs["uri"])
    exp = client.get_experiment_by_name("quantize-tests")
    found = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mode") == "quantize"]
    assert len(found) == len(LOSSES)
    fingerprint = open_dataset(DATA / "calib.parquet").fingerprint()
    for run in found:
        assert run.info.status == "FINISHED"
        assert run.data.tags["calibration_fingerprint"] == fingerprint
        assert run.data.params["quantize"] == "True"
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"quantize.log", "quantize.json", "quantize_loss.png", "fp8_config.json"} <= names
        best = {k for k in run.data.metrics if k.startswith("best_loss/")}
        assert best == {"best_loss/Conv_0", "best_loss/Conv_3", "best_loss/MatMul_7", "best_loss/Gemm_10"}
        assert run.data.metrics["seconds_capture"] >= 0 and run.data.metrics["seconds_search"] >= 0


@pytest.mark.parametrize("loss", ["mse", "kld"])
def test_library_pipeline_writes_the_clis_model_logs_and_metrics(runs, tmp_path, loss):
    """fp8core.pipeline.convert, without Prefect or MLflow: the CLI's bytes, quantize.json, and
    what its MLflow run records (metrics, artifacts). It reads the statistics the CLI cached."""
    from fp8core import pipeline
    from tasks.params import ConvertParams

    out = tmp_path / "model_fp8.onnx"
    conversion = pipeline.convert(ConvertParams(
        input_model=str(DATA / "demo_model.onnx"), output_model=str(out), quantize=True, quantize_loss_type=loss,
        data_preprocess=str(DATA / "calib.parquet"), batch_size=16))
    cli = runs["calibrated"][loss]
    assert out.read_bytes() == cli.read_bytes()
    assert (tmp_path / "quantize.json").read_text() == (cli.parent / "quantize.json").read_text()
    assert conversion.result()["quantize_log"] == str(tmp_path / "quantize.log")
    client = MlflowClient(tracking_uri=runs["uri"])
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("quantize-tests").experiment_id])
             if r.data.params["output_model"] == str(cli)]
    recorded = {k: v for k, v in run.data.metrics.items() if not k.startswith("seconds_")}
    assert conversion.tags["calibration_cache"] == "hit" and conversion.metrics["calibration_cache_hit"] == 1
    assert {**conversion.metrics, "calibration_cache_hit": recorded["calibration_cache_hit"]} == pytest.approx(recorded)
    assert {f"seconds_{k}" for k in conversion.seconds} == set(run.data.metrics) - set(recorded)
    assert sorted(a.name for a in conversion.artifacts) == sorted(a.path for a in client.list_artifacts(run.info.run_id))


def test_poprt_later_spellings_and_fp8_params_warning(tmp_path, capfd):
    out, _ = _run(tmp_path, "alias", "--calibration_with_data", "--calibration_loss_type", "mse",
                  "--data_preprocess", str(DATA / "calib.npz"), "--fp8_params", "F152,F152,-3,-3")
    err = capfd.readouterr().err
    assert "--fp8_params is ignored with --quantize" in err
    assert json.loads((out.parent / "quantize.json").read_text())["loss"] == "mse"


def test_skipped_ops_are_not_searched(tmp_path):
    out, _ = _run(tmp_path, "skip", "--quantize", "--data_preprocess", str(DATA / "calib.parquet"),
                  "--fp8_skip_op_names", "Conv_0,Gemm_10")
    report = json.loads((out.parent / "quantize.json").read_text())
    by_name = {o["name"]: o for o in report["ops"]}
    assert by_name["Conv_0"]["fp8"] is False and by_name["Conv_0"]["tensors"] == []
    assert by_name["Gemm_10"]["fp8"] is False
    assert by_name["Conv_3"]["fp8"] is True


def test_calibration_data_that_does_not_match_gives_one_clear_line(tmp_path, capfd):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 1, 7, 7), np.float32))
    out = tmp_path / "o.onnx"
    code = main(["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(out), "--quantize",
                 "--data_preprocess", str(bad), "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "image" in err[0], err
    assert not out.exists()


def test_every_run_logs_output_agreement_matching_an_independent_comparison(runs):
    """Without eval data a run still logs how close the FP8 outputs are to the float ones, on the
    first calibration samples; recomputed here with pyarrow + onnxruntime (ORT_DISABLE_ALL)."""
    import onnxruntime as ort
    import pyarrow.parquet as pq

    table = pq.read_table(DATA / "calib.parquet").slice(0, 4)
    column = table.column("image").combine_chunks()
    images = column.to_numpy_ndarray().astype(np.float32)  # fixed_shape_tensor cells
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def logits(path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images})[0].astype(np.float64)

    want, got = logits(DATA / "demo_model.onnx"), logits(runs["calibrated"]["mse"])
    cosine = float((want * got).sum() / np.sqrt((want * want).sum() * (got * got).sum()))
    snr = 10 * np.log10((want * want).sum() / ((want - got) ** 2).sum())
    agree = float((want.argmax(1) == got.argmax(1)).mean())
    client = MlflowClient(tracking_uri=runs["uri"])
    exp = client.get_experiment_by_name("quantize-tests")
    run = next(r for r in client.search_runs([exp.experiment_id])
               if r.data.params.get("quantize_loss_type") == "mse" and r.data.tags.get("mode") == "quantize")
    assert run.data.metrics["output_cosine"] == pytest.approx(cosine, abs=1e-6)
    assert run.data.metrics["output_snr_db"] == pytest.approx(snr, abs=1e-3)
    assert run.data.metrics["output_top1_agreement"] == pytest.approx(agree)
    fast = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mode") == "fast")
    assert {"output_cosine", "output_snr_db"} <= set(fast.data.metrics)  # fast mode too
