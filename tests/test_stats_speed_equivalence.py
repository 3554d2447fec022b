"""The fast :meth:`TensorStats.update` and the threaded capture give bit for bit the statistics of
the plain algorithm they replaced.

:func:`reference_update` below is that algorithm, kept verbatim (float64 deviations from each
bin's reference, one ``np.bincount`` per sum, per :data:`CHUNK` values). The fast path reads the
deviations as integers off the float32 bits and packs counts into the bincount weights (module
docstring of :mod:`fp8core.stats`); these tests pin that it changes no bit of any statistic,
serialised image included, on data that hits every branch: zeros of both signs, grid values,
subnormals, the top binade, NaN/inf, float16 and float64 inputs, strided arrays, and sizes that
are not multiples of the chunk.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from fp8core.calibration import ArraySource
from fp8core.capture import capture_stats
from fp8core.runtime import make_session, session_options
from fp8core.stats import (BIN_REFERENCE, CHUNK, GRID_LOW_MASK, KEY_SHIFT, NUM_BINS, NUM_EDGE_SLOTS,
                           Moments, TensorStats)
import models


def _reference_chunk(s: TensorStats, v: np.ndarray) -> None:
    if not np.isfinite(v).all():
        nan = np.isnan(v)
        s.nan_count += int(nan.sum())
        s.posinf_count += int((v == np.inf).sum())
        s.neginf_count += int((v == -np.inf).sum())
        v = v[np.isfinite(v)]
    if v.size == 0:
        return
    bits = v.view(np.uint32)
    key = (bits >> KEY_SHIFT).astype(np.intp)
    on_grid = (bits & GRID_LOW_MASK) == 0
    v64 = v.astype(np.float64)
    dev = v64 - np.take(BIN_REFERENCE, key)
    edges = np.bincount(key[on_grid] >> 1, minlength=NUM_EDGE_SLOTS)
    s.edge_count += edges
    s.interior_count += np.bincount(key, minlength=NUM_BINS)
    s.interior_count[0::2] -= edges
    s.sum_dev += np.bincount(key, weights=dev, minlength=NUM_BINS)
    dev *= dev
    s.sum_dev_sq += np.bincount(key, weights=dev, minlength=NUM_BINS)
    n = v64.size
    mean = float(v64.sum()) / n
    c = v64
    c -= mean
    c2 = c * c
    m2 = float(c2.sum())
    c *= c2
    m3 = float(c.sum())
    c2 *= c2
    m4 = float(c2.sum())
    s._merge_moments(Moments(n, mean, m2, m3, m4))
    s.min = min(s.min, float(v.min()))
    s.max = max(s.max, float(v.max()))


def reference_update(s: TensorStats, x: np.ndarray) -> TensorStats:
    flat = np.ascontiguousarray(np.asarray(x), dtype=np.float32).reshape(-1)
    for start in range(0, flat.size, CHUNK):
        _reference_chunk(s, flat[start:start + CHUNK])
    return s


def assert_identical(a: TensorStats, b: TensorStats) -> None:
    for name in TensorStats._SCALARS:  # repr: tells -0.0 from 0.0 and the last bit of a float
        assert repr(getattr(a, name)) == repr(getattr(b, name)), name
    for name in ("interior_count", "edge_count", "sum_dev", "sum_dev_sq"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.view(np.uint8).tobytes() == y.view(np.uint8).tobytes(), name
    assert a.to_bytes() == b.to_bytes()


def _bits(rng, n, dtype=np.uint32):
    return rng.integers(0, 1 << (8 * np.dtype(dtype).itemsize), n, dtype=np.uint64).astype(dtype)


F32 = np.finfo(np.float32)
CASES = {
    "relu": lambda r: np.maximum(r.standard_normal(3 * CHUNK + 123, dtype=np.float32), 0),
    "relu_both_zeros": lambda r: np.where(r.random(CHUNK + 7) < 0.3, np.float32(-0.0),
                                          np.maximum(r.standard_normal(CHUNK + 7, dtype=np.float32), 0)),
    "few_zeros": lambda r: np.where(r.random(CHUNK) < 0.05, 0, r.standard_normal(CHUNK)).astype(np.float32),
    "normal": lambda r: r.standard_normal(2 * CHUNK + 1, dtype=np.float32),
    "wide": lambda r: (r.standard_normal(CHUNK) * np.exp2(r.integers(-150, 127, CHUNK))).astype(np.float32),
    "bit_patterns": lambda r: _bits(r, 2 * CHUNK).view(np.float32),  # NaN, inf, subnormals, all of it
    "grid": lambda r: (r.integers(-40, 40, CHUNK + 5) / 4).astype(np.float32),
    "grid_and_not": lambda r: np.where(r.random(CHUNK) < 0.5, r.integers(-40, 40, CHUNK) / 4,
                                       r.standard_normal(CHUNK)).astype(np.float32),
    "grid_and_zeros": lambda r: np.where(r.random(CHUNK) < 0.5, 0, r.integers(-8, 8, CHUNK) / 2).astype(np.float32),
    "subnormal": lambda r: (_bits(r, CHUNK) & np.uint32(0x807FFFFF)).view(np.float32),
    "top_binade": lambda r: np.array([F32.max, -F32.max, 2.0**127 * 1.99, 2.0**127 * 1.97] * 300, np.float32),
    "constant": lambda r: np.full(CHUNK + 1, 3.3, np.float32),
    "zeros": lambda r: np.zeros(CHUNK // 2, np.float32),
    "negative_zeros": lambda r: np.full(100, -0.0, np.float32),
    "nan_and_inf": lambda r: np.where(r.random(CHUNK) < 0.1, np.nan,
                                      np.where(r.random(CHUNK) < 0.1, np.inf, r.standard_normal(CHUNK))).astype(np.float32),
    "only_nan": lambda r: np.full(1000, np.nan, np.float32),
    "empty": lambda r: np.zeros(0, np.float32),
    "scalar": lambda r: np.float32(-2.5),
    "float16": lambda r: r.standard_normal(CHUNK + 99).astype(np.float16),
    "float16_relu": lambda r: np.maximum(r.standard_normal(2 * CHUNK), 0).astype(np.float16),
    "float16_patterns": lambda r: _bits(r, 1 << 16, np.uint16).view(np.float16),
    "float64": lambda r: r.standard_normal(CHUNK + 3) * 1e3,
    "float64_beyond_float32": lambda r: np.array([1e39, -1e39, 1e-50, 3.0, np.nan]),
    "strided": lambda r: r.standard_normal((300, 250), dtype=np.float32).T[::2],
    "strided_1d": lambda r: np.maximum(r.standard_normal(3 * CHUNK, dtype=np.float32), 0)[::3],
    "strided_float16": lambda r: r.standard_normal((200, 400)).astype(np.float16)[:, ::2],
    "longdouble": lambda r: r.standard_normal(1000).astype(np.longdouble) * 7,
    "nchw": lambda r: np.maximum(r.standard_normal((2, 16, 40, 40), dtype=np.float32), 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_is_bit_identical_to_the_reference(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = CASES[name](rng)
    with np.errstate(all="ignore"):
        fast = TensorStats().update(x)
        reference = reference_update(TensorStats(), x)
        assert_identical(fast, reference)
        # a second batch, of another size: the running sums and the chunk boundaries carry on
        part = np.asarray(x).reshape(-1)[: max(1, np.asarray(x).size // 3)]
        assert_identical(fast.update(part), reference_update(reference, part))


def test_many_batches_of_odd_sizes_accumulate_identically():
    rng = np.random.default_rng(5)
    fast, reference = TensorStats(), TensorStats()
    for size in (1, CHUNK - 1, CHUNK, CHUNK + 1, 7, 3 * CHUNK + 17, 0, 1000):
        x = np.maximum(rng.standard_normal(size, dtype=np.float32) * rng.uniform(0.1, 100), 0)
        fast.update(x)
        reference_update(reference, x)
    assert_identical(fast, reference)


def test_chunk_sums_are_exact_at_the_bounds_of_the_packing():
    """Every value of a chunk at the largest deviation of its bin, one sign: |sum k| = 2^33 and
    sum k^2 = 2^51, the bounds the packed bincount weights must hold exactly."""
    bits = np.full(CHUNK, (127 << 23) | (1 << KEY_SHIFT), np.uint32)  # odd bin, k = -2^18
    x = bits.view(np.float32)
    assert_identical(TensorStats().update(x), reference_update(TensorStats(), x))
    x2 = ((np.uint32(127 << 23) | np.uint32((1 << KEY_SHIFT) - 1)) * np.ones(CHUNK, np.uint32)).view(np.float32)
    assert_identical(TensorStats().update(x2), reference_update(TensorStats(), x2))  # k = 2^18 - 1


def test_update_from_several_threads_is_the_single_thread_result():
    """Each thread has its own work arrays: concurrent updates of different tensors do not mix."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    arrays = [np.maximum(rng.standard_normal(2 * CHUNK + i, dtype=np.float32), 0) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda a: TensorStats().update(a), arrays))
    for got, a in zip(threaded, arrays):
        assert_identical(got, reference_update(TensorStats(), a))


def test_pipelined_capture_equals_folding_each_run_in_order():
    """capture_stats folds each run in on another thread while onnxruntime computes the next run;
    every tensor must still see its batches in order and in the same pieces, so the statistics
    equal a plain loop over the same runs."""
    import fp8core.capture as capture

    model = models.cnn(seed=3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 3, 8, 8)).astype(np.float32)
    tensors = ["x", "r1", "f", "g"]
    got = capture_stats(model, tensors, ArraySource(Path("x.npz"), {"x": x}), batch_size=8)

    session = make_session(model, session_options(), extra_outputs=tensors)
    want = {name: TensorStats() for name in tensors}
    for lo in range(0, len(x), 8):
        batch = x[lo:lo + 8]
        for part in range(0, len(batch), capture.RUN_SAMPLES):
            outputs = session.run(tensors, {"x": batch[part:part + capture.RUN_SAMPLES]})
            for name, value in zip(tensors, outputs):
                reference_update(want[name], value)
    assert list(got) == tensors
    for name in tensors:
        assert_identical(got[name], want[name])
