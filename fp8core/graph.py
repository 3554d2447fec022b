"""A small graph vocabulary over ONNX protos: load, name, look up producers/consumers/constants,
and edit (fresh names, new constant values).

The rewrite in :mod:`fp8core.rewrite` and the weight edits of :mod:`fp8core.weight_adjust` are
written with these verbs so that they read as SPEC section 3 does. Nothing here modifies a model
it was not explicitly handed to modify.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from fp8core.errors import FP8Error, first_line

# The op list (SPEC section 1): the ops that compute on FP8 inputs and weights. One place.
FP8_OP_TYPES: tuple[str, ...] = ("Conv", "MatMul", "Gemm")

# Which inputs of each FP8 op are multiplied (and so quantized). Bias inputs stay float.
QUANTIZED_INPUTS: dict[str, tuple[int, ...]] = {"Conv": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1)}

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
MIN_FP8_OPSET = 19  # FP8 element types exist in QuantizeLinear/DequantizeLinear from opset 19


class ModelError(FP8Error):
    """The input model cannot be used; the message says why and what to do."""


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model file, turning every failure into a one-line ModelError.

    The checker runs on the file, not on the proto, so models whose weights are in external data
    files (the only way past protobuf's 2 GiB limit) are checked without serializing them again.
    External weights are read tensor by tensor straight into the proto (one copy in memory), or,
    with ``load_weights=False``, left on disk as references relative to the model's directory:
    read them through :class:`fp8core.model.Model` (the proto and this folder) when needed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"input model {path!r} does not exist; check the --input_model path")
    if os.path.isdir(path):
        raise ModelError(f"input model {path!r} is a directory; pass the .onnx file inside it")
    if not os.access(path, os.R_OK):
        raise ModelError(f"input model {path!r} is not readable; check its permissions")
    if os.path.getsize(path) == 0:
        raise ModelError(f"input model {path!r} is empty; re-export or re-download it")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, ...
        raise ModelError(
            f"input model {path!r} is not a readable ONNX model ({first_line(exc)}); "
            "is the file truncated or not an .onnx file?"
        ) from None
    if not model.graph.node:
        raise ModelError(
            f"input model {path!r} has no graph nodes; is the file truncated or not an .onnx file?"
        )
    try:
        onnx.checker.check_model(path)  # checks external data locations too
    except Exception as exc:
        raise ModelError(f"input model {path!r} fails the ONNX checker: {first_line(exc)}") from None
    weights_dir = os.path.dirname(os.path.abspath(path))
    for tensor in external_tensors(model):
        check_external_tensor(tensor, weights_dir)  # a short or missing data file fails here, not mid-run
        # small tensors (shapes, biases, scales) always come in: shape inference needs their values
        if load_weights or tensor_nbytes(tensor) < LAZY_MIN_BYTES:
            tensor.raw_data = read_tensor_bytes(tensor, weights_dir)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


LAZY_MIN_BYTES = 64 * 1024  # with load_weights=False, external tensors below this are still read


# --- external data ----------------------------------------------------------------------------
def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Initializers and Constant/attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(sub)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model whose data lives in an external file."""
    return [t for t in _all_tensors(model.graph) if uses_external_data(t)]


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's data, from its type and dims (no data is read)."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise ModelError(f"weight {tensor.name!r}: external data offset/length are not integers; "
                         "the model file is damaged, re-export it") from None
    return info.get("location", ""), offset, length


def check_external_tensor(tensor: onnx.TensorProto, base_dir: str) -> str:
    """The absolute data file of an external tensor, after checking it is inside ``base_dir``
    and long enough for the tensor's dims (a lying header never makes us allocate or read past it).
    """
    location, offset, length = _external_info(tensor)
    real_dir = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(real_dir, location))
    if not location or os.path.isabs(location) or os.path.commonpath([real_dir, full]) != real_dir:
        raise ModelError(f"weight {tensor.name!r} points to external data {location!r} outside the "
                         "model's folder; keep the data file beside the .onnx")
    if not os.path.isfile(full):
        raise ModelError(f"weight {tensor.name!r}: external data file {location!r} is missing; copy it "
                         "next to the model")
    need = tensor_nbytes(tensor)
    if offset < 0 or (length is not None and length != need):
        raise ModelError(f"weight {tensor.name!r}: external data length {length} does not match its "
                         f"shape ({need} bytes); the model is damaged, re-export it")
    if offset + need > os.path.getsize(full):
        raise ModelError(f"weight {tensor.name!r}: external data file {location!r} is shorter than the "
                         "weight needs; the file is truncated, copy it again")
    return full


