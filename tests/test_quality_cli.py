"""--precision_compare, --num_of_layers_keep_fp16, --keep_dominant_share and --accuracy_target through the CLI on the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from fp8core.pipeline import DEFAULT_DOMINANT_SHARE
from tests.models import outlier_chain

DATA = Path(__file__).resolve().parents[1] / "data"


def _args(tmp_path: Path, *flags: str) -> list[str]:
    return ["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(tmp_path / "m_fp8.onnx"),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment_name", "quality", *flags]


def _fp8_ops(path: Path) -> set[str]:
    """Ops whose weight input comes from a DequantizeLinear."""
    model = onnx.load(path)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in dq}


def test_compare_keep_worst_and_accuracy_target_end_to_end(tmp_path, capsys):
    code = main(_args(tmp_path, "--quantize", "--data_preprocess", str(DATA / "calib.parquet"),
                      "--precision_compare", "--compare_data", str(DATA / "eval.parquet"),
                      "--num_of_layers_keep_fp16", "1", "--accuracy_target", "cos_dist=0.0002"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "precision_compare.log" in out and "accuracy target" in out
    report = json.loads((tmp_path / "precision_compare.json").read_text())
    log = (tmp_path / "precision_compare.log").read_text()
    assert "keep_gain" in log and "<- matters #1" in log
    fp8_left = _fp8_ops(tmp_path / "m_fp8.onnx")
    assert set(report["keep_gain"]["ops"]) == fp8_left and report["keep_gain"]["metric"] == "logit_snr"
    assert (tmp_path / "precision_compare_snr.png").stat().st_size > 0
    fp8_now = _fp8_ops(tmp_path / "m_fp8.onnx")
    config_names = {"Conv_0", "Conv_3", "MatMul_7", "Gemm_10"}
    assert report["samples"] == 300 if "samples" in report else True
    assert 0 < len(fp8_now) < 4 and fp8_now <= config_names, fp8_now
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quality").experiment_id])[0]
    assert run.data.metrics["accuracy_target_met"] == 1.0
    assert run.data.tags["num_of_layers_keep_fp16"] in config_names
    assert any(k.startswith("compare_output/") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"precision_compare.log", "precision_compare.json", "accuracy_target.json", "op_sensitivity.json",
            "op_sensitivity.png"} <= names
    sensitivity = json.loads(Path(client.download_artifacts(run.info.run_id, "op_sensitivity.json", str(tmp_path)))
                             .read_text())
    assert sensitivity["ops"][0]["name"] == run.data.tags["num_of_layers_keep_fp16"]  # the op that helps most
    assert {o["name"] for o in sensitivity["ops"]} == config_names


@pytest.mark.parametrize("flags, words", [
    (["--accuracy_target", "cos_dist"], "METRIC=VALUE"),
    (["--accuracy_target", "bogus=1", "--compare_data", str(DATA / "eval.parquet")], "bogus"),
    (["--precision_compare"], "needs data"),
    (["--num_of_layers_keep_fp16", "-1"], "num_of_layers_keep_fp16"),
    (["--num_of_layers_keep_fp16", "2"], "num_of_layers_keep_fp16"),
    (["--accuracy_target", "cos_dist=0", "--compare_data", str(DATA / "eval.parquet"),
      "--accuracy_target_max_keep", "-1"], "accuracy_target_max_keep"),
    (["--accuracy_target_max_keep", "2"], "--accuracy_target too"),
])
def test_bad_values_of_the_new_flags(tmp_path, capfd, flags, words):
    code = main(_args(tmp_path, *flags))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "m_fp8.onnx").exists()


def test_accuracy_target_max_keep_keeps_the_best_ops_found_and_says_the_target_is_not_met(tmp_path, capsys):
    code = main(_args(tmp_path, "--quantize", "--data_preprocess", str(DATA / "calib.parquet"),
                      "--compare_data", str(DATA / "eval.parquet"), "--accuracy_target", "snr_db=200",
                      "--accuracy_target_max_keep", "2", "--accuracy_target_samples", "16"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "not met keeping the 2 most helpful op(s)" in out
    assert len(_fp8_ops(tmp_path / "m_fp8.onnx")) == 2  # 4 FP8-able ops, the 2 chosen kept in float
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quality").experiment_id])[0]
    assert run.data.metrics["accuracy_target_met"] == 0.0 and run.data.metrics["accuracy_target_kept_ops"] == 2


def test_an_op_carrying_most_of_the_output_noise_is_kept_by_default_and_0_turns_it_off(tmp_path, capsys):
    # a 16-op chain whose op 11 has a weight no FP8 scale holds with the others: alone it carries
    # most of the output noise, so --quantize keeps it by default and says so
    model = tmp_path / "chain.onnx"
    onnx.save(outlier_chain(16, bad=11), model)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    flags = ("--quantize", "--data_preprocess", str(tmp_path / "calib.npz"))
    args = ["--input_model", str(model), "--output_model", str(tmp_path / "m_fp8.onnx"),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment_name", "quality"]
    assert main([*args, *flags]) == 0
    out = capsys.readouterr().out
    assert (f"kept in original precision (each carried >= {DEFAULT_DOMINANT_SHARE:g} of the output noise alone): "
            "mm_11") in out
    assert _fp8_ops(tmp_path / "m_fp8.onnx") == {f"mm_{i}" for i in range(16)} - {"mm_11"}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("quality").experiment_id])[0]
    assert run.data.tags["kept_dominant_ops"] == "mm_11" and run.data.metrics["kept_dominant_ops"] == 1
    # 16 ops x 16 activation values per sample: trials this cheap measure every op alone
    assert run.data.tags["dominant_search"] == "singles" and run.data.metrics["dominant_search_trials"] == 17
    found = json.loads(Path(client.download_artifacts(run.info.run_id, "dominant_ops.json", str(tmp_path))).read_text())
    assert found["activation_values_per_sample"] == 16 * 16 and found["method"] == "singles"
    assert list(found["found"]) == ["mm_11"] and found["found"]["mm_11"] >= 0.5 and found["samples"] == 8
    assert found["share"] == DEFAULT_DOMINANT_SHARE and found["passed_over"] == {}

    args[3] = str(tmp_path / "off.onnx")
    assert main([*args, *flags, "--keep_dominant_share", "0"]) == 0
    assert "each carried" not in capsys.readouterr().out
    assert _fp8_ops(tmp_path / "off.onnx") == {f"mm_{i}" for i in range(16)}
