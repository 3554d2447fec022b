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
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from fp8core.errors import first_line
from fp8core.graph import _copy_fields, tensor_elem_types, tensor_nbytes, uses_external_data
from fp8core.model import Model

DISABLED_OPTIMIZERS: tuple[str, ...] = (
    "ReluQuantRewrite",
    "ClipQuantRewrite",
    "QDQPropagationTransformer",
    "WeightBiasQuantization",
)


def session_options(intra_op_threads: int = 0, runs_once: bool = False, arena: bool = True) -> ort.SessionOptions:
    """``runs_once``: for a session run once or twice (validation, a reference), which skips
    onnxruntime's repacking of every constant MatMul/Conv weight at session creation (3 s for a
    model of 3 GB; with it off the weights stay memory-mapped) that only many runs pay back.
    ``arena=False``: without onnxruntime's memory arena, each run's activations go back to the OS
    after it instead of staying reserved for the rest of the process (passes over data batches).

    onnxruntime's worker threads do not spin-wait for the next run: between runs this pipeline
    works in numpy (binning, im2col, GPTQ sums) on the same two cores, which spinning threads
    took from it (ResNet50's default weight fit, library run: 38.9 -> 34.9 s, same bytes)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    if runs_once:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


HANDOVER_MIN_BYTES = 1 << 20
HANDOVER_TOTAL_BYTES = 1 << 30
"""A model proto whose inline initializers of at least HANDOVER_MIN_BYTES add up to
HANDOVER_TOTAL_BYTES or more reaches onnxruntime without them: they are handed over as OrtValues
(``SessionOptions.add_external_initializers``) beside a light proto. Protobuf cannot serialize a
model past 2 GiB at all, and serializing one of 1-2 GiB would hold its weights twice more."""


def make_session(
    model: Model | onnx.ModelProto | bytes | str | os.PathLike,
    options: ort.SessionOptions | None = None,
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
    extra_outputs: Sequence[str] = (),
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a float or FP8 model, with the safe optimizer set.

    ``extra_outputs``: tensors of a model proto to expose as outputs too (captured activations),
    added to a copy of the graph; the caller's model is not modified. A :class:`Model` whose
    weights are still on disk (loaded with ``load_weights=False``) has onnxruntime read them from
    their data files itself: Python never holds them. Both, and a hand-over, are set on
    ``options``: give each session its own options.
    """
    options = options or session_options()
    if isinstance(model, Model):
        if model.weights_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             model.weights_dir)
        model = model.proto
    handed_over: list[ort.OrtValue] = []
    if isinstance(model, onnx.ModelProto):
        model, handed_over = _session_payload(model, options, extra_outputs)
    elif extra_outputs:
        raise ValueError("extra_outputs needs a model proto")
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        session = ort.InferenceSession(
            model,
            sess_options=options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(disabled_optimizers),
        )
    except Exception as exc:
        if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            raise
        # onnxruntime's optimizer can fail on models that are valid: with static input shapes it
        # folds shape computations of the If branch that will not run and then rejects that
        # branch (a voice-activity model's 8 kHz LSTM). ORT_DISABLE_ALL computes ONNX semantics.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        _warn_once(f"onnxruntime's graph optimizer fails on this model ({first_line(exc)[:160]}); "
                   "it runs with graph_optimization_level=ORT_DISABLE_ALL, which is how to run the FP8 model too")
    session.fp8_handed_over = handed_over  # onnxruntime uses their buffers: keep them alive
    return session


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _warned:
        _warned.add(message)
        logging.getLogger("fp8").warning(message)


_NUMPY_NATIVE = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                 onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def _handed_over(tensor: onnx.TensorProto) -> bool:
    return (not uses_external_data(tensor) and tensor.data_type in _NUMPY_NATIVE
            and tensor_nbytes(tensor) >= HANDOVER_MIN_BYTES)


def _session_payload(model: onnx.ModelProto, options: ort.SessionOptions,
                     extra_outputs: Sequence[str]) -> tuple[bytes, list[ort.OrtValue]]:
    """The serialized model for onnxruntime and the initializers handed over beside it."""
    big = [t for t in model.graph.initializer if _handed_over(t)]
    if sum(tensor_nbytes(t) for t in big) < HANDOVER_TOTAL_BYTES:
        big = []
    if not big and not extra_outputs:
        return model.SerializeToString(), []
    types = tensor_elem_types(model) if extra_outputs else {}
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, model.graph, skip="initializer")
    names = {t.name for t in big}
    light.graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    for t in big:  # a stub per handed-over weight: name, type and shape, data "elsewhere"
        stub = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                           data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="handed-over-by-fp8core")
    listed = {o.name for o in light.graph.output}
    light.graph.output.extend(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                              for name in dict.fromkeys(extra_outputs) if name not in listed)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(numpy_helper.to_array(t))) for t in big]
    if big:
        options.add_external_initializers([t.name for t in big], values)
    return light.SerializeToString(), values


def reference_session(model: Model | onnx.ModelProto | bytes | str) -> ort.InferenceSession:
    """A session with every graph optimization off: the ONNX semantics (the reference a float
    model's rewrite or opset upgrade is checked against, and the tests' reference)."""
    options = session_options(runs_once=True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return make_session(model, options)
