"""Task: load the input model, fingerprint it, and prepare it (names, shapes, opset)."""

from __future__ import annotations

import dataclasses
import os

import onnx
from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.graph import default_opset, files_sha256, load_model as _load, model_files
from fp8core.rewrite import prepare_model, target_opset


@dataclasses.dataclass
class LoadedModel:
    path: str
    sha256: str
    bytes: int
    source_opset: int
    opset: int
    model: onnx.ModelProto  # prepared: named nodes, fixed input shapes, target opset
    weights_dir: str | None = None  # set when large external weights were left on disk


@task(name="load-model", cache_policy=NONE, **IO_RETRIES)
def load_model(path: str, input_shape: dict[str, list[int]], convert_version: int | None,
               stream_weights: bool = False) -> LoadedModel:
    """``stream_weights``: leave external weights on disk; encoding reads them one at a time."""
    original = _load(path, load_weights=False)
    files = model_files(path, original)  # the .onnx and its external data: all of it is the model
    weights_dir = os.path.dirname(os.path.abspath(path))
    if not stream_weights:
        original = _load(path) if len(files) > 1 else original
        weights_dir = None
    opset = target_opset(original, convert_version)
    prepared = prepare_model(original, opset, input_shape)
    return LoadedModel(os.path.abspath(path), files_sha256(files), sum(os.path.getsize(f) for f in files),
                       default_opset(original), opset, prepared, weights_dir if len(files) > 1 else None)


@task(name="read-written-model", cache_policy=NONE, **IO_RETRIES)
def read_written_model(path: str) -> onnx.ModelProto:
    """The FP8 model as written, weights in memory: for the checks after the save when the flow's
    copy gave its weights up (streamed models)."""
    return _load(path)
