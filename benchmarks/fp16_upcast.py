"""An FP16 model upcast to FP32 (every float16 initializer, constant, Cast and type to float32),
with its calibration data, so the FP32 path of ``fp8-convert`` can be run on the same network as
the FP16 path: where the two FP8 models are equally far from their references, the FP16 path
costs nothing and a lower score belongs to the network.

    python benchmarks/fp16_upcast.py MODEL_FP16.onnx CALIB.npz OUT_DIR [--fp32 MODEL_FP32.onnx]

writes OUT_DIR/model_fp32.onnx and OUT_DIR/calib_fp32.npz and prints the output SNR (dB) of the
upcast model against the FP16 one (and, with ``--fp32``, of the original FP32 export against
both) on the first two calibration samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import numpy_helper as nh


def upcast_graph(graph: onnx.GraphProto) -> None:
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(nh.from_array(nh.to_array(t).astype(np.float32), t.name))
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(nh.from_array(nh.to_array(a.t).astype(np.float32), a.t.name))
            if a.type == onnx.AttributeProto.GRAPH:
                upcast_graph(a.g)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    reference, test = reference.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10((reference**2).sum() / ((reference - test) ** 2).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("calib", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--fp32", type=Path, help="the FP32 export the FP16 model was made from")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(args.model)
    upcast_graph(model.graph)
    onnx.save(model, args.out / "model_fp32.onnx")
    data = dict(np.load(args.calib))
    data32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in data.items()}
    np.savez(args.out / "calib_fp32.npz", **data32)

    def run(path: Path, feeds: dict) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    fp16 = run(args.model, {k: v[:2] for k, v in data.items()})
    up = run(args.out / "model_fp32.onnx", {k: v[:2] for k, v in data32.items()})
    print(f"upcast vs FP16 model: {snr_db(fp16, up):.1f} dB")
    if args.fp32:
        fp32 = run(args.fp32, {k: v[:2] for k, v in data32.items()})
        print(f"FP16 model vs the FP32 export: {snr_db(fp32, fp16):.1f} dB; upcast vs it: {snr_db(fp32, up):.1f} dB")


if __name__ == "__main__":
    main()
