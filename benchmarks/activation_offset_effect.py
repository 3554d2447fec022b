"""What ``--activation_offset auto`` does to EfficientNet-Lite0, with and without the gptaq fit.

Converts the real-model suite's EfficientNet-Lite0 (``benchmarks/real_models_zoo.py``, 32
calibration crops of 4 photos) four ways with the library pipeline (``fp8core.pipeline.convert``,
the CLI's stages and bytes): ``--weight_rounding nearest`` / ``auto`` (gptaq) x
``--activation_offset none`` / ``auto``, default flags otherwise. Each FP8 model is scored against
the FP32 model on the 340 evaluation crops of 17 other photos and on the 32 calibration crops:
top-1 agreement, mean KL(FP32 || FP8) of the softmax, and logit SNR (a continuous score, steadier
than top-1 on a hard set). Also the SQNR of every FP8 activation input rounded with and without its
offset, on the calibration crops.

    python benchmarks/activation_offset_effect.py   # after pip install -e ".[bench]"

Writes ``benchmarks/results/activation_offset_effnet.md`` and ``.json``.
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


def scores(reference: np.ndarray, fp8: np.ndarray) -> dict:
    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    f, q = reference.astype(np.float64), fp8.astype(np.float64)
    pf, pq = softmax(f), softmax(q)
    return {"top1": float(np.mean(f.argmax(1) == q.argmax(1))),
            "kl": float(np.mean(np.sum(pf * (np.log(pf + 1e-12) - np.log(pq + 1e-12)), axis=1))),
            "logit_snr_db": float(10 * np.log10(np.sum(f ** 2) / np.sum((f - q) ** 2)))}


def run_all(model_path: str, x: np.ndarray) -> np.ndarray:
    from fp8core.runtime import make_session

    s = make_session(model_path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def tensor_sqnr(model_path: str, plans, calibration: np.ndarray) -> list[dict]:
    """SQNR of every FP8 activation input carrying an offset, rounded as x and as x - c."""
    import onnx

    from fp8core.runtime import make_session

    shifted = {}
    for p in plans:
        for q in p.input("activation"):
            if p.fp8 and q.params.offset:
                shifted[q.tensor] = q.params
    model = onnx.load(model_path)
    for name in shifted:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    s = make_session(model)
    values = s.run(list(shifted), {s.get_inputs()[0].name: calibration})
    rows = []
    for (name, params), v in zip(shifted.items(), values):
        import dataclasses

        plain = dataclasses.replace(params, offset=0.0)
        power = float(np.sum(v.astype(np.float64) ** 2))

        def sqnr(p):
            return 10 * np.log10(power / float(np.sum((p.round_trip(v).astype(np.float64) - v) ** 2)))

        rows.append({"tensor": name, "offset": params.offset, "sqnr_db": round(sqnr(plain), 2),
                     "sqnr_offset_db": round(sqnr(params), 2)})
    return rows


def main() -> int:
    import real_models_zoo as zoo
    from accuracy_models import image_data
    from fp8core import pipeline
    from tasks.params import ConvertParams

    model = str(zoo.build_efficientnet(zoo.default_cache_dir()))
    data = image_data()
    calibration, evaluation = data["calibration"][0], data["evaluation"][0]
    reference = {"evaluation": run_all(model, evaluation), "calibration": run_all(model, calibration)}
    rows, sqnr = [], []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=calibration)
        for rounding in ("nearest", "auto"):
            for offset in ("none", "auto"):
                out = Path(tmp) / f"{rounding}_{offset}" / "m.onnx"
                out.parent.mkdir()
                conversion = pipeline.convert(ConvertParams(
                    input_model=model, output_model=str(out), quantize=True, data_preprocess=str(calib),
                    weight_rounding=rounding, activation_offset=offset))
                row = {"weight_rounding": rounding, "activation_offset": offset,
                       "offsets": sum(1 for p in conversion.plans if p.fp8 for q in p.input("activation")
                                      if q.params.offset),
                       "kept": [p.name for p in conversion.plans if not p.fp8]}
                for split, x in (("evaluation", evaluation), ("calibration", calibration)):
                    row[split] = scores(reference[split], run_all(str(out), x))
                rows.append(row)
                print(row, flush=True)
                if rounding == "nearest" and offset == "auto":
                    sqnr = tensor_sqnr(model, conversion.plans, calibration)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "activation_offset_effnet.json").write_text(json.dumps({"runs": rows, "tensors": sqnr}, indent=1) + "\n")
    lines = ["# `--activation_offset` on EfficientNet-Lite0", "",
             "`python benchmarks/activation_offset_effect.py`: library pipeline, default flags but the two below; "
             "scores of each FP8 model against the FP32 model (top-1 agreement / mean KL / logit SNR).", "",
             "| weight rounding | activation offset | offsets | evaluation (340 crops) | calibration (32 crops) |",
             "|---|---|---|---|---|"]
    for r in rows:
        ev, ca = r["evaluation"], r["calibration"]
        lines.append(f"| {r['weight_rounding']} | {r['activation_offset']} | {r['offsets']} | "
                     f"{ev['top1']:.3f} / {ev['kl']:.3f} / {ev['logit_snr_db']:.2f} dB | "
                     f"{ca['top1']:.3f} / {ca['kl']:.3f} / {ca['logit_snr_db']:.2f} dB |")
    if sqnr:
        gains = [t["sqnr_offset_db"] - t["sqnr_db"] for t in sqnr]
        lines += ["", f"Activation inputs with an offset: {len(sqnr)}; SQNR on the calibration crops "
                      f"{min(t['sqnr_db'] for t in sqnr):.1f}-{max(t['sqnr_db'] for t in sqnr):.1f} dB without, "
                      f"gain {min(gains):.1f}-{max(gains):.1f} dB (median {np.median(gains):.1f}) with it."]
    (RESULTS / "activation_offset_effnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
