"""The committed demo in data/: model structure, numerics, accuracy, data schema, reproducibility."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import numpy_helper

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MAKE_DEMO = DATA_DIR / "make_demo.py"
GENERATED_FILES = ["demo_model.onnx", "calib.parquet", "calib.npz", "eval.parquet"]
IMAGE_TYPE = pa.fixed_shape_tensor(pa.float32(), [1, 8, 8])


def load_make_demo():
    """data/ is not a package: load the script as a module to reuse its split and reference."""
    spec = importlib.util.spec_from_file_location("make_demo", MAKE_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_demo():
    return load_make_demo()


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(DATA_DIR / "demo_model.onnx")


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(
        str(DATA_DIR / "demo_model.onnx"), providers=["CPUExecutionProvider"]
    )


def images_of(table: pa.Table) -> np.ndarray:
    return table.column("image").combine_chunks().to_numpy_ndarray()


@pytest.fixture(scope="module")
def eval_table() -> pa.Table:
    return pq.read_table(DATA_DIR / "eval.parquet")


@pytest.fixture(scope="module")
def calib_table() -> pa.Table:
    return pq.read_table(DATA_DIR / "calib.parquet")


# ---------------------------------------------------------------------------------------------
# The model


def test_model_passes_the_checker_at_opset_17(model):
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_model_io_has_a_dynamic_batch_dim(model):
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.name, dims) == ("image", ["N", 1, 8, 8])
    outputs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert outputs == {"logits": ["N", 10], "probs": ["N", 10]}


def test_nodes_are_unnamed(model):
    assert all(node.name == "" for node in model.graph.node)


def test_model_has_the_described_fp8_candidate_ops(model):
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MatMul") == 1 and ops.count("Gemm") == 1
    first_conv, depthwise = [n for n in model.graph.node if n.op_type == "Conv"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in depthwise.attribute}
    assert attrs["group"] == 16
    (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert {a.name: a.i for a in gemm.attribute}["transB"] == 1
    initializer_names = {t.name for t in model.graph.initializer}
    assert first_conv.input[1] in initializer_names
    # The depthwise weight comes from a Constant node: the converter's second weight source.
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    assert depthwise.input[1] in constants and depthwise.input[1] not in initializer_names
    weight = numpy_helper.to_array(constants[depthwise.input[1]].attribute[0].t)
    assert weight.shape == (16, 1, 3, 3) and weight.dtype == np.float32


def parameters_from(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The network's parameters read back from the ONNX file, keyed as make_demo names them."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    names = {
        "conv1_w": "conv1.weight", "conv1_b": "conv1.bias",
        "dw_w": "dwconv.weight", "dw_b": "dwconv.bias",
        "fc1_w": "fc1.weight", "fc1_b": "fc1.bias",
        "fc2_w": "fc2.weight", "fc2_b": "fc2.bias",
    }
    return {key: tensors[name] for key, name in names.items()}


def test_onnxruntime_matches_the_numpy_network(model, session, make_demo, eval_table):
    images = images_of(eval_table)
    logits, probs = session.run(["logits", "probs"], {"image": images})
    params = parameters_from(model)
    expected = make_demo.mlp_logits(make_demo.conv_features(images, params), params)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    shifted = np.exp(expected - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, shifted / shifted.sum(axis=1, keepdims=True), atol=1e-5)


def test_every_relu_clips_something(eval_table):
    """Each Relu sees negative inputs, so a runtime that drops one changes the result (SPEC 8)."""
    model = onnx.load(DATA_DIR / "demo_model.onnx")
    relu_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Relu"]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x) for x in relu_inputs)
    probe = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = probe.run(relu_inputs, {"image": images_of(eval_table)})
    assert len(values) == 3
    assert all((v < 0).mean() > 0.05 for v in values)


def test_fp32_accuracy_on_eval_is_above_90_percent(session, eval_table):
    logits = session.run(["logits"], {"image": images_of(eval_table)})[0]
    labels = eval_table.column("label").to_numpy()
    assert np.mean(logits.argmax(axis=1) == labels) > 0.9


# ---------------------------------------------------------------------------------------------
# The data


def test_calib_parquet_schema(calib_table):
    assert calib_table.schema == pa.schema([("image", IMAGE_TYPE)])
    assert calib_table.num_rows == 64


def test_eval_parquet_schema(eval_table):
    assert eval_table.schema == pa.schema([("image", IMAGE_TYPE), ("label", pa.int64())])
    assert eval_table.num_rows == 300
    assert set(eval_table.column("label").to_numpy()) == set(range(10))


def test_calib_npz_holds_the_calib_parquet_images(calib_table):
    with np.load(DATA_DIR / "calib.npz", allow_pickle=False) as npz:
        assert list(npz.keys()) == ["image"]
        np.testing.assert_array_equal(npz["image"], images_of(calib_table))


def test_files_hold_the_disjoint_splits_of_digits(make_demo, calib_table, eval_table):
    images, labels = make_demo.load_images()
    train_idx, calib_idx, eval_idx = make_demo.split_indices(len(images))
    assert not set(train_idx) & set(calib_idx)
    assert not set(train_idx) & set(eval_idx)
    assert not set(calib_idx) & set(eval_idx)
    assert len(train_idx) + len(calib_idx) + len(eval_idx) == len(images) == 1797
    # Preprocessing is applied before storage: pixel / 16, so values lie in [0, 1].
    np.testing.assert_array_equal(images_of(calib_table), images[calib_idx])
    np.testing.assert_array_equal(images_of(eval_table), images[eval_idx])
    np.testing.assert_array_equal(eval_table.column("label").to_numpy(), labels[eval_idx])
    assert 0.0 <= images.min() and images.max() == 1.0


def test_committed_files_are_small():
    assert sum((DATA_DIR / name).stat().st_size for name in GENERATED_FILES) < 2 * 2**20


def test_rerunning_make_demo_reproduces_the_committed_bytes(tmp_path):
    subprocess.run([sys.executable, str(MAKE_DEMO), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for name in GENERATED_FILES:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
