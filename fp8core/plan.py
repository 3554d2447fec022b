"""Decide which ops become FP8 and which of their inputs are weights or activations.

A plan is plain data (dataclasses that turn into JSON): it is what ``fp8_config.json`` records and
what :func:`fp8core.rewrite.rewrite_to_fp8` applies.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Literal

import numpy as np
import onnx

from fp8core.formats import get_format, round_trip
from fp8core.graph import (
    FLOAT_TYPES,
    FP8_OP_TYPES,
    QUANTIZED_INPUTS,
    GraphIndex,
    ModelError,
    nodes_of_type,
    tensor_elem_types,
    walk_graphs,
)
from fp8core.scale import Scale

Precision = Literal["fp8", "fp8_weight"]
PRECISIONS: tuple[str, ...] = ("fp8", "fp8_weight")
Role = Literal["activation", "weight"]


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """An FP8 format, an integer scale and an offset: real value = fp8 value * 2**scale + offset.

    ``offset`` is non-zero only for activations (:mod:`fp8core.offsets`): the graph subtracts it
    before QuantizeLinear and the op's bias adds it back through the FP8 weight
    (:mod:`fp8core.rewrite`), so Q/DQ keep zero point 0.
    """

    format: str
    scale: int
    offset: float = dataclasses.field(default=0.0, kw_only=True)

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format).name)
        object.__setattr__(self, "scale", int(self.scale))
        object.__setattr__(self, "offset", float(self.offset))

    def describe(self) -> dict:
        """What fp8_config.json and the logs show for these params."""
        return {"format": self.format, "scale": self.scale, **({"offset": self.offset} if self.offset else {})}

    def to_scale(self) -> Scale:
        """The scale to encode and decode with: ``2**scale``."""
        return Scale.pow2(self.scale)

    def round_trip(self, x: np.ndarray) -> np.ndarray:
        """What the FP8 op reads for ``x``, in float32: ``Q/DQ(x - offset) + offset``."""
        if not self.offset:
            return round_trip(x, self.format, self.to_scale())
        c = np.float32(self.offset)
        shifted = round_trip(np.asarray(x, np.float32) - c, self.format, self.to_scale())
        shifted += c
        return shifted


@dataclasses.dataclass(frozen=True)
class RealScaleParams(QuantParams):
    """An FP8 weight with real-valued scales (``--weight_granularity per_channel``, ``--scale_kind float``).

    Real value = fp8 value * ``scales[c]`` along ``axis`` (per_channel), or * ``scales[0]``
    (per_tensor, ``axis`` None). ``scale`` holds ``round(log2(geometric mean of scales))``, for
    names only; ``loss`` is the whole weight's loss with these scales (not part of equality).
    """

    granularity: str = "per_channel"
    axis: int | None = None
    scales: tuple[float, ...] = ()
    loss: float | None = dataclasses.field(default=None, compare=False)

    def to_scale(self) -> Scale:
        """The scale to encode and decode with: ``scales`` along ``axis``, or ``scales[0]``."""
        if self.axis is None:
            return Scale.real(self.scales[0])
        return Scale.along(self.scales, self.axis)

    def describe(self) -> dict:
        s = [float(v) for v in self.scales]
        geomean = float(2 ** (sum(math.log2(v) for v in s) / len(s))) if s else None
        return {"format": self.format, "scale": "per_channel" if self.granularity == "per_channel" else "float",
                "axis": self.axis, "loss": self.loss,
                "scales": {"count": len(s), "min": min(s, default=None), "max": max(s, default=None),
                           "geomean": geomean, **({"value": s[0]} if len(s) == 1 else {})}}


@dataclasses.dataclass
class QuantizedInput:
    index: int  # input position on the op
    tensor: str
    role: Role
    params: QuantParams | None = None


@dataclasses.dataclass
class OpPlan:
    name: str
    op_type: str
    position: int  # index in graph order
    fp8: bool
    reason: str  # why FP8, or why kept in original precision
    elem_type: int  # the op's original float type (FLOAT or FLOAT16)
    inputs: list[QuantizedInput] = dataclasses.field(default_factory=list)

    def input(self, role: Role) -> list[QuantizedInput]:
        return [i for i in self.inputs if i.role == role]

    def to_dict(self) -> dict:
        def params(role):
            found = [i.params for i in self.inputs if i.role == role and i.params is not None]
            return found[0].describe() if found else None

        return {
            "name": self.name,
            "op_type": self.op_type,
            "position": self.position,
            "fp8": self.fp8,
            "reason": self.reason,
            "dtype": onnx.TensorProto.DataType.Name(self.elem_type).lower(),
            "input": params("activation"),
            "weight": params("weight"),
            "tensors": [
                {"index": i.index, "tensor": i.tensor, "role": i.role,
                 **(i.params.describe() if i.params else {})}
                for i in self.inputs
            ],
        }


def close_matches(name: str, candidates: list[str]) -> str:
    found = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(found)}?" if found else ""


def check_skip_names(model: onnx.ModelProto, skip: list[str]) -> list[str]:
    """Raise for names that are not nodes; return warnings for names of ops that are never FP8."""
    by_name = {n.name: n for g, _ in walk_graphs(model.graph) for n in g.node}
    fp8_names = [n.name for n in nodes_of_type(model.graph, FP8_OP_TYPES, bodies=True)]
    warnings = []
    for name in skip:
        if name not in by_name:
            raise ModelError(
                f"--fp8_skip_op_names: no op named {name!r} in the model{close_matches(name, fp8_names or list(by_name))}"
            )
        if by_name[name].op_type not in FP8_OP_TYPES:
            warnings.append(f"--fp8_skip_op_names: {name!r} is a {by_name[name].op_type}, which is never FP8")
    return warnings


def plan_fp8_ops(
    model: onnx.ModelProto,
    precision: Precision = "fp8",
    skip: list[str] | tuple[str, ...] = (),
    activation_params: QuantParams | None = None,
    weight_params: QuantParams | None = None,
) -> list[OpPlan]:
    """One OpPlan per Conv/MatMul/Gemm in graph order, those inside If/Loop/Scan bodies included
    (their weights may be outer-scope initializers). Nodes must already be named.

    An input is a *weight* when it is a constant (initializer or Constant node), else an
    *activation*; a MatMul with two activations quantizes both as activations. With
    ``precision="fp8_weight"`` only weights are quantized, and an op without a constant weight
    stays in its original precision.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    index = GraphIndex(model.graph)
    types = tensor_elem_types(model)
    skip = set(skip)
    # by name: protobuf hands out a new wrapper object per access of a body's node, so ids differ
    positions = {n.name: i for i, n in enumerate(n for g, _ in walk_graphs(model.graph) for n in g.node)}
    plans = []
    for node in nodes_of_type(model.graph, FP8_OP_TYPES, bodies=True):
        ins = []
        for i in QUANTIZED_INPUTS[node.op_type]:
            if i < len(node.input) and node.input[i]:
                role = "weight" if index.is_constant(node.input[i]) else "activation"
                ins.append(QuantizedInput(i, node.input[i], role))
        if precision == "fp8_weight":
            ins = [q for q in ins if q.role == "weight"]
        elem_types = {types.get(q.tensor) for q in ins}
        elem = next(iter(elem_types)) if len(elem_types) == 1 else None
        plan = OpPlan(node.name, node.op_type, positions[node.name], True, "fp8", elem or 0, ins)
        if node.name in skip:
            plan.fp8, plan.reason = False, "skipped: in --fp8_skip_op_names"
        elif not ins:  # before the type check: no inputs means no element type either
            plan.fp8, plan.reason = False, "skipped: no constant weight (--precision fp8_weight)"
        elif elem not in FLOAT_TYPES:
            plan.fp8, plan.reason = False, "skipped: inputs are not float32/float16"
        if plan.fp8:
            for q in plan.inputs:
                q.params = weight_params if q.role == "weight" else activation_params
        else:
            for q in plan.inputs:
                q.params = None
        plans.append(plan)
    return plans


