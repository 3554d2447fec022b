"""Choose the FP8 (format, scale) of a tensor: every candidate's loss, from the bins, in one pass.

For every format and every integer scale ``s`` in :func:`candidate_scales`, the FP8 value of each
bin part (:meth:`fp8core.stats.TensorStats.binned_values`) is obtained by rounding one
representative with :func:`fp8core.formats.round_trip` - the same encoder the model will use -
and the loss follows from the bin sums (:mod:`fp8core.losses`). Nothing is re-read from the data.
:func:`brute_force_search` is the reference: it round-trips every value for every candidate.

Choosing among candidates (both searches use :func:`choose`), deterministic:

1. the smallest loss wins; losses within ``TIE_RTOL * |best| + loss.tie_atol`` of the best tie
   (two evaluations of one mathematical value may differ in the last bits);
2. among tied candidates, the smallest mse wins (the more faithful one), with the same relative
   tolerance;
3. then the format listed first in ``formats``;
4. then the scale closest to 0, then the smaller scale.

Non-finite values are ignored (they are counted in the statistics); a tensor without a finite
value raises :class:`NoFiniteValuesError`. NaN losses rank last.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from fp8core.errors import FP8Error
from fp8core.formats import FP8Format, get_format, round_trip
from fp8core.losses import Loss, error_sums_from_arrays, error_sums_from_bins, get_loss, mse
from fp8core.stats import TensorStats

DEFAULT_FORMATS = ("F143", "F152")
SCALE_LIMITS = (-100, 100)
"""Scales ever tried. Real tensors need |s| < 40. Within +-100 every step of the Q/DQ pair is
exact in float32 for every format: ``x / 2^s`` only shifts the exponent (an underflow lands far
below the smallest FP8 subnormal, an overflow saturates), every float32 subnormal input rounds to
0, and ``q * 2^s`` is a normal float32. The binned losses rely on this."""
TIE_RTOL = 1e-9


class NoFiniteValuesError(FP8Error):
    """A tensor of the user's model or data with no finite value to choose a scale for."""


class ScaleRangeError(ValueError):
    """An explicit ``scales`` argument outside :data:`SCALE_LIMITS`. Internal: no flag sets it
    (the CLI's scales come from the search's own candidates or ``--fp8_params``, bounded there)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    format: str
    scale: int
    loss: float
    mse: float  # the second ranking key


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The winner and every candidate's loss (formats in the order given, scales ascending)."""

    loss_name: str
    format: str
    scale: int
    loss: float
    candidates: tuple[Candidate, ...]

    def loss_of(self, fmt: str | FP8Format, scale: int) -> float:
        name = get_format(fmt).name
        for c in self.candidates:
            if c.format == name and c.scale == scale:
                return c.loss
        raise KeyError(f"({name}, {scale}) was not a candidate of this search")

    def to_dict(self) -> dict:
        return {"loss_name": self.loss_name, "format": self.format, "scale": self.scale,
                "loss": self.loss, "candidates": [dataclasses.asdict(c) for c in self.candidates]}


def _ceil_log2(v: float) -> int:
    """Smallest integer k with ``v <= 2^k`` (v > 0), exactly."""
    mantissa, exponent = math.frexp(v)
    return exponent - 1 if mantissa == 0.5 else exponent


def candidate_scales(stats: TensorStats, fmt: str | FP8Format) -> range:
    """The scales that can win for ``fmt`` (whatever the loss), clipped to :data:`SCALE_LIMITS`.

    Let ``a`` be the largest and ``t`` the smallest nonzero magnitude, ``M`` the largest and
    ``mu`` the smallest positive FP8 value. Write ``q_s(x)`` for x's round trip at scale s.

    * Upper end ``s_zero = ceil(log2(a)) - log2(mu / 2)``, the smallest scale where every value
      rounds to 0 (``|x| / 2^s <= mu / 2``; exactly ``mu / 2`` is a tie and goes to the even
      neighbour 0). Every scale from ``s_zero`` up quantizes to all zeros: the same loss and mse,
      so by the tie rule the scale closest to 0 among them wins: ``max(s_zero, 0)``.
    * Lower end ``s_lo = max{s : M 2^s <= t}``. Take ``s < s_lo``: every nonzero value
      saturates at both s and s + 1 (``|x| >= t >= M 2^(s+1)``), so ``q = sign(x) M 2^s`` and
      ``sign(x) M 2^(s+1)``. At s + 1 every nonzero value's error ``|x| - M 2^s'`` is strictly
      smaller, so mse, mae and snr are strictly better; q is proportional to sign(x) at both
      scales, so cos_dist is equal; for kld, every nonzero value lies beyond the saturation
      bound ``M 2^s`` at s, and at s + 1 all but those exactly equal to ``M 2^(s+1)``: kld's P
      is the same, its Q the same or larger, so kld is the same or smaller - and then mse
      breaks a tie. So s + 1 beats s: no scale below ``s_lo`` can win. (``t`` is taken as the
      lower edge of its bin, which only widens the window.)

    Hence every winner lies in ``[s_lo, max(s_zero, 0)]``. E5M2 (the format with infinities)
    additionally starts where ``a / 2^s`` stays below ``2^127``: below that, float32 division
    overflows to inf, which its Q node keeps, and the binned evaluation does not model it.
    A tensor whose finite values are all 0 is exact at every scale, so the window is ``{0}``.
    """
    f = get_format(fmt)
    if stats.count == 0:
        raise NoFiniteValuesError(
            f"the tensor has no finite values ({stats.nan_count} NaN, "
            f"{stats.posinf_count + stats.neginf_count} inf); cannot choose an FP8 scale - "
            "check the model and the calibration data")
    if stats.nonzero_count == 0:
        return range(0, 1)
    a = stats.absmax
    t = stats.smallest_nonzero_magnitude_bound()
    half_min_subnormal_exponent = f.min_normal_exponent - f.mantissa_bits - 1
    s_zero = _ceil_log2(a) - half_min_subnormal_exponent
    s_lo = math.floor(math.log2(t / f.max))
    while math.ldexp(f.max, s_lo + 1) <= t:  # make the float log exact
        s_lo += 1
    while math.ldexp(f.max, s_lo) > t:
        s_lo -= 1
    if f.has_inf:
        s_lo = max(s_lo, _ceil_log2(a) - 127)
    low, high = SCALE_LIMITS
    return range(min(max(s_lo, low), high), min(max(s_zero, 0, low), high) + 1)


