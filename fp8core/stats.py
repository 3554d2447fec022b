"""Streaming, mergeable statistics of one tensor: moments and the float32 bit-pattern bins.

A :class:`TensorStats` is fed batch by batch (:meth:`TensorStats.update`), merged across workers
(:meth:`TensorStats.merge`) and cached (:meth:`TensorStats.to_bytes`). Its memory does not grow
with the number of values. It holds:

* counts: finite values, NaN, +inf, -inf. Non-finite values are counted and otherwise ignored:
  every other statistic, and the search, see the finite values only.
* moments of the finite values, in float64, merged with Chan/Pebay's pairwise update (stable for
  any batch sizes): mean, population variance ``M2/n``, skewness ``sqrt(n) M3 / M2^1.5`` and
  excess kurtosis ``n M4 / M2^2 - 3`` (both 0 for a constant tensor), min, max, absmax.
* the bins of SPEC section 9, from which every loss of every (format, power-of-two scale) FP8
  candidate is computed exactly (:mod:`fp8core.losses`, :mod:`fp8core.search`).

The bins
--------
Values are taken as float32 (what ``QuantizeLinear`` sees; float16 converts exactly). A value's
**bin** is the top ``1 + 8 + K`` bits of its float32 pattern (sign, exponent, the first ``K = 5``
mantissa bits): ``key = bits >> 18``, 2 * 256 * 32 = 16384 bins, each a half-open interval of
magnitudes ``[lo, lo + w)`` with ``w = 2^(e - 5)`` inside binade ``[2^e, 2^(e+1))``.

Why one bin has one FP8 value. With scale ``s`` the encoder rounds ``x / 2^s``; dividing a
float32 by a power of two only shifts its exponent (exact at the scales the search uses, see
:data:`fp8core.search.SCALE_LIMITS`). The value ``x`` is rounded up or down at the *rounding
points*, the midpoints between neighbouring FP8 values. An FP8 value has at most ``m + 1``
significant bits (m = 3 for E4M3, 2 for E5M2), so a midpoint has at most ``m + 2``: its float32
pattern has only its first ``m + 1 <= 4`` mantissa bits set, whatever the format, the scale, or
whether it is a subnormal or the saturation midpoint. Call the numbers whose float32 mantissa has
nothing set below its first 4 bits the **grid** (multiples of ``2^(e-4)`` in binade e). Every
rounding point is on the grid, every FP8 value times ``2^s`` is on the grid (a fortiori), and with
K = 5 every grid point is the lower edge of an even bin (5th mantissa bit 0). Therefore:

* inside a bin there is no rounding point except possibly its lower edge, so every value of the
  bin other than that edge rounds to the same FP8 value ``q``;
* the edge value itself may be a tie (exactly halfway: ties go to the even neighbour, which may be
  the other side). Edge values are counted apart (``edge_count``), they are all the same number,
  and the search rounds that number itself;
* no FP8 value lies strictly inside a bin, so ``x - q`` has one sign across the bin.

K = 4 would already separate the rounding points; the fifth bit buys numerical accuracy: each
value is stored as its deviation ``d = x - r`` from its bin's **reference** ``r``, the grid
point nearest to it (the bin's lower edge for an even bin, its upper edge for an odd bin), and
the bins keep ``n``, ``sum d`` and ``sum d^2``. In ``x - q = d + (r - q)`` the two terms can
only have opposite signs when ``q`` lies beyond the bin on the side away from ``r``; ``q`` is on
the grid, so then ``|r - q| >= 2^(e-4) >= 2|d|``. Expanding
``sum (x - q)^2 = sum d^2 + 2 (r - q) sum d + n (r - q)^2`` therefore never cancels by more than
a factor of 4, even when every value sits right next to its FP8 value. Edge values have ``d = 0``.
(``r`` is computed in float64, so the top bins of float32 need no special case; ``x - r`` is exact
in float64.)

Memory: three 16384-entry arrays (interior count int64, sum d and sum d^2 float64) and one
8192-entry edge count (int64, even bins only) = 458,752 bytes per tensor, whatever the number of
values; :meth:`TensorStats.to_dict` stores only the occupied bins.

How :meth:`TensorStats.update` sums the bins, exactly
-----------------------------------------------------
Values are folded in chunks of :data:`CHUNK` = 2^15 finite values; each chunk's per-bin sums are
added to the running sums in chunk order. Inside a bin of binade e every value and its reference
are multiples of the binade's float32 spacing ``u = 2^(e - 23)`` (``2^-149`` for the subnormals,
which share e = -126), and the float32 bit patterns are evenly spaced across a binade and into the
next one, so ``d = sign * k * u`` with ``k`` an integer read straight off the bits: the low
``18 + 1`` bits of the pattern (the bin's parity and the bits below the key) as a signed 19-bit
number, ``|k| <= 2^18`` (an even bin's ``k`` is the offset above its lower edge, an odd bin's the
negative distance to its upper edge; ``k = 0`` exactly on the grid). So within one chunk
``|sum k| <= 2^33`` and ``sum k^2 <= 2^51``: every partial sum of ``d`` or ``d^2`` over values of one
bin is an integer times ``u`` (or ``u^2``) below ``2^53`` of them, exact in float64 in any order.
A chunk's per-bin sums are therefore exact whatever computes them, and the running sums see the
same float64 additions, chunk by chunk, as summing the float64 deviations ``x - r`` value by value
(``np.bincount`` with those weights) gives. One ``np.bincount`` weighted by ``k + 2^35`` returns
each bin's count and ``sum k`` together (``count * 2^35 + sum k``, exact, below 2^51), one weighted
by ``k^2`` its ``sum k^2``. Grid values (``d = 0``: edge values) are counted apart: zeros, most of
a ReLU output, directly, and left out of the bincounts when they are many; other grid values take
the key ``NUM_BINS + key``, whose bins count them. Each chunk's moments are computed in float64
with numpy's pairwise sums and merged with Pebay's formulas (:class:`Moments`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading

import numpy as np

MANTISSA_BITS_KEPT = 5
"""K: mantissa bits kept in a bin key (4 would separate every rounding point, see the module doc)."""
KEY_SHIFT = 23 - MANTISSA_BITS_KEPT
NUM_BINS = 1 << (1 + 8 + MANTISSA_BITS_KEPT)
NUM_EDGE_SLOTS = NUM_BINS // 2
GRID_LOW_MASK = (1 << (KEY_SHIFT + 1)) - 1  # mantissa bits below the first 4: zero on the grid
CHUNK = 1 << 15
"""Values per vectorised step (and per partial sum: changing it changes the float64 rounding of the
running sums and moments, so cached statistics would no longer match). Its float64 work arrays
(256 KiB) stay in L2; they are allocated once per thread (:func:`_work_arrays`): a fresh
allocation per step costs page faults every time it is returned to the OS."""
FORMAT_VERSION = 1


class StatsFormatError(ValueError):
    """A serialised TensorStats that this version cannot read. Internal: only the statistics
    cache reads them, and it treats such an entry as stale and recomputes it."""


def bin_keys(x: np.ndarray) -> np.ndarray:
    """The bin of every value: the top 1+8+K bits of its float32 pattern (int64 keys)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    return (x32.view(np.uint32) >> KEY_SHIFT).astype(np.int64)


