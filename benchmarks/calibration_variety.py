"""Does EfficientNet-Lite0's FP8 model improve with more or more varied calibration data?

The real-model suite calibrates EfficientNet-Lite0 on 32 crops of 4 photos, and its default
`--quantize` fits weights that score far better on those crops than on others (logit SNR ~14 dB
against ~9.5; `activation_offset_effnet.md`). This script checks whether more data is the cure.
It converts the model with default flags through the library pipeline (`fp8core.pipeline.convert`,
the CLI's stages and bytes), once per calibration set, and scores every FP8 model against FP32
with top-1 agreement, mean KL and logit SNR.

* Same photos: 32 crops (the suite's set); 64 crops of the same 4 photos; the 32 crops plus their
  mirror images. All are scored on the suite's 340 evaluation crops of 17 other photos.
* More photos: 4 of the 17 evaluation photos move to calibration. The sets are 4 photos x 8
  crops (the suite's), 8 photos x 4 crops (the same count, twice the variety) and 8 photos x 8
  crops. All are scored on the crops of the 13 photos that stay out.

    python benchmarks/calibration_variety.py   # after pip install -e ".[bench]"

Writes ``benchmarks/results/calibration_variety_effnet.md`` and ``.json``.
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


def main() -> int:
    import accuracy_models as am
    import real_models_zoo as zoo
    from activation_offset_effect import run_all, scores
    from fp8core import pipeline
    from tasks.params import ConvertParams

    model = str(zoo.build_efficientnet(zoo.default_cache_dir()))
    suite = am.image_data()
    cal32, evaluation = suite["calibration"][0], suite["evaluation"][0]
    photos = list(am.CALIBRATION_PHOTOS)
    others = [p for p in am.all_photo_names() if p not in photos]
    extra, held = others[:4], others[4:]
    held_out = am.image_set(held, am.EVALUATION_CROPS_PER_PHOTO)[0]
    per = am.CALIBRATION_CROPS_PER_PHOTO
    experiments = [
        ("same photos", "32 crops of 4 photos (the suite's)", cal32, evaluation),
        ("same photos", "64 crops of the same 4 photos", am.image_set(photos, 2 * per)[0], evaluation),
        ("same photos", "the 32 crops and their mirror images", np.concatenate([cal32, cal32[..., ::-1]]), evaluation),
        ("more photos", "4 photos x 8 crops (the suite's)", cal32, held_out),
        ("more photos", "8 photos x 4 crops", am.image_set(photos + extra, per // 2)[0], held_out),
        ("more photos", "8 photos x 8 crops", am.image_set(photos + extra, per)[0], held_out),
    ]
    references: dict[int, np.ndarray] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for group, label, calibration, scored_on in experiments:
            key = id(scored_on)
            if key not in references:
                references[key] = run_all(model, scored_on)
            np.savez(Path(tmp) / "calib.npz", input=np.ascontiguousarray(calibration))
            out = Path(tmp) / "m.onnx"
            conversion = pipeline.convert(ConvertParams(input_model=model, output_model=str(out), quantize=True,
                                                        data_preprocess=str(Path(tmp) / "calib.npz")))
            row = {"group": group, "calibration": label, "samples": len(calibration), "scored_on": len(scored_on),
                   "kept": [p.name for p in conversion.plans if not p.fp8],
                   **scores(references[key], run_all(str(out), scored_on))}
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_variety_effnet.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# EfficientNet-Lite0: more or more varied calibration data", "",
             "`python benchmarks/calibration_variety.py` (its docstring says what each set is): default "
             "`--quantize` through the library pipeline; each FP8 model against FP32.", "",
             "| experiment | calibration | samples | scored on (crops) | top-1 agreement | KL | logit SNR | kept |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['calibration']} | {r['samples']} | {r['scored_on']} | {r['top1']:.3f} | "
                     f"{r['kl']:.3f} | {r['logit_snr_db']:.2f} dB | {len(r['kept'])} |")
    (RESULTS / "calibration_variety_effnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
