"""Check, validate and write output models: atomically, byte-identically, never half-written."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import onnx

from fp8core.graph import ModelError, graph_inputs
from fp8core.runtime import make_session


class OutputError(ValueError):
    """The output cannot be written where asked; the message says what to do."""


def check_output_path(path: str) -> str:
    """Fail early, before any work, if ``path`` cannot be written."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise OutputError(f"--output_model {path!r} is a directory; give a file path ending in .onnx")
    if not os.path.isdir(folder):
        raise OutputError(f"output directory {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {folder!r} is not writable; choose another --output_model")
    return path


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    Readers see the old file or the new one, never a mix; a crash leaves at most a
    ``.<name>.*.tmp`` file, which the next write of the same path removes.
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    _remove_stale_temps(folder, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path!r}: {exc.strerror or exc}") from None
        raise


def _remove_stale_temps(folder: str, name: str) -> None:
    prefix = f".{name}."
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            full = os.path.join(folder, entry)
            try:
                # only temps no live writer holds: older than a minute
                if os.path.getmtime(full) < time.time() - 60:
                    os.unlink(full)
            except OSError:
                pass


def save_model_atomic(model: onnx.ModelProto, path: str) -> int:
    """Serialize deterministically and write atomically; returns the file size in bytes."""
    data = serialize(model)
    write_bytes_atomic(data, path)
    return len(data)


def example_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the model's inputs (dynamic dims -> ``batch``), for smoke runs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model.graph):
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def validate_fp8_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> None:
    """The FP8 model passes the full ONNX checker, loads in onnxruntime CPU and runs once."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ModelError(f"internal error: the FP8 model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    try:
        session = make_session(model)
        session.run(None, feeds if feeds is not None else example_feeds(model))
    except Exception as exc:
        raise ModelError(f"the FP8 model does not run in onnxruntime: {str(exc).splitlines()[0]}") from None