def _bin_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: lower edge (signed float64), width, reference (nearest grid point, signed)."""
    keys = np.arange(NUM_BINS, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # NaN patterns of the exponent-255 bins
        lower = (keys << KEY_SHIFT).view(np.float32).astype(np.float64)
    biased_exponent = (keys >> MANTISSA_BITS_KEPT) & 0xFF
    # float32 subnormals share exponent -126 with the smallest normal binade
    exponent = np.maximum(biased_exponent.astype(np.int64), 1) - 127
    width = np.ldexp(1.0, exponent - MANTISSA_BITS_KEPT)
    sign = np.where(keys >> (8 + MANTISSA_BITS_KEPT), -1.0, 1.0)
    odd = (keys & 1).astype(np.float64)
    reference = lower + sign * width * odd
    for table in (lower, width, reference):
        table[biased_exponent == 0xFF] = np.nan  # inf/NaN patterns: never binned
        table.setflags(write=False)
    return lower, width, reference


BIN_LOWER_EDGE, BIN_WIDTH, BIN_REFERENCE = _bin_tables()


def _spacing_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per bin: the float32 spacing u of its binade, signed like the bin (d = k * that), and u^2.
    Zero for the inf/NaN patterns, which are never binned."""
    keys = np.arange(NUM_BINS, dtype=np.int64)
    biased_exponent = (keys >> MANTISSA_BITS_KEPT) & 0xFF
    spacing = np.ldexp(1.0, np.maximum(biased_exponent, 1) - 127 - 23)
    spacing[biased_exponent == 0xFF] = 0.0
    signed = np.where(keys >> (8 + MANTISSA_BITS_KEPT), -spacing, spacing)
    squared = spacing * spacing  # >= 2^-298: no underflow in float64
    for table in (signed, squared):
        table.setflags(write=False)
    return signed, squared