def read_tensor_bytes(tensor: onnx.TensorProto, base_dir: str) -> bytes:
    """The raw little-endian bytes of an external tensor, read from its data file."""
    full = check_external_tensor(tensor, base_dir)
    _, offset, _ = _external_info(tensor)
    with open(full, "rb") as f:
        f.seek(offset)
        return f.read(tensor_nbytes(tensor))


def read_tensor(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    """The value of a tensor, read from its external data file (relative to ``base_dir``, the
    model's folder) when it has one (one copy)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    if base_dir is None:
        raise ModelError(f"weight {tensor.name!r} is in external data; the model's folder is not known "
                         "(load it as fp8core.model.Model with its weights_dir)")
    full = check_external_tensor(tensor, base_dir)
    _, offset, _ = _external_info(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    # np.fromfile reads straight into the array: no intermediate bytes object
    return np.fromfile(full, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return files_sha256([path])


def files_sha256(paths: Iterable[str | os.PathLike], chunk: int = 1 << 20) -> str:
    """sha256 over the files' contents, concatenated in the order given (one file: its sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def model_files(path: str | os.PathLike, model: onnx.ModelProto) -> list[str]:
    """The model file and the external data files its tensors reference (``model`` loaded with
    ``load_weights=False``, before anything was read in), in a stable order."""
    folder = os.path.dirname(os.path.abspath(path))
    locations = set()
    for tensor in external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(os.path.normpath(os.path.join(folder, entry.value)))
    return [os.path.abspath(path)] + sorted(locations)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelError("the model imports no default ONNX opset; it is not a standard ONNX model")


def assign_node_names(graph: onnx.GraphProto) -> None:
    """Name unnamed nodes ``OpType_index`` (index = position in graph order), as old exporters did.

    Named nodes keep their names. If ``OpType_index`` is taken, a suffix keeps names unique.
    """
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        k = 1
        while name in taken:
            name = f"{node.op_type}_{index}_{k}"
            k += 1
        node.name = name
        taken.add(name)


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """``(attribute name, body)`` of each graph attribute of a node (If branches, Loop/Scan bodies)."""
    found = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append((attr.name, attr.g))
        found.extend((attr.name, g) for g in attr.graphs)
    return found


def names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, including reads inside their subgraphs (If, Loop, Scan)."""
    names: set[str] = set()
    for node in nodes:
        names.update(i for i in node.input if i)
        for _, body in subgraphs(node):
            names |= names_read(body.node) | {o.name for o in body.output}
    return names


def walk_graphs(graph: onnx.GraphProto, path: tuple[onnx.NodeProto, ...] = ()):
    """Yield ``(graph, path)`` for the graph and every subgraph inside it, depth first; ``path``
    is the chain of control-flow nodes (If/Loop/Scan) that hold the graph, outermost first."""
    yield graph, path
    for node in graph.node:
        for _, body in subgraphs(node):
            yield from walk_graphs(body, path + (node,))


def nodes_by_name(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Every named node of ``graph`` and of the If/Loop/Scan bodies inside it (plans name body ops too)."""
    return {n.name: n for g, _ in walk_graphs(graph) for n in g.node if n.name}


def assign_subgraph_node_names(graph: onnx.GraphProto) -> None:
    """Name unnamed nodes inside If/Loop/Scan bodies ``<holder>/<attr>/OpType_index`` (the
    holder's name, the attribute, the position in the body), unique across the whole model."""
    taken = {n.name for g, _ in walk_graphs(graph) for n in g.node if n.name}

    def visit(g: onnx.GraphProto, prefix: str | None) -> None:
        for index, node in enumerate(g.node):
            if prefix is not None and not node.name:
                name, k = f"{prefix}/{node.op_type}_{index}", 1
                while name in taken:
                    name, k = f"{prefix}/{node.op_type}_{index}_{k}", k + 1
                node.name = name
                taken.add(name)
            for attr, body in subgraphs(node):
                visit(body, f"{node.name}/{attr}")

    visit(graph, None)


def set_input_shapes(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> None:
    """Fix graph input dims (``--input_shape name=1,3,224,224``)."""
    inputs = {i.name: i for i in graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            real = [i.name for i in graph_inputs(graph)]
            raise ModelError(f"--input_shape names {name!r}, which is not a model input; inputs: {real}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise ModelError(
                f"--input_shape {name} has {len(dims)} dims but the model input has {len(shape.dim)}"
            )
        for d, v in zip(shape.dim, dims):
            if d.HasField("dim_value") and d.dim_value != v:
                raise ModelError(
                    f"--input_shape {name}={','.join(map(str, dims))} conflicts with the model's "
                    f"fixed shape {[x.dim_value or x.dim_param for x in shape.dim]}"
                )
            d.Clear()
            d.dim_value = int(v)


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node attribute (strings decoded), or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs, as IR<4 models do)."""
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


class GraphIndex:
    """Lookups over one graph: producer, consumers and constant value of a tensor."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str | None = None):
        self.graph = graph
        self.base_dir = base_dir  # the model's folder, where external weights live (see load_model)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        # Constants of If/Loop/Scan bodies: a weight read inside a body is looked up like any other
        # (ONNX names are unique across a graph and its bodies). Topology stays top-level.
        self._body_constants: dict[str, onnx.NodeProto] = {}
        for body, path in walk_graphs(graph):
            if not path:
                continue
            for t in body.initializer:
                self.initializers.setdefault(t.name, t)
            for node in body.node:
                if node.op_type == "Constant":
                    self._body_constants[node.output[0]] = node

    def for_body(self, body: onnx.GraphProto) -> GraphIndex:
        """The topology (producer, consumers) of ``body``, a graph inside this one, with this
        graph's constants: a body reads the weights of its outer scopes."""
        inner = GraphIndex(body, self.base_dir)
        inner.initializers = {**self.initializers, **inner.initializers}
        inner._body_constants = {**self._body_constants, **inner._body_constants}
        return inner

    def constant_node(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name) or self._body_constants.get(name)
        return node if node is not None and node.op_type == "Constant" else None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or self.constant_node(name) is not None

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The TensorProto of a constant tensor, from an initializer or a Constant node."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_node(name)
        if node is None:
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return attr.t
            if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                arr = np.asarray(onnx.helper.get_attribute_value(attr))
                arr = arr.astype(np.float32 if "float" in attr.name else np.int64)
                return numpy_helper.from_array(arr, name)
        return None

    def constant_value(self, name: str) -> np.ndarray | None:
        t = self.constant_tensor(name)
        return None if t is None else read_tensor(t, self.base_dir)


LARGE_INITIALIZER_BYTES = 4096


def without_large_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto], set[str]]:
    """A copy of ``model`` whose large initializers are graph inputs instead (nothing else changes).

    Returns the copy, the large initializers (not copied) and the names of the inputs added for them.
    """
    graph = model.graph
    large = [t for t in graph.initializer if t.ByteSize() > LARGE_INITIALIZER_BYTES or uses_external_data(t)]
    large_names = {t.name for t in large}
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    g = light.graph
    _copy_fields(g, graph, skip="initializer")
    g.initializer.extend(t for t in graph.initializer if t.name not in large_names)
    listed = {i.name for i in g.input}
    added = [t for t in large if t.name not in listed]
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added)
    return light, large, {t.name for t in added}


