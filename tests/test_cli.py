"""``fp8-convert`` as a user runs it: end to end in subprocesses, bad inputs in-process.

Each subprocess pays for a Prefect temporary server (~10-15 s), so the end-to-end conversion runs
twice (``python -m flows.cli`` and the console script, which also proves byte-identical output
across runs) and the demo once; every other case calls ``flows.cli.main`` in this process, where
one temporary server is shared. The conftest points every Prefect server at the same temporary
PREFECT_HOME, so flow runs of the subprocesses can be read back here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from onnx import numpy_helper

from fp8core.runtime import make_session
from flows.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"
EVAL_DATA = DATA_DIR / "eval.parquet"
CONSOLE_SCRIPT = Path(sys.executable).with_name("fp8-convert")

SKIPPED_OP = "Conv_0"
FP8_PARAMS = "F143,F143,-3,-3"
FP8_OP_TYPES = ("Conv", "MatMul", "Gemm")
# The CLI options that are not conversion parameters, so are not MLflow params.
NOT_RECORDED = {"help", "verbose"}
SUBPROCESS_TIMEOUT_S = 300


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_subprocess(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=dict(os.environ), timeout=SUBPROCESS_TIMEOUT_S)


def mlflow_run_id(stdout: str) -> str:
    found = re.search(r"MLflow run ([0-9a-f]{32}) in", stdout)
    assert found, f"no MLflow run id in the summary:\n{stdout}"
    return found.group(1)


def expected_fp8_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op_type) of every Conv/MatMul/Gemm, named as SPEC section 3 says: OpType_index."""
    return [(n.name or f"{n.op_type}_{i}", n.op_type)
            for i, n in enumerate(model.graph.node) if n.op_type in FP8_OP_TYPES]


def eval_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(EVAL_DATA)
    images = table.column("image").combine_chunks().to_numpy_ndarray().astype(np.float32)
    return images, table.column("label").to_numpy()


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------------------------
# End to end, in subprocesses


@dataclasses.dataclass
class Conversion:
    """One conversion run from the command line and everything it should have produced."""

    process: subprocess.CompletedProcess
    output: Path
    run_id: str


@dataclasses.dataclass
class EndToEnd:
    input_model: Path
    input_sha256_before: str
    out_dir: Path
    tracking_uri: str
    runs: dict[str, Conversion]  # by entry point


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, demo_model_path) -> EndToEnd:
    """The same conversion through ``python -m flows.cli`` and through the ``fp8-convert`` script.

    The two run at the same time, on one Prefect home and one MLflow store, as two users of one
    machine would: each must still finish, record its own run and write the same bytes.
    """
    root = tmp_path_factory.mktemp("end_to_end")
    (root / "in").mkdir()
    (root / "out").mkdir()
    input_model = root / "in" / "demo_model.onnx"
    shutil.copyfile(demo_model_path, input_model)
    before = sha256(input_model)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: pip install -e . installs it"
    entry_points = {"python -m flows.cli": [sys.executable, "-m", "flows.cli"],
                    "fp8-convert": [str(CONSOLE_SCRIPT)]}
    started = {}
    for i, (label, command) in enumerate(entry_points.items()):
        output = root / "out" / f"model_fp8_{i}.onnx"
        started[label] = (output, subprocess.Popen(command + [
            "--input_model", str(input_model), "--output_model", str(output),
            "--fp8_skip_op_names", SKIPPED_OP, "--fp8_params", FP8_PARAMS,
            "--eval_data", str(EVAL_DATA), "--mlflow_tracking_uri", uri,
        ], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=dict(os.environ)))
    runs = {}
    for label, (output, child) in started.items():
        try:
            stdout, stderr = child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            child.kill()
        process = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
        assert process.returncode == 0, f"{label} failed:\n{process.stdout}\n{process.stderr}"
        runs[label] = Conversion(process, output, mlflow_run_id(process.stdout))
    return EndToEnd(input_model, before, root / "out", uri, runs)


def test_both_entry_points_exit_0_with_a_summary_and_a_silent_stderr(end_to_end):
    for label, run in end_to_end.runs.items():
        assert run.process.returncode == 0, label
        assert f"FP8 model written to {run.output}" in run.process.stdout, label
        assert "3 FP8, 1 kept in original precision" in run.process.stdout, label
        assert run.process.stderr == "", f"{label} printed on stderr:\n{run.process.stderr}"


def test_two_runs_write_byte_identical_models(end_to_end):
    first, second = (run.output.read_bytes() for run in end_to_end.runs.values())
    assert first == second


