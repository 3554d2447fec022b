"""ResNet50 FP8 calibration: ``fp8-convert --quantize`` against onnxruntime's own FP8 quantizer.

    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50,500 --mode quantize
    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50 --mode fast --skip-ort
    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50 --mode capture --repeats 3 --baseline-commit 1058283
    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50 --mode quantize --skip-ort --repeats 3 \
        --baseline-commit 1058283 [--our-args "--keep_dominant_share 0"]

The model is a ResNet50-architecture ONNX graph with random He-initialised weights (53 Conv +
1 Gemm, 25.5M parameters, built by ``resnet50_model.py``); the calibration data is random
``float32[3, 224, 224]`` samples in a Parquet ``fixed_shape_tensor`` column ``input``. Both are
generated once and cached in ``--cache-dir`` (default /tmp/fp8_bench), never in the repository.

Every measured run is its own subprocess, so its memory is its own:

* wall time: from spawning the process to its exit, Python start-up and imports included
  (Prefect and MLflow cost ours ~10 s of that); the tool's own stage times are reported apart.
* peak RSS: two numbers. ``ru_maxrss`` from ``wait4`` is the peak resident set of the largest
  single process of the run's tree (the kernel keeps the maximum over reaped descendants, not the
  sum). The tree peak samples the summed RSS of the process and all its descendants every 50 ms
  (psutil), which counts helper processes (a Prefect server, process-pool workers) too; it can
  miss a spike shorter than the interval. The ratios and targets use the larger of the two.

Runs:

* ours: ``fp8-convert --input_model M --output_model O --precision fp8 --quantize
  --quantize_loss_type kld --data_preprocess calib.parquet --batch_size 8 --mlflow_tracking_uri
  sqlite:///<cache>/mlflow.db --cache_dir <empty dir>`` (a cold statistics cache; ``--mode fast`` swaps ``--quantize ...`` for ``--fp8_params
  F143,F143,-3,-3``: no calibration at all, a floor, not a result).
* ORT: ``quantize_static(QuantFormat.QDQ, activation_type=weight_type=QFLOAT8E4M3FN,
  calibrate_method=Distribution, op_types_to_quantize=[Conv, MatMul, Gemm])`` on the same model
  and Parquet file. Its calibrator keeps every captured tensor of every sample in memory and stacks
  each tensor's samples with ``np.asarray``, so all batches must have the same shape: it is fed
  batches of the largest divisor of N that is at most ``--batch-size``. A run whose predicted peak
  (the largest smaller measured run's peak + the captured tensors of the extra samples) exceeds
  ``--memory-fraction`` of the machine's memory is not run and reported with that reason.

Capture (``--mode capture``): the calibration capture stage against plain inference, in one
process so that other work on the machine slows both alike. A child process, repeated
``--repeats`` times, measures on the same model and samples:

* inference: a plain FP32 session (``fp8core.runtime.session_options()``, onnxruntime's defaults)
  made once and warmed up, then one pass over the samples in batches of ``--batch-size``, reading
  them from the Parquet file as capture does;
* capture: ``fp8core.capture.capture_stats`` on the activation inputs of every Conv/Gemm (what
  ``--quantize`` captures on this model), session creation included, as the CLI's capture stage;
* ``TensorStats.update`` in ns per value (median of 5, one thread, CPU time of the thread, which
  other processes do not stretch): 2^20 post-ReLU float32 values (``max(N(0, 1), 0)``, half
  zeros), the same as float16, and the real captured tensors of one 2-sample run.

The ratio capture / inference is taken per repeat, then the median. ``--baseline-commit C`` also
runs the child on a copy of the working tree's packages with ``--baseline-files`` (default
``fp8core/stats.py`` and ``fp8core/capture.py``) as they were at commit C, alternating with the
current tree, so before and after are measured under the same load. With ``--mode quantize``,
``--baseline-commit`` does the same for whole ``fp8-convert`` runs, and ``--repeats`` keeps the
median run (by wall time) of each.

Results are merged into ``benchmarks/results/resnet50.json`` (one entry per tool, mode and sample
count, so runs made at different times combine) and ``benchmarks/results/resnet50.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet50_model  # noqa: E402  (a sibling module, not a package)

RESULTS_JSON = HERE / "results" / "resnet50.json"
RESULTS_MD = HERE / "results" / "resnet50.md"
ORT_CHILD_MARKER = "ORT_CHILD_RESULT "
CAPTURE_CHILD_MARKER = "CAPTURE_CHILD_RESULT "
BASELINE_FILES = "fp8core/stats.py,fp8core/capture.py"
PACKAGES = ("fp8core", "flows", "tasks")
FAST_PARAMS = "F143,F143,-3,-3"
TARGETS = {  # from the issue, at 50 samples
    "our_wall_s_max": 60.0,
    "our_peak_rss_gb_max": 2.5,
    "speedup_vs_ort_min": 5.0,
    "memory_fraction_of_ort_max": 1 / 3,
}
CAPTURE_TARGETS = {  # issue 10 (one activation stream): at 50 samples, on a quiet machine
    "capture_over_inference_max": 3.0,
    "our_wall_s_max": 20.0,
    "our_peak_rss_gb_max": 1.0,
}
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Measuring one subprocess
# --------------------------------------------------------------------------------------------
def _tree_rss_bytes(root) -> int:
    import psutil

    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


class _TreePeakSampler(threading.Thread):
    """Largest summed RSS of a process and its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_bytes: int | None = None
        self._done = threading.Event()

    def run(self):
        try:
            import psutil

            root = psutil.Process(self.pid)
        except Exception:  # psutil missing or the process already gone: report no tree peak
            return
        self.peak_bytes = 0
        while not self._done.is_set():
            self.peak_bytes = max(self.peak_bytes, _tree_rss_bytes(root))
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join()


