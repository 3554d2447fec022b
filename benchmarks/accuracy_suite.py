"""How close FP8 models stay to FP32 on real pretrained models: every fp8-convert technique and
onnxruntime's own FP8 quantizer, scored against the FP32 model on real data, next to onnxruntime's
INT8 quantizer as the anchor.

One command runs it all (not in CI; about 30-60 minutes on 2 shared cores):

    pip install -e ".[bench]"
    HF_HUB_OFFLINE=1 python benchmarks/accuracy_suite.py

    # a part of it, e.g. one model, or some runs (results merge into the same files):
    HF_HUB_OFFLINE=1 python benchmarks/accuracy_suite.py --models minilm --runs fast,quantize_kld,ort_fp8
    HF_HUB_OFFLINE=1 python benchmarks/accuracy_suite.py --resume      # only runs not yet scored

    # stable code while the checkout changes: a snapshot of a commit, its revision recorded
    git archive HEAD | tar -x -C /tmp/snap
    FP8_ACC_GIT_COMMIT=$(git rev-parse --short HEAD) PYTHONPATH=/tmp/snap \
        HF_HUB_OFFLINE=1 python /tmp/snap/benchmarks/accuracy_suite.py --runs ...

Models, data and preprocessing: ``accuracy_models.py`` (EfficientNet-Lite0 on 32 calibration /
340 evaluation crops of disjoint photos; all-MiniLM-L6-v2 on 64 calibration / 200 evaluation
sentences of disjoint documents). Everything is exported and cached in ``--cache-dir``
(default /tmp/fp8_acc), never in the repository; nothing is downloaded.

Runs, for each model (each one ``fp8-convert`` subprocess, timed from spawn to exit, Prefect and
MLflow start-up included; a cold statistics cache per run; MLflow store
``sqlite:////tmp/fp8_acc/mlflow.db``):

* ``fast``: ``--precision fp8``, fast mode defaults (``--fp8_params F143,F143,0,0``, no data).
* ``weights_only``: ``--precision fp8_weight --quantize`` (kld): FP8 weights, float activations;
  ``weights_only_<base>`` the same with the base loss (below).
* ``quantize_<loss>``: ``--precision fp8 --quantize --quantize_loss_type <loss>`` for mse, mae,
  snr, kld, cos_dist. The loss whose run scores best (EfficientNet: top-1 agreement, then KL;
  MiniLM: mean cosine) is the *base* of every run below. ``quantize_<DEFAULT_LOSS>``
  (``tasks.params``, mse today) is fp8-convert's default ``--quantize`` run: every other flag at
  its default (so with ``--keep_dominant_share``, its kept ops show in "FP8 / kept ops").
* ``keep_1..3``: base + ``--num_of_layers_keep_fp16 K``.
* ``target``: base + ``--accuracy_target METRIC=VALUE --compare_data <calibration data>
  --accuracy_target_samples 8`` (the search sees calibration data only, never the evaluation
  set); killed after ``--target-timeout`` seconds (default 600): its greedy search has no step
  limit and costs one rewrite + session + run per remaining candidate op per step.
* ``target_keep_3``: base + ``--weight_granularity per_channel`` + the same target with
  ``--accuracy_target_max_keep 3``: the 3 ops the greedy search finds best on calibration data
  (an eligible run: at most 3 ops kept); ``combined_target_keep_3``: the same on ``combined``.
* ``per_channel``, ``scale_float``, ``gptq``, ``bias_correction``: base + one of
  ``--weight_granularity per_channel``, ``--scale_kind float``, ``--weight_rounding gptq``,
  ``--bias_correction``; ``combined``: base + all of them that exist; ``combined_keep_3``:
  combined + ``--num_of_layers_keep_fp16 3``. A flag missing from ``fp8-convert --help`` makes
  its run "not available".
* ``gptaq``: fp8-convert's default ``--quantize`` + ``--weight_rounding gptaq`` (weights and
  biases fitted to the inputs the FP8 model gives them). Since 7634474 that is what every
  ``--quantize`` run does by default (``--weight_rounding auto``); rows recorded before it
  (``quantize_<loss>`` and the runs built on them) rounded weights to nearest.
* ``ort_fp8``: onnxruntime ``quantize_static(QuantFormat.QDQ, activation_type=weight_type=
  QFLOAT8E4M3FN, calibrate_method=Distribution, op_types_to_quantize=[Conv, MatMul, Gemm])`` on
  the same calibration samples (a subprocess, timed the same way).
* ``ort_int8``, the INT8 anchor (not an FP8 run: it is never eligible for the targets below, and
  its row is marked and listed last): onnxruntime ``quantize_static(QuantFormat.QDQ,
  per_channel=True, activation_type=weight_type=QInt8, calibrate_method=MinMax)`` with
  onnxruntime's default op types (every op it can quantize), on the same calibration samples, in
  the same kind of subprocess as ``ort_fp8`` (:data:`ORT_QUANTIZERS`). It is the accuracy a plain
  INT8 deployment gets, the bar FP8 should reach; the report compares FP8 runs with it.

Every FP8 model is run with ``fp8core.runtime.make_session``, the FP32 model too. Scores vs FP32:

* EfficientNet-Lite0 (logits -> softmax): top-1 agreement (same argmax); top-5 agreement
  (FP32's top-1 class is among FP8's five highest); mean KL(p_fp32 || p_fp8) in nats; top-1
  agreement on the samples where FP32's top probability is > 0.5.
* MiniLM (unit embeddings): mean and min cosine(e_fp32, e_fp8); nearest-neighbour agreement:
  the fraction of evaluation sentences whose nearest other evaluation sentence (by cosine) is the
  same with FP8 embeddings as with FP32 ones.

Targets (issue 6; full FP8, at most 3 ops kept in high precision): EfficientNet-Lite0 top-1
>= 0.75, top-5 >= 0.95, mean KL <= 0.15, confident top-1 >= 0.98; MiniLM mean cosine >= 0.999,
NN agreement >= 0.99. Results: ``benchmarks/results/accuracy.json`` and ``accuracy.md``; each
run records the commit it was measured at (``git rev-parse`` beside this file, or
``FP8_ACC_GIT_COMMIT`` when it runs from an exported snapshot that is no git checkout).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import accuracy_models  # noqa: E402  (a sibling module, not a package)

RESULTS_JSON = HERE / "results" / "accuracy.json"
RESULTS_MD = HERE / "results" / "accuracy.md"
ORT_CHILD_MARKER = "ORT_CHILD_RESULT "
LOSSES = ("mse", "mae", "snr", "kld", "cos_dist")
MAX_KEPT_OPS = 3
EVAL_BATCH = 20


# --------------------------------------------------------------------------------------------
# Targets and scores
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    metric: str
    bound: float
    higher_is_better: bool

    def met(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.bound:g}"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classifier_scores(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Scores of FP8 logits against FP32 logits (see the module docstring)."""
    p, q = softmax(reference), softmax(candidate)
    top1_ref = p.argmax(axis=1)
    top5_cand = np.argsort(-q, axis=1)[:, :5]
    agree = top1_ref == q.argmax(axis=1)
    confident = p.max(axis=1) > 0.5
    eps = 1e-12
    kl = np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)
    return {
        "top1_agreement": float(agree.mean()),
        "top5_agreement": float((top5_cand == top1_ref[:, None]).any(axis=1).mean()),
        "mean_kl": float(kl.mean()),
        "confident_top1_agreement": float(agree[confident].mean()) if confident.any() else float("nan"),
        "confident_samples": int(confident.sum()),
    }