def _copy_fields(dst, src, skip: str | tuple[str, ...]) -> None:
    skipped = (skip,) if isinstance(skip, str) else skip
    for field, value in src.ListFields():
        if field.name in skipped:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def with_initializers(light: onnx.ModelProto, large: list[onnx.TensorProto], added_inputs: set[str]) -> onnx.ModelProto:
    """Put the large initializers back (one copy each) and drop the inputs that stood for them."""
    if not large:
        return light
    keep_only(light.graph.input, lambda i: i.name not in added_inputs)
    light.graph.initializer.extend(large)
    return light


# --- editing verbs ---------------------------------------------------------------------------

def pruned_to(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``outputs`` (top-level names, its new graph
    outputs): the nodes and initializers none of them needs are left out, the graph inputs all
    stay (feeds do not change). onnxruntime runs every node of a graph whatever a run fetches,
    so a pass that reads the first ops' inputs otherwise pays for the whole model."""
    wanted = list(dict.fromkeys(outputs))
    needed, kept = set(wanted), []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= names_read([node])
    out = onnx.ModelProto()
    _copy_fields(out, model, skip="graph")
    g = out.graph
    _copy_fields(g, model.graph, skip=("node", "initializer", "output", "value_info"))
    g.node.extend(reversed(kept))
    inputs = {i.name for i in model.graph.input}  # an input's initializer is its default: kept
    g.initializer.extend(t for t in model.graph.initializer if t.name in needed or t.name in inputs)
    g.value_info.extend(v for v in model.graph.value_info if v.name in needed)
    listed = {o.name: o for o in model.graph.output}
    types = tensor_elem_types(model)
    g.output.extend(listed[n] if n in listed else
                    onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None) for n in wanted)
    return out


