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


def test_recorder_logs_metrics_named_after_tensorflow_ops_past_mlflows_key_limit(tmp_path):
    """A TensorFlow export (basic-pitch's nmp.onnx) names an op with its whole call path, past
    MLflow's 250 characters: the run failed with MlflowException. Two such names that differ only
    in the middle stay two keys, each with its start and its end."""
    path = "StatefulPartitionedCall/model_1/" + "/".join(f"block_{i}/conv2d_{i}/BiasAdd" for i in range(12))
    names = {f"best_loss/{path}/a/Conv2D": 0.5, f"best_loss/{path.replace('block_5', 'block_X')}/a/Conv2D": 1.0,
             "best_loss/short/Conv2D": 2.0}
    keys = {_metric_key(k) for k in names}
    assert len(keys) == 3 and all(len(k) <= 250 for k in keys)
    assert all(k.startswith("best_loss/") and k.endswith("/Conv2D") for k in keys)
    assert _metric_key("best_loss/short/Conv2D") == "best_loss/short/Conv2D"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("long", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    Recorder(client, run.info.run_id).metrics(names)
    assert sorted(client.get_run(run.info.run_id).data.metrics.values()) == [0.5, 1.0, 2.0]


def test_recorder_stage_writes_what_a_stage_result_says(tmp_path):
    """record.stage(result): tags, metrics, metrics at their steps, files and JSON documents."""
    from fp8core.pipeline import Artifact, StageResult

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("stage", artifact_location=(tmp_path / "art").as_uri()))
    log = tmp_path / "quantize.log"
    log.write_text("log\n")
    Recorder(client, run.info.run_id).stage(StageResult(
        tags={"kept": "Conv_0"}, metrics={"fp8_op_count": 3}, steps=((1, {"trial": 0.5}), (2, {"trial": 0.25})),
        artifacts=(Artifact.file(str(log)), Artifact.json({"a": 1}, "x.json"))))
    got = client.get_run(run.info.run_id).data
    assert got.tags["kept"] == "Conv_0" and got.metrics["fp8_op_count"] == 3
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "trial")] == [(1, 0.5), (2, 0.25)]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["quantize.log", "x.json"]
