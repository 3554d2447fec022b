"""Large models: fast FP8 conversion time and peak memory from 0.3 GB to 3 GB of FP32 weights.

The model is transformer-shaped (per layer: q/k/v/o MatMuls d x d, an MLP d x 4d and 4d x d,
residual Adds, Relu), generated straight into an external data file in /tmp (never the whole model
in memory). Each conversion runs in a fresh subprocess; peak RSS is that child's
``ru_maxrss``. Two ways are measured:

* ``engine``: the library pipeline (``fp8core.pipeline``) as the CLI runs it, without Prefect or
  MLflow - ``load`` (weights left in the data file; one run on generated inputs), ``plan``,
  ``to_fp8``: encode one weight at a time from the data file, rewrite, save with
  ``external_data="auto"``, validated (checker on the path + one onnxruntime run);
* ``cli``: ``fp8-convert`` (the Prefect flow, MLflow), as a user runs it today.

Targets (issue 5): >= 150 MB of FP32 weights per second, peak RSS <= 1.5 x the FP32 model size.

    python benchmarks/bench_large.py --sizes 0.3,1 [--cli] [--quantize] [--workdir /tmp/fp8-large]

writes benchmarks/results/large.json and large.md (rows are merged by size and way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = 1024
SEQ = 8
LAYER_BYTES = 12 * HIDDEN * HIDDEN * 4  # 4 d*d + 2 d*4d float32 weights


def generate(path: Path, gigabytes: float, seed: int = 0) -> int:
    """Write the model and its data file; returns the bytes of FP32 weights."""
    layers = max(1, round(gigabytes * 1e9 / LAYER_BYTES))
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        def weight(name: str, shape: tuple[int, int]) -> str:
            nonlocal offset
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1 / np.sqrt(shape[0]))
            data.write(w.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                                 data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                tensor.external_data.add(key=k, value=v)
            offset += w.nbytes
            inits.append(tensor)
            return name

        x = "x"
        d = HIDDEN
        for i in range(layers):
            def mm(inp, w, out):
                nodes.append(helper.make_node("MatMul", [inp, w], [out], name=f"MatMul_{out}"))
                return out
            q = mm(x, weight(f"l{i}.wq", (d, d)), f"l{i}.q")
            k = mm(x, weight(f"l{i}.wk", (d, d)), f"l{i}.k")
            v = mm(x, weight(f"l{i}.wv", (d, d)), f"l{i}.v")
            nodes.append(helper.make_node("Add", [q, k], [f"l{i}.qk"]))
            nodes.append(helper.make_node("Add", [f"l{i}.qk", v], [f"l{i}.a"]))
            o = mm(f"l{i}.a", weight(f"l{i}.wo", (d, d)), f"l{i}.o")
            nodes.append(helper.make_node("Add", [x, o], [f"l{i}.r1"]))
            h = mm(f"l{i}.r1", weight(f"l{i}.w1", (d, 4 * d)), f"l{i}.h")
            nodes.append(helper.make_node("Relu", [h], [f"l{i}.hr"]))
            m = mm(f"l{i}.hr", weight(f"l{i}.w2", (4 * d, d)), f"l{i}.m")
            nodes.append(helper.make_node("Add", [f"l{i}.r1", m], [f"l{i}.out"]))
            x = f"l{i}.out"
    graph = helper.make_graph(nodes, "transformer_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", SEQ, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))  # tensors already external: the .onnx is small
    return offset


ENGINE = """
import json, sys, time
t0 = time.perf_counter()
from fp8core import pipeline
from fp8core.plan import QuantParams
src, out = sys.argv[1], sys.argv[2]
import resource
seconds, peak_gb = {}, {}
def stage(name, t, parts=None):
    seconds.update(parts or {name: round(time.perf_counter() - t, 3)})
    peak_gb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)  # peak so far
    return time.perf_counter()
