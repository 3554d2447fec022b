"""Faults and untrusted files: what a kill, a full disk, a failing sample or Ctrl-C leaves behind.

* SIGKILL of a writer (mid data file, or after the temps are complete but before the rename):
  the previous model and its data file are intact, byte for byte; the next write removes the
  dead writer's temps and leaves none of its own.
* A full disk (``RLIMIT_FSIZE`` in a subprocess): one-line OutputError, previous output intact,
  no temps.
* A calibration sample that makes onnxruntime fail: CaptureError naming the samples.
* Ctrl-C (SIGINT to ``fp8-convert``): exit 130, one line, no output file, MLflow run KILLED.
* Untrusted sizes: an npz array or Parquet tensor column whose declared size is larger than its
  data or than free memory is refused before allocation; npz object arrays are refused.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp8core.calibration import ArraySource, CalibrationDataError, open_dataset
from fp8core.capture import CaptureError, capture_stats
from fp8core.modelio import save_model_atomic
from fp8core.plan import QuantParams, plan_fp8_ops
from models import matmul_chain

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("fp8-convert")


def _big_model(mbytes: int, seed: int) -> onnx.ModelProto:
    """One MatMul whose weight is ``mbytes`` MiB of float32 (content depends on ``seed``)."""
    n = int(np.sqrt(mbytes * 2**20 / 4))
    w = np.random.default_rng(seed).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


# A writer in a subprocess: saves _big_model(mb, seed) to argv path; with "hang", the check
# callback (run after the temps are complete, before any rename) announces itself and sleeps.
WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_faults import _big_model
    from fp8core.modelio import OutputError, save_model_atomic
    path, mb, seed, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode == "fsize":
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
    def check(temp_model):
        if mode == "hang":
            print("checking", flush=True)
            time.sleep(60)
    try:
        save_model_atomic(_big_model(mb, seed), path, external_data="always", check=check)
    except OutputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
""").format(tests=str(Path(__file__).parent))


