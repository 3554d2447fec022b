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

The registry :data:`LOSSES` maps a name to a :class:`Loss`; :func:`get_loss` looks one up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from fp8core.stats import BinnedValues, bin_keys


class UnknownLossError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class JointHistogram:
    """Counts of values per (x's bin, q value); rows may repeat a pair (they add up)."""

    bin_key: np.ndarray  # int64, fp8core.stats bin of x
    q_value: np.ndarray  # float64, the FP8 round trip shared by those values
    count: np.ndarray  # int64


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


def error_sums_from_arrays(x: np.ndarray, q: np.ndarray, with_histogram: bool = False) -> ErrorSums:
    """Brute force: the sums straight from the values and their round trip, in float64."""
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
        joint=_joint_from_arrays(x32, q32) if with_histogram else None,
    )


def error_sums_from_bins(bins: BinnedValues, q: np.ndarray, with_histogram: bool = False) -> ErrorSums:
    """From the bins: ``q[i]`` is the FP8 round trip shared by every value of part ``i``."""
    q = np.asarray(q, dtype=np.float64)
    n = bins.count.astype(np.float64)
    s1, s2, r = bins.sum_dev, bins.sum_dev_sq, bins.reference
    c = r - q
    joint = JointHistogram(bins.key, q, bins.count) if with_histogram else None
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


def _joint_from_arrays(x32: np.ndarray, q32: np.ndarray) -> JointHistogram:
    keys = bin_keys(x32)
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
        counts = np.bincount(keys * groups + compact[ids], minlength=0)
        pairs = np.flatnonzero(counts)
        q_values = (present[pairs % groups].astype(np.uint32) << 16).view(np.float32)
        return JointHistogram(pairs // groups, q_values.astype(np.float64), counts[pairs])
    pairs, counts = np.unique(np.stack([keys, q32.astype(np.float64) + 0.0]), axis=1,
                              return_counts=True)
    return JointHistogram(pairs[0].astype(np.int64), pairs[1], counts)


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


@_register(needs_histogram=True, tie_atol=1e-12)
def kld(e: ErrorSums) -> float:
    """KL divergence ``sum_b P(b) ln(P(b) / Q(b))`` of x's histogram P against its quantized Q.

    The histogram is over the bins of :mod:`fp8core.stats` (sign, exponent and 5 mantissa bits
    of the float32 pattern: a log-scale histogram with 32 bins per binade). ``P(b)`` is the
    fraction of values in bin b. Quantization merges values into groups, one per distinct FP8
    value q; like TensorRT's entropy calibration, ``Q`` spreads each group's mass evenly over the
    bins the group occupies: ``Q(b) = sum over groups g present in b of (|g| / N) / bins(g)``.
    A group that stays in one bin costs nothing, and so does a group over equally filled bins;
    the cost comes from merging differently filled bins, i.e. values flushed to zero, saturated,
    or crushed into coarse subnormals (on a tiny tensor whose values each sit in their own bin,
    kld is 0 everywhere and the search's mse tie-break decides). Q is positive wherever P is, so
    no smoothing is needed. Natural log; clamped at 0 against rounding.
    Computed from integer counts only, so the binned and brute-force forms agree exactly.
    """
    j = e.joint
    if j is None:
        raise ValueError("kld needs the joint histogram (ErrorSums built with with_histogram)")
    group_values, group = np.unique(j.q_value + 0.0, return_inverse=True)  # -0 joins +0
    groups = group_values.size
    pair_ids, pair_index = np.unique(j.bin_key * groups + group.reshape(-1), return_inverse=True)
    pair_count = np.bincount(pair_index.reshape(-1), weights=j.count.astype(np.float64))
    pair_bin, pair_group = pair_ids // groups, pair_ids % groups
    group_count = np.bincount(pair_group, weights=pair_count, minlength=groups)
    group_bins = np.bincount(pair_group, minlength=groups)
    _, bin_index = np.unique(pair_bin, return_inverse=True)
    p_count = np.bincount(bin_index, weights=pair_count)
    q_count = np.bincount(bin_index, weights=(group_count / group_bins)[pair_group])
    total = p_count.sum()
    return max(0.0, float(np.sum(p_count * np.log(p_count / q_count)) / total))


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