def run_measured(command: list[str], cwd: Path, timeout_s: float, log_path: Path,
                 env: dict[str, str] | None = None) -> dict:
    """Run ``command`` to completion; wall seconds, peak RSS (MB), exit code, its stdout and stderr.

    stdout/stderr go to files (a pipe could fill up and stall the child); both are returned as text
    and kept at ``log_path`` (.out / .err).
    """
    out_path, err_path = log_path.with_suffix(".out"), log_path.with_suffix(".err")
    # Other work on the machine slows a run down: its 1-minute load average is kept with the numbers.
    load_before = os.getloadavg()[0]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        sampler = _TreePeakSampler(process.pid)
        sampler.start()
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        # wait4 instead of Popen.wait: it returns the child's own rusage (ru_maxrss, KiB on Linux).
        _, status, rusage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        sampler.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
    max_rss_mb = rusage.ru_maxrss / 1024
    tree_mb = None if sampler.peak_bytes is None else sampler.peak_bytes / MB
    return {
        "command": command,
        "exit_code": process.returncode,
        "timed_out": wall >= timeout_s,
        "wall_s": round(wall, 2),
        "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 2),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "max_rss_process_mb": round(max_rss_mb, 1),
        "peak_rss_tree_mb": None if tree_mb is None else round(tree_mb, 1),
        "peak_rss_mb": round(max(max_rss_mb, tree_mb or 0.0), 1),
        "stdout": out_path.read_text(errors="replace"),
        "stderr": err_path.read_text(errors="replace"),
    }


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------
def fp8_convert_executable() -> str:
    beside_python = Path(sys.executable).parent / "fp8-convert"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("fp8-convert")
    if found is None:
        raise SystemExit("fp8-convert not found: pip install -e . in the repository first")
    return found


def our_command(model: Path, data: Path, output: Path, mode: str, batch_size: int, cache_dir: Path,
                tree: Path | None = None, extra_args: list[str] = ()) -> list[str]:
    """The fp8-convert command; with ``tree``, the same CLI run from that copy of the packages
    (``python -c``, with ``PYTHONPATH=tree`` set by the caller)."""
    if tree is None:
        program = [fp8_convert_executable()]
    else:
        program = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    command = [
        *program, "--input_model", str(model), "--output_model", str(output),
        "--precision", "fp8", "--mlflow_tracking_uri", f"sqlite:///{cache_dir / 'mlflow.db'}",
    ]
    if mode == "quantize":
        # A fresh statistics cache beside the output (the run directory is wiped first): every
        # measured run captures cold, as a first conversion does.
        command += ["--quantize", "--quantize_loss_type", "kld", "--data_preprocess", str(data),
                    "--batch_size", str(batch_size), "--cache_dir", str(output.parent / "statistics_cache")]
    else:
        command += ["--fp8_params", FAST_PARAMS]
    return command + list(extra_args)


_STAGE = re.compile(r"([A-Za-z_][\w ]*?)\s+([0-9]+(?:\.[0-9]+)?)s\b")


def parse_stage_seconds(stdout: str) -> dict[str, float]:
    """``{stage: seconds}`` from the tool's ``time: load 0.06s, plan 0.01s, ...`` summary line."""
    for line in stdout.splitlines():
        text = line.strip()
        if text.startswith("time:"):
            return {name.strip(): float(value) for name, value in _STAGE.findall(text[len("time:"):])}
    return {}