def nearest_other(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def embedding_scores(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Scores of FP8 sentence embeddings against FP32 ones (see the module docstring)."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    cosine = np.sum(ref * cand, axis=1)
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "nn_agreement": float((nearest_other(reference) == nearest_other(candidate)).mean()),
    }


# --------------------------------------------------------------------------------------------
# The two models
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelCase:
    """A model, its calibration data (Parquet and arrays), evaluation feeds, and how to score."""

    key: str
    title: str
    model: Path
    calibration_parquet: Path
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    score: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    metrics: tuple[str, ...]
    targets: tuple[Target, ...]
    accuracy_target: str             # the --accuracy_target of the ``target`` run
    rank: Callable[[dict], tuple]     # larger is better: picks the base loss
    data_note: str


def _classifier_rank(scores: dict) -> tuple:
    return (scores["top1_agreement"], -scores["mean_kl"])


def _embedding_rank(scores: dict) -> tuple:
    return (scores["mean_cosine"], scores["nn_agreement"])


def efficientnet_case(cache: Path) -> ModelCase:
    from fp8core.calibration import write_parquet

    model = accuracy_models.export_efficientnet(cache)
    data = accuracy_models.image_data()
    calibration = {accuracy_models.IMAGE_INPUT: data["calibration"][0]}
    evaluation = {accuracy_models.IMAGE_INPUT: data["evaluation"][0]}
    parquet = write_parquet(calibration, cache / "efficientnet_calibration.parquet")
    n_eval_photos = len({label.split()[0] for label in data["evaluation"][1]})
    return ModelCase(
        key="efficientnet_lite0", title="EfficientNet-Lite0 (ImageNet classifier)", model=model,
        calibration_parquet=parquet, calibration=calibration, evaluation=evaluation,
        score=classifier_scores,
        metrics=("top1_agreement", "top5_agreement", "mean_kl", "confident_top1_agreement"),
        targets=(Target("top1_agreement", 0.75, True), Target("top5_agreement", 0.95, True),
                 Target("mean_kl", 0.15, False), Target("confident_top1_agreement", 0.98, True)),
        accuracy_target="top1_agreement=0.9", rank=_classifier_rank,
        data_note=(f"{len(data['calibration'][1])} calibration crops of {len(accuracy_models.CALIBRATION_PHOTOS)} "
                   f"photos ({', '.join(accuracy_models.CALIBRATION_PHOTOS)}); {len(data['evaluation'][1])} "
                   f"evaluation crops of {n_eval_photos} other photos"),
    )


def minilm_case(cache: Path) -> ModelCase:
    from fp8core.calibration import write_parquet

    model = accuracy_models.export_minilm(cache)
    sentences = accuracy_models.text_data()
    calibration = accuracy_models.tokenize(sentences["calibration"])
    evaluation = accuracy_models.tokenize(sentences["evaluation"])
    parquet = write_parquet(calibration, cache / "minilm_calibration.parquet")
    return ModelCase(
        key="all_minilm_l6_v2", title="all-MiniLM-L6-v2 (sentence embedder)", model=model,
        calibration_parquet=parquet, calibration=calibration, evaluation=evaluation,
        score=embedding_scores, metrics=("mean_cosine", "min_cosine", "nn_agreement"),
        targets=(Target("mean_cosine", 0.999, True), Target("nn_agreement", 0.99, True)),
        accuracy_target="cos_dist=0.0025", rank=_embedding_rank,
        data_note=(f"{len(sentences['calibration'])} calibration / {len(sentences['evaluation'])} evaluation "
                   f"sentences of disjoint documents (scikit-learn data-set descriptions, Python reference "
                   f"topics), {accuracy_models.SEQ_LEN} tokens padded"),
    )


CASES = {"efficientnet": efficientnet_case, "minilm": minilm_case}


def run_model(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output on ``feeds``, in batches, with the project's safe session."""
    from fp8core.runtime import make_session

    session = make_session(str(path))
    n = len(next(iter(feeds.values())))
    outputs = [session.run(None, {k: v[i:i + EVAL_BATCH] for k, v in feeds.items()})[0]
               for i in range(0, n, EVAL_BATCH)]
    return np.concatenate(outputs)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OrtQuantizer:
    """One onnxruntime ``quantize_static`` (QDQ) configuration, run in a child process."""

    kind: str                        # what the quantized ops hold: "FP8" or "INT8"
    activation_type: str             # QuantType member names
    weight_type: str
    calibrate_method: str            # CalibrationMethod member name
    per_channel: bool = False
    op_types: tuple[str, ...] | None = None   # None: onnxruntime's default (every op it can quantize)

    def settings(self) -> str:
        types = (self.activation_type if self.activation_type == self.weight_type
                 else f"{self.activation_type} activations, {self.weight_type} weights")
        ops = "/".join(self.op_types) if self.op_types else "default op types"
        return (f"onnxruntime quantize_static {types}, {self.calibrate_method}, QDQ"
                f"{', per-channel' if self.per_channel else ''}, {ops}")


ORT_QUANTIZERS = {
    "ort_fp8": OrtQuantizer("FP8", "QFLOAT8E4M3FN", "QFLOAT8E4M3FN", "Distribution",
                            op_types=("Conv", "MatMul", "Gemm")),
    "ort_int8": OrtQuantizer("INT8", "QInt8", "QInt8", "MinMax", per_channel=True),
}
COUNTED_OPS = ("Conv", "MatMul", "Gemm")   # the ops fp8-convert converts; ORT runs count the same


@dataclasses.dataclass
class RunSpec:
    name: str
    settings: str
    args: list[str]                  # fp8-convert flags (empty for onnxruntime runs)
    needs: tuple[str, ...] = ()      # flags that must appear in fp8-convert --help
    full_fp8: bool = True            # FP8 weights and activations (the targets' condition)
    ort: OrtQuantizer | None = None  # an onnxruntime quantize_static run instead of fp8-convert

    @property
    def anchor(self) -> bool:
        """A non-FP8 reference run (the INT8 anchor), reported apart from the FP8 runs."""
        return self.ort is not None and self.ort.kind != "FP8"


def ort_run(name: str) -> RunSpec:
    quantizer = ORT_QUANTIZERS[name]
    settings = quantizer.settings()
    if quantizer.kind != "FP8":
        settings = f"**{quantizer.kind} anchor, not FP8**: {settings}"
    return RunSpec(name, settings, [], full_fp8=quantizer.kind == "FP8", ort=quantizer)


def fp8_convert_executable() -> str:
    beside_python = Path(sys.executable).parent / "fp8-convert"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("fp8-convert")
    if found is None:
        raise SystemExit("fp8-convert not found: pip install -e . in the repository first")
    return found


def available_flags() -> set[str]:
    text = subprocess.run([fp8_convert_executable(), "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"--[a-z0-9_]+", text))


def quantize_args(case: ModelCase, loss: str) -> list[str]:
    return ["--quantize", "--quantize_loss_type", loss, "--data_preprocess", str(case.calibration_parquet),
            "--batch_size", "8"]


def default_loss() -> str:
    """fp8-convert's --quantize_loss_type default (its ``quantize_<loss>`` run is the default --quantize run)."""
    from tasks.params import DEFAULT_LOSS

    return DEFAULT_LOSS


def first_runs(case: ModelCase) -> list[RunSpec]:
    runs = [
        RunSpec("fast", "--precision fp8, --fp8_params F143,F143,0,0 (defaults, no data)", ["--precision", "fp8"]),
        RunSpec("weights_only", "--precision fp8_weight --quantize (kld)",
                ["--precision", "fp8_weight", *quantize_args(case, "kld")], full_fp8=False),
    ]
    runs += [RunSpec(f"quantize_{loss}", f"--quantize --quantize_loss_type {loss}",
                     ["--precision", "fp8", *quantize_args(case, loss)]) for loss in LOSSES]
    default = default_loss()
    runs.append(RunSpec("gptaq", f"--quantize --quantize_loss_type {default} + --weight_rounding gptaq",
                        ["--precision", "fp8", *quantize_args(case, default), "--weight_rounding", "gptaq"]))
    # the eligible shape: full FP8 but the 3 ops that matter most, with the weight fit
    # (no per_channel: on the real-model suite's EfficientNet-Lite0 it took this 0.729 -> 0.641)
    runs.append(RunSpec("gptaq_keep_3", f"--quantize --quantize_loss_type {default} + --weight_rounding gptaq "
                        "+ --num_of_layers_keep_fp16 3",
                        ["--precision", "fp8", *quantize_args(case, default),
                         "--weight_rounding", "gptaq", "--num_of_layers_keep_fp16", "3"],
                        needs=("--num_of_layers_keep_fp16",)))
    return runs


TECHNIQUES = (  # (run name, flags, settings text)
    ("per_channel", ["--weight_granularity", "per_channel"], "--weight_granularity per_channel"),
    ("scale_float", ["--scale_kind", "float"], "--scale_kind float"),
    ("gptq", ["--weight_rounding", "gptq"], "--weight_rounding gptq"),
    ("bias_correction", ["--bias_correction"], "--bias_correction"),
)


def base_runs(case: ModelCase, loss: str, flags: set[str]) -> list[RunSpec]:
    """Runs on top of the best loss's --quantize run."""
    base = ["--precision", "fp8", *quantize_args(case, loss)]
    text = f"--quantize {loss}"
    runs = []
    if loss != "kld":
        runs.append(RunSpec(f"weights_only_{loss}", f"--precision fp8_weight --quantize {loss}",
                            ["--precision", "fp8_weight", *quantize_args(case, loss)], full_fp8=False))
    runs += [RunSpec(f"keep_{k}", f"{text} + --num_of_layers_keep_fp16 {k}", [*base, "--num_of_layers_keep_fp16", str(k)],
                    needs=("--num_of_layers_keep_fp16",)) for k in (1, 2, 3)]
    runs.append(RunSpec("target", f"{text} + --accuracy_target {case.accuracy_target} (on 8 calibration samples)",
                        [*base, "--accuracy_target", case.accuracy_target, "--compare_data", str(case.calibration_parquet),
                         "--accuracy_target_samples", "8"], needs=("--accuracy_target",)))
    runs.append(RunSpec("target_keep_3", f"{text} + --weight_granularity per_channel + --accuracy_target "
                        f"{case.accuracy_target} --accuracy_target_max_keep 3 (on 8 calibration samples)",
                        [*base, "--weight_granularity", "per_channel", "--accuracy_target", case.accuracy_target,
                         "--compare_data", str(case.calibration_parquet), "--accuracy_target_samples", "8",
                         "--accuracy_target_max_keep", "3"], needs=("--accuracy_target_max_keep",)))
    for name, extra, settings in TECHNIQUES:
        runs.append(RunSpec(name, f"{text} + {settings}", [*base, *extra], needs=(extra[0],)))
    present = [(extra, settings) for _, extra, settings in TECHNIQUES if extra[0] in flags]
    if present:
        combined = [flag for extra, _ in present for flag in extra]
        settings = " + ".join(s for _, s in present)
        runs.append(RunSpec("combined", f"{text} + {settings}", [*base, *combined]))
        runs.append(RunSpec("combined_keep_3", f"{text} + {settings} + --num_of_layers_keep_fp16 3",
                            [*base, *combined, "--num_of_layers_keep_fp16", "3"], needs=("--num_of_layers_keep_fp16",)))
        runs.append(RunSpec("combined_target_keep_3", f"{text} + {settings} + --accuracy_target "
                            f"{case.accuracy_target} --accuracy_target_max_keep 3 (on 8 calibration samples)",
                            [*base, *combined, "--accuracy_target", case.accuracy_target,
                             "--compare_data", str(case.calibration_parquet), "--accuracy_target_samples", "8",
                             "--accuracy_target_max_keep", "3"], needs=("--accuracy_target_max_keep",)))
        runs.append(RunSpec("combined_weights_only", f"--precision fp8_weight --quantize {loss} + {settings}",
                            ["--precision", "fp8_weight", *quantize_args(case, loss), *combined], full_fp8=False))
    runs += [ort_run(name) for name in ORT_QUANTIZERS]
    return runs


_OPS = re.compile(r"ops:\s*(\d+)\s*FP8,\s*(\d+)\s*kept")
_STAGE = re.compile(r"([A-Za-z_][\w ]*?)\s+([0-9]+(?:\.[0-9]+)?)s\b")


def parse_summary(stdout: str) -> dict:
    """FP8/kept op counts and stage seconds from fp8-convert's summary."""
    found: dict = {}
    for line in stdout.splitlines():
        text = line.strip()
        match = _OPS.search(text)
        if match and "fp8_ops" not in found:
            found["fp8_ops"], found["kept_ops"] = int(match.group(1)), int(match.group(2))
        if text.startswith("time:"):
            found["stage_s"] = {k.strip(): float(v) for k, v in _STAGE.findall(text[len("time:"):])}
    return found


def timed(command: list[str], work: Path, timeout_s: float) -> dict:
    """Run ``command`` in ``work``; wall seconds, exit code, output kept in files and returned."""
    out_path, err_path = work / "run.out", work / "run.err"
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            code = subprocess.run(command, cwd=work, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"seconds": round(time.perf_counter() - start, 1), "exit_code": code,
            "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace")}


def convert(case: ModelCase, spec: RunSpec, cache: Path, timeout_s: float) -> tuple[dict, Path]:
    work = cache / "runs" / case.key / spec.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    output = work / f"{case.key}_fp8.onnx"
    if spec.ort is not None:
        npz = work / "calibration.npz"
        np.savez(npz, **case.calibration)
        command = [sys.executable, str(Path(__file__).resolve()), "--_ort-child", spec.name, str(case.model), str(npz),
                   str(output)]
    else:
        command = [fp8_convert_executable(), "--input_model", str(case.model), "--output_model", str(output),
                   *spec.args, "--cache_dir", str(work / "statistics_cache"), "--log_dir", str(work / "logs"),
                   "--mlflow_tracking_uri", f"sqlite:///{cache / 'mlflow.db'}", "--experiment_name", "accuracy-suite"]
    result = timed(command, work, timeout_s)
    result["command"] = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command))
    result.update(parse_summary(result["stdout"]))
    if spec.ort is not None:
        for line in result["stdout"].splitlines():
            if line.startswith(ORT_CHILD_MARKER):
                result.update(json.loads(line[len(ORT_CHILD_MARKER):]))
    return result, output


def _ort_child(name: str, model: str, npz: str, output: str) -> None:
    """Body of the ORT child process: quantize_static (``ORT_QUANTIZERS[name]``) on the
    calibration arrays, 8 per batch; prints the quantized/kept Conv/MatMul/Gemm counts."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    quantizer = ORT_QUANTIZERS[name]

    arrays = dict(np.load(npz))
    n = len(next(iter(arrays.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v[i:i + 8] for k, v in arrays.items()} for i in range(0, n, 8)])

        def get_next(self):
            return next(self.batches, None)

    start = time.perf_counter()
    quantize_static(model, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=quantizer.per_channel,
                    activation_type=QuantType[quantizer.activation_type], weight_type=QuantType[quantizer.weight_type],
                    calibrate_method=CalibrationMethod[quantizer.calibrate_method],
                    op_types_to_quantize=list(quantizer.op_types) if quantizer.op_types else None)
    import onnx

    quantized = onnx.load(output)
    dq_outputs = {o for node in quantized.graph.node if node.op_type == "DequantizeLinear" for o in node.output}
    total = sum(node.op_type in COUNTED_OPS for node in quantized.graph.node)
    done = sum(node.op_type in COUNTED_OPS and any(i in dq_outputs for i in node.input) for node in quantized.graph.node)
    qdq = {op: sum(node.op_type == op for node in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    print(ORT_CHILD_MARKER + json.dumps({"tool_s": round(time.perf_counter() - start, 2),
                                         f"{quantizer.kind.lower()}_ops": done, "kept_ops": total - done,
                                         "qdq_nodes": qdq}), flush=True)


def _trimmed(result: dict) -> dict:
    kept = {k: v for k, v in result.items() if k not in ("stdout", "stderr")}
    kept["stdout_tail"] = result.get("stdout", "")[-2500:]
    kept["stderr_tail"] = result.get("stderr", "")[-1500:]
    return kept


def measure(case: ModelCase, spec: RunSpec, reference: np.ndarray, flags: set[str], cache: Path,
            timeout_s: float) -> dict:
    entry = {"settings": spec.settings, "full_fp8": spec.full_fp8}
    if spec.anchor:
        entry["anchor"] = spec.ort.kind
    missing = [flag for flag in spec.needs if flag not in flags]
    if missing:
        return {**entry, "status": f"not available ({', '.join(missing)} not in fp8-convert --help)"}
    result, output = convert(case, spec, cache, timeout_s)
    entry.update(_trimmed(result))
    if result["exit_code"] != 0 or not output.exists():
        last = (result["stderr"].strip().splitlines() or ["no output"])[-1]
        entry["status"] = f"failed (exit {result['exit_code']}): {last[:300]}"
        return entry
    start = time.perf_counter()
    entry["scores"] = case.score(reference, run_model(output, case.evaluation))
    entry["scoring_seconds"] = round(time.perf_counter() - start, 1)
    entry["status"] = "ok"
    return entry


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def load_results() -> dict:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"models": {}}


def environment() -> dict:
    import platform

    import onnx
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__,
            **code_revision(), "engine_code": _engine_code()}


def _engine_code() -> str:
    """Where ``flows`` (what fp8-convert runs) is imported from: the snapshot or the checkout."""
    import importlib.util

    spec = importlib.util.find_spec("flows")
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else "?"


def code_revision() -> dict:
    """The commit the measured code is at: ``FP8_ACC_GIT_COMMIT`` (a snapshot exported with ``git
    archive`` is no checkout), else ``git rev-parse`` here, with the engine files changed since."""
    snapshot = os.environ.get("FP8_ACC_GIT_COMMIT", "").strip()
    if snapshot:
        return {"git_commit": snapshot, "uncommitted_engine_files": [], "code": f"snapshot of {snapshot} in {HERE.parent}"}
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    uncommitted = git("status", "--porcelain", "--", "../fp8core", "../flows", "../tasks").splitlines()
    return {"git_commit": git("rev-parse", "--short", "HEAD") or "?",
            "uncommitted_engine_files": [line[3:] for line in uncommitted]}


def eligible(run: dict) -> bool:
    """Counts for the targets: full FP8, scored, at most MAX_KEPT_OPS ops kept in high precision."""
    return (run.get("status") == "ok" and run.get("full_fp8", True)
            and run.get("kept_ops") is not None and run["kept_ops"] <= MAX_KEPT_OPS)


def targets_met(model: dict, run: dict) -> int:
    return sum(Target(**t).met(run["scores"].get(t["metric"])) for t in model["targets"])


def best_eligible(model: dict) -> tuple[str, dict] | None:
    runs = [(name, run) for name, run in model["runs"].items() if eligible(run)]
    if not runs:
        return None
    primary = model["targets"][0]["metric"]
    return max(runs, key=lambda item: (targets_met(model, item[1]), item[1]["scores"][primary]))


def _ops_cell(run: dict) -> str:
    """"FP8 / kept" op counts; an anchor run's quantized ops are named by their kind ("50 INT8 / 0")."""
    if run.get("fp8_ops") is not None:
        return f"{run['fp8_ops']} / {run['kept_ops']}"
    kind = run.get("anchor")
    if kind and run.get(f"{kind.lower()}_ops") is not None:
        return f"{run[f'{kind.lower()}_ops']} {kind} / {run['kept_ops']}"
    return "-"


def commit_lines(model: dict) -> list[str]:
    """Which commit each row was measured at (rows merge across runs of the suite)."""
    by_commit: dict[str, list[str]] = {}
    for name, run in model["runs"].items():
        by_commit.setdefault(run.get("git_commit") or "", []).append(f"`{name}`")
    if set(by_commit) == {""}:
        return []
    parts = [f"{commit}: {', '.join(names)}" for commit, names in by_commit.items() if commit]
    if "" in by_commit:
        parts.append(f"not recorded (measured before rows kept their commit): {', '.join(by_commit[''])}")
    return ["", "Commit each row was measured at: " + "; ".join(parts) + "."]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.4f}"
    return str(value)