def _validated_scales(scales: Iterable[int]) -> list[int]:
    out = sorted({int(s) for s in scales})
    low, high = SCALE_LIMITS
    if not out or out[0] < low or out[-1] > high:
        raise ScaleRangeError(
            f"scales must be a non-empty set of integers in [{low}, {high}], got "
            f"{out[:1] + out[-1:] if out else 'none'}")
    return out


def _nan_last(v: float) -> float:
    return math.inf if math.isnan(v) else v


def choose(candidates: Sequence[Candidate], loss: Loss, formats: Sequence[str]) -> Candidate:
    """The winner by the ranking rules of this module's docstring."""
    best = min(_nan_last(c.loss) for c in candidates)
    tied = [c for c in candidates if _nan_last(c.loss) <= best + TIE_RTOL * abs(best) + loss.tie_atol]
    best_mse = min(_nan_last(c.mse) for c in tied)
    tied = [c for c in tied if _nan_last(c.mse) <= best_mse * (1.0 + TIE_RTOL)]
    rank = {name: i for i, name in enumerate(formats)}
    return min(tied, key=lambda c: (rank[c.format], abs(c.scale), c.scale))


def _result(loss: Loss, candidates: list[Candidate], formats: Sequence[str]) -> SearchResult:
    win = choose(candidates, loss, formats)
    return SearchResult(loss.name, win.format, win.scale, win.loss, tuple(candidates))


def _format_names(formats: Iterable[str | FP8Format]) -> list[str]:
    names = list(dict.fromkeys(get_format(f).name for f in formats))
    if not names:
        raise ValueError("formats is empty; give at least one FP8 format, e.g. ('F143', 'F152')")
    return names


def search(stats: TensorStats, loss_name: str = "kld",
           formats: Iterable[str | FP8Format] = DEFAULT_FORMATS,
           scales: Iterable[int] | None = None) -> SearchResult:
    """Best (format, scale) for the tensor summarised by ``stats``, from the bins alone.

    ``scales=None`` tries :func:`candidate_scales` of each format (provably enough); otherwise
    exactly the given scales for every format.
    """
    loss = get_loss(loss_name)
    names = _format_names(formats)
    if stats.count == 0:
        candidate_scales(stats, names[0])  # raises the explanatory error
    bins = stats.binned_values()
    candidates = []
    for name in names:
        tried = candidate_scales(stats, name) if scales is None else _validated_scales(scales)
        for s in tried:
            q = round_trip(bins.representative, name, s)
            sums = error_sums_from_bins(bins, q, loss.needs_histogram,
                                        math.ldexp(get_format(name).max, s))
            candidates.append(Candidate(name, s, loss.of_sums(sums), mse.of_sums(sums)))
    return _result(loss, candidates, names)


def brute_force_search(x: np.ndarray, loss_name: str,
                       formats: Iterable[str | FP8Format] = DEFAULT_FORMATS,
                       scales: Iterable[int] = range(-20, 21)) -> SearchResult:
    """Reference: round-trip every finite value of ``x`` (as float32) for every candidate."""
    loss = get_loss(loss_name)
    names = _format_names(formats)
    values = np.asarray(x, dtype=np.float32).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise NoFiniteValuesError("the tensor has no finite values; cannot choose an FP8 scale")
    candidates = []
    for name in names:
        for s in _validated_scales(scales):
            sums = error_sums_from_arrays(values, round_trip(values, name, s),
                                          loss.needs_histogram, math.ldexp(get_format(name).max, s))
            candidates.append(Candidate(name, s, loss.of_sums(sums), mse.of_sums(sums)))
    return _result(loss, candidates, names)


def search_weight(array: np.ndarray, loss_name: str = "kld",
                  formats: Iterable[str | FP8Format] = DEFAULT_FORMATS,
                  scales: Iterable[int] | None = None) -> SearchResult:
    """:func:`search` on a tensor held in memory (a weight): builds its statistics first."""
    return search(TensorStats.from_array(array), loss_name, formats, scales)
