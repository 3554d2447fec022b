"""The mapped capture and search on a real Dask LocalCluster give the same FP8 model as threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                     host="127.0.0.1")
    try:
        yield c
    finally:
        c.close()


def _convert(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name / "m_fp8.onnx"
    out.parent.mkdir()
    code = main(["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(out),
                 "--quantize", "--data_preprocess", str(DATA / "calib.parquet"), "--batch_size", "8",
                 "--quantize_loss_type", "mse", "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 *flags])
    assert code == 0
    return out


def test_dask_cluster_gives_the_same_model_bytes_as_threads(tmp_path, cluster):
    threads = _convert(tmp_path, "thread", "--task_runner", "thread")
    dask = _convert(tmp_path, "dask", "--dask_address", cluster.scheduler_address)
    assert dask.read_bytes() == threads.read_bytes()
    a = json.loads((threads.parent / "quantize.json").read_text())
    b = json.loads((dask.parent / "quantize.json").read_text())
    # sharded capture merges moments in another order: same choices, same losses up to rounding
    for op_a, op_b in zip(a["ops"], b["ops"]):
        for ta, tb in zip(op_a["tensors"], op_b["tensors"]):
            assert ta["chosen"] == tb["chosen"]
            assert [c["loss"] for c in ta["candidates"]] == pytest.approx([c["loss"] for c in tb["candidates"]], rel=1e-9)
            assert ta["statistics"]["count"] == tb["statistics"]["count"]
    # the work really ran on the cluster's workers: each worker ran tasks
    ran = _task_counts(cluster)
    assert len([w for w, n in ran.items() if n > 0]) == 2, ran


def _task_counts(cluster) -> dict:
    from dask.distributed import Client

    with Client(cluster.scheduler_address) as client:
        return client.run(lambda dask_worker: len(dask_worker.state.log))


def test_a_deployment_style_run_honours_dask_address(tmp_path, cluster):
    """A deployed flow's own task runner is fixed at deployment; calling the flow the way a
    deployment run does (parameters only) must still send capture shards and searches to Dask."""
    from flows.convert import fp8_convert
    from tasks.params import ConvertParams

    threads = _convert(tmp_path, "thread", "--task_runner", "thread")
    before = _task_counts(cluster)
    out = tmp_path / "deployed" / "m_fp8.onnx"
    out.parent.mkdir()
    params = ConvertParams(input_model=str(DATA / "demo_model.onnx"), output_model=str(out), quantize=True,
                           data_preprocess=str(DATA / "calib.parquet"), batch_size=8, quantize_loss_type="mse",
                           dask_address=cluster.scheduler_address,
                           mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    fp8_convert(params)
    assert out.read_bytes() == threads.read_bytes()
    after = _task_counts(cluster)
    assert all(after[w] > before[w] for w in after), (before, after)  # both workers got work
