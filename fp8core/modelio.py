"""Check, validate and write output models: atomically, byte-identically, never half-written."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from fp8core.errors import FP8Error, first_line
from fp8core.graph import (
    ModelError,
    _copy_fields,
    check_external_tensor,
    graph_inputs,
    read_tensor_bytes,
    tensor_nbytes,
    uses_external_data,
    without_large_initializers,
)
from fp8core.model import Model
from fp8core.runtime import make_session, session_options


class OutputError(FP8Error):
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


def serialized_pieces(model: onnx.ModelProto) -> Iterator[bytes]:
    """``serialize(model)`` in pieces, the graph's initializers one at a time: the same bytes
    joined (protobuf writes fields in field-number order, and a message's bytes are its fields'
    bytes one after another), without ever holding them all. Serializing a 0.75 GB model at once
    grows protobuf's buffer by doubling and then copies it into a bytes object: 1.5-6.4 s and
    up to 2 GB of fresh memory, where its tensors one by one take a fraction."""
    if not model.HasField("graph"):
        yield serialize(model)
        return
    model_below, model_above = _without_field(model, "graph")
    graph_below, graph_above = _without_field(model.graph, "initializer")
    sizes = [t.ByteSize() for t in model.graph.initializer]
    tag = _field_key(onnx.GraphProto, "initializer")
    graph_size = len(graph_below) + len(graph_above) + sum(len(tag) + len(_varint(n)) + n for n in sizes)
    yield model_below + _field_key(onnx.ModelProto, "graph") + _varint(graph_size) + graph_below
    for tensor, size in zip(model.graph.initializer, sizes):
        yield tag + _varint(size)
        yield tensor.SerializeToString(deterministic=True)
    yield graph_above + model_above


def _without_field(message, name: str) -> tuple[bytes, bytes]:
    """The serialized fields of ``message`` numbered below and above field ``name``."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    below, above = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number == number:
            continue
        part = below if field.number < number else above
        if field.is_repeated:
            getattr(part, field.name).extend(value)
        elif field.message_type is not None:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return serialize(below), serialize(above)


