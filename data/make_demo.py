"""Build the demo model and its data from scikit-learn's bundled digits (no download, no torch).

Usage: ``python data/make_demo.py [OUT_DIR]`` (default: the directory of this script).

Writes, byte-identically on every run with the same library versions:

* ``demo_model.onnx``: a small CNN, input ``image`` float32 [N,1,8,8] (pixels / 16, in [0,1]),
  outputs ``logits`` [N,10] and ``probs`` [N,10] (Softmax of the logits). Opset 17, nodes
  unnamed (the converter names them ``OpType_index``)::

      Conv 3x3, 16 filters, pad 1      filters: k-means centroids of contrast-normalised patches
      Relu
      Conv 3x3 depthwise, group 16     per channel: first principal direction of its 3x3
                                       patches, bias minus its median response; the weight is
                                       held in a Constant node, not an initializer
      MaxPool 2x2 -> Relu -> Reshape [-1, 256]
      MatMul 256x64 + Add -> Relu      hidden layer of an sklearn MLPClassifier
      Gemm transB=1 (10x64)            output layer of the same MLPClassifier
      Softmax

* ``calib.parquet`` (column ``image``), ``calib.npz`` (key ``image``): the calibration split.
* ``eval.parquet`` (columns ``image``, ``label`` int64): the held-out evaluation split.

Parquet ``image`` cells are Arrow ``fixed_shape_tensor(float32, [1, 8, 8])``, one sample per row
(SPEC section 5). The three splits (train, calibration, evaluation) are disjoint sets of indices.
The script checks with onnxruntime that the ONNX graph reproduces the numpy forward pass and the
sklearn classifier, and prints the evaluation accuracy.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

SEED = 0
N_CALIB = 64
N_EVAL = 300
N_FILTERS = 16
N_HIDDEN = 64
N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
OPSET = 17
# Fraction of training responses each first-layer filter lets through its Relu (Coates & Ng's
# "triangle" activation keeps roughly the above-average half; a sparser code generalises better).
CONV1_ACTIVE_FRACTION = 0.25
# Contrast normalisation of patches: x -> (x - mean) / sqrt(var + eps); eps keeps near-blank
# patches from being blown up to full contrast (pixels are in [0, 1]).
PATCH_VAR_EPS = 0.01
# Timestamp written into calib.npz's zip entries: fixed so that the file is reproducible.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

MODEL_FILE = "demo_model.onnx"
CALIB_PARQUET = "calib.parquet"
CALIB_NPZ = "calib.npz"
EVAL_PARQUET = "eval.parquet"


# ---------------------------------------------------------------------------------------------
# Data


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images float32 [N,1,8,8] = pixel / 16 (in [0,1]), labels int64 [N]."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, *IMAGE_SHAPE)
    return images, digits.target.astype(np.int64)


def split_indices(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint (train, calib, eval) index arrays covering range(n), from one seeded permutation.

    Eval takes the first N_EVAL of the permutation, calib the next N_CALIB, train the rest; each
    is sorted so that files list samples in data-set order.
    """
    order = np.random.default_rng(seed).permutation(n)
    eval_idx = np.sort(order[:N_EVAL])
    calib_idx = np.sort(order[N_EVAL : N_EVAL + N_CALIB])
    train_idx = np.sort(order[N_EVAL + N_CALIB :])
    return train_idx, calib_idx, eval_idx


# ---------------------------------------------------------------------------------------------
# Numpy reference of the network (float64 arithmetic on float32-rounded parameters)


