"""Task: load the input model, fingerprint it, and prepare it (names, shapes, opset)."""

from __future__ import annotations

import dataclasses
import os

import onnx
from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.graph import default_opset, files_sha256, load_model as _load, model_files
from fp8core.model import Model
from fp8core.rewrite import prepare_model, target_opset
from fp8core.validation import Reference, check_same_outputs, probe_reference


@dataclasses.dataclass
class LoadedModel:
    path: str
    sha256: str
    bytes: int
    source_opset: int
    opset: int
    model: Model  # prepared: named nodes, fixed input shapes, target opset; large weights maybe on disk
    notes: list[str] = dataclasses.field(default_factory=list)  # what was repaired or assumed, one line each
    reference: Reference | None = None  # generated inputs the model runs on, and its outputs


@task(name="load-model", cache_policy=NONE, **IO_RETRIES)
def load_model(path: str, input_shape: dict[str, list[int]], convert_version: int | None,
               stream_weights: bool = False, batch_axes: dict[str, int | None] | None = None) -> LoadedModel:
    """``stream_weights``: leave external weights on disk; encoding reads them one at a time.

    The prepared model is run on generated inputs of shapes the input model takes; when the opset
    was upgraded, it must give the input model's outputs there (an upgrade that changes what the
    model computes is an error, not a silently wrong FP8 model)."""
    original = _load(path, load_weights=False)
    files = model_files(path, original)  # the .onnx and its external data: all of it is the model
    external = len(files) > 1
    if external and not stream_weights:
        original = _load(path)
    folder = os.path.dirname(os.path.abspath(path)) if external and stream_weights else None
    opset = target_opset(original, convert_version)
    notes: list[str] = []
    prepared = Model(prepare_model(original, opset, input_shape, batch_axes, notes), folder)
    upgraded = default_opset(original) < opset
    reference = probe_reference(Model(original, folder) if upgraded and not input_shape else prepared)
    if reference is not None and upgraded and not input_shape:
        check_same_outputs(reference, prepared, f"the opset upgrade {default_opset(original)} -> {opset} "
                           "changed what the model computes (an onnx.version_converter defect)")
    if reference is None:
        notes.append("the model ran on no generated inputs (dynamic dims tried: 1, 16, 64, 224, 512); "
                     "the FP8 model is validated on calibration data only (give --input_shape or --data_preprocess)")
    return LoadedModel(os.path.abspath(path), files_sha256(files), sum(os.path.getsize(f) for f in files),
                       default_opset(original), opset, prepared, notes, reference)


@task(name="read-written-model", cache_policy=NONE, **IO_RETRIES)
def read_written_model(path: str) -> onnx.ModelProto:
    """The FP8 model as written, weights in memory: for the checks after the save when the flow's
    copy gave its weights up (streamed models)."""
    return _load(path)