# (technique run, the run it is compared with, what it is)
CONTRIBUTIONS = (
    ("weights_only_{base}", "fp32", "FP8 weights only (activations float), base loss"),
    ("weights_only", "weights_only_{base}", "kld instead of the base loss for weights-only"),
    ("quantize_{base}", "weights_only_{base}", "FP8 activations on top of FP8 weights"),
    ("quantize_{base}", "fast", "calibration search vs fast-mode defaults"),
    ("per_channel", "quantize_{base}", "per-channel real weight scales"),
    ("scale_float", "quantize_{base}", "real per-tensor weight scales"),
    ("gptq", "quantize_{base}", "GPTQ weight rounding"),
    ("gptaq", "quantize_{default}", "weights and biases fitted to the FP8 model's own inputs (default loss)"),
    ("gptaq_keep_3", "gptaq", "the 3 ops that matter most kept, on top of gptaq"),
    ("bias_correction", "quantize_{base}", "bias correction"),
    ("combined", "quantize_{base}", "all weight techniques together"),
    ("keep_1", "quantize_{base}", "1 worst op kept in high precision"),
    ("keep_3", "quantize_{base}", "3 worst ops kept in high precision"),
    ("combined_keep_3", "combined", "3 worst ops kept, on top of the weight techniques"),
    ("target", "quantize_{base}", "--accuracy_target fallback"),
    ("target_keep_3", "per_channel", "at most 3 ops kept by the accuracy-target search (measured effect), on per-channel scales"),
    ("combined_target_keep_3", "combined", "at most 3 ops kept by the accuracy-target search, on all weight techniques"),
    ("ort_fp8", "quantize_{base}", "onnxruntime's FP8 quantizer instead of fp8-convert"),
    ("quantize_{base}", "ort_int8", "fp8-convert FP8 (base loss) against the INT8 anchor"),
    ("quantize_{default}", "ort_int8", "fp8-convert's default --quantize (loss {default}) against the INT8 anchor"),
    ("ort_fp8", "ort_int8", "onnxruntime FP8 against onnxruntime INT8 (the anchor)"),
)


