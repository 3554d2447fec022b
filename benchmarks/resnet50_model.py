"""A ResNet50-architecture ONNX model with random weights, and random calibration data for it.

Built with ``onnx.helper`` only (no torch, no download), so the benchmark runs anywhere.

Architecture (torchvision ResNet50 v1.5, BatchNorm folded into each Conv's weight and bias):
Conv 7x7/2 (64) -> Relu -> MaxPool 3x3/2 -> 4 stages of bottleneck blocks ([3, 4, 6, 3] blocks,
widths 64/128/256/512, expansion 4; the stride sits on the 3x3 conv; the first block of each stage
has a 1x1 projection shortcut) -> GlobalAveragePool -> Flatten -> Gemm 2048 -> 1000.
That is 53 Conv + 1 Gemm and 25.5M parameters. Nodes are unnamed, as old exporters left them.

Weights: He-normal, ``w ~ N(0, 2 / fan_in)``, seeded. Each block's last 1x1 conv (and its
projection shortcut) is scaled by :data:`RESIDUAL_BRANCH_GAIN`: with plain He init every block
would add a branch as large as its input and activations would grow ~sqrt(2)x per block (about
2^8 after 16 blocks). The small gain plays the part of a trained network's small last BatchNorm
gamma. Biases (the folded BatchNorm shifts) are small normal values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
SAMPLE_SHAPE = (3, 224, 224)
OPSET = 17
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, first stride)
EXPANSION = 4
NUM_CLASSES = 1000
RESIDUAL_BRANCH_GAIN = 0.25
BIAS_STD = 0.05


class _GraphBuilder:
    """Appends unnamed nodes and seeded He-initialised initializers, naming tensors t0, t1, ..."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def _constant(self, prefix: str, value: np.ndarray) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def _node(self, op: str, inputs: list[str], **attributes) -> str:
        output = self._name("t")
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1, gain: float = 1.0) -> str:
        fan_in = c_in * kernel * kernel
        std = math.sqrt(2.0 / fan_in) * gain
        weight = self.rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32) * std
        bias = self.rng.standard_normal(c_out, dtype=np.float32) * BIAS_STD * gain
        pad = kernel // 2
        return self._node(
            "Conv",
            [x, self._constant("W", weight), self._constant("B", bias)],
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
        )

    def relu(self, x: str) -> str:
        return self._node("Relu", [x])

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b])

    def max_pool(self, x: str) -> str:
        return self._node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])

    def global_average_pool(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x])

    def flatten(self, x: str) -> str:
        return self._node("Flatten", [x], axis=1)

    def gemm(self, x: str, c_in: int, c_out: int) -> str:
        # Gemm is stored as PyTorch exports Linear: weight [out, in], transB=1.
        weight = self.rng.standard_normal((c_out, c_in), dtype=np.float32) * math.sqrt(1.0 / c_in)
        bias = self.rng.standard_normal(c_out, dtype=np.float32) * BIAS_STD
        return self._node(
            "Gemm", [x, self._constant("W", weight), self._constant("B", bias)], transB=1
        )


def _bottleneck(g: _GraphBuilder, x: str, c_in: int, width: int, stride: int) -> tuple[str, int]:
    c_out = width * EXPANSION
    y = g.relu(g.conv(x, c_in, width, 1))
    y = g.relu(g.conv(y, width, width, 3, stride))
    y = g.conv(y, width, c_out, 1, gain=RESIDUAL_BRANCH_GAIN)
    if stride != 1 or c_in != c_out:
        shortcut = g.conv(x, c_in, c_out, 1, stride)
    else:
        shortcut = x
    return g.relu(g.add(y, shortcut)), c_out


def build_resnet50(seed: int = 0) -> onnx.ModelProto:
    """The ResNet50-architecture model described in the module docstring, checked by onnx."""
    g = _GraphBuilder(seed)
    x = g.max_pool(g.relu(g.conv(INPUT_NAME, 3, 64, 7, 2)))
    channels = 64
    for width, blocks, first_stride in STAGES:
        for block in range(blocks):
            x, channels = _bottleneck(g, x, channels, width, first_stride if block == 0 else 1)
    logits = g.gemm(g.flatten(g.global_average_pool(x)), channels, NUM_CLASSES)

    graph = helper.make_graph(
        g.nodes,
        "resnet50_random",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *SAMPLE_SHAPE])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # opset 17's IR version, so older runtimes load it too
    onnx.checker.check_model(model)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def calibration_samples(num_samples: int, seed: int = 1) -> np.ndarray:
    """``float32[num_samples, 3, 224, 224]`` standard normal values, like normalised images.

    Sample i is the same whatever ``num_samples`` is (one generator per sample), so the 50-sample
    set is the first 50 of the 500-sample set.
    """
    out = np.empty((num_samples, *SAMPLE_SHAPE), dtype=np.float32)
    for i in range(num_samples):
        out[i] = np.random.default_rng([seed, i]).standard_normal(SAMPLE_SHAPE, dtype=np.float32)
    return out


def write_calibration_parquet(path: Path, num_samples: int) -> Path:
    """Write :func:`calibration_samples` as Parquet, one ``fixed_shape_tensor`` column ``input``."""
    samples = calibration_samples(num_samples)
    try:
        from fp8core.calibration import write_parquet
    except ImportError:  # the project's writer is the reference; plain pyarrow if it is missing
        return _write_parquet_with_pyarrow(path, samples)
    return write_parquet({INPUT_NAME: samples}, path)


def _write_parquet_with_pyarrow(path: Path, samples: np.ndarray) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(samples.reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(SAMPLE_SHAPE))
    column = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), list(SAMPLE_SHAPE)), storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({INPUT_NAME: column}), path)
    return path


def ensure_model(cache_dir: Path, seed: int = 0) -> Path:
    """Path of the cached model, building it on first use."""
    path = cache_dir / f"resnet50_random_seed{seed}.onnx"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        onnx.save(build_resnet50(seed), temporary)
        temporary.replace(path)
    return path


def ensure_calibration_data(cache_dir: Path, num_samples: int) -> Path:
    """Path of the cached ``num_samples``-sample Parquet file, writing it on first use."""
    path = cache_dir / f"calib_{num_samples}.parquet"
    if not path.exists():
        write_calibration_parquet(path, num_samples)
    return path