def test_input_model_is_untouched_and_no_temp_files_are_left(end_to_end):
    assert sha256(end_to_end.input_model) == end_to_end.input_sha256_before
    assert sorted(os.listdir(end_to_end.out_dir)) == sorted(r.output.name for r in end_to_end.runs.values())


def test_output_passes_the_full_checker_and_agrees_with_fp32_in_onnxruntime(end_to_end):
    output = next(iter(end_to_end.runs.values())).output
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    images, labels = eval_images_and_labels()
    fp8_probs = make_session(model).run(["probs"], {"image": images})[0]
    fp32_probs = ort.InferenceSession(str(end_to_end.input_model), providers=["CPUExecutionProvider"]).run(
        ["probs"], {"image": images})[0]
    assert fp8_probs.shape == fp32_probs.shape == (len(labels), 10)
    assert np.all(np.isfinite(fp8_probs))
    agreement = np.mean(fp8_probs.argmax(1) == fp32_probs.argmax(1))
    assert agreement >= 0.95, f"FP8 and FP32 top-1 agree on only {agreement:.3f} of the eval samples"
    # the flow's own evaluation, recomputed independently from the written file
    metrics = mlflow_client(end_to_end.tracking_uri).get_run(next(iter(end_to_end.runs.values())).run_id).data.metrics
    assert metrics["eval_accuracy_fp8"] == pytest.approx(np.mean(fp8_probs.argmax(1) == labels))
    assert metrics["eval_accuracy_fp32"] == pytest.approx(np.mean(fp32_probs.argmax(1) == labels))


def test_skipped_op_reads_float_tensors_and_the_others_fp8_weights(end_to_end):
    model = onnx.load(next(iter(end_to_end.runs.values())).output)
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    ops = {n.name: n for n in model.graph.node if n.op_type in FP8_OP_TYPES}
    assert sorted(ops) == sorted(name for name, _ in expected_fp8_ops(onnx.load(end_to_end.input_model)))

    skipped = ops.pop(SKIPPED_OP)
    for tensor in skipped.input[:2]:
        assert tensor not in producers or producers[tensor].op_type != "DequantizeLinear", tensor
    assert initializers[skipped.input[1]].data_type == onnx.TensorProto.FLOAT

    for name, node in ops.items():
        dq = producers.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{name}: weight not dequantized"
        weight, scale = initializers[dq.input[0]], initializers[dq.input[1]]
        assert weight.data_type == onnx.TensorProto.FLOAT8E4M3FNUZ, name  # F143
        assert numpy_helper.to_array(scale) == np.float32(2.0 ** -3), name


