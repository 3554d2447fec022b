"""Operations: the statistics cache, the re-quantization config, and the deployments end to end.

The end-to-end tests start a real ``prefect server start`` and a real ``mlflow server`` (SQLite,
temp dirs, free ports on 127.0.0.1) and ``python -m deployments.serve`` as subprocesses, and talk
to them over HTTP only; every subprocess is stopped when the module's tests end, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.nightly_config import ConfigError, inside, load_config, newest_calibration_data
from fp8core.cache import CacheEntryCorrupt, StatsCache, StatsKey, decode_entry, encode_entry
from fp8core.stats import TensorStats

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
BIN = Path(sys.executable).parent


# --- the statistics cache (pure) -----------------------------------------------------------------

def _stats(seed: int) -> dict[str, TensorStats]:
    rng = np.random.default_rng(seed)
    return {"x": TensorStats.from_array(rng.normal(size=1000).astype(np.float32)),
            "conv/out:0": TensorStats.from_array(rng.exponential(size=500).astype(np.float32))}


KEY = StatsKey.of("a" * 64, "b" * 64, ["x", "conv/out:0"], 16)


def test_cache_round_trip_is_exact(tmp_path):
    cache = StatsCache(tmp_path)
    assert cache.load(KEY) is None
    stats = _stats(0)
    cache.store(KEY, stats)
    assert cache.load(KEY) == stats
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic write left no temp file


def test_cache_key_changes_with_every_field_and_ignores_tensor_order():
    assert StatsKey.of("a" * 64, "b" * 64, ["conv/out:0", "x", "x"], 16).digest == KEY.digest
    others = [StatsKey.of("c" * 64, "b" * 64, ["x", "conv/out:0"], 16),
              StatsKey.of("a" * 64, "c" * 64, ["x", "conv/out:0"], 16),
              StatsKey.of("a" * 64, "b" * 64, ["x"], 16),
              StatsKey.of("a" * 64, "b" * 64, ["x", "conv/out:0"], 32)]
    assert len({k.digest for k in others} | {KEY.digest}) == 5


@pytest.mark.parametrize("damage", ["flip_payload_byte", "flip_checksum_byte", "truncate", "magic", "empty"])
def test_damaged_entry_is_detected(damage):
    data = bytearray(encode_entry(KEY, _stats(1)))
    if damage == "flip_payload_byte":
        data[-100] ^= 0x01
    elif damage == "flip_checksum_byte":
        data[10] ^= 0x80
    elif damage == "truncate":
        data = data[:-7]
    elif damage == "magic":
        data[:8] = b"NOTSTATS"
    else:
        data = bytearray()
    with pytest.raises(CacheEntryCorrupt):
        decode_entry(bytes(data), KEY)


def test_entry_for_another_key_is_not_trusted(tmp_path):
    cache = StatsCache(tmp_path)
    other = StatsKey.of("a" * 64, "b" * 64, ["x", "conv/out:0"], 8)
    cache.path(KEY).parent.mkdir(parents=True, exist_ok=True)
    cache.path(KEY).write_bytes(encode_entry(other, _stats(2)))  # a misplaced, internally valid entry
    with pytest.raises(CacheEntryCorrupt, match="another key"):
        cache.load(KEY)


# --- the re-quantization config (pure) ------------------------------------------------------------

def _write_config(path: Path, models: list[dict], **top) -> Path:
    path.write_text(json.dumps({"data_dir": "data", "output_dir": "out", **top, "models": models}))
    return path


def test_config_paths_may_not_leave_their_root(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="leaves"):
        inside((tmp_path / "data").resolve(), "../secret.onnx", "model")
    with pytest.raises(ConfigError, match="absolute"):
        inside((tmp_path / "data").resolve(), "/etc/passwd", "model")
    (tmp_path / "data" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="leaves"):
        inside((tmp_path / "data").resolve(), "link/x.onnx", "model")
    cfg = load_config(_write_config(tmp_path / "c.json", [
        {"name": "m", "model": "m.onnx", "calibration_dir": ".", "output_model": "../../escape.onnx"}]))
    with pytest.raises(ConfigError, match="leaves"):
        cfg.output_path(cfg.models[0])


def test_config_rejects_unknown_keys_and_duplicate_names(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="models.0.loss: Extra inputs"):
        load_config(_write_config(tmp_path / "c.json", [{"name": "m", "model": "m", "calibration_dir": ".", "loss": "mse"}]))
    with pytest.raises(ConfigError, match="unique"):
        load_config(_write_config(tmp_path / "c.json", [{"name": "m", "model": "m", "calibration_dir": "."}] * 2))


def test_output_dir_expands_home_and_the_shipped_config_writes_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    config = load_config(_write_config(tmp_path / "c.json", [
        {"name": "m", "model": "m.onnx", "calibration_dir": "."}], data_dir="data", output_dir="~/fp8-out"))
    assert config.output_dir == (tmp_path / "home" / "fp8-out").resolve()
    shipped = load_config(REPO / "deployments" / "models.yaml")
    assert REPO.resolve() not in shipped.output_dir.parents
    assert shipped.output_dir == (tmp_path / "home" / ".local/share/fp8-pipeline/nightly").resolve()


def test_newest_calibration_data_wins(tmp_path):
    for i, name in enumerate(["b.parquet", "a.npz", "notes.txt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert newest_calibration_data(tmp_path).name == "a.npz"  # notes.txt is newer but not data
    shard_dir = tmp_path / "2024-06-01"
    shard_dir.mkdir()
    (shard_dir / "part-0.parquet").write_bytes(b"x")
    os.utime(shard_dir / "part-0.parquet", (5000, 5000))
    assert newest_calibration_data(tmp_path) == shard_dir
    assert newest_calibration_data(tmp_path, "*.parquet").name == "b.parquet"
    with pytest.raises(ConfigError, match="no calibration data"):
        newest_calibration_data(tmp_path, "*.pkl")


# --- servers ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


class Processes:
    """Subprocesses started by this module, each in its own process group, stopped on close()."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def close(self) -> None:
        """Ctrl-C, then SIGTERM, then SIGKILL, to each process group, newest first (serve before servers)."""
        for sig, grace in ((signal.SIGINT, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            alive = [p for p in reversed(self.procs) if p.poll() is None]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace
            for proc in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prefect server + MLflow server + the served deployments; yields their URLs and dirs."""
    root = tmp_path_factory.mktemp("ops")
    logs = root / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_UI_ENABLED="false", PYTHONUNBUFFERED="1")
    procs = Processes(logs)
    try:
        prefect_port, mlflow_port = _free_port(), _free_port()
        prefect_url = f"http://127.0.0.1:{prefect_port}/api"
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        (root / "prefect-server").mkdir()
        server, log = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                     "--port", str(prefect_port)],
                                  {**env, "PREFECT_HOME": str(root / "prefect-server")}, root)
        mlf, mlog = procs.start("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1",
                                                  "--port", str(mlflow_port), "--workers", "1",
                                                  "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                                  "--artifacts-destination", str(root / "mlartifacts")], env, root)
        _wait_http(f"{prefect_url}/health", server, log, 120)
        _wait_http(f"{mlflow_url}/health", mlf, mlog, 120)
        (root / "serve-home").mkdir()
        serve_env = {**env, "PREFECT_HOME": str(root / "serve-home"), "PREFECT_API_URL": prefect_url,
                     "MLFLOW_TRACKING_URI": mlflow_url, "FP8_CACHE_DIR": str(root / "cache")}
        serve, slog = procs.start("serve", [sys.executable, "-m", "deployments.serve"], serve_env, root)
        _wait_http(f"{prefect_url}/deployments/name/fp8-requantize-nightly/fp8-requantize-nightly", serve, slog, 120)
        _wait_http(f"{prefect_url}/deployments/name/fp8-convert/fp8-convert-on-demand", serve, slog, 30)
        yield {"prefect": prefect_url, "mlflow": mlflow_url, "root": root, "logs": logs}
    finally:
        procs.close()


def _call(api: httpx.Client, method: str, url: str, **kwargs):
    """One API call; a busy server (SQLite locked: 503) is asked again, a few times."""
    for attempt in range(10):
        response = api.request(method, url, **kwargs)
        if response.status_code != 503:
            return response.raise_for_status().json()
        time.sleep(0.5 * (attempt + 1))
    return response.raise_for_status().json()


def _run_deployment(prefect: str, name: str, parameters: dict, timeout: float = 150) -> dict:
    with httpx.Client(base_url=prefect, timeout=30) as api:
        dep = _call(api, "GET", f"/deployments/name/{name}")
        run = _call(api, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = _call(api, "GET", f"/flow_runs/{run['id']}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run['id']} of {name} not finished after {timeout}s: {run['state']}")


def _artifacts(prefect: str, flow_run_id: str) -> dict[str, dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    with httpx.Client(base_url=prefect, timeout=30) as api:
        found = _call(api, "POST", "/artifacts/filter", json=body)
    return {a["key"]: a for a in found if a["key"]}


def _logs_of(stack) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted(stack["logs"].glob("*.log")))


def _mlflow_run(mlflow: str, experiment: str, flow_run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert len(runs) == 1, runs
    return client, runs[0]


def test_on_demand_deployment_records_artifacts_mlflow_registry_and_reuses_capture(stack):
    out = stack["root"] / "ondemand"
    params = {
        "input_model": str(DATA / "demo_model.onnx"), "output_model": str(out / "demo_fp8.onnx"),
        "quantize": True, "data_preprocess": str(DATA / "calib.parquet"), "eval_data": str(DATA / "eval.parquet"),
        "quantize_loss_type": "mse", "fp8_skip_op_names": ["Conv_0"], "batch_size": 32,
        "mlflow_tracking_uri": stack["mlflow"], "experiment_name": "ops-on-demand",
        "cache_dir": str(stack["root"] / "ondemand-cache"),
        "register_model": True, "registered_model_name": "demo-fp8-ops", "min_accuracy_fp8": 0.9,
    }
    first = _run_deployment(stack["prefect"], "fp8-convert/fp8-convert-on-demand", {"params": params})
    assert first["state"]["type"] == "COMPLETED", _logs_of(stack)
    assert first["parameters"]["params"]["quantize_loss_type"] == "mse"

    artifacts = _artifacts(stack["prefect"], first["id"])
    table = artifacts["fp8-ops-demo-model"]
    assert table["type"] == "table"
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["Conv_0"]["precision"] == "skipped" and by_name["Conv_0"]["input_format"] == ""
    fp8_rows = [r for r in rows if r["precision"] == "fp8"]
    assert len(fp8_rows) == 3
    for r in fp8_rows:
        assert r["input_format"] in ("F143", "F152") and r["weight_format"] in ("F143", "F152")
        assert float(r["best_loss"]) >= 0

    client, run = _mlflow_run(stack["mlflow"], "ops-on-demand", first["id"])
    link = f"{stack['mlflow']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert link in artifacts["mlflow-run"]["data"]  # Prefect stores a link artifact as markdown
    assert link in artifacts["mlflow-run-summary"]["data"]
    assert run.info.status == "FINISHED"
    assert run.data.params["quantize_loss_type"] == "mse" and run.data.params["fp8_skip_op_names"] == "Conv_0"
    assert run.data.metrics["fp8_op_count"] == 3 and run.data.metrics["skipped_op_count"] == 1
    assert run.data.metrics["eval_accuracy_fp8"] >= 0.9
    assert run.data.tags["calibration_cache"] == "miss" and run.data.metrics["calibration_cache_hit"] == 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"fp8_config.json", "quantize.log", "quantize.json", "fp8_model"} <= names
    version = client.get_model_version("demo-fp8-ops", "1")
    assert version.run_id == run.info.run_id and version.source.endswith("fp8_model")
    local = client.download_artifacts(run.info.run_id, "fp8_model", str(stack["root"] / "download"))
    assert (Path(local) / "demo_fp8.onnx").read_bytes() == (out / "demo_fp8.onnx").read_bytes()
    # where the README says the registered model's file is: under the server's --artifacts-destination
    stored = stack["root"] / "mlartifacts" / run.info.experiment_id / run.info.run_id / "artifacts" / "fp8_model"
    assert (stored / "demo_fp8.onnx").read_bytes() == (out / "demo_fp8.onnx").read_bytes()
    # and the README's download command
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack["mlflow"]}
    subprocess.run([str(BIN / "mlflow"), "artifacts", "download", "-u", "models:/demo-fp8-ops/1",
                    "-d", str(stack["root"] / "by-version")], env=env, check=True, capture_output=True)
    assert (stack["root"] / "by-version" / "demo_fp8.onnx").read_bytes() == (out / "demo_fp8.onnx").read_bytes()

    second = _run_deployment(stack["prefect"], "fp8-convert/fp8-convert-on-demand", {"params": params})
    assert second["state"]["type"] == "COMPLETED", _logs_of(stack)
    _, run2 = _mlflow_run(stack["mlflow"], "ops-on-demand", second["id"])
    assert run2.data.tags["calibration_cache"] == "hit" and run2.data.metrics["calibration_cache_hit"] == 1
    assert run2.data.tags["registered_model_version"] == "2"
    # the cached statistics give the same searched choices as the capture did
    q1 = client.download_artifacts(run.info.run_id, "quantize.json", str(stack["root"] / "q1"))
    q2 = client.download_artifacts(run2.info.run_id, "quantize.json", str(stack["root"] / "q2"))
    assert json.loads(Path(q1).read_text())["ops"] == json.loads(Path(q2).read_text())["ops"]


def test_nightly_deployment_requantizes_only_the_changed_model(stack):
    base = stack["root"] / "nightly"
    data = base / "data"
    for name in ("a", "b"):
        (data / f"calib_{name}").mkdir(parents=True)
        shutil.copy(DATA / "demo_model.onnx", data / f"model_{name}.onnx")
        shutil.copy(DATA / "calib.parquet", data / f"calib_{name}" / "2024-01-01.parquet")
    shutil.copy(DATA / "eval.parquet", data / "eval.parquet")
    config = _write_config(base / "models.json", [
        {"name": n, "model": f"model_{n}.onnx", "calibration_dir": f"calib_{n}", "eval_data": "eval.parquet",
         "min_accuracy_fp8": 0.9} for n in ("a", "b")],
        mlflow_tracking_uri=stack["mlflow"], experiment_name="ops-nightly", cache_dir=str(base / "cache"))

    first = _run_deployment(stack["prefect"], "fp8-requantize-nightly/fp8-requantize-nightly", {"config_path": str(config)})
    assert first["state"]["type"] == "COMPLETED", _logs_of(stack)
    state = json.loads((base / "out" / "requantize_state.json").read_text())
    assert set(state) == {"a", "b"} and state["a"]["data_path"].endswith("2024-01-01.parquet")

    # new, newer calibration data for model a only: the first 40 samples
    newer = data / "calib_a" / "2024-02-01.parquet"
    pq.write_table(pq.read_table(DATA / "calib.parquet").slice(0, 40), newer)
    os.utime(newer, (time.time() + 60, time.time() + 60))
    second = _run_deployment(stack["prefect"], "fp8-requantize-nightly/fp8-requantize-nightly", {"config_path": str(config)})
    assert second["state"]["type"] == "COMPLETED", _logs_of(stack)
    summary = _artifacts(stack["prefect"], second["id"])["fp8-requantize-summary"]
    rows = json.loads(summary["data"]) if isinstance(summary["data"], str) else summary["data"]
    assert {r["model"]: r["action"] for r in rows} == {"a": "converted", "b": "skipped"}
    state2 = json.loads((base / "out" / "requantize_state.json").read_text())
    assert state2["a"]["data_path"].endswith("2024-02-01.parquet")
    assert state2["a"]["data_fingerprint"] != state["a"]["data_fingerprint"]
    assert state2["b"] == state["b"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"])
    exp = client.get_experiment_by_name("ops-nightly")
    assert len(client.search_runs([exp.experiment_id])) == 3  # a, b, then a again
    assert client.get_registered_model("a-fp8").latest_versions[0].version == "2"


def _flow_run_log_text(prefect: str, flow_run_id: str, expected: str, timeout: float = 30) -> str:
    """The run's log messages as the server has them, once ``expected`` is among them (the
    runner's subprocess sends its logs in batches, some after the run's final state)."""
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=prefect, timeout=30) as api:
        while True:
            text = "\n".join(entry["message"] for entry in _call(api, "POST", "/logs/filter", json=body))
            if expected in text or time.monotonic() > deadline:
                return text
            time.sleep(1)


def test_failed_deployment_run_shows_the_one_line_error_and_no_traceback(stack):
    missing = stack["root"] / "no_such_model.onnx"
    params = {"input_model": str(missing), "mlflow_tracking_uri": stack["mlflow"], "experiment_name": "ops-failures"}
    run = _run_deployment(stack["prefect"], "fp8-convert/fp8-convert-on-demand", {"params": params})
    assert run["state"]["type"] == "FAILED", _logs_of(stack)
    message = run["state"]["message"]
    assert str(missing) in message and "\n" not in message, message
    text = _flow_run_log_text(stack["prefect"], run["id"], str(missing))
    assert str(missing) in text, text
    assert "Traceback" not in text, text

    # the nightly flow with an unreadable config: one line as well
    bad_config = stack["root"] / "bad_models.yaml"
    bad_config.write_text("models: [")
    nightly = _run_deployment(stack["prefect"], "fp8-requantize-nightly/fp8-requantize-nightly",
                              {"config_path": str(bad_config)})
    assert nightly["state"]["type"] == "FAILED", _logs_of(stack)
    assert "bad_models.yaml" in nightly["state"]["message"]
    text = _flow_run_log_text(stack["prefect"], nightly["id"], "bad_models.yaml")
    assert "bad_models.yaml" in text and "Traceback" not in text, text


def _serve_and_stop(procs: Processes, name: str, env: dict, root: Path, prefect_url: str, stop_server=None) -> float:
    """Start deployments.serve, wait until it registered both deployments, (stop the server,) SIGTERM it;
    the seconds it took to exit."""
    serve, slog = procs.start(name, [sys.executable, "-m", "deployments.serve"], env, root)
    _wait_http(f"{prefect_url}/deployments/name/fp8-convert/fp8-convert-on-demand", serve, slog, 120)
    time.sleep(2)  # let the runner start polling
    if stop_server is not None:
        stop_server()
    t0 = time.monotonic()
    os.killpg(serve.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        serve.wait(timeout=30)
    took = time.monotonic() - t0
    assert serve.poll() is not None, slog.read_text()[-3000:]
    return took


def test_serve_exits_soon_after_sigterm_with_the_server_up_or_gone(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false",
               PYTHONUNBUFFERED="1")
    procs = Processes(tmp_path)
    try:
        port = _free_port()
        prefect_url = f"http://127.0.0.1:{port}/api"
        (tmp_path / "server-home").mkdir()
        server, log = procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                     "--port", str(port)],
                                  {**env, "PREFECT_HOME": str(tmp_path / "server-home")}, tmp_path)
        _wait_http(f"{prefect_url}/health", server, log, 120)
        (tmp_path / "serve-home").mkdir()
        serve_env = {**env, "PREFECT_HOME": str(tmp_path / "serve-home"), "PREFECT_API_URL": prefect_url}

        took = _serve_and_stop(procs, "serve-1", serve_env, tmp_path, prefect_url)
        assert took < 10, took
        with httpx.Client(base_url=prefect_url, timeout=30) as api:  # stopping paused the deployments
            dep = _call(api, "GET", "/deployments/name/fp8-requantize-nightly/fp8-requantize-nightly")
        # ... unless the graceful stop itself outlasted the grace (a heavily loaded machine): then
        # serve says so on its way out
        assert dep["paused"] is True or "the deployments may not be paused" in (tmp_path / "serve-1.log").read_text()

        def stop_server():
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

        took = _serve_and_stop(procs, "serve-2", serve_env, tmp_path, prefect_url, stop_server)
        assert took < 10, (took, (tmp_path / "serve-2.log").read_text()[-3000:])
    finally:
        procs.close()


def test_corrupt_cache_entry_is_recomputed_not_trusted(tmp_path, monkeypatch):
    """CLI (in-process, the session's temporary Prefect server): miss, corrupt, hit; same FP8 bytes."""
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outputs = []
    for i in range(3):
        out = tmp_path / f"m{i}.onnx"
        args = ["--input_model", str(DATA / "demo_model.onnx"), "--output_model", str(out), "--quantize",
                "--data_preprocess", str(DATA / "calib.parquet"), "--cache_dir", str(cache),
                "--mlflow_tracking_uri", uri, "--experiment_name", "cache"]
        assert main(args) == 0
        outputs.append(out.read_bytes())
        if i == 0:
            (entry,) = cache.rglob("*.fp8stats")
            data = bytearray(entry.read_bytes())
            data[len(data) // 2] ^= 0xFF
            entry.write_bytes(bytes(data))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cache").experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.tags["calibration_cache"] for r in runs] == ["miss", "corrupt", "hit"]
    assert outputs[0] == outputs[1] == outputs[2]
