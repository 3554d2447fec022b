"""How many calibration samples the default weight fit needs (``--weight_fit_samples``).

EfficientNet-Lite0 (the real-model suite's export) calibrated on ``8 x --crops`` crops of 8
photos, converted with default flags through the library pipeline (``fp8core.pipeline.convert``,
the CLI's stages and bytes) with the gptaq fit reading each ``--fit`` count of them, evenly spaced;
the statistics and the dominance search read the same data every time, so only the fit differs.
Each FP8 model is scored against FP32 on the crops of the 13 photos outside the calibration set
(top-1 agreement, mean KL, logit SNR), and the fit's own seconds are recorded.

    python benchmarks/fit_samples.py                                   # 128 crops: fit 16, 32, 64, 128
    python benchmarks/fit_samples.py --crops 32 --fit 64,128,256       # 256 crops

after ``pip install -e ".[bench]"``; ``--int8`` adds onnxruntime's INT8 QDQ model calibrated on the
same crops (``--fit none``: only that). Each row replaces the row of the same size and count in

``benchmarks/results/fit_samples_effnet.json``; ``.md`` shows every size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crops", type=int, default=16, help="calibration crops per photo (8 photos)")
    p.add_argument("--fit", default="16,32,64,128", help="--weight_fit_samples values, comma-separated (none: skip)")
    p.add_argument("--int8", action="store_true",
                   help="also onnxruntime's INT8 QDQ (the real-model suite's anchor) on the same calibration crops")
    args = p.parse_args(argv)
    import accuracy_models as am
    import real_models_zoo as zoo
    from activation_offset_effect import run_all, scores
    from fp8core import pipeline
    from tasks.params import ConvertParams

    model = str(zoo.build_efficientnet(zoo.default_cache_dir()))
    photos = list(am.CALIBRATION_PHOTOS)
    others = [p for p in am.all_photo_names() if p not in photos]
    calibration = am.image_set(photos + others[:4], args.crops)[0]
    held_out = am.image_set(others[4:], am.EVALUATION_CROPS_PER_PHOTO)[0]
    reference = run_all(model, held_out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "calib.npz", input=np.ascontiguousarray(calibration))
        if args.int8:
            import real_models

            int8 = str(Path(tmp) / "ort_int8.onnx")
            real_models.ort_quantize_main(["int8", model, str(Path(tmp) / "calib.npz"), int8, json.dumps({"input": 0})])
            rows.append({"fit_samples": "onnxruntime INT8", "calibration": len(calibration), "scored_on": len(held_out),
                         "fit_seconds": "-", "kept": [], **scores(reference, run_all(int8, held_out))})
            print(rows[-1], flush=True)
        for samples in (int(n) for n in args.fit.split(",") if n != "none"):
            out = Path(tmp) / f"fit{samples}" / "m.onnx"
            out.parent.mkdir()
            conversion = pipeline.convert(ConvertParams(
                input_model=model, output_model=str(out), quantize=True, data_preprocess=str(Path(tmp) / "calib.npz"),
                weight_fit_samples=samples, cache_dir=str(Path(tmp) / "cache")))
            row = {"fit_samples": samples, "calibration": len(calibration), "scored_on": len(held_out),
                   "fit_seconds": round(conversion.seconds.get("adjust_weights", 0.0), 1),
                   "kept": [p.name for p in conversion.plans if not p.fp8],
                   **scores(reference, run_all(str(out), held_out))}
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "fit_samples_effnet.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    replaced = {(len(calibration), r["fit_samples"]) for r in rows}
    rows = sorted([r for r in earlier if (r["calibration"], r["fit_samples"]) not in replaced] + rows,
                  key=lambda r: (r["calibration"], str(r["fit_samples"]).zfill(8)))
    path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# EfficientNet-Lite0: the weight fit on fewer calibration samples", "",
             "`python benchmarks/fit_samples.py [--crops N --fit ...]` (its docstring says how): default `--quantize` on "
             "8 photos x N crops, `--weight_fit_samples` varied; each FP8 model against FP32 on the crops of 13 other "
             "photos.", "",
             "| --weight_fit_samples | calibration samples | scored on (crops) | top-1 agreement | KL | logit SNR | fit s | kept |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['fit_samples']} | {r['calibration']} | {r['scored_on']} | {r['top1']:.3f} | {r['kl']:.3f} | "
                     f"{r['logit_snr_db']:.2f} dB | {r['fit_seconds']} | {len(r['kept'])} |")
    (RESULTS / "fit_samples_effnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
