"""onnxruntime sessions that compute FP8 QDQ graphs as ONNX defines them.

Measured on onnxruntime 1.32 CPU, these graph optimizations miscompute FP8 QDQ graphs:

* ``ReluQuantRewrite`` deletes a Relu feeding a QuantizeLinear whose zero point is an FP8 tensor
  (negative values pass through);
* ``ClipQuantRewrite`` fails at session creation on Clip -> QuantizeLinear with an FP8 zero point;
* ``QDQPropagationTransformer`` copies Q/DQ across Reshape and drops QuantizeLinear-21's
  ``output_dtype``, so the copy quantizes to uint8 (reported on real models; not reproduced on
  the small graphs of ``tests/test_runtime.py``, where the copy keeps ``output_dtype``);
* ``WeightBiasQuantization`` rewrites the float bias of a Conv/Gemm whose input and weight come
  from DequantizeLinear into int32 with scale ``x_scale * w_scale``, i.e. rounds every bias to a
  multiple of ``2**(s_x + s_w)`` (``2**-6`` at the default scales -3/-3), in both graph forms:
  a few percent of output error that the ONNX graph does not contain.

Every FP8 model this project runs goes through :func:`make_session`, which keeps the default
optimizations (ORT_ENABLE_ALL) and disables exactly those four. ``tests/test_runtime.py`` proves
it computes the same as ``ORT_DISABLE_ALL`` (ONNX semantics) on graphs with Relu, Clip and
Reshape around FP8 ops and biased Conv/Gemm. To run an FP8 model yourself::

    import onnxruntime as ort
    sess = ort.InferenceSession("model_fp8.onnx", providers=["CPUExecutionProvider"],
        disabled_optimizers=["ReluQuantRewrite", "ClipQuantRewrite", "QDQPropagationTransformer",
                             "WeightBiasQuantization"])
"""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort

DISABLED_OPTIMIZERS: tuple[str, ...] = (
    "ReluQuantRewrite",
    "ClipQuantRewrite",
    "QDQPropagationTransformer",
    "WeightBiasQuantization",
)


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    return so


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    options: ort.SessionOptions | None = None,
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a float or FP8 model, with the safe optimizer set."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(
        model,
        sess_options=options or session_options(),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )


def reference_session(model: onnx.ModelProto | bytes | str) -> ort.InferenceSession:
    """A session with every graph optimization off: the ONNX semantics, for tests."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
