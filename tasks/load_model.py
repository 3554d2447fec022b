"""Task: load the input model, fingerprint it, and prepare it (names, shapes, opset)."""

from __future__ import annotations

import dataclasses
import os

import onnx
from prefect import task
from prefect.cache_policies import NONE

from tasks.retry import IO_RETRIES

from fp8core.graph import file_sha256, load_model as _load
from fp8core.rewrite import prepare_model, target_opset


@dataclasses.dataclass
class LoadedModel:
    path: str
    sha256: str
    bytes: int
    source_opset: int
    opset: int
    model: onnx.ModelProto  # prepared: named nodes, fixed input shapes, target opset


@task(name="load-model", cache_policy=NONE, **IO_RETRIES)
def load_model(path: str, input_shape: dict[str, list[int]], convert_version: int | None) -> LoadedModel:
    original = _load(path)
    from fp8core.graph import default_opset

    opset = target_opset(original, convert_version)
    prepared = prepare_model(original, opset, input_shape)
    return LoadedModel(os.path.abspath(path), file_sha256(path), os.path.getsize(path),
                       default_opset(original), opset, prepared)