def _field_key(message_type, name: str) -> bytes:
    """The key of a length-delimited field (wire type 2)."""
    return _varint(message_type.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def model_sha256(model: Model | onnx.ModelProto) -> str:
    """sha256 of a model's content, also past protobuf's 2 GiB limit: the model without its large
    initializers, then each of them in order (each tensor serialized on its own; the data of a
    weight still in external data is read from its file in the model's ``weights_dir``)."""
    model = Model.of(model)
    weights_dir = model.weights_dir
    light, large, _ = without_large_initializers(model.proto)
    digest = hashlib.sha256(serialize(light))
    for tensor in large:
        digest.update(tensor.SerializeToString(deterministic=True))
        if weights_dir is not None and uses_external_data(tensor):
            digest.update(read_tensor_bytes(tensor, weights_dir))
    return digest.hexdigest()


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    Readers see the old file or the new one, never a mix. A killed writer leaves at most a
    ``.<name>.<pid>.<random>.tmp`` file, which the next write of the same path removes.
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    remove_stale_temps(folder, name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise _output_error(path, exc) from None
        raise


def _output_error(path: str, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return OutputError(f"could not write {path!r}: the disk is full or the file size limit was hit "
                           f"({exc.strerror}); free space or choose another output folder")
    return OutputError(f"could not write {path!r}: {exc.strerror or exc}")


def temp_prefix(name: str) -> str:
    """``.<name>.<pid>.``: temps named so (and ending in ``.tmp``) are swept by :func:`remove_stale_temps`."""
    return f".{name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(folder: str, name: str) -> None:
    """Remove temp files/folders of earlier writes of ``name`` whose writer process is gone.

    A temp whose name carries the pid of another live process is that writer's, and is left
    alone; one of this process is removed only when older than an hour (another thread may be
    writing it); temps of unknown form only when older than a minute.
    """
    prefix = f".{name}."
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        full = os.path.join(folder, entry)
        pid_text = entry[len(prefix):].split(".", 1)[0]
        try:
            age = time.time() - os.path.getmtime(full)
            if pid_text.isdigit():
                pid = int(pid_text)
                if (pid == os.getpid() and age < 3600) or (pid != os.getpid() and _pid_alive(pid)):
                    continue
            elif age < 60:
                continue
            _remove(full)
        except OSError:
            pass


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# --- whole models: inline or with external data ------------------------------------------------
PROTOBUF_LIMIT = 2**31 - 1
# auto mode goes external below the hard limit: the estimate ignores proto field overhead
INLINE_LIMIT_BYTES = int(1.9 * 2**30)
EXTERNAL_MIN_BYTES = 1024  # tensors smaller than this stay inline (as onnx.save does)
EXTERNAL_ALIGN = 4096  # page-aligned offsets let onnxruntime map the data file
EXTERNAL_DATA_MODES = ("auto", "always", "never")


def model_tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer data (inline or external), from dtypes and dims."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def wants_external_data(model: onnx.ModelProto, mode: str = "auto") -> bool:
    """``always``/``never`` as asked; ``auto``: external when the data would pass ~1.9 GiB.

    ``never`` with a model past protobuf's 2 GiB limit is an OutputError (it cannot be written).
    """
    if mode not in EXTERNAL_DATA_MODES:
        raise OutputError(f"--external_data {mode!r}: use one of {', '.join(EXTERNAL_DATA_MODES)}")
    size = model_tensor_bytes(model)
    if mode == "never" and size > INLINE_LIMIT_BYTES:
        raise OutputError(f"the FP8 model holds {size / 2**30:.2f} GiB of weights, past protobuf's 2 GiB "
                          "limit for one file; use --external_data auto or always")
    return mode == "always" or (mode == "auto" and size > INLINE_LIMIT_BYTES)


def external_data_name(model_name: str, digest: str) -> str:
    """``<model file>.<first 16 hex of the data's sha256>.data``: a new file per content, so the
    rename of the .onnx switches old model+data to new model+data in one atomic step."""
    return f"{model_name}.{digest[:16]}.data"


def save_model_atomic(
    model: Model | onnx.ModelProto,
    path: str,
    external_data: str = "auto",
    check: Callable[[str], None] | None = None,
    release: bool = False,
) -> int:
    """Write ``model`` to ``path`` atomically; returns the bytes written (model + data file).

    Inline (one ``.onnx``) or with its tensors >= 1 KiB in ``<name>.<sha256[:16]>.data`` beside
    it (see :func:`wants_external_data`), 4 KiB-aligned, in initializer order. Tensors of
    ``model`` that are still external references are copied from its ``weights_dir`` in chunks.
    Everything is written into a temp folder beside ``path``, ``check(temp_model_path)`` runs
    there (e.g. :func:`validate_fp8_model`), then the data file is renamed into place and the
    ``.onnx`` last: a reader or a crash sees the old model with its data or the new one with
    its data. Data files of the previous version are removed after the switch. Same model, same
    bytes. ``model`` is not modified, unless ``release=True``: then its initializers are cleared
    once written, before ``check`` runs, so the check (an onnxruntime session) does not run beside
    a second in-memory copy of the weights - for callers that are done with the model.
    """
    weights_dir = model.weights_dir if isinstance(model, Model) else None
    model = model.proto if isinstance(model, Model) else model
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    external = wants_external_data(model, external_data)
    remove_stale_temps(folder, name)
    try:
        tmpdir = tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        if external:
            data_name, data_bytes, light = _write_external(model, tmpdir, name, weights_dir)
        else:
            data_name, data_bytes, light = None, 0, _inlined(model, weights_dir)
        tmp_model = os.path.join(tmpdir, name)
        size = _write_file(tmp_model, serialized_pieces(light)) + data_bytes
        del light
        if release:
            del model.graph.initializer[:]
        if check is not None:
            check(tmp_model)
        if data_name is not None:
            os.replace(os.path.join(tmpdir, data_name), os.path.join(folder, data_name))
        os.replace(tmp_model, path)  # the switch
        _fsync_dir(folder)
    except OSError as exc:
        raise _output_error(path, exc) from None
    finally:
        _remove(tmpdir)
    _remove_old_data_files(folder, name, keep=data_name)
    return size


def _write_file(path: str, chunks) -> int:
    """Write the chunks, fsync; returns the bytes written."""
    size = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)
    return size


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_old_data_files(folder: str, name: str, keep: str | None) -> None:
    pattern = re.compile(re.escape(name) + r"\.[0-9a-f]{16}\.data")
    for entry in os.listdir(folder):
        if entry != keep and pattern.fullmatch(entry):
            _remove(os.path.join(folder, entry))


def _tensor_chunks(tensor: onnx.TensorProto, base_dir: str | None, chunk: int = 64 << 20):
    """The tensor's raw little-endian bytes, in chunks (external data is streamed from disk)."""
    if uses_external_data(tensor):
        if base_dir is None:
            raise ModelError(f"weight {tensor.name!r} is in external data; save it as a "
                             "fp8core.model.Model that knows its weights_dir")
        full = check_external_tensor(tensor, base_dir)
        offset = int({e.key: e.value for e in tensor.external_data}.get("offset", 0) or 0)
        remaining = tensor_nbytes(tensor)
        with open(full, "rb") as f:
            f.seek(offset)
            while remaining:
                block = f.read(min(chunk, remaining))
                if not block:
                    raise ModelError(f"weight {tensor.name!r}: external data file ended early; copy it again")
                remaining -= len(block)
                yield block
    elif tensor.HasField("raw_data"):
        yield tensor.raw_data
    else:
        array = numpy_helper.to_array(tensor)  # typed fields (float_data, ...): ONNX raw is little-endian
        yield array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _light_copy(model: onnx.ModelProto, move, base_dir: str | None) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]]:
    """A copy of ``model`` whose initializers for which ``move(t)`` is true are data-less stubs
    (name, type, dims), and whose other external references are read in; returns it and the
    (original, stub) pairs of the moved ones, in initializer order. ``model`` is not modified."""
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, model.graph, skip="initializer")
    pairs = []
    for t in model.graph.initializer:
        moved = move(t)
        if not moved and not uses_external_data(t):
            light.graph.initializer.append(t)
            continue
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        if t.HasField("doc_string"):
            stub.doc_string = t.doc_string
        if moved:
            pairs.append((t, stub))
        else:
            stub.raw_data = b"".join(_tensor_chunks(t, base_dir))
    return light, pairs


