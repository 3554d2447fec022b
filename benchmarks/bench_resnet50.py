"""ResNet50 FP8 calibration: ``fp8-convert --quantize`` against onnxruntime's own FP8 quantizer.

    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50,500 --mode quantize
    /work/venv/bin/python benchmarks/bench_resnet50.py --samples 50 --mode fast --skip-ort

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
FAST_PARAMS = "F143,F143,-3,-3"
TARGETS = {  # from the issue, at 50 samples
    "our_wall_s_max": 60.0,
    "our_peak_rss_gb_max": 2.5,
    "speedup_vs_ort_min": 5.0,
    "memory_fraction_of_ort_max": 1 / 3,
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


def run_measured(command: list[str], cwd: Path, timeout_s: float, log_path: Path) -> dict:
    """Run ``command`` to completion; wall seconds, peak RSS (MB), exit code, its stdout and stderr.

    stdout/stderr go to files (a pipe could fill up and stall the child); both are returned as text
    and kept at ``log_path`` (.out / .err).
    """
    out_path, err_path = log_path.with_suffix(".out"), log_path.with_suffix(".err")
    # Other work on the machine slows a run down: its 1-minute load average is kept with the numbers.
    load_before = os.getloadavg()[0]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
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


def our_command(model: Path, data: Path, output: Path, mode: str, batch_size: int, cache_dir: Path) -> list[str]:
    command = [
        fp8_convert_executable(), "--input_model", str(model), "--output_model", str(output),
        "--precision", "fp8", "--mlflow_tracking_uri", f"sqlite:///{cache_dir / 'mlflow.db'}",
    ]
    if mode == "quantize":
        # A fresh statistics cache beside the output (the run directory is wiped first): every
        # measured run captures cold, as a first conversion does.
        command += ["--quantize", "--quantize_loss_type", "kld", "--data_preprocess", str(data),
                    "--batch_size", str(batch_size), "--cache_dir", str(output.parent / "statistics_cache")]
    else:
        command += ["--fp8_params", FAST_PARAMS]
    return command


_STAGE = re.compile(r"([A-Za-z_][\w ]*?)\s+([0-9]+(?:\.[0-9]+)?)s\b")


def parse_stage_seconds(stdout: str) -> dict[str, float]:
    """``{stage: seconds}`` from the tool's ``time: load 0.06s, plan 0.01s, ...`` summary line."""
    for line in stdout.splitlines():
        text = line.strip()
        if text.startswith("time:"):
            return {name.strip(): float(value) for name, value in _STAGE.findall(text[len("time:"):])}
    return {}


def measure_ours(model: Path, data: Path, samples: int, mode: str, batch_size: int, cache_dir: Path, timeout_s: float) -> dict:
    work = cache_dir / "runs" / f"ours_{mode}_{samples}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    output = work / "resnet50_fp8.onnx"
    command = our_command(model, data, output, mode, batch_size, cache_dir)
    result = run_measured(command, work, timeout_s, work / "run")
    result["stage_s"] = parse_stage_seconds(result["stdout"])
    result["tool_s"] = round(sum(result["stage_s"].values()), 2) if result["stage_s"] else None
    result["output_exists"] = output.exists()
    return result


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
    uncommitted = git("status", "--porcelain", "--", "../fp8core", "../flows", "../tasks").splitlines()
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


def target_checks(runs: dict) -> list[dict]:
    ours = runs.get(run_key("ours", "quantize", 50))
    ort = runs.get(run_key("ort", "distribution", 50))
    if not ours or ours.get("exit_code") != 0:
        return [{"target": "all", "status": "not measured: no successful --quantize run at 50 samples"}]
    checks = [
        ("wall time <= 60 s", ours["wall_s"], ours["wall_s"] <= TARGETS["our_wall_s_max"]),
        ("peak RSS <= 2.5 GB", ours["peak_rss_mb"] / 1024, ours["peak_rss_mb"] <= TARGETS["our_peak_rss_gb_max"] * 1024),
    ]
    if ort and ort.get("exit_code") == 0:
        speedup = ort["wall_s"] / ours["wall_s"]
        memory = ours["peak_rss_mb"] / ort["peak_rss_mb"]
        checks += [
            (">= 5x faster than ORT", speedup, speedup >= TARGETS["speedup_vs_ort_min"]),
            ("<= 1/3 of ORT's memory", memory, memory <= TARGETS["memory_fraction_of_ort_max"]),
        ]
    return [{"target": t, "value": round(v, 3), "met": bool(ok)} for t, v, ok in checks]


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
    order = {"ours": 0, "ort": 1}
    for run in sorted(runs.values(), key=lambda r: (order.get(r["tool"], 2), r["mode"], r["samples"])):
        tool = "fp8-convert" if run["tool"] == "ours" else "ORT quantize_static"
        if run.get("not_run"):
            lines.append(f"| {tool} | {run['mode']} | {run['samples']} | - | - | - | - | - | - | not run: {run['not_run']} |")
            continue
        own = run.get("tool_s") if run["tool"] == "ours" else run.get("quantize_static_s")
        stages = ", ".join(f"{k} {v:g}" for k, v in run.get("stage_s", {}).items()) or "-"
        status = "ok" if run.get("exit_code") == 0 else f"failed (exit {run.get('exit_code')})"
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


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="50,500", help="sample counts for our tool, comma separated")
    p.add_argument("--ort-samples", default=None, help="sample counts for ORT (default: same as --samples)")
    p.add_argument("--mode", choices=["quantize", "fast"], default="quantize")
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
        results["targets"] = target_checks(results["runs"])
        save_results(results)
        state = "ok" if run.get("exit_code") == 0 else run.get("not_run") or f"exit {run.get('exit_code')}"
        print(f"{tool} {mode} {samples}: wall {run.get('wall_s')} s, peak RSS {run.get('peak_rss_mb')} MB ({state})", flush=True)

    if not args.skip_ours:
        for n in our_samples:
            record("ours", args.mode, n, measure_ours(model_path, data[n], n, args.mode, args.batch_size, cache, args.timeout))
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