def patches_3x3(x: np.ndarray) -> np.ndarray:
    """[N,C,H,W] -> [N,C,H,W,9]: the zero-padded 3x3 neighbourhood of every pixel, row-major.

    Element k = 3*dy + dx of pixel (i, j) is x[i + dy - 1, j + dx - 1] (0 outside), which is the
    order of a flattened ONNX Conv kernel [3,3], so conv = patches @ kernel.ravel() (a
    cross-correlation, as ONNX Conv computes).
    """
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return np.stack(
        [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=-1
    )


def conv1(images: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv 3x3 pad 1, one input channel: [N,1,8,8] -> [N,F,8,8]."""
    p = patches_3x3(images.astype(np.float64))[:, 0]  # [N,8,8,9]
    w = weight.reshape(weight.shape[0], 9).astype(np.float64)
    return np.einsum("nhwk,fk->nfhw", p, w) + bias.astype(np.float64)[None, :, None, None]


def depthwise_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv 3x3 pad 1, group = channels: [N,C,H,W] -> [N,C,H,W]."""
    w = weight.reshape(weight.shape[0], 9).astype(np.float64)
    return np.einsum("nchwk,ck->nchw", patches_3x3(x), w) + bias.astype(np.float64)[
        None, :, None, None
    ]


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """MaxPool kernel 2, stride 2: [N,C,H,W] -> [N,C,H/2,W/2]."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def conv_features(images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """The convolutional trunk: images [N,1,8,8] -> flattened features [N, F*4*4] (float64)."""
    h = relu(conv1(images, params["conv1_w"], params["conv1_b"]))
    h = depthwise_conv(h, params["dw_w"], params["dw_b"])
    h = relu(max_pool_2x2(h))
    return h.reshape(h.shape[0], -1)


def mlp_logits(features: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """MatMul + Add -> Relu -> Gemm(transB=1): features [N,256] -> logits [N,10] (float64)."""
    hidden = relu(features @ params["fc1_w"].astype(np.float64) + params["fc1_b"])
    return hidden @ params["fc2_w"].astype(np.float64).T + params["fc2_b"]


# ---------------------------------------------------------------------------------------------
# Learning the parameters


def learn_conv1(train_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-layer filters, learned without labels (Coates & Ng 2011, single-layer k-means).

    Patches with some ink are contrast-normalised, (x - mean) / sqrt(var + PATCH_VAR_EPS), and
    clustered with k-means into N_FILTERS centroids. Each filter is its centroid made zero-sum
    (the response ignores brightness) and unit-norm. The bias is minus the (1 -
    CONV1_ACTIVE_FRACTION) quantile of the filter's training responses, so that after the Relu
    each filter fires on about that fraction of pixels.
    """
    patches = patches_3x3(train_images.astype(np.float64))[:, 0].reshape(-1, 9)
    inked = patches[patches.max(axis=1) > 0]
    centred = inked - inked.mean(axis=1, keepdims=True)
    normalised = centred / np.sqrt(centred.var(axis=1, keepdims=True) + PATCH_VAR_EPS)
    kmeans = KMeans(n_clusters=N_FILTERS, n_init=4, random_state=SEED).fit(normalised)
    filters = kmeans.cluster_centers_ - kmeans.cluster_centers_.mean(axis=1, keepdims=True)
    filters /= np.linalg.norm(filters, axis=1, keepdims=True)
    weight = filters.reshape(N_FILTERS, 1, 3, 3).astype(np.float32)
    responses = patches @ weight.reshape(N_FILTERS, 9).T.astype(np.float64)
    bias = -np.quantile(responses, 1.0 - CONV1_ACTIVE_FRACTION, axis=0).astype(np.float32)
    return weight, bias


def learn_depthwise(feature_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the 3x3 kernel = first principal direction of that channel's patches.

    The direction is taken on uncentred patches (the dominant local pattern, a smoothing-like
    kernel), signed so that its sum is positive. The bias is minus the median of the channel's
    responses, so that the Relu after the pooling has work to do (it zeroes about a third of
    the pooled values; without the bias the kernel's output is never negative).
    """
    patches = patches_3x3(feature_maps)  # [N,C,H,W,9]
    channels = feature_maps.shape[1]
    weight = np.empty((channels, 1, 3, 3), dtype=np.float32)
    for c in range(channels):
        p = patches[:, c].reshape(-1, 9)
        _, _, vt = np.linalg.svd(p.T @ p)
        kernel = vt[0] * np.sign(vt[0].sum())
        weight[c, 0] = kernel.reshape(3, 3)
    zero_bias = np.zeros(channels, dtype=np.float32)
    responses = depthwise_conv(feature_maps, weight, zero_bias)
    bias = -np.median(responses, axis=(0, 2, 3)).astype(np.float32)
    return weight, bias


def train_mlp(features: np.ndarray, labels: np.ndarray) -> MLPClassifier:
    """One hidden Relu layer of N_HIDDEN units on the conv features (seeded, deterministic)."""
    mlp = MLPClassifier(
        hidden_layer_sizes=(N_HIDDEN,),
        activation="relu",
        alpha=1e-3,
        max_iter=400,
        random_state=SEED,
    )
    return mlp.fit(features, labels)


def learn_parameters(train_images: np.ndarray, train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """All network parameters as float32 arrays, in ONNX layouts (Gemm weight is [10, 64])."""
    params: dict[str, np.ndarray] = {}
    params["conv1_w"], params["conv1_b"] = learn_conv1(train_images)
    maps = relu(conv1(train_images, params["conv1_w"], params["conv1_b"]))
    params["dw_w"], params["dw_b"] = learn_depthwise(maps)
    mlp = train_mlp(conv_features(train_images, params), train_labels)
    params["fc1_w"] = mlp.coefs_[0].astype(np.float32)
    params["fc1_b"] = mlp.intercepts_[0].astype(np.float32)
    params["fc2_w"] = np.ascontiguousarray(mlp.coefs_[1].T).astype(np.float32)
    params["fc2_b"] = mlp.intercepts_[1].astype(np.float32)
    return params


# ---------------------------------------------------------------------------------------------
# ONNX export


def build_model(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The ONNX graph of the network (opset 17, unnamed nodes, dynamic batch dim "N")."""
    n_features = N_FILTERS * 4 * 4
    init = numpy_helper.from_array
    initializers = [
        init(params["conv1_w"], "conv1.weight"),
        init(params["conv1_b"], "conv1.bias"),
        init(params["dw_b"], "dwconv.bias"),
        init(np.array([-1, n_features], dtype=np.int64), "flatten.shape"),
        init(params["fc1_w"], "fc1.weight"),
        init(params["fc1_b"], "fc1.bias"),
        init(params["fc2_w"], "fc2.weight"),
        init(params["fc2_b"], "fc2.bias"),
    ]
    # The depthwise weight lives in a Constant node: the converter must find weights there too.
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Constant", [], ["dwconv.weight"], value=init(params["dw_w"])),
        helper.make_node("Conv", ["relu1", "dwconv.weight", "dwconv.bias"], ["dwconv"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=N_FILTERS),
        helper.make_node("MaxPool", ["dwconv"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["pool"], ["relu2"]),
        helper.make_node("Reshape", ["relu2", "flatten.shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["fc1.matmul"]),
        helper.make_node("Add", ["fc1.matmul", "fc1.bias"], ["fc1"]),
        helper.make_node("Relu", ["fc1"], ["relu3"]),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", N_CLASSES]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="data/make_demo.py",
        doc_string="Digits CNN (sklearn load_digits); input = pixel / 16, shape [N,1,8,8].",
    )
    model.ir_version = 8  # the IR of opset 17; keeps the file loadable by older runtimes
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# Writing the data files


def image_table(images: np.ndarray, labels: np.ndarray | None = None) -> pa.Table:
    """Column ``image``: fixed_shape_tensor(float32, [1,8,8]); optional ``label``: int64."""
    tensor_type = pa.fixed_shape_tensor(pa.float32(), list(IMAGE_SHAPE))
    flat = pa.array(np.ascontiguousarray(images, dtype=np.float32).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(IMAGE_SHAPE)))
    columns = {"image": pa.ExtensionArray.from_storage(tensor_type, storage)}
    if labels is not None:
        columns["label"] = pa.array(labels.astype(np.int64))
    return pa.table(columns)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez-compatible archive with fixed zip timestamps (np.savez stamps the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Check and entry point


def onnx_logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["logits"], {"image": images})[0]


def check_against_onnxruntime(
    model: onnx.ModelProto, params: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray
) -> float:
    """Assert the ONNX graph matches the numpy forward pass; return accuracy on (images, labels)."""
    expected = mlp_logits(conv_features(images, params), params)
    actual = onnx_logits(model, images)
    max_error = float(np.max(np.abs(actual - expected)))
    if max_error > 1e-3 or not np.array_equal(actual.argmax(1), expected.argmax(1)):
        raise RuntimeError(f"ONNX model differs from the numpy reference (max |diff| {max_error})")
    return float(np.mean(actual.argmax(1) == labels))


def build_demo(out_dir: Path) -> float:
    """Learn the model, write the four files into out_dir, return the eval accuracy (FP32)."""
    images, labels = load_images()
    train_idx, calib_idx, eval_idx = split_indices(len(images))
    # One thread: k-means and BLAS reductions then add in a fixed order (reproducible bytes).
    with threadpool_limits(limits=1):
        params = learn_parameters(images[train_idx], labels[train_idx])
    model = build_model(params)
    accuracy = check_against_onnxruntime(model, params, images[eval_idx], labels[eval_idx])

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(model.SerializeToString(deterministic=True))
    pq.write_table(image_table(images[calib_idx]), out_dir / CALIB_PARQUET)
    pq.write_table(image_table(images[eval_idx], labels[eval_idx]), out_dir / EVAL_PARQUET)
    write_npz(out_dir / CALIB_NPZ, {"image": images[calib_idx]})
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write the files (default: the directory of this script)")
    args = parser.parse_args(argv)
    accuracy = build_demo(args.out_dir)
    print(f"wrote {MODEL_FILE}, {CALIB_PARQUET}, {CALIB_NPZ}, {EVAL_PARQUET} to {args.out_dir}")
    print(f"FP32 accuracy on the {N_EVAL} evaluation digits: {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