_BIN_SPACING, _BIN_SPACING_SQ = _spacing_tables()
_DEVIATION_SHIFT = 32 - (KEY_SHIFT + 1)
"""Shifting the int32 pattern left then (arithmetically) right by this keeps its low 19 bits as a
signed number: k, the deviation in units of the bin's spacing (module docstring)."""
_COUNT_UNIT = 2.0**35
"""Bincount weight ``k + 2^35``: per bin ``count * 2^35 + sum k`` with ``|sum k| <= 2^33`` (< half a
unit) and the total below 2^51, so both come back exactly."""
_GRID_FLAG_SHIFT = NUM_BINS.bit_length() - 1
_FLOAT16_AS_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
"""Every float16 pattern as float32 (exact): a table lookup converts float16 faster than a cast."""
_FLOAT16_AS_FLOAT32.setflags(write=False)


class _WorkArrays:
    """Per-thread CHUNK-sized work arrays of :meth:`TensorStats.update` (about 1.4 MB)."""

    def __init__(self) -> None:
        self.f32 = np.empty(CHUNK, np.float32)
        self.u32 = np.empty(CHUNK, np.uint32)
        self.low = np.empty(CHUNK, np.uint32)
        self.bits = np.empty(CHUNK, np.uint32)
        self.i32 = np.empty(CHUNK, np.int32)
        self.key = np.empty(CHUNK, np.intp)
        self.a = np.empty(CHUNK, np.float64)
        self.b = np.empty(CHUNK, np.float64)
        self.mask = np.empty(CHUNK, np.bool_)


_THREAD_LOCAL = threading.local()


def _work_arrays() -> _WorkArrays:
    work = getattr(_THREAD_LOCAL, "work", None)
    if work is None:
        work = _THREAD_LOCAL.work = _WorkArrays()
    return work


def bin_interior_representative(keys: np.ndarray) -> np.ndarray:
    """A float32 strictly inside each bin and off the grid: it rounds like every non-edge value."""
    keys = np.asarray(keys, dtype=np.uint32)
    return ((keys << KEY_SHIFT) | np.uint32(1 << (KEY_SHIFT - 1))).view(np.float32)


def bin_edge_value(keys: np.ndarray) -> np.ndarray:
    """The lower edge of each (even) bin as float32: the one value there that may be a tie."""
    return (np.asarray(keys, dtype=np.uint32) << KEY_SHIFT).view(np.float32)