QUANTIZED_OP_TYPES = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
                      "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                      "QAttention", "QGemm", "MatMulNBits")


def already_quantized_note(model: onnx.ModelProto, plans: list[OpPlan]) -> str | None:
    """One line for a model that is already (partly) quantized, or None: its integer/QDQ ops are
    left as they are and only its float Conv/MatMul/Gemm can become FP8."""
    counts: dict[str, int] = {}
    for g, _ in walk_graphs(model.graph):
        for node in g.node:
            if node.op_type in QUANTIZED_OP_TYPES:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return None
    found = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
    fp8 = sum(p.fp8 for p in plans)
    return (f"the model is already quantized ({found}); those ops are left as they are, and only its float "
            f"Conv/MatMul/Gemm become FP8 ({fp8} of them)" + ("; convert the float model instead" if not fp8 else ""))


UNREACHED_REASON = ("kept: the calibration data never reaches it (inside an If branch or loop that "
                    "no sample takes), so its input scale cannot be calibrated")


def keep_unreached(plans: list[OpPlan], unreached: set[str]) -> tuple[list[OpPlan], list[str]]:
    """Keep in original precision the FP8 ops whose activation input no calibration sample
    computed; returns the plans and the names of the ops kept so."""
    kept = []
    for plan in plans:
        if plan.fp8 and any(q.tensor in unreached for q in plan.input("activation")):
            plan.fp8, plan.reason = False, UNREACHED_REASON
            for q in plan.inputs:
                q.params = None
            kept.append(plan.name)
    return plans, kept