class FreshNames:
    """Fresh tensor/node names that cannot collide with the graph's: ``base``, else ``base_1``,
    ``base_2``, ... The names of bodies count too (they share one namespace with the graph)."""

    def __init__(self, graph: onnx.GraphProto):
        self.used: set[str] = set()
        for g, _ in walk_graphs(graph):
            self.used.update(n.name for n in g.node)
            for n in g.node:
                self.used.update(n.output)
            self.used.update(t.name for t in g.initializer)
            self.used.update(i.name for i in g.input)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def replace_all(field, items: Iterable) -> None:
    """The repeated proto field ``field`` (nodes, initializers, inputs, ...) holds ``items`` instead, in order."""
    items = list(items)
    del field[:]
    field.extend(items)


def keep_only(field, keep: Callable[[Any], bool]) -> None:
    """Remove the items of the repeated proto field ``field`` that ``keep`` rejects; order unchanged."""
    kept = [x for x in field if keep(x)]
    if len(kept) != len(field):
        replace_all(field, kept)


def with_value(tensor: onnx.TensorProto, values: dict[str, np.ndarray]) -> onnx.TensorProto:
    """``tensor`` itself, or a new tensor of its name holding ``values[tensor.name]``."""
    return numpy_helper.from_array(values[tensor.name], tensor.name) if tensor.name in values else tensor


def replace_constants(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> None:
    """The initializers and Constant nodes of ``graph`` named in ``values`` hold those values
    instead, in place: same names, same positions, so every reader sees the new value."""
    for t in graph.initializer:
        if t.name in values:
            t.CopyFrom(with_value(t, values))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in values:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(values[node.output[0]], node.output[0]))


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference can tell."""
    light, _, _ = without_large_initializers(model)  # inference copies the model: keep it small
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:
        inferred = model
    types: dict[str, int] = {}
    index = GraphIndex(inferred.graph)
    for g, _ in walk_graphs(inferred.graph):  # If/Loop/Scan bodies too
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for node in g.node:
            if node.op_type == "Constant":
                t = index.constant_tensor(node.output[0])
                if t is not None:
                    types[node.output[0]] = t.data_type
    return types


def nodes_of_type(graph: onnx.GraphProto, op_types: Iterable[str], bodies: bool = False) -> list[onnx.NodeProto]:
    """Nodes of the given standard op types, in graph order; ``bodies``: inside If/Loop/Scan bodies
    too (after the top-level nodes, body by body, depth first)."""
    wanted = set(op_types)
    graphs = [g for g, _ in walk_graphs(graph)] if bodies else [graph]
    return [n for g in graphs for n in g.node if n.op_type in wanted and n.domain in ("", "ai.onnx")]
