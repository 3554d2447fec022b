"""MLflow keys built from op names that torch exporters produce ('/bert/encoder/MatMul') are valid."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tasks.tracking import Recorder, _metric_key


def test_metric_keys_are_clean_relative_paths():
    assert _metric_key("best_loss//bert/encoder/layer.0/MatMul") == "best_loss/bert/encoder/layer.0/MatMul"
    assert _metric_key("compare//a/../b:0/snr") == "compare/a/__/b_0/snr"
    assert _metric_key("/") == "_"


def test_recorder_logs_metrics_named_after_torch_style_ops(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("keys", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    Recorder(client, run.info.run_id).metrics({"best_loss//bert/encoder/layer.0/attention/MatMul": 0.5,
                                               "compare//embeddings/Gather/snr": 1.0})
    got = client.get_run(run.info.run_id).data.metrics
    assert got == {"best_loss/bert/encoder/layer.0/attention/MatMul": 0.5, "compare/embeddings/Gather/snr": 1.0}