@dataclasses.dataclass(frozen=True)
class BinnedValues:
    """The occupied bins as a flat list of *parts*: values that all round to the same FP8 value.

    A part is either the non-edge values of one bin or the edge values of one even bin (all equal
    to ``reference``, with zero deviation). For every value x of a part, ``x = reference + d``.
    ``representative`` is a float32 that the encoder rounds exactly as it rounds each of them.
    """

    key: np.ndarray  # int64 bin key
    count: np.ndarray  # int64
    reference: np.ndarray  # float64
    sum_dev: np.ndarray  # float64, sum of d
    sum_dev_sq: np.ndarray  # float64, sum of d^2
    representative: np.ndarray  # float32

    @property
    def total(self) -> int:
        return int(self.count.sum())


@dataclasses.dataclass
class TensorStats:
    """Streaming statistics of one tensor's values; see the module docstring for the rules."""

    count: int = 0
    nan_count: int = 0
    posinf_count: int = 0
    neginf_count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    interior_count: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(NUM_BINS, np.int64))
    edge_count: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(NUM_EDGE_SLOTS, np.int64))
    sum_dev: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NUM_BINS))
    sum_dev_sq: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NUM_BINS))

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_array(cls, x: np.ndarray) -> TensorStats:
        stats = cls()
        stats.update(x)
        return stats

    def update(self, x: np.ndarray) -> TensorStats:
        """Fold a batch of values in (any shape; float64 is rounded to float32 first, as the
        float32 Q node would see it); returns self."""
        values = np.asarray(x)
        if not np.issubdtype(values.dtype, np.floating):
            raise TypeError(f"TensorStats takes floating-point arrays, got dtype {values.dtype}")
        flat = np.ascontiguousarray(values).reshape(-1)  # converted chunk by chunk below
        work = _work_arrays()
        for start in range(0, flat.size, CHUNK):
            part = flat[start:start + CHUNK]
            if part.dtype == np.float32:
                chunk = part
            elif part.dtype == np.float16:  # mode "clip": no defensive copy (indices < 2^16)
                chunk = _FLOAT16_AS_FLOAT32.take(part.view(np.uint16), out=work.f32[:part.size], mode="clip")
            else:  # float64 and wider: rounded to float32, as a cast rounds them
                chunk = work.f32[:part.size]
                chunk[...] = part
            self._update_chunk(chunk, work)
        return self

    def _update_chunk(self, v: np.ndarray, work: _WorkArrays) -> None:
        low, high = v.min(), v.max()  # NaN if there is one (numpy's min/max propagate NaN)
        if not (math.isfinite(low) and math.isfinite(high)):
            nan = np.isnan(v)
            self.nan_count += int(nan.sum())
            self.posinf_count += int((v == np.inf).sum())
            self.neginf_count += int((v == -np.inf).sum())
            v = v[np.isfinite(v)]
            if v.size == 0:
                return
            low, high = v.min(), v.max()
        n = v.size
        self._bin_chunk(v.view(np.uint32), work)

        # Central moments of the chunk, in place (np.dot would start BLAS threads).
        v64 = work.a[:n]
        v64[...] = v
        mean = float(v64.sum()) / n
        c = v64
        c -= mean
        c2 = np.multiply(c, c, out=work.b[:n])
        m2 = float(c2.sum())
        c *= c2
        m3 = float(c.sum())
        c2 *= c2
        m4 = float(c2.sum())
        self._merge_moment_sums(n, mean, m2, m3, m4)
        self.min = min(self.min, float(low))
        self.max = max(self.max, float(high))

    def _bin_chunk(self, bits: np.ndarray, work: _WorkArrays) -> None:
        """Add one chunk of finite values (their float32 patterns) to the bins (module docstring)."""
        n = bits.size
        low = np.bitwise_and(bits, GRID_LOW_MASK, out=work.low[:n])  # 0 on the grid: d = 0
        on_grid = n - int(np.count_nonzero(low))
        if on_grid:
            doubled = np.left_shift(bits, 1, out=work.u32[:n])  # 0 for +0 and -0
            zeros = n - int(np.count_nonzero(doubled))
            if zeros * 8 >= n:  # ReLU outputs: count the zeros here and bin the other values
                positive_zeros = int(np.count_nonzero(bits == 0))
                self.edge_count[0] += positive_zeros
                self.edge_count[NUM_EDGE_SLOTS // 2] += zeros - positive_zeros
                keep = np.not_equal(doubled, 0, out=work.mask[:n])
                n -= zeros
                on_grid -= zeros
                bits = np.compress(keep, bits, out=work.bits[:n])
                if on_grid:
                    low = np.bitwise_and(bits, GRID_LOW_MASK, out=work.low[:n])
        if n == 0:
            return
        key = np.right_shift(bits, KEY_SHIFT, out=work.key[:n], casting="unsafe")
        if on_grid:  # grid values take key NUM_BINS + key: those bins count the edges
            flag = np.subtract(low, 1, out=low)  # wraps to 2^32 - 1 on the grid, else < 2^19
            np.right_shift(flag, 31, out=flag)
            np.left_shift(flag, _GRID_FLAG_SHIFT, out=flag)
            np.bitwise_or(key, flag, out=key)
        k = np.left_shift(bits.view(np.int32), _DEVIATION_SHIFT, out=work.i32[:n])
        np.right_shift(k, _DEVIATION_SHIFT, out=k)
        k64 = work.a[:n]
        k64[...] = k
        packed = np.bincount(key, weights=np.add(k64, _COUNT_UNIT, out=work.b[:n]))
        squares = np.bincount(key, weights=np.multiply(k64, k64, out=k64))  # k^2 <= 2^36: exact
        if packed.size > NUM_BINS:
            edges = packed[NUM_BINS::2]
            slots = np.flatnonzero(edges != 0)
            self.edge_count[slots] += np.rint(edges[slots] * (1.0 / _COUNT_UNIT)).astype(np.int64)
            packed, squares = packed[:NUM_BINS], squares[:NUM_BINS]
        occupied = np.flatnonzero(packed != 0)  # (a float array's flatnonzero is 4x slower)
        packed = packed[occupied]
        counts = np.rint(packed * (1.0 / _COUNT_UNIT))
        sum_k = packed - counts * _COUNT_UNIT
        self.interior_count[occupied] += counts.astype(np.int64)
        self.sum_dev[occupied] += sum_k * _BIN_SPACING[occupied]
        self.sum_dev_sq[occupied] += squares[occupied] * _BIN_SPACING_SQ[occupied]

    # --- merging -------------------------------------------------------------------------
    def merge(self, other: TensorStats) -> TensorStats:
        """Fold ``other`` (statistics of other values of the same tensor) into self; returns self.

        Counts and bins add; moments combine with Pebay's formulas, so merging batch statistics
        in any grouping gives the single-stream result (to float64 rounding).
        """
        self.nan_count += other.nan_count
        self.posinf_count += other.posinf_count
        self.neginf_count += other.neginf_count
        self._merge_moments(Moments(other.count, other.mean, other.m2, other.m3, other.m4))
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.interior_count += other.interior_count
        self.edge_count += other.edge_count
        self.sum_dev += other.sum_dev
        self.sum_dev_sq += other.sum_dev_sq
        return self

    def _merge_moments(self, b: Moments) -> None:
        self._merge_moment_sums(b.n, b.mean, b.m2, b.m3, b.m4)

    def _merge_moment_sums(self, n: int, mean: float, m2: float, m3: float, m4: float) -> None:
        """Fold in the moments of ``n`` other values (:meth:`Moments.merged`, without the objects)."""
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.m3, self.m4 = n, mean, m2, m3, m4
            return
        self.count, self.mean, self.m2, self.m3, self.m4 = _merged_moments(
            self.count, self.mean, self.m2, self.m3, self.m4, n, mean, m2, m3, m4)

    def copy(self) -> TensorStats:
        return TensorStats.from_dict(self.to_dict())

    # --- derived statistics --------------------------------------------------------------
    @property
    def finite_count(self) -> int:
        return self.count

    @property
    def total_count(self) -> int:
        return self.count + self.nan_count + self.posinf_count + self.neginf_count

    @property
    def variance(self) -> float:
        """Population variance (ddof = 0) of the finite values."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def skewness(self) -> float:
        """``sqrt(n) M3 / M2^1.5`` (biased g1); 0 when the values are all equal."""
        if self.count == 0 or self.m2 <= 0.0:
            return 0.0
        return math.sqrt(self.count) * self.m3 / self.m2**1.5

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis ``n M4 / M2^2 - 3`` (biased g2); 0 when the values are all equal."""
        if self.count == 0 or self.m2 <= 0.0:
            return 0.0
        return self.count * self.m4 / self.m2**2 - 3.0

    @property
    def absmax(self) -> float:
        """Largest finite magnitude (0 when there are no finite values)."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def nonzero_count(self) -> int:
        zero_edges = int(self.edge_count[0] + self.edge_count[NUM_EDGE_SLOTS // 2])  # +0 and -0
        return self.count - zero_edges

    def smallest_nonzero_magnitude_bound(self) -> float:
        """A lower bound of the smallest nonzero |x|: the lower edge of its bin (the smallest
        positive float32 if it shares the bin of 0); 0 if there is no nonzero value."""
        occupied = self.interior_count > 0
        occupied[0::2] |= self.edge_count > 0
        occupied[[0, NUM_BINS // 2]] = self.interior_count[[0, NUM_BINS // 2]] > 0  # drop +-0
        keys = np.flatnonzero(occupied)
        if keys.size == 0:
            return 0.0
        lows = np.abs(BIN_LOWER_EDGE[keys])
        smallest = float(lows.min())
        return smallest if smallest > 0 else float(np.finfo(np.float32).smallest_subnormal)

    def summary(self) -> dict[str, float | int]:
        """The statistics that logs show (SPEC section 6)."""
        return {
            "count": self.count, "nan_count": self.nan_count, "posinf_count": self.posinf_count,
            "neginf_count": self.neginf_count, "mean": self.mean, "variance": self.variance,
            "std": self.std, "skewness": self.skewness, "kurtosis": self.kurtosis,
            "min": self.min if self.count else math.nan, "max": self.max if self.count else math.nan,
            "absmax": self.absmax,
        }

    def binned_values(self) -> BinnedValues:
        """The occupied bins as parts (non-edge values of a bin; edge values of an even bin)."""
        inner = np.flatnonzero(self.interior_count)
        edge_slots = np.flatnonzero(self.edge_count)
        edge = edge_slots * 2
        return BinnedValues(
            key=np.concatenate([inner, edge]).astype(np.int64),
            count=np.concatenate([self.interior_count[inner], self.edge_count[edge_slots]]),
            reference=np.concatenate([BIN_REFERENCE[inner], BIN_REFERENCE[edge]]),
            sum_dev=np.concatenate([self.sum_dev[inner], np.zeros(edge.size)]),
            sum_dev_sq=np.concatenate([self.sum_dev_sq[inner], np.zeros(edge.size)]),
            representative=np.concatenate(
                [bin_interior_representative(inner), bin_edge_value(edge)]),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the bins (the moments are a few scalars)."""
        return sum(a.nbytes for a in (self.interior_count, self.edge_count, self.sum_dev,
                                      self.sum_dev_sq))

    # --- serialisation -------------------------------------------------------------------
    _SCALARS = ("count", "nan_count", "posinf_count", "neginf_count", "mean", "m2", "m3", "m4",
                "min", "max")

    def to_dict(self) -> dict:
        """Plain dict of scalars and numpy arrays; only occupied bins are stored."""
        inner = np.flatnonzero(self.interior_count)  # sums are zero where the count is
        edges = np.flatnonzero(self.edge_count)
        out = {name: getattr(self, name) for name in self._SCALARS}
        out.update(
            version=FORMAT_VERSION, mantissa_bits_kept=MANTISSA_BITS_KEPT,
            bin_index=inner.astype(np.int32), bin_count=self.interior_count[inner],
            bin_sum_dev=self.sum_dev[inner], bin_sum_dev_sq=self.sum_dev_sq[inner],
            edge_index=edges.astype(np.int32), edge_count=self.edge_count[edges],
        )
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TensorStats:
        if int(d.get("version", -1)) != FORMAT_VERSION or int(
                d.get("mantissa_bits_kept", -1)) != MANTISSA_BITS_KEPT:
            raise StatsFormatError(
                f"serialised TensorStats has version {d.get('version')} / K "
                f"{d.get('mantissa_bits_kept')}, this code reads version {FORMAT_VERSION} / K "
                f"{MANTISSA_BITS_KEPT}; recompute the statistics (delete the cache)")
        stats = cls(**{name: (int(d[name]) if name.endswith("count") else float(d[name]))
                       for name in cls._SCALARS})
        inner = np.asarray(d["bin_index"], dtype=np.intp)
        stats.interior_count[inner] = d["bin_count"]
        stats.sum_dev[inner] = d["bin_sum_dev"]
        stats.sum_dev_sq[inner] = d["bin_sum_dev_sq"]
        stats.edge_count[np.asarray(d["edge_index"], dtype=np.intp)] = d["edge_count"]
        return stats

    def to_bytes(self) -> bytes:
        """An ``.npz`` image of :meth:`to_dict` (no pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in self.to_dict().items()})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TensorStats:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            d = {k: (npz[k] if npz[k].ndim else npz[k].item()) for k in npz.files}
        return cls.from_dict(d)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._SCALARS) and all(
            np.array_equal(getattr(self, n), getattr(other, n))
            for n in ("interior_count", "edge_count", "sum_dev", "sum_dev_sq"))


@dataclasses.dataclass(frozen=True)
class Moments:
    """Count, mean and central moment sums M2..M4 of a set of values; :meth:`merged` gives those of
    the union of two disjoint sets (used by TensorStats and by the streaming comparison statistics)."""

    n: int
    mean: float
    m2: float
    m3: float
    m4: float

    def merged(self, b: Moments) -> Moments:
        """Pebay (2008) eq. 2.1-2.4: the moments of the union of two disjoint sets."""
        if b.n == 0:
            return self
        if self.n == 0:
            return b
        return Moments(*_merged_moments(self.n, self.mean, self.m2, self.m3, self.m4,
                                        b.n, b.mean, b.m2, b.m3, b.m4))


def _merged_moments(an: int, amean: float, am2: float, am3: float, am4: float,
                    bn: int, bmean: float, bm2: float, bm3: float, bm4: float) -> tuple:
    """:meth:`Moments.merged` on plain numbers (both counts > 0): ``(n, mean, m2, m3, m4)``."""
    n = an + bn
    delta = bmean - amean
    na, nb = float(an), float(bn)
    mean = amean + delta * nb / n
    m2 = am2 + bm2 + delta**2 * na * nb / n
    m3 = (am3 + bm3 + delta**3 * na * nb * (na - nb) / n**2
          + 3.0 * delta * (na * bm2 - nb * am2) / n)
    m4 = (am4 + bm4 + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
          + 6.0 * delta**2 * (na * na * bm2 + nb * nb * am2) / n**2
          + 4.0 * delta * (na * bm3 - nb * am3) / n)
    return n, mean, m2, m3, m4
