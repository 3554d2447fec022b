"""The five calibration losses, each defined once, computable from raw arrays or from the bins.

Every loss compares the original finite values ``x`` (float32, as ``QuantizeLinear`` sees them)
with their FP8 round trip ``q``; lower is better for all of them. Each is a function of a few
sums (:class:`ErrorSums`), and those sums come either

* from the raw arrays (:func:`error_sums_from_arrays`, the brute-force form, ``loss(x, q)``), or
* from :class:`fp8core.stats.TensorStats` bins and the FP8 value ``q`` of every bin part
  (:func:`error_sums_from_bins`, the form the search uses): a part has ``n`` values
  ``x = r + d`` that all round to ``q`` and lie on one side of it, so with ``c = r - q``:
  ``sum (x-q)^2 = S2 + 2 c S1 + n c^2``, ``sum |x-q| = |S1 + n c|``,
  ``sum x^2 = S2 + 2 r S1 + n r^2``, ``sum q^2 = n q^2`` (S1 = sum d, S2 = sum d^2), and
  with unit vectors ``u = r/|x| - q/|q|``:
  ``sum (x/|x| - q/|q|)^2 = S2/|x|^2 + 2 u S1/|x| + n u^2``.

``kld`` is a function of counts instead: how many values of each bin round to each ``q``, and
whether they saturate (:class:`JointHistogram`), exact in both forms. :class:`KldRows` evaluates
it for many rows and many round trips at once (the per-channel weight search), from how many of
each row's values saturate and flush.

The registry :data:`LOSSES` maps a name to a :class:`Loss`; :func:`get_loss` looks one up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from fp8core.errors import FP8Error
from fp8core.stats import (BIN_LOWER_EDGE, BIN_WIDTH, KEY_SHIFT, NUM_BINS, BinnedValues,
                           bin_keys)


class UnknownLossError(FP8Error):
    """A loss name that is not in :data:`LOSSES` (a library config's setting; the CLI's
    ``--quantize_loss_type`` is checked before)."""


@dataclasses.dataclass(frozen=True)
class JointHistogram:
    """Counts of values per (x's bin, q value, saturated or not); rows may repeat (they add up).

    ``saturated``: the values of the row lie beyond the saturation bound R (``|x| > R``): the
    format's largest value times ``2^s`` when the search knows it, else ``max |q|``, the largest
    magnitude the round trip reaches (see :func:`kld`).
    """

    bin_key: np.ndarray  # int64, fp8core.stats bin of x
    q_value: np.ndarray  # float64, the FP8 round trip shared by those values
    count: np.ndarray  # int64
    saturated: np.ndarray  # bool


@dataclasses.dataclass(frozen=True)
class ErrorSums:
    """The sums every loss is a function of (all over the finite values only)."""

    n: int  # number of values
    sq_err: float  # sum (x - q)^2
    abs_err: float  # sum |x - q|
    x_sq: float  # sum x^2
    q_sq: float  # sum q^2
    unit_sq_dist: float  # sum (x/|x| - q/|q|)^2; NaN when x or q is all zeros
    joint: JointHistogram | None = None  # only built for losses that need it (kld)


def error_sums_from_arrays(x: np.ndarray, q: np.ndarray, with_histogram: bool = False,
                           saturation_bound: float | None = None) -> ErrorSums:
    """Brute force: the sums straight from the values and their round trip, in float64.

    ``saturation_bound``: R of :class:`JointHistogram` (default ``max |q|``)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    q32 = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
    if x32.shape != q32.shape:
        raise ValueError(f"x has {x32.size} values but q has {q32.size}")
    x64 = x32.astype(np.float64)
    q64 = q32.astype(np.float64)
    err = x64 - q64
    # np.sum, not a BLAS dot product: pairwise summation, and no BLAS threads
    x_sq, q_sq = float(np.sum(x64 * x64)), float(np.sum(q64 * q64))
    unit_sq_dist = math.nan
    if x_sq > 0 and q_sq > 0:
        unit_err = x64 / math.sqrt(x_sq) - q64 / math.sqrt(q_sq)
        unit_sq_dist = float(np.sum(unit_err * unit_err))
    return ErrorSums(
        n=int(x32.size), sq_err=float(np.sum(err * err)), abs_err=float(np.abs(err).sum()),
        x_sq=x_sq, q_sq=q_sq, unit_sq_dist=unit_sq_dist,
        joint=_joint_from_arrays(x32, q32, saturation_bound) if with_histogram else None,
    )


def error_sums_from_bins(bins: BinnedValues, q: np.ndarray, with_histogram: bool = False,
                         saturation_bound: float | None = None) -> ErrorSums:
    """From the bins: ``q[i]`` is the FP8 round trip shared by every value of part ``i``.

    ``saturation_bound``: R of :class:`JointHistogram` (default ``max |q|``); on the grid of
    :mod:`fp8core.stats` (an FP8 value times a power of two) for the binned form to be exact."""
    q = np.asarray(q, dtype=np.float64)
    n = bins.count.astype(np.float64)
    s1, s2, r = bins.sum_dev, bins.sum_dev_sq, bins.reference
    c = r - q
    joint = _joint_from_bins(bins, q, saturation_bound) if with_histogram else None
    x_sq, q_sq = float(np.sum(s2 + 2.0 * r * s1 + n * r * r)), float(np.sum(n * q * q))
    unit_sq_dist = math.nan
    if x_sq > 0 and q_sq > 0:
        nx, nq = math.sqrt(x_sq), math.sqrt(q_sq)
        u = r / nx - q / nq
        unit_sq_dist = float(np.sum(s2 / x_sq + 2.0 * u * s1 / nx + n * u * u))
    return ErrorSums(
        n=bins.total,
        sq_err=float(np.sum(s2 + 2.0 * c * s1 + n * c * c)),
        abs_err=float(np.sum(np.abs(s1 + n * c))),
        x_sq=x_sq, q_sq=q_sq, unit_sq_dist=unit_sq_dist, joint=joint,
    )


def _joint_from_bins(bins: BinnedValues, q: np.ndarray, bound: float | None) -> JointHistogram:
    """One row per bin part. Which parts lie beyond R is decided from the bin alone, exactly,
    when R is an FP8 value times a power of two (``max |q|`` of an FP8 round trip, or the
    format's largest value times ``2^s``): then R is on the grid of :mod:`fp8core.stats`, so no
    part straddles it - an interior part (magnitudes in ``[lo, lo + w)``, above ``lo`` in an
    even bin) is beyond R iff ``lo >= R``, an edge part (all equal to ``lo``) iff ``lo > R``."""
    r = bound if bound is not None else (float(np.max(np.abs(q))) if q.size else 0.0)
    lo = BIN_LOWER_EDGE[bins.key & (NUM_BINS // 2 - 1)]
    edge = (bins.representative.view(np.uint32) & np.uint32((1 << KEY_SHIFT) - 1)) == 0
    saturated = np.where(edge, lo > r, lo >= r)
    return JointHistogram(bins.key, q, bins.count, saturated)


def _joint_from_arrays(x32: np.ndarray, q32: np.ndarray, bound: float | None) -> JointHistogram:
    keys = bin_keys(x32)
    r = bound if bound is not None else (float(np.max(np.abs(q32))) if q32.size else 0.0)
    saturated = (np.abs(x32.astype(np.float64)) > r).astype(np.intp)
    q_bits = q32.view(np.uint32)
    if np.all(q_bits & 0xFFFF == 0):
        # Fast path for FP8 round trips (<= 4 significant bits): the top 16 bits name q exactly.
        # -0 and +0 are the same q; drop the sign of zero.
        ids = (q_bits >> 16).astype(np.intp)
        ids[ids == 0x8000] = 0
        present = np.flatnonzero(np.bincount(ids, minlength=1 << 16))
        compact = np.zeros(1 << 16, np.intp)
        compact[present] = np.arange(present.size)
        groups = present.size
        counts = np.bincount((keys * groups + compact[ids]) * 2 + saturated, minlength=0)
        rows = np.flatnonzero(counts)
        pairs = rows // 2
        q_values = (present[pairs % groups].astype(np.uint32) << 16).view(np.float32)
        return JointHistogram(pairs // groups, q_values.astype(np.float64), counts[rows],
                              (rows % 2).astype(bool))
    # Any other q (real-valued scales: nearly every value its own q): one row per value. Grouping
    # them first (np.unique over the (bin, q, saturated) triples) would sort the whole tensor,
    # seconds per million values; the histograms only add the rows up.
    return JointHistogram(keys, q32.astype(np.float64) + 0.0, np.ones(keys.size, np.int64),
                          saturated.astype(bool))


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss: a formula over :class:`ErrorSums`, usable on arrays or on bins.

    ``tie_atol``: losses closer than ``1e-9 * |best| + tie_atol`` to the best count as tied in
    the search (dimensionless losses get a small absolute slack for rounding around 0).
    """

    name: str
    of_sums: Callable[[ErrorSums], float]
    needs_histogram: bool
    tie_atol: float

    @property
    def formula(self) -> str:
        return (self.of_sums.__doc__ or "").strip()

    def __call__(self, x: np.ndarray, q: np.ndarray) -> float:
        """Brute-force form: the loss of round trip ``q`` against the values ``x``."""
        return self.of_sums(error_sums_from_arrays(x, q, self.needs_histogram))

    def from_bins(self, bins: BinnedValues, q: np.ndarray) -> float:
        """Binned form: ``q[i]`` is the round trip of bin part ``i`` (see the module doc)."""
        return self.of_sums(error_sums_from_bins(bins, q, self.needs_histogram))


LOSSES: dict[str, Loss] = {}


def _register(needs_histogram: bool = False, tie_atol: float = 0.0):
    def wrap(fn: Callable[[ErrorSums], float]) -> Loss:
        loss = Loss(fn.__name__, fn, needs_histogram, tie_atol)
        LOSSES[loss.name] = loss
        return loss
    return wrap


@_register()
def mse(e: ErrorSums) -> float:
    """Mean squared error ``sum (x - q)^2 / N``."""
    return e.sq_err / e.n


@_register()
def mae(e: ErrorSums) -> float:
    """Mean absolute error ``sum |x - q| / N``."""
    return e.abs_err / e.n


@_register(tie_atol=1e-15)
def snr(e: ErrorSums) -> float:
    """Noise-to-signal power ``sum (x - q)^2 / sum x^2`` (lower is better; 0 when x is all 0).

    In decibels the signal-to-noise ratio is ``-10 log10(snr)``, see :func:`snr_db`.
    """
    return e.sq_err / e.x_sq if e.x_sq > 0 else 0.0


@_register(tie_atol=1e-15)
def cos_dist(e: ErrorSums) -> float:
    """Cosine distance ``1 - <x, q> / (|x| |q|)``; 0 if x and q are both 0, 1 if only one is.

    Evaluated as ``|x/|x| - q/|q||^2 / 2`` (equal, the two unit vectors have norm 1): a sum of
    squares, so a tiny distance keeps its digits (no ``1 - (a number close to 1)``), and it is
    scale-free, so it stays exact when ``|q|`` is far smaller than ``|x|``.
    """
    if e.x_sq == 0.0 or e.q_sq == 0.0:
        return 0.0 if e.x_sq == e.q_sq else 1.0
    return max(0.0, e.unit_sq_dist / 2.0)


KLD_BINS = 2048
"""Linear bins of kld's histogram over ``[0, A]`` (TensorRT's and onnxruntime's histogram size)."""
KLD_EPSILON = 1e-4
"""Smoothing weight of kld: the ``eps`` of onnxruntime's and MXNet's ``smooth_distribution``."""


def kld_histograms(joint: JointHistogram) -> tuple[np.ndarray, np.ndarray]:
    """The two count histograms of :func:`kld` over its linear bins: ``(P, Q)``, both float64."""
    fine = joint.bin_key & (NUM_BINS // 2 - 1)  # the stats bin of |x|
    lo, width = BIN_LOWER_EDGE[fine], BIN_WIDTH[fine]
    count = joint.count.astype(np.float64)
    occupied = joint.count > 0
    top = float(np.max((lo + width)[occupied]))  # A
    position = np.minimum(np.floor((lo + 0.5 * width) * (KLD_BINS / top)), KLD_BINS - 1)
    position = np.where(fine == 0, 0, position).astype(np.int64)  # zero's stats bin: at 0
    p = np.bincount(position, weights=count, minlength=KLD_BINS)
    kept = occupied & ~joint.saturated
    flushed = kept & (joint.q_value == 0.0)
    if flushed.any() and float(np.max((lo + width)[flushed])) > top / KLD_BINS:
        position = np.where(flushed, 0, position)  # the zero group reaches past bin 0
    q = np.bincount(position[kept], weights=count[kept], minlength=KLD_BINS)
    return p, q


KLD_TIE_ATOL = 1e-3
"""kld values this close to the best tie, and mse chooses among them (:mod:`fp8core.search`)."""


@_register(needs_histogram=True, tie_atol=KLD_TIE_ATOL)
def kld(e: ErrorSums) -> float:
    """KL divergence of x's linear magnitude histogram P from the histogram Q that q keeps of it.

    Entropy calibration as TensorRT and onnxruntime (``calibrate.py``, ``get_entropy_threshold``)
    do it - P a linear histogram, the clipped tail left out of Q, KL(P||Q) smoothed - fitted to
    FP8 with power-of-two scales:

    * **Bins.** ``KLD_BINS = 2048`` linear bins of width ``w = A / 2048`` over ``[0, A]``,
      A the largest magnitude. ``P(b)``: the number of values in bin b.
    * **Q.** R is the saturation bound: the format's largest value times ``2^s`` in the search,
      ``max |q|`` for a bare ``kld(x, q)`` (there a value rounded down onto the top q without
      saturating counts as saturated too; between formats that would decide, so the search
      gives R). A value with ``|x| > R`` is *saturated*. Q counts where the quantized tensor
      keeps each value, at the histogram's resolution: a saturated value is not in Q; a value
      flushed to zero is at 0, in bin 0, once the values flushed reach past ``w`` (below that,
      flushing has lost nothing at this resolution); every other value stays in its bin.
    * **Loss.** ``sum_b P(b)/N ln(P(b) / Qe(b))`` over the bins with ``P(b) > 0``, N values,
      ``Qe = Q + eps (P - Q)`` with ``eps = KLD_EPSILON = 1e-4`` (onnxruntime's and MXNet's
      smoothing constant): Qe > 0 wherever P is, so the loss is finite. Natural log.
    * **Ties.** kld values within ``KLD_TIE_ATOL = 1e-3`` nats of the best tie in the search,
      and the smallest mse among them wins (:mod:`fp8core.search`).

    Bounds: ``Qe >= eps P`` gives every term ``<= P/N ln(1/eps)``, so
    ``kld <= ln(1/eps) = 9.21``, reached when every value saturates; Qe sums to at most N over
    P's support, so by Gibbs' inequality ``kld >= 0`` (clamped at 0 against rounding).

    What it measures: the share of the values the quantized tensor loses - saturated, or
    flushed to zero from further out than ``A / 2048`` - each at up to ``ln(1/eps) = 9.2`` nats
    times its share (less where its bin also keeps other values). Flushing values that share bin
    0 with zero is free, however many they are: next to A they are below FP8's own resolution.
    1e-3 nats, the tie, is the cost of losing about one value in 10^4; among the candidates that
    lose (almost) nothing, mse - which measures the rounding itself - decides. In practice:
    the smallest mse among the scales at which (almost) nothing saturates.

    Why not more of TensorRT:

    * TensorRT also spreads each quantized bin's mass evenly over its nonzero bins in Q (the
      "expand"), so that Q loses the shape inside each step; with INT8's equal steps and a
      moving threshold, that term trades resolution against clipping. FP8's relative grid is
      the same at every power-of-two scale in the normal range, so it cannot tell scales apart; it
      only compares formats, and there it measures where repeated values fall (flat image
      regions, swish's minimum, clips: a spike inside a step costs ``ln(steps' bins)`` whatever
      its rounding error), not error. Measured with it (spread over the stats bins): on
      ddddocr's detector kld chose E5M2 for 28 of 67 Conv inputs, 27.3 dB output SNR against
      mse's 29.5 dB (activations only); on a 64-value PP-OCR weight the counting noise chose E5M2
      at 5 dB below E4M3.
    * TensorRT folds the clipped tail into P's last bin and compares P and Q on
      ``[0, threshold]``. That needs its floor on the threshold (128 of 2048 bins): a threshold
      inside bin 0 makes P and Q the same single spike (kld 0, the best). Here P keeps every
      value where it is, over ``[0, A]`` for every candidate, so no floor is needed; and when
      every nonzero value saturates, the next scale's Q only adds the values equal to its R
      (:func:`fp8core.search.candidate_scales` relies on this).

    Why linear bins, not :mod:`fp8core.stats`' log-scale bins (32 per binade, down to float32's
    smallest values): on those, flushing the many tiny values merges thousands of bins and
    saturating the few large ones merges a handful, so a kld over them prefers to saturate
    (tests/test_kld.py keeps that form: on activations with outliers at 50-100 std it saturates
    them, 25-28 dB below mse); on a text-line recogniser it takes the character error rate from
    0.125% (FP32) to 99%.

    **From the bins.** P and Q need, per value, only its stats bin, whether ``q = 0`` and
    whether it is saturated. A stats bin goes to the linear bin of its centre ``lo + width/2``
    (stats bin 0, zero and magnitudes below ``2^-131``, to bin 0), ``A`` is the upper edge of
    the highest occupied stats bin (``max |x| <= A < max |x| (1 + 1/32)``), and both forms
    (brute force and binned) do exactly this, so they agree exactly; saturation is decided per
    value in the brute-force form and exactly from the bin for FP8 round trips
    (:func:`_joint_from_bins`). The approximation, against linear bins of the exact ``|x|``: a
    stats bin is at most ``|x| / 32`` wide; below ``A / 64`` that is narrower than a linear
    bin, so a value lands in its own linear bin or a neighbour; above, P is the stats bins
    themselves, 32 per binade. tests/test_kld.py bounds the difference on raw arrays.
    """
    j = e.joint
    if j is None:
        raise ValueError("kld needs the joint histogram (ErrorSums built with with_histogram)")
    p, q = kld_histograms(j)
    used = p > 0
    p, q = p[used], q[used]
    return max(0.0, float(np.sum(kld_terms(p, q)) / p.sum()))


def kld_terms(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The terms ``P ln(P / Qe)`` of :func:`kld`, ``Qe = Q + eps (P - Q)``, for bins with P > 0."""
    smoothed = q + KLD_EPSILON * (p - q)
    return p * np.log(p / smoothed)


class KldRows:
    """:func:`kld` of every row of ``x`` (2-D) at once, for round trips given by two counts per row.

    ``KldRows(x)(n_saturated, n_flushed)[r]`` equals ``kld(x[r], q[r])`` (up to the order of the
    floating-point sum) for any round trip ``q[r]`` of the row whose saturated values
    (``|x| > max |q|``) are its ``n_saturated[r]`` largest magnitudes - always so - and whose
    flushed values (``q = 0``, not saturated) are its ``n_flushed[r]`` smallest: so whenever
    ``|q|`` does not decrease as ``|x|`` grows, as for an FP8 round trip with one scale per row.
    :func:`kld_rows` takes the round trips themselves.

    Why this is cheap: P depends on x alone, and Q equals P in every linear bin that loses no
    value, where the term ``P ln(P/Qe)`` is exactly 0. The values lost are a run of the sorted
    magnitudes at each end: the largest (saturated), and the smallest (flushed) when they reach
    past bin 0. So a row's kld is the sum of the terms of the bins emptied at either end
    (``P ln(P / (eps P))``, summed once per row from each end), of at most two bins partly
    emptied, and of bin 0 (which gains the flushed values): a few look-ups per row and round
    trip, whatever the row's length.
    """

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"KldRows needs a 2-D array of non-empty rows, got shape {list(x.shape)}")
        rows, n = x.shape
        self.magnitudes = np.sort(np.abs(x), axis=1)  # what the callers count in
        flat = self.magnitudes.reshape(-1)
        fine = flat.view(np.uint32) >> np.uint32(KEY_SHIFT)  # the stats bin of |x|
        # Values sharing a stats bin share a linear bin: work on the (row, stats bin) groups.
        new = np.empty(flat.size, bool)
        new[0] = True
        np.not_equal(fine[1:], fine[:-1], out=new[1:])
        new[::n] = True
        g_start = np.flatnonzero(new)
        del new
        g_row = g_start // n
        g_fine = fine[g_start].astype(np.int64)
        del fine
        lo, width = BIN_LOWER_EDGE[g_fine], BIN_WIDTH[g_fine]
        ub = lo + width
        row_first = np.searchsorted(g_start, np.arange(rows) * n)
        self.top = ub[np.r_[row_first[1:], g_start.size] - 1]  # A: magnitudes ascend in a row
        g_pos = np.minimum(np.floor((lo + 0.5 * width) * (KLD_BINS / self.top[g_row])), KLD_BINS - 1)
        g_pos = np.where(g_fine == 0, 0, g_pos).astype(np.int64)
        # Runs: consecutive groups of a row in the same linear bin (the bins with P > 0, in order).
        run = np.ones(g_start.size, bool)
        run[1:] = (g_pos[1:] != g_pos[:-1]) | (g_row[1:] != g_row[:-1])
        r_start, r_row, r_pos = g_start[run], g_row[run], g_pos[run]
        r_size = np.diff(np.r_[r_start, flat.size])
        r_first = np.searchsorted(r_start, np.arange(rows) * n)
        r_index = np.arange(r_start.size) - r_first[r_row]
        width_runs = int(r_index.max()) + 1
        self._start = np.full((rows, width_runs), n, np.int64)
        self._start[r_row, r_index] = r_start - r_row * n
        self._end = np.full((rows, width_runs), n, np.int64)
        self._end[r_row, r_index] = r_start - r_row * n + r_size
        self._pos = np.full((rows, width_runs), -1, np.int64)
        self._pos[r_row, r_index] = r_pos
        p = r_size.astype(np.float64)
        emptied = kld_terms(p, np.zeros_like(p))
        emptied[r_index == 0] = 0.0  # a row's first run is always evaluated on its own
        full = np.zeros((rows, width_runs))
        full[r_row, r_index] = emptied
        # emptied terms of the runs before / after each run, summed from the row's ends inwards
        self._before = np.zeros_like(full)
        np.cumsum(full[:, :-1], axis=1, out=self._before[:, 1:])
        self._after = np.zeros_like(full)
        self._after[:, :-1] = np.cumsum(full[:, :0:-1], axis=1)[:, ::-1]
        self._run_of = np.repeat(r_index.astype(np.int32), r_size).reshape(rows, n)
        self.n = n

    def __call__(self, n_saturated: np.ndarray, n_flushed: np.ndarray) -> np.ndarray:
        """kld per row (float64) when the ``n_saturated`` largest and ``n_flushed`` smallest
        magnitudes of each row are saturated and flushed (the two sets must not overlap).

        The counts broadcast against the rows: ``[k, rows]`` counts give ``[k, rows]`` losses,
        k round trips of every row at once."""
        n = self.n
        rows = np.arange(self.magnitudes.shape[0])
        n_sat = np.asarray(n_saturated, np.int64) + np.zeros_like(rows)
        n_fl = np.asarray(n_flushed, np.int64) + np.zeros_like(rows)
        if np.any(n_sat < 0) or np.any(n_fl < 0) or np.any(n_sat + n_fl > n):
            raise ValueError(f"saturated and flushed counts must be disjoint parts of {n} values")
        # flushing counts only when it reaches past bin 0: the largest flushed value's stats bin
        largest = self.magnitudes[rows, np.maximum(n_fl - 1, 0)].view(np.uint32) >> np.uint32(KEY_SHIFT)
        reach = BIN_LOWER_EDGE[largest] + BIN_WIDTH[largest]
        moved = np.where((n_fl > 0) & (reach > self.top / KLD_BINS), n_fl, 0)
        first_sat = n - n_sat
        flush_run = self._run_of[rows, np.maximum(moved - 1, 0)]
        sat_run = self._run_of[rows, np.minimum(first_sat, n - 1)]
        total = (np.where(moved > 0, self._before[rows, flush_run], 0.0)
                 + np.where(n_sat > 0, self._after[rows, sat_run], 0.0))
        # the runs evaluated on their own: the first, and the two where the emptied ends stop
        for run, own in ((np.zeros_like(n_sat), True),
                         (flush_run, (moved > 0) & (flush_run != 0)),
                         (sat_run, (n_sat > 0) & (sat_run != 0) & ~((moved > 0) & (sat_run == flush_run)))):
            start, end = self._start[rows, run], self._end[rows, run]
            lost = (np.maximum(0, np.minimum(end, moved) - start)
                    + np.maximum(0, end - np.maximum(start, first_sat)))
            p = (end - start).astype(np.float64)
            q = p - lost + np.where(self._pos[rows, run] == 0, moved, 0)  # bin 0 gains the flushed
            with np.errstate(divide="ignore", invalid="ignore"):
                total = total + np.where(own & (p > 0), kld_terms(p, q), 0.0)
        return np.maximum(0.0, total / n)


def kld_rows(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """:func:`kld` of every row pair ``(x[r], q[r])`` of two 2-D arrays, by :class:`KldRows`.

    Raises ValueError unless each row's flushed values (``q = 0``, not saturated) are its
    smallest magnitudes (true when ``|q|`` does not decrease as ``|x|`` grows)."""
    x32, q32 = np.asarray(x, np.float32), np.asarray(q, np.float32)
    if x32.shape != q32.shape or x32.ndim != 2:
        raise ValueError(f"x and q must be 2-D arrays of one shape, got {list(x32.shape)} and {list(q32.shape)}")
    mag = np.abs(x32)
    saturated = mag > np.max(np.abs(q32), axis=1, keepdims=True)
    flushed = (q32 == 0) & ~saturated
    kept = ~flushed & ~saturated
    if np.any(np.max(np.where(flushed, mag, -1.0), axis=1) > np.min(np.where(kept, mag, np.inf), axis=1)):
        raise ValueError("kld_rows: a row flushes a value larger than one it keeps")
    return KldRows(x32)(saturated.sum(axis=1), flushed.sum(axis=1))


def get_loss(name: str | Loss) -> Loss:
    """The registered loss called ``name`` (case-insensitive)."""
    if isinstance(name, Loss):
        return name
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise UnknownLossError(
            f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[key]


def snr_db(noise_to_signal: float) -> float:
    """Signal-to-noise ratio in dB from :func:`snr`'s ratio (inf when there is no noise)."""
    return math.inf if noise_to_signal <= 0 else -10.0 * math.log10(noise_to_signal)
