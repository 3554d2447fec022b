"""A model handle that owns its weights: the proto and where its external data lives.

A model loaded with ``load_weights=False`` (large models, streamed) keeps its big weights on
disk as references relative to its folder; a model rewritten from it (the FP8 model, whose kept
ops still read float weights) keeps the same references. Whoever reads a weight, opens a session,
hashes or saves the model needs that folder, so it travels with the proto here instead of beside
it in every signature (onnxscript's ``ExternalTensor`` knows its base directory the same way).

``Model.of`` accepts a plain ``onnx.ModelProto`` too (every weight in memory), so library
functions take either.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np
import onnx

from fp8core.graph import GraphIndex, load_model, uses_external_data


@dataclasses.dataclass
class Model:
    proto: onnx.ModelProto
    weights_dir: str | None = None  # folder of weights still in external data; None: all in memory

    @classmethod
    def of(cls, model: Model | onnx.ModelProto) -> Model:
        if isinstance(model, Model):
            return model
        if isinstance(model, onnx.ModelProto):
            return cls(model)
        raise TypeError(f"expected an onnx.ModelProto or a Model, got {type(model).__name__}")

    @classmethod
    def load(cls, path: str | os.PathLike, load_weights: bool = True) -> Model:
        """:func:`fp8core.graph.load_model` (checked, one-line errors); with ``load_weights=False``
        large external weights stay on disk and the handle knows their folder."""
        proto = load_model(path, load_weights=load_weights)
        external = any(uses_external_data(t) for t in proto.graph.initializer)
        return cls(proto, os.path.dirname(os.path.abspath(path)) if external else None)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def derive(self, proto: onnx.ModelProto) -> Model:
        """A model made from this one (e.g. rewritten to FP8) whose external references, if it kept
        any, still point at this model's weights."""
        return Model(proto, self.weights_dir)

    def index(self) -> GraphIndex:
        """Producer/consumer/constant lookups; a weight's value is read from disk when asked for."""
        return GraphIndex(self.proto.graph, self.weights_dir)

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), None if it is not one."""
        return self.index().constant_value(name)

    def session(self, options=None, extra_outputs: Sequence[str] = ()):
        """An onnxruntime CPU session (:func:`fp8core.runtime.make_session`)."""
        from fp8core.runtime import make_session

        return make_session(self, options, extra_outputs=extra_outputs)

    def sha256(self) -> str:
        """sha256 of the content, weights on disk included (:func:`fp8core.modelio.model_sha256`)."""
        from fp8core.modelio import model_sha256

        return model_sha256(self)

    def save(self, path: str, external_data: str = "auto", check: Callable[[str], None] | None = None,
             release: bool = False) -> int:
        """Write atomically (:func:`fp8core.modelio.save_model_atomic`); the bytes written."""
        from fp8core.modelio import save_model_atomic

        return save_model_atomic(self, path, external_data, check=check, release=release)