def measure_ours(model: Path, data: Path, samples: int, mode: str, batch_size: int, cache_dir: Path, timeout_s: float,
                 tree: Path | None = None, extra_args: list[str] = (), name: str = "ours") -> dict:
    work = cache_dir / "runs" / f"{name}_{mode}_{samples}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    output = work / "resnet50_fp8.onnx"
    command = our_command(model, data, output, mode, batch_size, cache_dir, tree, extra_args)
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    result = run_measured(command, work, timeout_s, work / "run", env)
    result["stage_s"] = parse_stage_seconds(result["stdout"])
    result["tool_s"] = round(sum(result["stage_s"].values()), 2) if result["stage_s"] else None
    result["output_exists"] = output.exists()
    if output.exists():
        import hashlib

        result["output_sha256"] = hashlib.sha256(output.read_bytes()).hexdigest()
    return result


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one for an even count), with every run's wall
    time, CPU time and peak RSS kept beside it."""
    ok = [r for r in runs if r.get("exit_code") == 0] or runs
    chosen = dict(sorted(ok, key=lambda r: r["wall_s"])[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["repeats"] = {k: [r.get(k) for r in runs] for k in ("wall_s", "cpu_s", "peak_rss_mb", "exit_code")}
        chosen["repeats"]["capture_s"] = [r.get("stage_s", {}).get("capture") for r in runs]
    return chosen


def baseline_tree(commit: str, files: list[str], cache_dir: Path) -> Path:
    """A copy of the working tree's packages (:data:`PACKAGES`) with ``files`` as they were at
    ``commit``: the code before a change, everything else as now."""
    repo = HERE.parent
    tree = cache_dir / f"baseline_{commit}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for package in PACKAGES:
        shutil.copytree(repo / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in files:
        text = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=repo, capture_output=True, check=True).stdout
        (tree / name).write_bytes(text)
    return tree


# --------------------------------------------------------------------------------------------
# Capture against inference, in one process (runs inside the child process this script starts)
# --------------------------------------------------------------------------------------------
def captured_tensors(model) -> list[str]:
    """The activation input of every Conv/Gemm/MatMul, once each, in graph order: what
    ``--quantize`` captures on this model (fp8core.capture.activations_to_capture over its plans)."""
    initializers = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[0] not in initializers and node.input[0] not in names:
            names.append(node.input[0])
    return names


def _median_ns_per_value(update_factory, arrays: list, repeats: int = 5) -> float:
    """Median over ``repeats`` of the thread CPU time of updating fresh statistics with ``arrays``."""
    import statistics

    values = sum(a.size for a in arrays)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        for array in arrays:
            update_factory().update(array)
        times.append(time.thread_time() - start)
    return round(statistics.median(times) / values * 1e9, 2)


def _capture_child(tree: str, model_path: str, data: str, batch_size: int) -> None:
    """Body of the capture child: inference pass, capture, inference pass; update ns/value."""
    sys.path.insert(0, tree)
    try:  # the CLI's allocator setting (flows/cli.py), so capture allocates as it does there
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass
    import numpy as np
    import onnx

    import fp8core
    from fp8core import capture
    from fp8core.calibration import open_dataset
    from fp8core.runtime import make_session, session_options
    from fp8core.stats import TensorStats

    assert Path(fp8core.__file__).resolve().is_relative_to(Path(tree).resolve()), fp8core.__file__
    model = onnx.load(model_path)
    tensors = captured_tensors(model)
    source = open_dataset(data)
    input_name = model.graph.input[0].name

    def inference_pass(session) -> float:
        start = time.perf_counter()
        for batch in source.iter_batches(batch_size, [input_name]):
            session.run(None, capture.input_feeds(model, batch))
        return time.perf_counter() - start

    session = make_session(model, session_options())
    first = next(iter(source.iter_batches(batch_size, [input_name])))
    session.run(None, capture.input_feeds(model, first))  # warm-up
    inference = [inference_pass(session)]
    start, cpu = time.perf_counter(), time.process_time()
    stats = capture.capture_stats(model, tensors, source, batch_size)
    capture_s, capture_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    inference.append(inference_pass(session))
    captured_values = sum(s.total_count for s in stats.values())

    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal(1 << 20, dtype=np.float32), 0)
    two = {input_name: first[input_name][:2]}
    real = make_session(model, session_options(), extra_outputs=tensors).run(tensors, capture.input_feeds(model, two))
    result = {
        "inference_s": [round(t, 3) for t in inference],
        "capture_s": round(capture_s, 3),
        "capture_cpu_s": round(capture_cpu_s, 3),
        "ratio": round(capture_s / (sum(inference) / len(inference)), 3),
        "captured_tensors": len(tensors),
        "captured_values": captured_values,
        "update_ns_per_value": {
            "relu_float32_1M": _median_ns_per_value(TensorStats, [relu]),
            "relu_float16_1M": _median_ns_per_value(TensorStats, [relu.astype(np.float16)]),
            "captured_2_samples": _median_ns_per_value(TensorStats, real),
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(CAPTURE_CHILD_MARKER + json.dumps(result), flush=True)


def measure_capture(model: Path, data: Path, batch_size: int, cache_dir: Path, timeout_s: float, tree: Path) -> dict:
    work = cache_dir / "runs" / "capture"
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_capture-child", str(tree), str(model), str(data), str(batch_size)]
    run = run_measured(command, work, timeout_s, work / f"run_{tree.name}")
    for line in run["stdout"].splitlines():
        if line.startswith(CAPTURE_CHILD_MARKER):
            return {**json.loads(line[len(CAPTURE_CHILD_MARKER):]), "peak_rss_mb": run["peak_rss_mb"]}
    raise RuntimeError(f"capture child failed (exit {run['exit_code']}): {run['stderr'][-2000:]}")


def summarize_capture(repeats: list[dict]) -> dict:
    """Medians over the child runs of one tree (ratios are taken per run first)."""
    import statistics

    med = lambda values: round(statistics.median(values), 3)  # noqa: E731
    kinds = repeats[0]["update_ns_per_value"]
    return {
        "repeats": len(repeats),
        "inference_s": med([statistics.mean(r["inference_s"]) for r in repeats]),
        "capture_s": med([r["capture_s"] for r in repeats]),
        "capture_cpu_s": med([r["capture_cpu_s"] for r in repeats]),
        "capture_over_inference": med([r["ratio"] for r in repeats]),
        "update_ns_per_value": {k: med([r["update_ns_per_value"][k] for r in repeats]) for k in kinds},
        "captured_values": repeats[0]["captured_values"],
        "captured_tensors": repeats[0]["captured_tensors"],
        "load_average_1m": [r["load_average_1m"] for r in repeats],
        "runs": repeats,
    }


# --------------------------------------------------------------------------------------------
# onnxruntime's quantizer (runs inside the child process this script starts)
# --------------------------------------------------------------------------------------------
def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _ort_child(model: str, data: str, output: str, batch_size: int) -> None:
    """Body of the ORT child process: quantize_static on the Parquet data; prints its timings."""
    import numpy as np
    import pyarrow.parquet as pq
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    class ParquetReader(CalibrationDataReader):
        """Yields ``{input: float32[batch, 3, 224, 224]}`` row groups re-cut into equal batches."""

        def __init__(self, path: str, batch: int):
            self.file = pq.ParquetFile(path)
            self.batch = batch
            self.batches = self._batches()

        def _batches(self):
            pending: list = []
            for record_batch in self.file.iter_batches(batch_size=self.batch, columns=[resnet50_model.INPUT_NAME]):
                column = record_batch.column(0)
                storage = column.storage if hasattr(column, "storage") else column
                flat = storage.flatten().to_numpy(zero_copy_only=False)
                pending.append(flat.reshape(len(column), *resnet50_model.SAMPLE_SHAPE).astype(np.float32))
                stacked = np.concatenate(pending)
                pending = []
                for i in range(0, len(stacked) - self.batch + 1, self.batch):
                    yield {resnet50_model.INPUT_NAME: stacked[i:i + self.batch]}
                rest = len(stacked) % self.batch
                if rest:
                    pending = [stacked[-rest:]]

        def get_next(self):
            return next(self.batches, None)

    start = time.perf_counter()
    quantize_static(
        model, output, ParquetReader(data, batch_size),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QFLOAT8E4M3FN,
        weight_type=QuantType.QFLOAT8E4M3FN,
        calibrate_method=CalibrationMethod.Distribution,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    seconds = time.perf_counter() - start
    print(ORT_CHILD_MARKER + json.dumps({"quantize_static_s": round(seconds, 2), "batch_size": batch_size}), flush=True)


def captured_bytes_per_sample(model_path: Path) -> int:
    """Bytes ORT's calibrator keeps per sample: float32 inputs and outputs of Conv/MatMul/Gemm."""
    import onnx

    model = onnx.load(str(model_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model)
    elements = {
        v.name: math.prod(d.dim_value for d in v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    initializers = {t.name for t in model.graph.initializer}
    tensors = {
        name
        for node in model.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")
        for name in (*node.input, *node.output) if name and name not in initializers
    }
    return 4 * sum(elements.get(name, 0) for name in tensors)


def predicted_ort_peak_mb(samples: int, model_path: Path, measured: dict) -> tuple[float, str]:
    """ORT's peak RSS at ``samples``: a measured run's peak plus the captured tensors of the extra samples.

    The calibrator keeps every captured tensor of every sample, so memory grows at least by
    :func:`captured_bytes_per_sample` per sample (a lower bound: it also stacks copies).
    """
    per_sample_mb = captured_bytes_per_sample(model_path) / MB
    runs = [r for r in measured.values() if r.get("tool") == "ort" and r.get("exit_code") == 0 and r["samples"] <= samples]
    if runs:
        base = max(runs, key=lambda r: r["samples"])
        predicted = base["peak_rss_mb"] + (samples - base["samples"]) * per_sample_mb
        return predicted, (f"{base['peak_rss_mb'] / 1024:.1f} GB measured at {base['samples']} samples "
                           f"+ {per_sample_mb:.0f} MB of captured tensors per extra sample")
    return per_sample_mb * samples, f"{per_sample_mb:.0f} MB of captured tensors per sample"


def measure_ort(model: Path, data: Path, samples: int, batch_size: int, cache_dir: Path, timeout_s: float) -> dict:
    work = cache_dir / "runs" / f"ort_{samples}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    batch = largest_divisor_at_most(samples, batch_size)
    command = [sys.executable, str(Path(__file__).resolve()), "--_ort-child", str(model), str(data),
               str(work / "resnet50_ort_fp8.onnx"), str(batch)]
    result = run_measured(command, work, timeout_s, work / "run")
    for line in result["stdout"].splitlines():
        if line.startswith(ORT_CHILD_MARKER):
            result.update(json.loads(line[len(ORT_CHILD_MARKER):]))
    return result


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def machine_memory_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB


def environment() -> dict:
    import numpy
    import onnx
    import onnxruntime

    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD")
    # Uncommitted engine files mean the numbers belong to a work tree, not to the commit.
    uncommitted = subprocess.run(["git", "status", "--porcelain", "--", "../fp8core", "../flows", "../tasks"], cwd=HERE,
                                 capture_output=True, text=True).stdout.splitlines()  # not stripped: " M path"
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "memory_gb": round(machine_memory_mb() / 1024, 1),
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
        "git_commit": commit, "uncommitted_engine_files": [line[3:] for line in uncommitted],
    }


def run_key(tool: str, mode: str, samples: int) -> str:
    return f"{tool}/{mode}/{samples}"


def load_results() -> dict:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"runs": {}}


def save_results(results: dict) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS_MD.write_text(markdown(results))


def _trimmed(record: dict) -> dict:
    """What the JSON keeps of a run: numbers, and only the tail of its output."""
    kept = {k: v for k, v in record.items() if k not in ("stdout", "stderr")}
    kept["stdout_tail"] = record.get("stdout", "")[-1500:]
    kept["stderr_tail"] = record.get("stderr", "")[-1500:]
    return kept


def comparisons(runs: dict) -> list[dict]:
    """Ratios for every sample count that has both an ORT run and our quantize (or fast) run."""
    rows = []
    for key, ours in sorted(runs.items()):
        if ours["tool"] != "ours" or ours.get("exit_code") != 0:
            continue
        ort = runs.get(run_key("ort", "distribution", ours["samples"]))
        if not ort or ort.get("exit_code") != 0:
            continue
        rows.append({
            "samples": ours["samples"], "our_mode": ours["mode"],
            "time_ratio_ort_over_ours": round(ort["wall_s"] / ours["wall_s"], 2),
            # CPU seconds are not stretched by other work on the machine, wall seconds are.
            "cpu_time_ratio_ort_over_ours": round(ort["cpu_s"] / ours["cpu_s"], 2),
            "memory_ratio_ours_over_ort": round(ours["peak_rss_mb"] / ort["peak_rss_mb"], 3),
        })
    return rows


LEAN_MODE = "quantize --keep_dominant_share 0 --weight_rounding nearest"


def target_checks(runs: dict, capture: dict | None = None) -> list[dict]:
    ours = runs.get(run_key("ours", "quantize", 50))
    ort = runs.get(run_key("ort", "distribution", 50))
    checks = []
    at50 = (capture or {}).get("50")
    if at50:
        ratio = at50["current"]["capture_over_inference"]
        checks.append({"target": "capture <= 3x one FP32 inference pass (issue 10)", "value": ratio,
                       "met": ratio <= CAPTURE_TARGETS["capture_over_inference_max"]})
    # The issue-10 targets were set on a --quantize of capture and search alone (29.3 s then);
    # the default has since added the dominance search and the gptaq weight fit (issue 11), so
    # both are checked: the default, and that pipeline (the two turned off).
    lean = runs.get(run_key("ours", LEAN_MODE, 50))
    for label, run in (("", lean), (" (default flags)", ours)):
        if not run or run.get("exit_code") != 0:
            continue
        what = f"--quantize{label}" if label else f"--quantize, capture and search only ({LEAN_MODE[len('quantize '):]})"
        checks += [
            {"target": f"whole {what} <= 20 s (issue 10, quiet machine)", "value": run["wall_s"],
             "met": run["wall_s"] <= CAPTURE_TARGETS["our_wall_s_max"]},
            {"target": f"whole {what} peak RSS <= 1 GB (issue 10; largest process "
                       f"{run.get('max_rss_process_mb', 0) / 1024:.3f} GB)",
             "value": round(run["peak_rss_mb"] / 1024, 3),
             "met": run["peak_rss_mb"] <= CAPTURE_TARGETS["our_peak_rss_gb_max"] * 1024},
        ]
    if not ours or ours.get("exit_code") != 0:
        return checks + [{"target": "all", "status": "not measured: no successful --quantize run at 50 samples"}]
    checks_issue = [
        ("wall time <= 60 s", ours["wall_s"], ours["wall_s"] <= TARGETS["our_wall_s_max"]),
        ("peak RSS <= 2.5 GB", ours["peak_rss_mb"] / 1024, ours["peak_rss_mb"] <= TARGETS["our_peak_rss_gb_max"] * 1024),
    ]
    if ort and ort.get("exit_code") == 0:
        speedup = ort["wall_s"] / ours["wall_s"]
        memory = ours["peak_rss_mb"] / ort["peak_rss_mb"]
        checks_issue += [
            (">= 5x faster than ORT", speedup, speedup >= TARGETS["speedup_vs_ort_min"]),
            ("<= 1/3 of ORT's memory", memory, memory <= TARGETS["memory_fraction_of_ort_max"]),
        ]
    return checks + [{"target": t, "value": round(v, 3), "met": bool(ok)} for t, v, ok in checks_issue]


def markdown(results: dict) -> str:
    runs = results["runs"]
    model = results.get("model", {})
    lines = [
        "# ResNet50 FP8 calibration: fp8-convert vs onnxruntime quantize_static",
        "",
        f"Model: ResNet50 architecture, random He weights, {model.get('parameters', '?'):,} parameters, "
        f"{model.get('ops', {}).get('Conv', '?')} Conv + {model.get('ops', {}).get('Gemm', '?')} Gemm, opset "
        f"{model.get('opset', '?')}. Calibration: random float32[3,224,224] samples from Parquet.",
        f"Machine: {results.get('environment', {}).get('cpus', '?')} CPUs, "
        f"{results.get('environment', {}).get('memory_gb', '?')} GB; onnxruntime "
        f"{results.get('environment', {}).get('onnxruntime', '?')}; commit {results.get('environment', {}).get('git_commit', '?')}. Generated by `benchmarks/bench_resnet50.py` "
        "(its docstring says how each number is measured).",
        "",
        "| tool | mode | samples | wall s | tool's own s | CPU s | peak RSS MB | stages (s) | load before/after | status |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    order = {"ours": 0, "ours_baseline": 1, "ort": 2}
    for run in sorted(runs.values(), key=lambda r: (order.get(r["tool"], 3), r["mode"], r["samples"])):
        tool = {"ours": "fp8-convert", "ort": "ORT quantize_static"}.get(run["tool"], run["tool"])
        if run["tool"] == "ours_baseline":
            tool = f"fp8-convert, {', '.join(Path(f).name for f in run.get('baseline_files', []))} at {run.get('baseline_commit')}"
        if run.get("not_run"):
            lines.append(f"| {tool} | {run['mode']} | {run['samples']} | - | - | - | - | - | - | not run: {run['not_run']} |")
            continue
        own = run.get("quantize_static_s") if run["tool"] == "ort" else run.get("tool_s")
        stages = ", ".join(f"{k} {v:g}" for k, v in run.get("stage_s", {}).items()) or "-"
        status = "ok" if run.get("exit_code") == 0 else f"failed (exit {run.get('exit_code')})"
        if run.get("repeats"):
            status += f"; median of {len(run['repeats']['wall_s'])}, wall s {run['repeats']['wall_s']}"
        load = "/".join(f"{x:g}" for x in run.get("load_average_1m", [])) or "?"
        lines.append(
            f"| {tool} | {run['mode']} | {run['samples']} | {run['wall_s']:.1f} | "
            f"{'-' if own is None else f'{own:.1f}'} | {run['cpu_s']:.1f} | {run['peak_rss_mb']:.0f} | {stages} | {load} | {status} |"
        )
    rows = comparisons(runs)
    if rows:
        lines += ["", "| samples | our mode | ORT wall time / ours | ORT CPU time / ours | our peak RSS / ORT peak RSS |",
                  "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['samples']} | {r['our_mode']} | {r['time_ratio_ort_over_ours']:.2f}x | "
                  f"{r['cpu_time_ratio_ort_over_ours']:.2f}x | {r['memory_ratio_ours_over_ort']:.3f} |" for r in rows]
    lines += capture_markdown(results.get("capture", {}))
    lines += ["", "Targets (issue, at 50 samples, --quantize):", ""]
    for check in results.get("targets", []):
        if "met" in check:
            lines.append(f"* {check['target']}: {check['value']:g} -> {'met' if check['met'] else 'NOT met'}")
        else:
            lines.append(f"* {check['target']}: {check['status']}")
    lines += ["", "Wall time counts the whole process (Python start-up, imports, for ours Prefect and MLflow);",
              "\"tool's own s\" is the sum of fp8-convert's stage times, or ORT's quantize_static call.",
              "Peak RSS is the larger of the biggest single process (wait4 ru_maxrss) and the sampled sum over",
              "the process tree (ours starts a Prefect server process). Load is the machine's 1-minute load",
              "average (2 CPUs) before and after the run: above ~2, other work was slowing the run down.", ""]
    return "\n".join(lines)


def capture_markdown(capture: dict) -> list[str]:
    """The capture-vs-inference table (``--mode capture``)."""
    if not capture:
        return []
    lines = ["", "Capture vs plain inference, in one process (`--mode capture`; medians, per-run ratios first):", "",
             "| code | samples | runs | inference pass s | capture s | capture / inference | capture CPU s | "
             "update ns/value: ReLU f32 / ReLU f16 / captured | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for n, entry in sorted(capture.items(), key=lambda kv: int(kv[0])):
        for name in ("baseline", "current"):
            if name not in entry:
                continue
            c = entry[name]
            code = (f"before: {', '.join(Path(f).name for f in entry.get('baseline_files', []))} at {entry.get('baseline_commit')}"
                    if name == "baseline" else f"after: {entry.get('git_commit')}")
            ns = c["update_ns_per_value"]
            lines.append(f"| {code} | {n} | {c['repeats']} | {c['inference_s']:.2f} | {c['capture_s']:.2f} | "
                         f"**{c['capture_over_inference']:.2f}x** | {c['capture_cpu_s']:.1f} | "
                         f"{ns['relu_float32_1M']:.1f} / {ns['relu_float16_1M']:.1f} / {ns['captured_2_samples']:.1f} | "
                         f"{', '.join(f'{x:g}' for x in c['load_average_1m'])} |")
        if "baseline" in entry:
            b, c = entry["baseline"], entry["current"]
            lines.append(f"| after / before | | | | {c['capture_s'] / b['capture_s']:.2f} | "
                         f"{c['capture_over_inference'] / b['capture_over_inference']:.2f} | "
                         f"{c['capture_cpu_s'] / b['capture_cpu_s']:.2f} | " + " / ".join(
                             f"{c['update_ns_per_value'][k] / b['update_ns_per_value'][k]:.2f}"
                             for k in c["update_ns_per_value"]) + " | |")
    lines += ["", f"{capture[max(capture, key=int)]['current']['captured_values']:,} values in "
              f"{capture[max(capture, key=int)]['current']['captured_tensors']} tensors captured at "
              f"{max(capture, key=int)} samples. update ns/value is one thread's CPU time; capture folds "
              "each run's tensors in on every core."]
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="50,500", help="sample counts for our tool, comma separated")
    p.add_argument("--ort-samples", default=None, help="sample counts for ORT (default: same as --samples)")
    p.add_argument("--mode", choices=["quantize", "fast", "capture"], default="quantize",
                   help="capture: the capture stage against plain inference, in one process (module docstring)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the median is kept")
    p.add_argument("--baseline-commit", default=None,
                   help="also measure the working tree with --baseline-files as at this commit (before a change)")
    p.add_argument("--baseline-files", default=BASELINE_FILES, help="comma-separated paths taken from --baseline-commit")
    p.add_argument("--our-args", default="", help="extra fp8-convert arguments (recorded in the mode column)")
    p.add_argument("--skip-ort", action="store_true", help="do not run onnxruntime's quantizer")
    p.add_argument("--skip-ours", action="store_true", help="do not run fp8-convert")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FP8_BENCH_DIR", "/tmp/fp8_bench")))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="run ORT only if its predicted peak fits in this fraction of the machine's memory")
    return p.parse_args(argv)


def _counts(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_ort-child"]:
        _ort_child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    if argv[:1] == ["--_capture-child"]:
        _capture_child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    args = parse_args(argv)
    cache = args.cache_dir.resolve()
    our_samples = _counts(args.samples)
    ort_samples = _counts(args.ort_samples) if args.ort_samples else our_samples

    model_path = resnet50_model.ensure_model(cache)
    data = {n: resnet50_model.ensure_calibration_data(cache, n) for n in sorted({*our_samples, *ort_samples})}
    results = load_results()
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    results["model"] = {"parameters": resnet50_model.parameter_count(model), "ops": resnet50_model.op_counts(model),
                        "opset": resnet50_model.OPSET, "bytes": model_path.stat().st_size}
    results["environment"] = environment()
    now = lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: E731

    def record(tool: str, mode: str, samples: int, run: dict) -> None:
        entry = {"tool": tool, "mode": mode, "samples": samples, "measured_at": now(),
                 "git_commit": results["environment"]["git_commit"], **_trimmed(run)}
        results["runs"][run_key(tool, mode, samples)] = entry
        results["comparisons"] = comparisons(results["runs"])
        results["targets"] = target_checks(results["runs"], results.get("capture"))
        save_results(results)
        state = "ok" if run.get("exit_code") == 0 else run.get("not_run") or f"exit {run.get('exit_code')}"
        print(f"{tool} {mode} {samples}: wall {run.get('wall_s')} s, peak RSS {run.get('peak_rss_mb')} MB ({state})", flush=True)

    baseline = None
    if args.baseline_commit:
        files = [f for f in args.baseline_files.split(",") if f]
        baseline = {"commit": args.baseline_commit, "files": files,
                    "tree": baseline_tree(args.baseline_commit, files, cache)}
    if args.mode == "capture":
        for n in our_samples:
            trees = {"current": HERE.parent, **({"baseline": baseline["tree"]} if baseline else {})}
            measured: dict[str, list[dict]] = {name: [] for name in trees}
            for repeat in range(args.repeats):  # the trees alternate: the same load hits both
                for name, tree in trees.items():
                    one = measure_capture(model_path, data[n], args.batch_size, cache, args.timeout, tree)
                    measured[name].append(one)
                    print(f"capture {name} {n} samples, run {repeat + 1}: inference {one['inference_s']} s, "
                          f"capture {one['capture_s']} s ({one['ratio']}x), update ns/value "
                          f"{one['update_ns_per_value']}, load {one['load_average_1m']}", flush=True)
            entry = {"samples": n, "batch_size": args.batch_size, "measured_at": now(),
                     "git_commit": results["environment"]["git_commit"],
                     **{name: summarize_capture(runs) for name, runs in measured.items()}}
            if baseline:
                entry["baseline_commit"], entry["baseline_files"] = baseline["commit"], baseline["files"]
            results.setdefault("capture", {})[str(n)] = entry
            results["targets"] = target_checks(results["runs"], results.get("capture"))
            save_results(results)
        print(markdown(results))
        return 0

    extra_args = args.our_args.split()
    mode = args.mode + (f" {args.our_args}" if extra_args else "")
    if not args.skip_ours:
        for n in our_samples:
            variants = {"ours": None, **({"ours_baseline": baseline["tree"]} if baseline else {})}
            measured = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, tree in variants.items():
                    measured[name].append(measure_ours(model_path, data[n], n, args.mode, args.batch_size, cache,
                                                       args.timeout, tree, extra_args, name))
            for name, runs in measured.items():
                run = median_run(runs)
                if name == "ours_baseline":
                    run["baseline_commit"], run["baseline_files"] = baseline["commit"], baseline["files"]
                record(name, mode, n, run)
    if not args.skip_ort:
        for n in sorted(ort_samples):  # smallest first: its peak predicts the larger ones'
            predicted, basis = predicted_ort_peak_mb(n, model_path, results["runs"])
            limit = args.memory_fraction * machine_memory_mb()
            if predicted > limit:
                reason = (f"predicted peak {predicted / 1024:.1f} GB ({basis}) exceeds "
                          f"{args.memory_fraction:.0%} of the machine's {machine_memory_mb() / 1024:.0f} GB")
                record("ort", "distribution", n, {"not_run": reason, "predicted_peak_rss_mb": round(predicted)})
                continue
            record("ort", "distribution", n, measure_ort(model_path, data[n], n, args.batch_size, cache, args.timeout))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