def test_prefect_flow_run_completed(end_to_end, prefect_home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    client_mlflow = mlflow_client(end_to_end.tracking_uri)
    with get_client(sync_client=True) as client:
        for label, run in end_to_end.runs.items():
            flow_run_id = client_mlflow.get_run(run.run_id).data.tags["prefect_flow_run_id"]
            flow_run = client.read_flow_run(UUID(flow_run_id))
            assert client.read_flow(flow_run.flow_id).name == "fp8-convert", label
            assert flow_run.state.type == StateType.COMPLETED, f"{label}: {flow_run.state}"


def test_mlflow_run_records_flags_metrics_tags_and_fp8_config(end_to_end, tmp_path):
    client = mlflow_client(end_to_end.tracking_uri)
    conversion = next(iter(end_to_end.runs.values()))
    run = client.get_run(conversion.run_id)
    assert run.info.status == "FINISHED"

    flags = {a.dest for a in build_parser()._actions} - NOT_RECORDED
    assert flags - set(run.data.params) == set(), "CLI flags missing from the MLflow params"
    assert run.data.params["fp8_params"] == FP8_PARAMS
    assert run.data.params["fp8_skip_op_names"] == SKIPPED_OP
    assert run.data.params["input_model"] == str(end_to_end.input_model)
    assert run.data.params["eval_data"] == str(EVAL_DATA)

    metrics = run.data.metrics
    assert metrics["fp8_op_count"] == 3
    assert metrics["skipped_op_count"] == 1
    assert metrics["model_bytes_before"] == end_to_end.input_model.stat().st_size
    assert metrics["model_bytes_after"] == conversion.output.stat().st_size
    for stage in ("load", "plan", "encode", "rewrite", "save", "evaluate"):
        assert metrics[f"seconds_{stage}"] >= 0, stage

    assert run.data.tags["input_model_sha256"] == end_to_end.input_sha256_before
    assert run.data.tags["mode"] == "fast"

    config_path = client.download_artifacts(conversion.run_id, "fp8_config.json", str(tmp_path))
    config = json.loads(Path(config_path).read_text())
    expected = expected_fp8_ops(onnx.load(end_to_end.input_model))
    assert [(op["name"], op["op_type"]) for op in config["ops"]] == expected
    for op in config["ops"]:
        if op["name"] == SKIPPED_OP:
            assert op["fp8"] is False
            assert "fp8_skip_op_names" in op["reason"]
            assert op["input"] is None and op["weight"] is None
        else:
            assert op["fp8"] is True, op["name"]
            assert op["input"] == {"format": "F143", "scale": -3}, op["name"]
            assert op["weight"] == {"format": "F143", "scale": -3}, op["name"]


def test_no_arguments_converts_the_demo_and_reports_accuracy(tmp_path):
    process = run_subprocess([str(CONSOLE_SCRIPT)], cwd=tmp_path)
    assert process.returncode == 0, f"the demo failed:\n{process.stdout}\n{process.stderr}"
    output = tmp_path / "out" / "demo_model_fp8.onnx"
    onnx.checker.check_model(onnx.load(output), full_check=True)
    assert f"FP8 model written to {output}" in process.stdout
    assert process.stderr == "", f"the demo printed on stderr:\n{process.stderr}"
    assert re.search(r"accuracy on 300 labelled samples: FP32 0\.9967, FP8 0\.9\d+", process.stdout), process.stdout
    run = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(mlflow_run_id(process.stdout))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "quantize"


# --------------------------------------------------------------------------------------------
# Bad inputs, in-process: exit 2, one line on stderr, nothing written, input untouched


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One store for every in-process case (a new SQLite store costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@dataclasses.dataclass
class Setup:
    input_model: Path
    out_dir: Path

    @property
    def output_model(self) -> Path:
        return self.out_dir / "model_fp8.onnx"

    def convert(self, *extra: str, input_model: Path | None = None, output_model: Path | None = None) -> list[str]:
        return ["--input_model", str(input_model or self.input_model),
                "--output_model", str(output_model or self.output_model), *extra]


def _text_file(s: Setup) -> tuple[list[str], Path]:
    path = s.input_model.with_name("notes.onnx")
    path.write_text("this is not an ONNX model\n")
    return s.convert(input_model=path), path


def _truncated_model(s: Setup) -> tuple[list[str], Path]:
    path = s.input_model.with_name("truncated.onnx")
    data = s.input_model.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return s.convert(input_model=path), path


def _unwritable_output(s: Setup) -> tuple[list[str], Path]:
    locked = s.out_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return s.convert(output_model=locked / "model_fp8.onnx"), s.input_model
    # root writes through mode 555: a path under a regular file cannot be written by anyone
    locked.chmod(0o755)
    locked.rmdir()
    blocker = s.out_dir / "regular_file"
    blocker.write_bytes(b"not a directory")
    return s.convert(output_model=blocker / "model_fp8.onnx"), s.input_model


def _nan_weight(s: Setup) -> tuple[list[str], Path]:
    model = onnx.load(s.input_model)
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    value = numpy_helper.to_array(weight).copy()
    value.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))
    path = s.input_model.with_name("nan_weight.onnx")
    onnx.save(model, path)
    return s.convert("--weight_granularity", "per_channel", input_model=path), path


def _unlabelled_eval_data(s: Setup) -> tuple[list[str], Path]:
    path = s.input_model.with_name("unlabelled.npz")
    table = pq.read_table(EVAL_DATA)
    np.savez(path, **{name: np.stack(table.column(name).to_numpy(zero_copy_only=False))
                      for name in table.column_names if name != "label"})
    return s.convert("--eval_data", str(path)), path