def contribution_lines(model: dict) -> list[str]:
    base = model.get("base_loss", "kld")
    names = {"base": base, "default": model.get("default_loss", base)}
    primary = [t["metric"] for t in model["targets"]]
    runs = dict(model["runs"])
    runs.setdefault(f"weights_only_{base}", runs.get("weights_only"))  # base kld: one run is both
    lines, seen = [], set()
    for technique, reference, what in CONTRIBUTIONS:
        a, b, what = technique.format(**names), reference.format(**names), what.format(**names)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        if b == "fp32":
            run = runs.get(a)
            if run and run.get("status") == "ok":
                lines.append(f"* {what} (`{a}` vs FP32): " + ", ".join(f"{m} {_fmt(run['scores'][m])}" for m in primary))
            continue
        ra, rb = runs.get(a), runs.get(b)
        if not ra or not rb:
            continue
        if ra.get("status") != "ok" or rb.get("status") != "ok":
            lines.append(f"* {what} (`{a}`): {ra.get('status', '?') if ra.get('status') != 'ok' else 'reference ' + rb.get('status', '?')}")
            continue
        deltas = ", ".join(f"{m} {_fmt(rb['scores'][m])} -> {_fmt(ra['scores'][m])} ({ra['scores'][m] - rb['scores'][m]:+.4f})"
                           for m in primary)
        lines.append(f"* {what} (`{a}` vs `{b}`): {deltas}")
    return lines


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = [
        "# FP8 accuracy on real pretrained models",
        "",
        "Generated by `HF_HUB_OFFLINE=1 python benchmarks/accuracy_suite.py` (its docstring defines every run and",
        f"score). Commit {env.get('git_commit', '?')}, onnxruntime {env.get('onnxruntime', '?')}, torch "
        f"{env.get('torch', '?')} (export only), {env.get('cpus', '?')} shared CPUs (the last run; each table says",
        "which commit each row comes from). Scores compare each FP8 model with the FP32 model on the evaluation data;",
        "seconds are the wall time of the conversion process (Prefect/MLflow start-up included, cold statistics",
        "cache), not of the scoring. The last row(s) of each table, marked **INT8 anchor**, are onnxruntime's",
        "INT8 QDQ quantizer on the same calibration data: not FP8, never eligible for the targets, the accuracy",
        "the FP8 runs are read against.",
        "",
    ]
    for key, model in results["models"].items():
        metrics = model["metrics"]
        lines += [f"## {model['title']}", "", f"Data: {model['data_note']}. Base loss for the later runs: "
                  f"`{model.get('base_loss', '?')}` (best `quantize_*` run).", ""]
        header = ["run", "settings", "FP8 / kept ops", *metrics, "targets met", "seconds", "status"]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(metrics) + 2) + ["---"]) + "|"]
        # FP8 runs first, then the anchor rows (INT8): the FP8 numbers read against them.
        for name, run in sorted(model["runs"].items(), key=lambda item: bool(item[1].get("anchor"))):
            scores = run.get("scores", {})
            ops = _ops_cell(run)
            met = f"{targets_met(model, run)}/{len(model['targets'])}" if scores else "-"
            if scores and not eligible(run):
                met += " (not eligible)"
            status = run.get("status", "?")
            label = f"`{name}` (**{run['anchor']} anchor**)" if run.get("anchor") else f"`{name}`"
            lines.append("| " + " | ".join([label, run["settings"], ops, *(_fmt(scores.get(m)) for m in metrics),
                                           met, "-" if run.get("seconds") is None else f"{run['seconds']:.1f}", status.replace("|", "/")]) + " |")
        lines += commit_lines(model)
        best = best_eligible(model)
        lines += ["", f"Targets (full FP8, at most {MAX_KEPT_OPS} ops kept in high precision):", ""]
        anchors = {name: run for name, run in model["runs"].items() if run.get("anchor") and run.get("status") == "ok"}
        if best is None:
            lines.append("* no eligible run")
        else:
            name, run = best
            lines.append(f"Best eligible run: `{name}` ({run['settings']}; {run['kept_ops']} ops kept).")
            lines.append("")
            for t in model["targets"]:
                target = Target(**t)
                value = run["scores"].get(target.metric)
                anchor_text = "".join(f"; `{a}` anchor {_fmt(ar['scores'].get(target.metric))}"
                                      for a, ar in anchors.items())
                lines.append(f"* {target}: {_fmt(value)} -> {'met' if target.met(value) else 'MISSED'}{anchor_text}")
        lines += ["", "What each technique contributes:", "", *contribution_lines(model), ""]
        if model.get("target_report"):
            lines += ["`--accuracy_target` report (from fp8-convert's output):", "", "```", model["target_report"], "```", ""]
    return "\n".join(lines)


