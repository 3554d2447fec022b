"""Weight scale choice: per tensor or per channel, powers of two or real scales.

``--weight_granularity`` and ``--scale_kind`` (:func:`choose_weight_params`):

* ``per_tensor`` with ``scale_kind pow2`` (the default): the power-of-two search of
  :mod:`fp8core.search`; nothing here changes the plan.
* ``per_channel``: one real scale per output channel of a Conv/MatMul/Gemm weight
  (:func:`output_channel_axis`: Conv 0, MatMul last axis, Gemm 0 with transB=1 else 1), written
  as ``DequantizeLinear(fp8, scales[C], axis)``.
* ``per_tensor`` with ``scale_kind float``: the same search with the whole weight as one channel,
  written as ``DequantizeLinear(fp8, scale)`` with a real scalar scale.
* The format is chosen among ``formats`` by the loss of the whole weight (every channel encoded
  with its own scale); ties go to the earlier format in ``formats``.
* A float16 op stores its scales in float16: the chosen scales are made
  :func:`fp8core.scale.storable` (float16's rules live there) before the weight is encoded with
  them.
* Activations keep the per-tensor power-of-two scales: the binned search statistics
  (:mod:`fp8core.stats`) are binned per power of two, so a real scale's loss cannot be
  evaluated exactly from them.

Why real scales: with a floating-point format, power-of-two per-channel scales only move each
channel's range: the relative rounding grid is the same for every power of two (measured:
EfficientNet-Lite0 gave the per-tensor accuracy). A real-valued scale moves the grid itself, so
the per-channel scales here are real numbers, chosen per output channel by the loss among

    ``scale_c = absmax_c / max_fp8 * 2^(j / STEPS_PER_OCTAVE)``  for j in ``SCALE_STEPS``

(``absmax_c / max_fp8`` maps the channel's largest magnitude onto the format's largest value;
smaller factors clip the few largest values for a finer grid, larger ones leave head-room).
A channel whose values are all zero gets scale 1.

Encoding is :func:`fp8core.formats.encode` with a :class:`fp8core.scale.Scale` along the
channel axis (ONNX ``QuantizeLinear`` with a 1-D float scale and ``axis``); decoding is
``DequantizeLinear`` with the same ``axis``: ``q * scale_c``. :func:`dequantize_node` writes it;
onnxruntime reproduces :func:`PerChannelWeight.dequantized` bit for bit (tests/test_weights.py).

Ranking per channel: smallest loss, ties (within 1e-9 relative) to the smaller ``|j|``, then the
smaller j. ``mse``, ``mae``, ``snr`` and ``cos_dist`` are their row-wise float64 forms - the
weight moved to ``[channels, values]``, round-tripped, ``mean((x - q)^2)`` and so on per row -
evaluated a block of channels at a time for every candidate, each sum in the order numpy takes
over the whole rows: for a C-contiguous weight (every ONNX initializer) the losses of the
unblocked forms to the last bit (tests/test_weights.py). ``kld`` by
:class:`fp8core.losses.KldRows`: :func:`fp8core.losses.kld` of each channel, up to the order of
one floating-point sum. Any other registered loss: one channel at a time.

The search's round trips round ``x / scale_c`` to the FP8 grid by adding and subtracting a
multiple of the grid step (:func:`fp8core.formats.round_to_grid`: numpy's float32 addition rounds to nearest,
ties to even, as ``QuantizeLinear`` does): the values of :func:`fp8core.formats.round_trip` for
every float32 in ``[-max, max]`` (all of them checked, once, in every format), in 5 array
operations instead of a cast to FP8 and back. The chosen scales are encoded with
:func:`fp8core.formats.encode_to_dtype`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp8core.errors import FP8Error
from fp8core.formats import FP8Format, decode, encode_to_dtype, get_format, round_trip, round_trip_into
from fp8core.graph import node_attr, nodes_by_name
from fp8core.losses import KldRows, get_loss
from fp8core.model import Model
from fp8core.plan import OpPlan, QuantParams, RealScaleParams
from fp8core.scale import Scale, scale_initializer, storable

STEPS_PER_OCTAVE = 8
SCALE_STEPS = range(-16, 9)  # factors 2^-2 .. 2^1 around absmax / max
VECTORISED_LOSSES = ("mse", "mae", "snr", "cos_dist")
GRANULARITIES = ("per_tensor", "per_channel")
SCALE_KINDS = ("pow2", "float")
BLOCK_VALUES = 1 << 16
"""Values per block of the mse/mae/snr/cos_dist search: its float64 buffers (512 KiB, allocated
once per block, under the CLI's mmap threshold) stay in cache while every candidate is
evaluated on it, where a pass over the whole weight per candidate and operation went to memory
(benchmarks/bench_weight_scales.py; 1 << 15 and 1 << 17 measured slower)."""
KLD_BLOCK_VALUES = 1 << 18
"""Values per block of the kld search: a sort, then a few operations per channel and candidate
(not per value), so larger blocks; bounded, since its tables are a few times the block."""


class WeightQuantizationError(FP8Error):
    """A weight request that cannot be met: a weight with NaN or inf values, or an unknown
    granularity or scale kind (a library config; the CLI's flags are checked before). An op or
    axis the caller derived from the model itself is an internal error (a plain ValueError)."""


@dataclasses.dataclass(frozen=True)
class PerChannelWeight:
    """A weight in FP8 with one real scale per output channel along ``axis``."""

    format: str
    axis: int
    scales: np.ndarray  # float32, one per channel
    steps: np.ndarray  # the chosen j per channel
    losses: np.ndarray  # the chosen loss per channel
    fp8: np.ndarray  # the FP8 values as ml_dtypes, same shape as the weight

    @property
    def scale(self) -> Scale:
        return Scale.along(self.scales, self.axis)

    def dequantized(self) -> np.ndarray:
        """``DequantizeLinear(fp8, scales, axis)`` in float32."""
        return decode(self.fp8, self.format, self.scale)


def output_channel_axis(op_type: str, weight_rank: int, trans_b: int = 0) -> int:
    """The axis of a weight that indexes the op's output channels.

    Conv ``[M, C/group, k...]``: 0. Gemm B: 0 with ``transB=1`` (``[N, K]``), else 1.
    MatMul B ``[..., K, N]``: the last axis.
    """
    if op_type == "Conv":
        return 0
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return weight_rank - 1
    raise ValueError(f"{op_type} has no FP8 weight; per-channel scales apply to Conv, MatMul, Gemm")


def _pairwise_leaves(n: int, limit: int):
    """numpy's pairwise summation tree of n values, cut into pieces of at most ``limit`` values.

    ``np.sum`` over a contiguous run of n > 128 float64 values adds the sum of its first
    ``n // 2`` (rounded down to a multiple of 8) values to the sum of the rest, recursively; the
    pieces' ``np.sum``, added up along this tree, give the whole run's sum to the bit
    (tests/test_weights.py checks it).
    """
    if n <= max(limit, 128):
        return n
    half = n // 2
    half -= half % 8
    return (_pairwise_leaves(half, limit), _pairwise_leaves(n - half, limit))


def _leaf_slices(tree, start: int = 0) -> list[slice]:
    if isinstance(tree, int):
        return [slice(start, start + tree)]
    left = _leaf_slices(tree[0], start)
    return left + _leaf_slices(tree[1], left[-1].stop)


def _tree_sum(tree, parts: list):
    """The pieces' sums (in :func:`_leaf_slices` order) added up along ``tree``."""
    it = iter(parts)

    def walk(t):
        return next(it) if isinstance(t, int) else walk(t[0]) + walk(t[1])
    return walk(tree)


def _error_sums(x: np.ndarray, s: np.ndarray, f: FP8Format, loss: str, axis: int, whole: bool = False,
                norms=None, carry: dict | None = None) -> dict:
    """Per candidate and channel, the sums ``loss`` needs over one piece of the channels' values.

    ``x``: the piece, in the weight's dtype, a channel's values along ``axis``; ``s``: the
    candidate scales ``[candidates, channels]``. Keys: ``x_sq`` (sum x^2, per channel: snr,
    cos_dist), ``err`` (sum of squared or absolute errors: mse, mae, snr), ``q_sq`` (sum q^2) and
    ``unit_sq`` (sum (x/|x| - q/|q|)^2): cos_dist. ``unit_sq`` needs the norms: computed here when
    ``whole`` (the piece is the channels' every value), else given as ``norms = (|x|, |q|)`` - and
    then it is the only sum. The operations are those of the losses' definitions, in float64.

    Order of the sums: numpy's. Along axis 1 (contiguous rows, or one block of any other layout)
    ``np.add.reduce`` as over the whole rows; along axis 0 (a strided axis for numpy: its values
    are added one after another) the piece's values go after ``carry``'s sums, when given.
    """
    x32 = np.asarray(x, np.float32)
    x64 = np.asarray(x, np.float64)
    y = np.empty_like(x32)
    if axis == 0 and carry is not None:
        ext = np.empty((x64.shape[0] + 1, x64.shape[1]))  # row 0: the sums so far
        e = ext[1:]
    else:
        ext, e = None, np.empty_like(x64)

    def add_up(key, i=None):
        if ext is None:
            return np.add.reduce(e, axis=axis)
        ext[0] = carry[key] if i is None else carry[key][i]
        return np.add.reduce(ext, axis=0)

    def along(v):
        return v[:, None] if axis == 1 else v[None, :]
    sums: dict[str, np.ndarray] = {}
    if norms is None and loss in ("snr", "cos_dist"):
        np.multiply(x64, x64, out=e)
        sums["x_sq"] = add_up("x_sq")
    if loss != "cos_dist":
        keys = ("err",)
    else:
        keys = ("q_sq", "unit_sq") if whole else ("unit_sq",) if norms is not None else ("q_sq",)
        if "unit_sq" in keys:
            nx = np.sqrt(np.where(sums["x_sq"] > 0, sums["x_sq"], 1)) if whole else norms[0]
            xn = x64 / along(nx)
    for key in keys:
        sums[key] = np.empty(s.shape)
    for i, si in enumerate(s):
        round_trip_into(x32, along(si), f, y)
        if loss == "cos_dist":
            if "q_sq" in keys:
                np.multiply(y, y, out=e, dtype=np.float64)
                sums["q_sq"][i] = q_sq = add_up("q_sq", i)
            if "unit_sq" in keys:
                ny = np.sqrt(np.where(q_sq > 0, q_sq, 1)) if whole else norms[1][i]
                np.divide(y, along(ny), out=e, dtype=np.float64)
                np.subtract(xn, e, out=e)
                np.multiply(e, e, out=e)
                sums["unit_sq"][i] = add_up("unit_sq", i)
            continue
        np.subtract(x64, y, out=e, dtype=np.float64)
        if loss == "mae":
            np.abs(e, out=e)
        else:
            np.multiply(e, e, out=e)
        sums["err"][i] = add_up("err", i)
    return sums


def _losses_of_sums(loss: str, n: int, sums: dict) -> np.ndarray:
    """The loss per candidate and channel from :func:`_error_sums`' sums over n values each."""
    if loss == "mse" or loss == "mae":
        return sums["err"] / n  # np.mean: the sum, then divided by the count
    x_sq = sums["x_sq"]
    if loss == "snr":
        return np.where(x_sq > 0, sums["err"] / np.where(x_sq > 0, x_sq, 1), 0.0)
    y_sq = sums["q_sq"]  # cos_dist as |x/|x| - y/|y||^2 / 2 (no cancellation)
    d = np.maximum(0.0, sums["unit_sq"] / 2)
    return np.where((x_sq == 0) | (y_sq == 0), np.where(x_sq == y_sq, 0.0, 1.0), d)


def _norms(sums: dict):
    return (np.sqrt(np.where(sums["x_sq"] > 0, sums["x_sq"], 1)),
            np.sqrt(np.where(sums["q_sq"] > 0, sums["q_sq"], 1)))


def _error_loss_table(rows: np.ndarray, cands: np.ndarray, f: FP8Format, loss: str) -> np.ndarray:
    """``[candidates, channels]`` losses of mse, mae, snr or cos_dist, a block at a time.

    ``rows`` is the C-contiguous weight with its channel axis moved first (a view, or a copy for
    a middle axis), the layout these sums have always been taken in, because numpy's order of a
    sum follows it: pairwise along contiguous rows (axis 0, a copied middle axis, a per-tensor
    row), one value after another along a strided axis (the last axis: MatMul and Gemm weights).
    The blocks keep each order, so the sums are the same to the bit.
    """
    channels, n = rows.shape
    table = np.empty((len(cands), channels))
    if rows.flags.c_contiguous and n > BLOCK_VALUES:  # a long row (a per-tensor search): tree pieces
        tree = _pairwise_leaves(n, BLOCK_VALUES)
        pieces = _leaf_slices(tree)
        for r in range(channels):
            x, s = rows[r:r + 1], cands[:, r:r + 1]
            parts = [_error_sums(x[:, p], s, f, loss, 1) for p in pieces]
            sums = {key: _tree_sum(tree, [part[key] for part in parts]) for key in parts[0]}
            if loss == "cos_dist":
                norms = _norms(sums)
                sums["unit_sq"] = _tree_sum(tree, [_error_sums(x[:, p], s, f, loss, 1, norms=norms)["unit_sq"]
                                                   for p in pieces])
            table[:, r:r + 1] = _losses_of_sums(loss, n, sums)
    elif rows.flags.c_contiguous or not rows.T.flags.c_contiguous:
        # any other layout (not reached from a C-contiguous weight): one block, summed as numpy does
        step = max(1, BLOCK_VALUES // n) if rows.flags.c_contiguous else channels
        for r0 in range(0, channels, step):
            sums = _error_sums(rows[r0:r0 + step], cands[:, r0:r0 + step], f, loss, 1, whole=True)
            table[:, r0:r0 + step] = _losses_of_sums(loss, n, sums)
    else:  # the channels are the contiguous axis: groups of channels, pieces of their values
        cols = rows.T
        width = min(channels, max(512, BLOCK_VALUES // n))
        length = max(1, BLOCK_VALUES // width)
        for c0 in range(0, channels, width):
            x, s = cols[:, c0:c0 + width], cands[:, c0:c0 + width]
            if n <= length:
                sums = _error_sums(x, s, f, loss, 0, whole=True)
            else:
                sums = None
                for k0 in range(0, n, length):
                    sums = _error_sums(x[k0:k0 + length], s, f, loss, 0, carry=sums)
                if loss == "cos_dist":
                    norms, unit = _norms(sums), None
                    for k0 in range(0, n, length):
                        unit = _error_sums(x[k0:k0 + length], s, f, loss, 0, norms=norms, carry=unit)
                    sums["unit_sq"] = unit["unit_sq"]
            table[:, c0:c0 + width] = _losses_of_sums(loss, n, sums)
    return table


def _count_leading(sorted_rows: np.ndarray, guess: np.ndarray, holds) -> np.ndarray:
    """``[candidates, rows]``: how many leading values of each row of ``sorted_rows`` (ascending,
    >= 0) satisfy ``holds`` - a condition true on a prefix of each row, called with one value per
    candidate and row (``[candidates, rows]``).

    ``guess`` ``[candidates, rows]`` (float32, >= 0) estimates the largest value that holds: the
    count of values up to it is checked against ``holds`` at its boundary and found by bisection
    where the estimate was wrong, so the result is exact either way.
    """
    k, channels = guess.shape
    n = sorted_rows.shape[1]
    rows = np.arange(channels)
    # one sorted int64 key per value, row-major: the row, then the float32 bits (ordered for >= 0)
    keys = (rows[:, None] << 32) | sorted_rows.view(np.uint32).astype(np.int64)
    probe = (rows << 32) | np.asarray(guess, np.float32).view(np.uint32).astype(np.int64)
    count = np.searchsorted(keys.reshape(-1), probe, side="right") - rows * n

    below = (count == 0) | holds(sorted_rows[rows, np.maximum(count - 1, 0)])
    above = (count == n) | ~holds(sorted_rows[rows, np.minimum(count, n - 1)])
    wrong = ~(below & above)
    if wrong.any():
        lo, hi = np.zeros_like(count), np.full_like(count, n)
        while np.any(wrong & (lo < hi)):
            mid = (lo + hi) // 2
            ok = holds(sorted_rows[rows, np.minimum(mid, n - 1)])
            lo, hi = np.where(wrong & (lo < hi) & ok, mid + 1, lo), np.where(wrong & (lo < hi) & ~ok, mid, hi)
        count = np.where(wrong, lo, count)
    return count


def _kld_loss_table(rows: np.ndarray, cands: np.ndarray, f: FP8Format) -> np.ndarray:
    """``[candidates, channels]`` kld losses by :class:`fp8core.losses.KldRows`.

    A channel's round trip ``q = round(x / s) * s`` has ``|q|`` non-decreasing in ``|x|`` (each
    step is), so its saturated values (``|x| > max |q|``, max |q| the round trip of the largest
    ``|x|``) and its flushed ones (``q = 0``) are counted in the sorted magnitudes. A scale that
    underflowed to 0 makes ``0 / 0`` NaN and breaks the order: such channels are evaluated one at
    a time as before.
    """
    channels, n = rows.shape
    kld = get_loss("kld")
    table = np.empty((len(cands), channels))
    step = max(1, KLD_BLOCK_VALUES // n)
    half_smallest = np.float32(f.min_subnormal / 2)
    for r0 in range(0, channels, step):
        x32 = np.ascontiguousarray(rows[r0:r0 + step], np.float32)
        s = cands[:, r0:r0 + step]
        kr = KldRows(x32)
        mags = kr.magnitudes

        def round_trip_of(v):  # v: one magnitude per candidate and channel
            return round_trip(v, f, Scale.real(s))
        top_q = round_trip_of(mags[:, -1])  # max |q|: the round trip of max |x|
        n_sat = n - _count_leading(mags, top_q, lambda v: v <= top_q)
        zero_below = half_smallest * s  # about where q becomes nonzero
        n_zero = _count_leading(mags, zero_below, lambda v: round_trip_of(v) == 0)
        table[:, r0:r0 + step] = kr(n_sat, np.minimum(n_zero, n - n_sat))
        for c in np.flatnonzero(np.any(s == 0, axis=0)):
            x = x32[c]
            for i in range(len(cands)):
                table[i, r0 + c] = kld(x, round_trip(x, f, Scale.real(s[i, c])))
    return table


def _channel_loss_table(w: np.ndarray, axis: int, cands: np.ndarray, f: FP8Format, loss: str) -> np.ndarray:
    """The loss of every candidate (rows of ``cands``) and channel: ``[candidates, channels]``."""
    rows = np.moveaxis(np.ascontiguousarray(w), axis, 0).reshape(w.shape[axis], -1)
    if loss in VECTORISED_LOSSES:
        return _error_loss_table(rows, cands, f, loss)
    if loss == "kld":
        return _kld_loss_table(rows, cands, f)
    fn = get_loss(loss)
    x32 = np.asarray(rows, np.float32)
    table = np.empty((len(cands), rows.shape[0]))
    y = np.empty(x32.shape, np.float32)
    for i, s in enumerate(cands):
        round_trip_into(x32, s[:, None], f, y)
        table[i] = [fn(x32[c], y[c]) for c in range(rows.shape[0])]
    return table


def candidate_scales(absmax: np.ndarray, fmt: str, steps=SCALE_STEPS) -> np.ndarray:
    """``[len(steps), channels]`` float32 scales ``absmax / max * 2^(j / STEPS_PER_OCTAVE)``."""
    base = np.where(absmax > 0, absmax / get_format(fmt).max, 1.0)
    factors = np.exp2(np.asarray(list(steps), np.float64) / STEPS_PER_OCTAVE)
    return (factors[:, None] * base[None, :]).astype(np.float32)


def quantize_per_channel(w: np.ndarray, axis: int, fmt: str = "F143", loss: str = "mse",
                         steps=SCALE_STEPS) -> PerChannelWeight:
    """Choose every channel's real scale by ``loss`` (module docstring) and encode the weight."""
    w = np.asarray(w)
    if w.ndim < 1 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis {axis} is outside a weight of shape {list(w.shape)}")
    axis %= w.ndim
    if not np.isfinite(w).all():
        raise WeightQuantizationError("the weight has NaN or inf values; fix the model before quantizing it")
    get_loss(loss)  # unknown names fail here, with the list of losses
    fmt = get_format(fmt).name
    steps = list(steps)
    absmax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    cands = candidate_scales(absmax, fmt, steps)
    table = _channel_loss_table(w, axis, cands, get_format(fmt), loss)
    order = sorted(range(len(steps)), key=lambda i: (abs(steps[i]), steps[i]))  # tie-break order
    best = np.full(w.shape[axis], order[0])
    for i in order[1:]:
        cur = table[best, np.arange(best.size)]
        better = table[i] < cur - 1e-9 * np.abs(cur)
        best = np.where(better, i, best)
    channels = np.arange(best.size)
    scales = cands[best, channels]
    fp8 = encode_to_dtype(w, fmt, Scale.along(scales, axis))
    return PerChannelWeight(fmt, axis, scales, np.asarray(steps)[best], table[best, channels], fp8)


def dequantize_node(weight: PerChannelWeight, base: str, elem_type: int = onnx.TensorProto.FLOAT
                    ) -> tuple[list[onnx.TensorProto], onnx.NodeProto, str]:
    """Initializers (FP8 weight, 1-D scale) and the ``DequantizeLinear(axis)`` node; its output name."""
    q = numpy_helper.from_array(weight.fp8.view(np.uint8), f"{base}_fp8")
    q.data_type = get_format(weight.format).onnx_type  # the bytes are FP8
    s = scale_initializer(f"{base}_scale", weight.scale, elem_type)
    out = f"{base}_dq"
    node = helper.make_node("DequantizeLinear", [q.name, s.name], [out], name=f"{base}_DequantizeLinear",
                            axis=weight.axis)
    return [q, s], node, out


# --- the plan's weights: which scales, in which format -----------------------------------------

def uses_real_scales(granularity: str, scale_kind: str) -> bool:
    """Whether weights get :class:`RealScaleParams` (anything but PopRT's per-tensor power of two)."""
    if granularity not in GRANULARITIES:
        raise WeightQuantizationError(f"weight granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if scale_kind not in SCALE_KINDS:
        raise WeightQuantizationError(f"scale kind {scale_kind!r}: use one of {', '.join(SCALE_KINDS)}")
    return granularity == "per_channel" or scale_kind == "float"


def dequantized_weight(w: np.ndarray, p: QuantParams) -> np.ndarray:
    """The weight as the FP8 model computes with it (power-of-two or real scales), float32."""
    return round_trip(w, p.format, p.to_scale())


def real_scale_params(w: np.ndarray, axis: int | None, formats: list[str] | tuple[str, ...], loss: str,
                      elem_type: int = onnx.TensorProto.FLOAT) -> RealScaleParams:
    """Search the real scale(s) of one weight (module docstring): per channel along ``axis``, or
    one scale for the whole weight when ``axis`` is None."""
    w32 = np.asarray(w, np.float32)
    loss_fn = get_loss(loss)
    best: RealScaleParams | None = None
    for fmt in formats:
        fmt = get_format(fmt).name
        if axis is None:
            chosen = quantize_per_channel(w32.reshape(1, -1), 0, fmt, loss)
        else:
            chosen = quantize_per_channel(w32, axis, fmt, loss)
        scales = storable(chosen.scales, elem_type)
        geomean = float(np.exp2(np.mean(np.log2(scales.astype(np.float64)))))
        p = RealScaleParams(fmt, round(math.log2(geomean)), "per_tensor" if axis is None else "per_channel",
                            axis, tuple(float(s) for s in scales))
        if np.array_equal(scales, chosen.scales):  # the search encoded w with these scales already
            dequantized = chosen.dequantized()
        else:
            dequantized = dequantized_weight(w32, p)
        value = float(loss_fn(w32.reshape(-1), dequantized.reshape(-1)))
        p = dataclasses.replace(p, loss=value)
        if best is None or value < best.loss:
            best = p
    return best


def weight_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The output-channel axis of ``node``'s weight (Gemm reads its transB)."""
    trans_b = node_attr(node, "transB", 0)
    return output_channel_axis(node.op_type, weight_rank, trans_b)


def choose_weight_params(model: Model | onnx.ModelProto, plans: list[OpPlan], granularity: str, scale_kind: str,
                         formats: list[str] | tuple[str, ...], loss: str) -> list[OpPlan]:
    """Copies of ``plans`` whose FP8 weights carry real scales (unchanged for per_tensor pow2).

    A weight read by several FP8 ops is searched once per distinct (tensor, axis).
    """
    if not uses_real_scales(granularity, scale_kind):
        return plans
    index = Model.of(model).index()
    nodes = nodes_by_name(model.graph)  # ops inside If/Loop/Scan bodies are FP8 too
    found: dict[tuple[str, int | None, int], RealScaleParams] = {}
    out = []
    for plan in plans:
        plan = dataclasses.replace(plan, inputs=[dataclasses.replace(q) for q in plan.inputs])
        if plan.fp8:
            for q in plan.input("weight"):
                if q.params is None:
                    continue
                value = index.constant_value(q.tensor)
                axis = weight_axis(nodes[plan.name], value.ndim) if granularity == "per_channel" else None
                key = (q.tensor, axis, plan.elem_type)
                if key not in found:
                    try:
                        found[key] = real_scale_params(value, axis, formats, loss, plan.elem_type)
                    except WeightQuantizationError as exc:
                        raise WeightQuantizationError(f"{plan.name}: weight {q.tensor!r}: {exc}") from None
                q.params = found[key]
        out.append(plan)
    return out