# case id -> (builds the argv and names the input file that must stay untouched, words the message must hold)
BAD_INPUTS = {
    "missing input file": (lambda s: (s.convert(input_model=s.input_model.with_name("missing.onnx")), None),
                           ["missing.onnx", "does not exist"]),
    "text file": (_text_file, ["notes.onnx", "not a readable ONNX model"]),
    "truncated model": (_truncated_model, ["truncated.onnx", "truncated"]),
    "unknown skip name": (lambda s: (s.convert("--fp8_skip_op_names", "Conv_O"), s.input_model),
                          ["'Conv_O'", "did you mean", "Conv_0"]),
    "fp8_params with 3 values": (lambda s: (s.convert("--fp8_params", "F143,F143,-3"), s.input_model),
                                 ["--fp8_params", "4 comma-separated values"]),
    "fp8_params non-integer scale": (lambda s: (s.convert("--fp8_params", "F143,F143,-3,x"), s.input_model),
                                     ["--fp8_params", "'x' is not an integer"]),
    "fp8_params unknown format": (lambda s: (s.convert("--fp8_params", "F143,F999,-3,-3"), s.input_model),
                                  ["F999", "F143"]),
    "output directory not writable": (_unwritable_output, ["output directory"]),
    "convert_version 17": (lambda s: (s.convert("--convert_version", "17"), s.input_model),
                           ["--convert_version 17", ">= 19"]),
    "malformed input_shape": (lambda s: (s.convert("--input_shape", "image=1,x,8,8"), s.input_model),
                              ["--input_shape", "NAME=D1,D2"]),
    "unknown flag": (lambda s: (s.convert("--no_such_flag"), s.input_model), ["--no_such_flag", "--help"]),
    "output is the input": (lambda s: (s.convert(output_model=s.input_model), s.input_model),
                            ["--output_model", "--input_model"]),
    "weight with NaN": (_nan_weight, ["NaN or inf", "fix the model"]),
    "eval data without labels": (_unlabelled_eval_data, ["unlabelled.npz", "no 'label' column", "--eval_data"]),
    "missing calibration data": (lambda s: (s.convert("--quantize", "--data_preprocess", "nowhere.npz"), s.input_model),
                                 ["calibration data nowhere.npz does not exist", "--data_preprocess"]),
    "missing comparison data": (lambda s: (s.convert("--precision_compare", "--compare_data", "nowhere.parquet"),
                                           s.input_model), ["comparison data nowhere.parquet", "--compare_data"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, workdir, demo_model_path,
                                                            mlflow_uri, capfd):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    setup = Setup(tmp_path / "in" / "demo_model.onnx", tmp_path / "out")
    shutil.copyfile(demo_model_path, setup.input_model)
    build, words = BAD_INPUTS[case]
    argv, kept_input = build(setup)
    out_dir_before = {p: p.read_bytes() if p.is_file() else None for p in setup.out_dir.rglob("*")}
    input_before = kept_input.read_bytes() if kept_input else None

    code = main(argv + ["--mlflow_tracking_uri", mlflow_uri])

    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("fp8-convert: error: "), captured.err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in captured.out + captured.err
    # nothing written: the output dir (temp files included) is as it was, the input unchanged
    assert {p: p.read_bytes() if p.is_file() else None for p in setup.out_dir.rglob("*")} == out_dir_before
    assert os.listdir(workdir) == []
    if kept_input:
        assert kept_input.read_bytes() == input_before


def test_a_failure_inside_the_flow_marks_the_mlflow_run_failed(tmp_path, workdir, demo_model_path, mlflow_uri, capsys):
    tag = f"failed-run-{tmp_path.name}"
    code = main(["--input_model", str(demo_model_path), "--output_model", str(tmp_path / "m.onnx"),
                 "--fp8_skip_op_names", "Conv_O", "--mlflow_tracking_uri", mlflow_uri, "--experiment_name", tag])
    assert code == 2, capsys.readouterr()
    client = mlflow_client(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name(tag).experiment_id])
    assert run.info.status == "FAILED"
    assert "Conv_O" in run.data.tags["error"]


def test_help_exits_0_and_lists_the_poprt_flags(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for flag in ("--input_model", "--output_model", "--input_shape", "--precision", "--fp8_skip_op_names",
                 "--fp8_params", "--quantize", "--calibration_with_data", "--quantize_loss_type",
                 "--data_preprocess", "--convert_version"):
        assert flag in usage, flag


def test_only_runs_that_read_data_in_batches_fix_the_mmap_threshold():
    """The fixed glibc mmap threshold keeps memory flat over many data batches but costs time
    where fresh memory is slow to touch (a 3 GB fast conversion 42 -> 30 s without it): set for
    calibration, comparison or evaluation data, not for a fast conversion."""
    from flows.cli import _reads_data_in_batches
    from tasks.params import ConvertParams

    fast = ConvertParams(input_model="m.onnx")
    assert not _reads_data_in_batches(fast)
    assert _reads_data_in_batches(ConvertParams(input_model="m.onnx", quantize=True, data_preprocess="c.npz"))
    assert _reads_data_in_batches(ConvertParams(input_model="m.onnx", eval_data="e.parquet"))
    assert _reads_data_in_batches(ConvertParams(input_model="m.onnx", precision_compare=True, compare_data="c.npz"))