def _writer(path: Path, mb: int, seed: int, mode: str = "plain", **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(mb), str(seed), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def previous_output(tmp_path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "m.onnx"
    save_model_atomic(_big_model(4, seed=1), str(out), external_data="always")
    before = _snapshot(tmp_path)
    assert len(before) == 2  # m.onnx + m.onnx.<hash>.data
    return out, before


@pytest.mark.parametrize("moment", ["writing data", "before the rename"])
def test_sigkill_leaves_the_previous_output_and_the_next_run_cleans_up(previous_output, moment):
    out, before = previous_output
    folder = out.parent
    if moment == "writing data":
        proc = _writer(out, 64, seed=2)
        deadline = time.monotonic() + 60
        while not any(p.is_dir() and any(p.iterdir()) for p in folder.iterdir() if p.name.startswith(".")):
            assert proc.poll() is None and time.monotonic() < deadline, "writer finished before it could be killed"
            time.sleep(0.001)
    else:
        proc = _writer(out, 8, seed=2, mode="hang")
        assert proc.stdout.readline().strip() == "checking"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert _temps(folder), "the kill left the writer's temps (what the next run must remove)"
    assert {k: v for k, v in _snapshot(folder).items() if not k.startswith(".")} == before

    proc = _writer(out, 4, seed=3)
    assert proc.wait(120) == 0, proc.stderr.read()
    after = _snapshot(folder)
    assert not _temps(folder)
    assert len(after) == 2 and after.keys() != before.keys()  # new model, new data file, old data gone
    onnx.checker.check_model(str(out), full_check=True)


def test_full_disk_is_one_line_and_keeps_the_previous_output(previous_output):
    out, before = previous_output
    proc = _writer(out, 8, seed=2, mode="fsize")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    line = stderr.strip()
    assert "\n" not in line and "disk is full or the file size limit" in line and str(out) in line
    assert _snapshot(out.parent) == before and not _temps(out.parent)  # old model and data intact, no temps


def _gather_model() -> onnx.ModelProto:
    """y = MatMul(x, W) + Gather(table, idx): an idx out of range makes onnxruntime fail."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Gather", ["table", "idx"], ["g"], name="gather", axis=0),
             helper.make_node("Squeeze", ["g", "one"], ["gs"], name="squeeze"),
             helper.make_node("Add", ["h", "gs"], ["y"], name="add")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_a_sample_that_makes_onnxruntime_fail_is_named(tmp_path):
    model = _gather_model()
    idx = np.zeros((20, 1), np.int64)
    idx[13] = 7  # out of the table's 3 rows
    source = ArraySource(tmp_path / "calib.npz", {"x": np.ones((20, 4), np.float32), "idx": idx})
    plans = plan_fp8_ops(model, "fp8", [], QuantParams("F143", 0), QuantParams("F143", 0))
    with pytest.raises(CaptureError) as caught:
        capture_stats(model, ["x"], source, batch_size=4)
    message = str(caught.value)
    assert "\n" not in message and ("samples 12..15" in message or "sample 13" in message), message
    assert plans  # the op the capture serves


# --- Ctrl-C -------------------------------------------------------------------------------------


def _run_status(db: Path) -> str | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute("SELECT status FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _sigint_as_in_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored and children inherit that (Python then
    # installs no KeyboardInterrupt handler): a test suite launched with `&` would see Ctrl-C
    # ignored. In the child, before exec: SIGINT back to its default, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "fp8-convert: interrupted; no output written"),
    (signal.SIGTERM, 143, "fp8-convert: terminated (SIGTERM); no output written"),
])
def test_ctrl_c_and_sigterm_stop_the_run_and_mark_the_mlflow_run_killed(tmp_path, sig, code, line):
    model_path, data_path, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "m_fp8.onnx"
    onnx.save(matmul_chain(size=256, depth=4), str(model_path))
    # enough batches that the capture is still running when the signal comes
    np.savez(data_path, x=np.random.default_rng(0).standard_normal((40_000, 256)).astype(np.float32))
    db = tmp_path / "mlflow.db"
    proc = subprocess.Popen([str(CONSOLE_SCRIPT), "--input_model", str(model_path), "--output_model", str(out),
                             "--quantize", "--data_preprocess", str(data_path), "--batch_size", "4",
                             "--mlflow_tracking_uri", f"sqlite:///{db}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 240
    while _run_status(db) != "RUNNING":
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the MLflow run never started"
        time.sleep(0.2)
    time.sleep(2)  # inside the flow's stages
    proc.send_signal(sig)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, (stdout, stderr)
    assert time.monotonic() - sent < 10  # schedulers give a few seconds before SIGKILL
    assert stderr.strip().splitlines()[-1] == line
    assert not out.exists() and not _temps(tmp_path)
    assert _run_status(db) == "KILLED"


# --- untrusted sizes ------------------------------------------------------------------------------


def _npz_with_lying_header(path: Path, shape: tuple[int, ...]) -> None:
    """An npz whose only member's .npy header declares ``shape`` but holds 16 bytes of data."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(b"\0" * 16)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", buf.getvalue())


@pytest.mark.parametrize("shape", [(2**40,), (1000, 1000, 1000, 1000)])
def test_npz_array_larger_than_its_data_is_refused_before_allocation(tmp_path, shape):
    path = tmp_path / "lie.npz"
    _npz_with_lying_header(path, shape)
    with pytest.raises(CalibrationDataError, match="declares .* bytes but holds"):
        open_dataset(path)


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CalibrationDataError, match="object array"):
        open_dataset(path)


def test_parquet_column_whose_samples_would_not_fit_in_memory_is_refused(tmp_path):
    """A list column whose recorded sample shape is 4 TiB: refused at the first batch, unread."""
    path = tmp_path / "huge.parquet"
    table = pa.table({"x": pa.array([[1.0, 2.0]], type=pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({b"fp8.shape.x": json.dumps([2**20, 2**20]).encode()})
    pq.write_table(table, path)
    source = open_dataset(path)
    with pytest.raises(CalibrationDataError, match="GiB of memory is free"):
        next(source.iter_batches(1))


def test_the_staging_folder_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    from fp8core.staging import StagedOutputs

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    stale = tmp_path / f".fp8-staging.{dead_pid}.k1ll3d.tmp"  # what a SIGKILLed run leaves behind
    stale.mkdir()
    (stale / "quantize.log").write_text("partial")
    running = tmp_path / f".fp8-staging.{os.getppid()}.busy.tmp"  # a live process's: left alone
    running.mkdir()
    with StagedOutputs(str(tmp_path)) as staging:
        (Path(staging.path) / "quantize.log").write_text("new")
    assert not stale.exists() and running.exists()
    assert (tmp_path / "quantize.log").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "quantize.log"]