def target_report(stdout: str) -> str:
    """fp8-convert's lines about the accuracy-target search (what it kept, metric per step)."""
    keep = [line for line in stdout.splitlines()
            if re.search(r"accuracy|target|step|kept|keep", line, re.IGNORECASE)]
    return "\n".join(keep[-30:])


def save(results: dict) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=float) + "\n")
    RESULTS_MD.write_text(markdown(results))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="efficientnet,minilm", help=f"comma separated: {', '.join(CASES)}")
    p.add_argument("--runs", default="", help="comma separated run names (default: all)")
    p.add_argument("--base-loss", default="", help="skip choosing: use this loss as the base")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FP8_ACC_DIR", "/tmp/fp8_acc")))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per conversion before it is killed")
    p.add_argument("--target-timeout", type=float, default=600.0,
                   help="seconds for the --accuracy_target run (its greedy search rewrites and runs the model once "
                        "per remaining candidate op per step, and has no step limit)")
    p.add_argument("--report-only", action="store_true", help="rewrite accuracy.md from accuracy.json, run nothing")
    p.add_argument("--resume", action="store_true", help="keep runs already scored in accuracy.json, run the rest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_ort-child"]:
        _ort_child(*argv[1:5])
        return 0
    args = parse_args(argv)
    if args.report_only:
        RESULTS_MD.write_text(markdown(load_results()))
        return 0
    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {r for r in args.runs.split(",") if r}
    flags = available_flags()
    results = load_results()
    results["environment"] = environment()
    now = lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: E731

    for model_key in [m for m in args.models.split(",") if m]:
        case = CASES[model_key](cache)
        reference = run_model(case.model, case.evaluation)
        entry = results["models"].setdefault(case.key, {"runs": {}})
        entry.update({"title": case.title, "metrics": list(case.metrics), "data_note": case.data_note,
                      "targets": [dataclasses.asdict(t) for t in case.targets],
                      "evaluation_samples": len(reference)})
        if case.score is classifier_scores:
            entry["fp32_confident_samples"] = int((softmax(reference).max(axis=1) > 0.5).sum())

        def record(spec: RunSpec) -> None:
            if wanted and spec.name not in wanted:
                return
            if args.resume and entry["runs"].get(spec.name, {}).get("status") == "ok":
                return
            print(f"[{now()}] {case.key} {spec.name}: {spec.settings}", flush=True)
            timeout = args.target_timeout if "target" in spec.name else args.timeout
            run = measure(case, spec, reference, flags, cache, timeout)
            run["measured_at"] = now()
            run["git_commit"] = results["environment"]["git_commit"]
            entry["runs"][spec.name] = run
            if spec.name == "target" and run.get("stdout_tail"):
                entry["target_report"] = target_report(run["stdout_tail"])
            save(results)
            print(f"    {run['status']}, {run.get('seconds', '-')} s, scores {run.get('scores', {})}", flush=True)

        for spec in first_runs(case):
            record(spec)
        scored = {loss: entry["runs"].get(f"quantize_{loss}", {}).get("scores") for loss in LOSSES}
        scored = {loss: s for loss, s in scored.items() if s}
        base = args.base_loss or (max(scored, key=lambda loss: case.rank(scored[loss])) if scored else "kld")
        entry["base_loss"] = base
        entry["default_loss"] = default_loss()
        for spec in base_runs(case, base, flags):
            record(spec)
        save(results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
