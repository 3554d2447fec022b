"""Is the FP8 *activation format* what keeps EfficientNet-Lite0 below onnxruntime's INT8?

The counterfactual: take the FP8 model that the default ``--quantize`` writes (library pipeline,
``fp8core.pipeline.convert``; the real-model suite's EfficientNet-Lite0 and its 32 calibration
crops) and change one thing only: each activation Q/DQ pair rounds to UINT8 with onnxruntime's
MinMax rule (scale ``(max(x, 0) - min(x, 0)) / 255`` and zero point ``round(-min / scale)`` from
the same 32 crops, what ``quantize_static(..., QUInt8, MinMax)`` computes) instead of E4M3. The
FP8 weights, the gptaq fit and the kept ops stay as they are. Scored against the FP32 model on
the 340 evaluation crops of 17 other photos (top-1 agreement, top-5 containment of the FP32
label, mean KL of the softmax, logit SNR), beside onnxruntime's INT8 QDQ model (per-channel
QInt8 weights, QUInt8 MinMax activations, the suite's anchor) and the same FP8 models unchanged.

Then the swap on one kind of activation input at a time (by the op reading it: depthwise Convs,
1x1 Convs reading a ReLU6, 1x1 Convs reading the signed residual stream, the classifier): which
inputs the format matters for. Also, per activation input, the SQNR of its values on 64
evaluation crops rounded each way (E4M3 with the scale the search chose; UINT8 MinMax).

    python benchmarks/activation_format_effect.py   # after pip install -e ".[bench]"

Writes ``benchmarks/results/activation_format_effnet.md`` and ``.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results"
SQNR_CROPS = 64


def scores(reference: np.ndarray, other: np.ndarray) -> dict:
    from activation_offset_effect import scores as base

    top5 = np.argsort(-other, axis=1)[:, :5]
    return {**base(reference, other), "top5": float(np.mean([r in t for r, t in zip(reference.argmax(1), top5)]))}


def activation_q_nodes(model) -> list:
    """The QuantizeLinear nodes of activations (weights are stored FP8 and only dequantized)."""
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear"]


def value_ranges(float_model: str, tensors: list[str], x: np.ndarray) -> dict[str, tuple[float, float]]:
    """min and max of each tensor of the float model over the samples ``x`` (ORT's MinMax)."""
    import onnx

    from fp8core.runtime import make_session

    s = make_session(onnx.load(float_model), extra_outputs=tensors)
    name = s.get_inputs()[0].name
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for i in range(0, len(x), 8):
        for t, v in zip(tensors, s.run(tensors, {name: x[i:i + 8]})):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """onnxruntime's asymmetric UINT8 scale and zero point for the range [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    return scale, np.uint8(np.clip(np.round(-lo / scale), 0, 255))


def _readers(graph) -> dict[str, list]:
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def consumer_kinds(fp8_path: str, ranges: dict) -> dict[str, str]:
    """Each activation input's kind, by the op reading it: ``depthwise`` (a grouped Conv),
    ``pointwise, input >= 0`` (a 1x1 Conv reading a ReLU6: the projections), ``pointwise,
    signed input`` (the expansions reading the residual stream) or ``other`` (the classifier)."""
    import onnx

    m = onnx.load(fp8_path)
    readers = _readers(m.graph)
    kinds = {}
    for q in activation_q_nodes(m):
        dq = readers[q.output[0]][0]
        op = readers[dq.output[0]][0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        if op.op_type == "Conv" and attrs.get("group", 1) > 1:
            kinds[q.input[0]] = "depthwise"
        elif op.op_type == "Conv" and list(attrs.get("kernel_shape", [])) == [1, 1]:
            kinds[q.input[0]] = "pointwise, input >= 0" if ranges[q.input[0]][0] >= 0 else "pointwise, signed input"
        else:
            kinds[q.input[0]] = "other"
    return kinds


def with_uint8_activations(fp8_path: str, ranges: dict, out: str, only: set[str] | None = None) -> None:
    """The FP8 model with every activation Q/DQ pair (or those of the tensors ``only``) rounding to
    UINT8 with these ranges."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(fp8_path)
    g = m.graph
    readers = _readers(g)
    for k, q in enumerate(activation_q_nodes(m)):
        if only is not None and q.input[0] not in only:
            continue
        scale, zero = uint8_params(*ranges[q.input[0]])
        s_name, z_name = f"uint8_scale_{k}", f"uint8_zero_point_{k}"
        g.initializer.extend([numpy_helper.from_array(np.asarray(scale), s_name),
                              numpy_helper.from_array(np.asarray(zero), z_name)])
        del q.attribute[:]  # saturate applies to FP8 only
        q.input[1:] = [s_name, z_name]
        for dq in readers.get(q.output[0], []):
            assert dq.op_type == "DequantizeLinear", dq.op_type
            dq.input[1:] = [s_name, z_name]
    onnx.save(m, out)


def tensor_sqnr(fp8_path: str, float_model: str, ranges: dict, x: np.ndarray) -> list[dict]:
    """Per activation input: SQNR in dB of its float values rounded to E4M3 (the FP8 model's scale)
    and to UINT8 (MinMax), over the crops ``x``."""
    import onnx
    from onnx import numpy_helper

    from fp8core.runtime import make_session

    m = onnx.load(fp8_path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    qs = activation_q_nodes(m)
    tensors = [q.input[0] for q in qs]
    s = make_session(onnx.load(float_model), extra_outputs=tensors)
    name = s.get_inputs()[0].name
    sums = {t: np.zeros(3) for t in tensors}  # signal, E4M3 error, UINT8 error energies
    fp8_rt = {}
    for q in qs:  # one onnxruntime Q/DQ pair per tensor, its own scale and zero point
        x_in = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        params = ["s", "z"][:len(q.input) - 1]  # the zero point may be left out (output_dtype)
        quantize = onnx.helper.make_node("QuantizeLinear", ["x", *params], ["q"])
        quantize.attribute.extend(q.attribute)
        graph = onnx.helper.make_graph(
            [quantize, onnx.helper.make_node("DequantizeLinear", ["q", *params], ["y"])], "rt", [x_in], [y],
            [numpy_helper.from_array(inits[i], p) for i, p in zip(q.input[1:], params)])
        fp8_rt[q.input[0]] = make_session(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    for i in range(0, len(x), 8):
        for t, v in zip(tensors, s.run(tensors, {name: x[i:i + 8]})):
            scale, zero = uint8_params(*ranges[t])
            u8 = (np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale
            e4 = fp8_rt[t].run(None, {"x": v})[0]
            v64 = v.astype(np.float64)
            sums[t] += [np.sum(v64 ** 2), np.sum((e4 - v64) ** 2), np.sum((u8 - v64) ** 2)]
    return [{"tensor": t, "e4m3_sqnr_db": round(float(10 * np.log10(a / b)), 2),
             "uint8_sqnr_db": round(float(10 * np.log10(a / c)), 2)} for t, (a, b, c) in sums.items()]


def main() -> int:
    import real_models
    import real_models_zoo as zoo
    from accuracy_models import image_data
    from activation_offset_effect import run_all
    from fp8core import pipeline
    from tasks.params import ConvertParams

    model = str(zoo.build_efficientnet(zoo.default_cache_dir()))
    data = image_data()
    calibration, evaluation = data["calibration"][0], data["evaluation"][0]
    reference = run_all(model, evaluation)
    rows, sqnr = [], []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=calibration)
        int8 = str(Path(tmp) / "ort_int8.onnx")
        real_models.ort_quantize_main(["int8", model, str(calib), int8, json.dumps({"input": 0})])
        rows.append({"model": "onnxruntime INT8 QDQ (per-channel QInt8 weights, QUInt8 MinMax activations)",
                     "evaluation": scores(reference, run_all(int8, evaluation))})
        print(rows[-1], flush=True)
        for rounding in ("auto", "nearest"):
            out = Path(tmp) / rounding / "m.onnx"
            out.parent.mkdir()
            conversion = pipeline.convert(ConvertParams(input_model=model, output_model=str(out), quantize=True,
                                                        data_preprocess=str(calib), weight_rounding=rounding))
            kept = [p.name for p in conversion.plans if not p.fp8]
            import onnx

            tensors = sorted({q.input[0] for q in activation_q_nodes(onnx.load(str(out)))})
            ranges = value_ranges(model, tensors, calibration)
            swapped = str(out.with_name("uint8_activations.onnx"))
            with_uint8_activations(str(out), ranges, swapped)
            label = "default --quantize" + ("" if rounding == "auto" else " --weight_rounding nearest")
            for what, path in ((f"{label}: FP8 (E4M3/E5M2) activations", str(out)),
                               (f"{label}, activations UINT8 MinMax instead", swapped)):
                rows.append({"model": what, "kept": kept, "activation_inputs": len(tensors),
                             "evaluation": scores(reference, run_all(path, evaluation))})
                print(rows[-1], flush=True)
            if rounding == "auto":
                sqnr = tensor_sqnr(str(out), model, ranges, evaluation[:SQNR_CROPS])
                kinds = consumer_kinds(str(out), ranges)
                for row in sqnr:
                    row["kind"] = kinds[row["tensor"]]
                for kind in sorted(set(kinds.values())):  # which inputs the format matters for
                    only = {t for t, k in kinds.items() if k == kind}
                    part = str(out.with_name(f"uint8_{len(rows)}.onnx"))
                    with_uint8_activations(str(out), ranges, part, only)
                    rows.append({"model": f"{label}, UINT8 on the {len(only)} {kind} inputs only", "kept": kept,
                                 "activation_inputs": len(only), "evaluation": scores(reference, run_all(part, evaluation))})
                    print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "activation_format_effnet.json").write_text(json.dumps({"runs": rows, "tensors": sqnr}, indent=1) + "\n")
    lines = ["# EfficientNet-Lite0: FP8 weights with FP8 or UINT8 activations", "",
             "`python benchmarks/activation_format_effect.py` (its docstring says what each row is): each model "
             "against the FP32 model on the 340 evaluation crops; calibration: the suite's 32 crops.", "",
             "| model | top-1 agreement | top-5 | mean KL | logit SNR |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        e = r["evaluation"]
        lines.append(f"| {r['model']} | {e['top1']:.3f} | {e['top5']:.3f} | {e['kl']:.3f} | {e['logit_snr_db']:.2f} dB |")
    if sqnr:
        e4 = np.array([t["e4m3_sqnr_db"] for t in sqnr])
        u8 = np.array([t["uint8_sqnr_db"] for t in sqnr])
        lines += ["", f"Per activation input ({len(sqnr)} of the default FP8 model, {SQNR_CROPS} evaluation crops): "
                      f"SQNR rounded to the FP8 format the search chose {np.min(e4):.1f}-{np.max(e4):.1f} dB "
                      f"(median {np.median(e4):.1f}); to UINT8 MinMax {np.min(u8):.1f}-{np.max(u8):.1f} dB "
                      f"(median {np.median(u8):.1f}); UINT8 ahead on {int(np.sum(u8 > e4))} of {len(sqnr)}, "
                      f"by a median {np.median(u8 - e4):.1f} dB.", "",
                  "| inputs read by | count | E4M3 SQNR median | UINT8 SQNR median |", "|---|---:|---:|---:|"]
        for kind in sorted({t["kind"] for t in sqnr}):
            part = [t for t in sqnr if t["kind"] == kind]
            lines.append(f"| {kind} | {len(part)} | {np.median([t['e4m3_sqnr_db'] for t in part]):.1f} dB | "
                         f"{np.median([t['uint8_sqnr_db'] for t in part]):.1f} dB |")
    (RESULTS / "activation_format_effnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