def _inlined(model: onnx.ModelProto, base_dir: str | None) -> onnx.ModelProto:
    """The model with every external reference read into the proto (a copy only if needed)."""
    if not any(uses_external_data(t) for t in model.graph.initializer):
        return model
    light, _ = _light_copy(model, lambda t: False, base_dir)
    return light


def _write_external(model, tmpdir: str, name: str, base_dir: str | None):
    """Write the data file (temp name, then its content name) and return (data file name,
    data bytes, the model copy that points into it)."""
    light, pairs = _light_copy(model, lambda t: tensor_nbytes(t) >= EXTERNAL_MIN_BYTES, base_dir)
    if not pairs:  # nothing big enough to move out
        return None, 0, light
    digest = hashlib.sha256()
    offsets = []
    tmp_data = os.path.join(tmpdir, "data.tmp")
    with open(tmp_data, "wb") as f:
        position = 0
        for original, _ in pairs:
            pad = -position % EXTERNAL_ALIGN
            if pad:
                f.write(b"\0" * pad)
                digest.update(b"\0" * pad)
                position += pad
            start = position
            for block in _tensor_chunks(original, base_dir):
                f.write(block)
                digest.update(block)
                position += len(block)
            offsets.append((start, position - start))
        f.flush()
        os.fsync(f.fileno())
    data_name = external_data_name(name, digest.hexdigest())
    os.replace(tmp_data, os.path.join(tmpdir, data_name))
    for (_, stub), (offset, length) in zip(pairs, offsets):
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
    return data_name, position, light


def example_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the model's inputs (dynamic dims -> ``batch``), for smoke runs."""
    specs = []
    for vi in graph_inputs(model.graph):
        tt = vi.type.tensor_type
        specs.append((vi.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type),
                      [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]))
    return _random_feeds(specs, batch, seed)


def _random_feeds(specs, batch: int, seed: int) -> dict[str, np.ndarray]:
    """(name, dtype, dims with None for dynamic) -> standard normal floats, zeros otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, dims in specs:
        shape = [batch if d is None else d for d in dims]
        feeds[name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                       else np.zeros(shape, dtype=dtype))
    return feeds


_ORT_INPUT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session_example_feeds(session, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray] | None:
    """:func:`example_feeds` from an onnxruntime session's inputs, so a model file need not be
    parsed a second time (for an inline model that would be a second copy of every weight);
    None if an input has a type this table does not know."""
    inputs = session.get_inputs()
    if any(arg.type not in _ORT_INPUT_TYPES for arg in inputs):
        return None
    return _random_feeds([(arg.name, _ORT_INPUT_TYPES[arg.type],
                           [d if isinstance(d, int) and d >= 0 else None for d in arg.shape]) for arg in inputs],
                         batch, seed)


def validate_fp8_model(model: onnx.ModelProto | str, feeds=None, full_check: bool = True) -> dict[str, float]:
    """The FP8 model passes the ONNX checker, loads in onnxruntime CPU and runs.

    ``model`` is a proto or a path; a path is checked on disk (``check_model(path, full_check=True)``),
    the only way for models with external data or past 2 GiB. ``feeds``: a
    :class:`fp8core.validation.Reference` (inputs of real shapes and the float model's outputs
    there: the FP8 outputs must match in shape and finiteness, and their agreement is returned),
    a plain feed dict (run only), or None (generated inputs; a model that does not run on them is
    not an error then, since nothing says they are inputs it can take). ``full_check=False`` for
    an input model that itself fails the full checker in ways the conversion cannot repair.
    """
    from fp8core.validation import Reference, compare_outputs

    target = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    try:
        onnx.checker.check_model(target, full_check=full_check)
    except Exception as exc:
        raise ModelError(f"internal error: the FP8 model fails the ONNX checker: {first_line(exc)}") from None
    try:
        session = make_session(target, session_options(runs_once=True))
    except Exception as exc:
        raise ModelError(f"the FP8 model does not load in onnxruntime: {first_line(exc)}") from None
    if isinstance(feeds, Reference):
        try:
            outputs = session.run(feeds.names, feeds.feeds)
        except Exception as exc:
            raise ModelError(f"the FP8 model does not run in onnxruntime on {feeds.source}: "
                             f"{first_line(exc)}") from None
        return compare_outputs(feeds, outputs)
    generated = feeds is None
    if generated:
        feeds = session_example_feeds(session)
        if feeds is None:
            proto = onnx.load(target, load_external_data=False) if isinstance(target, str) else target
            feeds = example_feeds(proto)
    try:
        session.run(None, feeds)
    except Exception as exc:
        if not generated:
            raise ModelError(f"the FP8 model does not run in onnxruntime: {first_line(exc)}") from None
    return {}