t = time.perf_counter()
loaded = pipeline.load(src, pipeline.LoadConfig(stream_weights=True)); t = stage("load", t)
plans = pipeline.plan(loaded.model, pipeline.PlanConfig("fp8", (), QuantParams("F143", -3), QuantParams("F143", -3))).plans
t = stage("plan", t)
converted = pipeline.to_fp8(loaded, plans, pipeline.ToFP8Config(out, "auto", keep_model=False))
t = stage("save", t, {k: round(v, 3) for k, v in converted.seconds.items()})  # encode, rewrite, save (validated)
print(json.dumps({"seconds": seconds, "peak_gb_after": peak_gb, "bytes_after": converted.bytes_after}))
"""


def measure(way: str, size_gb: float, workdir: Path, quantize: bool = False) -> dict:
    model_dir = workdir / f"model_{size_gb}"
    model_path = model_dir / "model.onnx"
    if not model_path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        generate(model_path, size_gb)
    weights = (model_dir / "model.onnx.data").stat().st_size
    out_dir = workdir / f"out_{way}_{size_gb}{'_q' if quantize else ''}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out = out_dir / "model_fp8.onnx"
    if way == "engine":
        command = [sys.executable, "-c", ENGINE, str(model_path), str(out)]
    else:
        command = [str(Path(sys.executable).with_name("fp8-convert")), "--input_model", str(model_path),
                   "--output_model", str(out), "--fp8_params", "F143,F143,-3,-3",
                   "--mlflow_tracking_uri", f"sqlite:///{out_dir / 'mlflow.db'}"]
        if quantize:
            calib = workdir / "calib32.npz"
            if not calib.exists():
                np.savez(calib, x=np.random.default_rng(1).standard_normal((32, SEQ, HIDDEN)).astype(np.float32))
            command += ["--quantize", "--data_preprocess", str(calib), "--batch_size", "8"]
    load_before = round(os.getloadavg()[0], 2)  # the machine is shared: context for the numbers
    # a fresh Python per measurement, so ru_maxrss of RUSAGE_CHILDREN is this conversion's alone
    wrapper = ("import resource, subprocess, sys, json, time; t=time.perf_counter(); "
               "p=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': p.returncode, 'wall': time.perf_counter()-t, "
               "'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024, "
               "'stdout': p.stdout, 'stderr': p.stderr[-3000:]}))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=out_dir)
    info = json.loads(proc.stdout)
    if info["rc"] != 0:
        raise RuntimeError(f"{way} {size_gb} GB failed: {info['stderr']}")
    outputs = sum(p.stat().st_size for p in out_dir.iterdir() if p.name.startswith("model_fp8.onnx"))
    row = {
        "way": way + ("+quantize(32 samples)" if quantize else ""),
        "size_gb": size_gb,
        "fp32_weight_bytes": weights,
        "fp8_output_bytes": outputs,
        "wall_seconds": round(info["wall"], 2),
        "mb_per_s": round(weights / 1e6 / info["wall"], 1),
        "peak_rss_bytes": info["peak"],
        "peak_rss_over_model": round(info["peak"] / weights, 3),
        "external_data_output": any(p.suffix == ".data" for p in out_dir.iterdir()),
        "load_average_1min_before": load_before,
    }
    if way == "engine":
        engine = json.loads(info["stdout"].strip().splitlines()[-1])
        row["stages"] = engine["seconds"]
        row["peak_gb_after_stage"] = engine["peak_gb_after"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return row


def write_results(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "large.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    keyed = {(r["way"], r["size_gb"]): r for r in old}
    keyed.update({(r["way"], r["size_gb"]): r for r in rows})
    merged = sorted(keyed.values(), key=lambda r: (r["way"], r["size_gb"]))
    meta = {"cpus": os.cpu_count(), "hidden": HIDDEN, "targets": {"mb_per_s": 150, "peak_rss_over_model": 1.5}}
    path.write_text(json.dumps({"meta": meta, "rows": merged}, indent=1) + "\n")
    lines = ["| way | FP32 weights | FP8 output | time | MB/s | peak RSS | RSS / model | stages (s) [peak RSS so far] | load before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in merged:
        peaks = r.get("peak_gb_after_stage", {})  # peak RSS so far, after each stage
        stages = ", ".join(f"{k} {v}" + (f" [{peaks[k]} GB]" if k in peaks else "") for k, v in r.get("stages", {}).items())
        lines.append(f"| {r['way']} | {r['fp32_weight_bytes'] / 1e9:.2f} GB | {r['fp8_output_bytes'] / 1e9:.2f} GB"
                     f"{' (external)' if r['external_data_output'] else ''} | {r['wall_seconds']} s | {r['mb_per_s']} "
                     f"| {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_over_model']} | {stages} | {r.get('load_average_1min_before', '')} |")
    (RESULTS / "large.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.3,1", help="GB of FP32 weights, comma separated")
    p.add_argument("--cli", action="store_true", help="also run fp8-convert (Prefect flow) at each size")
    p.add_argument("--quantize", action="store_true", help="also fp8-convert --quantize with 32 samples, at each size")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fp8-large"))
    p.add_argument("--keep", action="store_true", help="keep the generated models")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")]
    for size in sizes:
        rows = [measure("engine", size, workdir)]
        if args.cli:
            rows.append(measure("cli", size, workdir))
        if args.quantize:
            rows.append(measure("cli", size, workdir, quantize=True))
        for r in rows:
            print(json.dumps(r))
        write_results(rows)
        if not args.keep:
            shutil.rmtree(workdir / f"model_{size}", ignore_errors=True)


if __name__ == "__main__":
    main()
