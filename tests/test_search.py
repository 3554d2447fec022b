"""The binned search against brute force: every candidate's loss, the winner, the window.

Brute force (:func:`fp8core.search.brute_force_search`) round-trips every value with
:func:`fp8core.formats.round_trip` for every candidate; the binned search sees only the
statistics, built from several batches and merged. They must agree on every candidate's loss to
1e-9 relative and on the winner, on data chosen to hit every rounding regime.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fp8core import losses
from fp8core.formats import get_format, representable_values, round_trip
from fp8core.losses import KLD_BINS, KLD_EPSILON, LOSSES, UnknownLossError, get_loss
from fp8core.search import (SCALE_LIMITS, NoFiniteValuesError, ScaleRangeError,
                            brute_force_search, candidate_scales, search, search_weight)
from fp8core.stats import (BIN_LOWER_EDGE, BIN_WIDTH, NUM_BINS, BinnedValues, TensorStats,
                           bin_interior_representative, bin_keys)

FORMATS = ("F143", "F152")
WIDE = range(-60, 61)
RTOL = 1e-9
ATOL = {"mse": 0.0, "mae": 0.0, "snr": 1e-15, "cos_dist": 1e-15, "kld": 1e-12}


def fp8_midpoints(fmt: str, scales) -> np.ndarray:
    """Values exactly halfway between neighbouring FP8 values (ties) at the given scales."""
    v = representable_values(fmt)
    mids = (v[:-1] + v[1:]) / 2
    return np.concatenate([mids * 2.0**s for s in scales])


def tie_heavy(rng) -> np.ndarray:
    ties = np.concatenate([fp8_midpoints("F143", (-3, 0, 2)), fp8_midpoints("F152", (-1, 4))])
    exact = representable_values("F143") * 2.0**-2
    x = np.concatenate([np.repeat(ties, 5), exact, rng.standard_normal(3000)])
    return (x * rng.choice([-1.0, 1.0], x.size)).astype(np.float32)


DISTRIBUTIONS = {
    "normal": lambda rng: rng.normal(0.0, 0.5, 20000).astype(np.float32),
    "laplace": lambda rng: rng.laplace(0.0, 2.0, 20000).astype(np.float32),
    "student_t2": lambda rng: rng.standard_t(2, 20000).astype(np.float32),
    "relu": lambda rng: np.maximum(rng.normal(0.2, 1.0, 20000), 0).astype(np.float32),
    "tiny_subnormal": lambda rng: (rng.standard_normal(20000) * 3e-6).astype(np.float32),
    "huge_saturating": lambda rng: (rng.standard_normal(20000) * 3e5).astype(np.float32),
    "wide_range": lambda rng: (rng.standard_normal(20000)
                               * 2.0 ** rng.uniform(-30, 8, 20000)).astype(np.float32),
    "tie_heavy": tie_heavy,
    "float16": lambda rng: rng.standard_normal(20000).astype(np.float16),
    "all_equal": lambda rng: np.full(5000, -0.3, np.float32),
}


@functools.cache
def data(name: str) -> np.ndarray:
    return DISTRIBUTIONS[name](np.random.default_rng(sorted(DISTRIBUTIONS).index(name)))


def stats_in_batches(x: np.ndarray, splits=(0.1, 0.55)) -> TensorStats:
    """Statistics of x fed as three uneven batches to separate objects, then merged."""
    cut = [int(f * x.size) for f in splits]
    parts = [TensorStats.from_array(p) for p in np.split(x, cut)]
    return parts[0].merge(parts[1]).merge(parts[2])


@functools.cache
def brute(name: str, loss: str):
    return brute_force_search(data(name), loss, FORMATS, WIDE)


def assert_losses_match(binned, reference, loss: str):
    assert [(c.format, c.scale) for c in binned.candidates] == [
        (c.format, c.scale) for c in reference.candidates]
    got = np.array([c.loss for c in binned.candidates])
    want = np.array([c.loss for c in reference.candidates])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL[loss])


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_every_binned_loss_equals_brute_force_and_the_winner_too(name, loss):
    stats = stats_in_batches(data(name))
    binned = search(stats, loss, FORMATS, WIDE)
    reference = brute(name, loss)
    assert_losses_match(binned, reference, loss)
    assert (binned.format, binned.scale) == (reference.format, reference.scale)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_window_search_finds_the_wide_brute_force_optimum(name, loss):
    stats = stats_in_batches(data(name))
    reference = brute(name, loss)
    assert reference.scale in candidate_scales(stats, reference.format)
    windowed = search(stats, loss, FORMATS)
    assert (windowed.format, windowed.scale) == (reference.format, reference.scale)
    assert windowed.loss == pytest.approx(reference.loss, rel=RTOL, abs=ATOL[loss])


def test_window_is_much_narrower_than_the_wide_range_for_ordinary_data():
    stats = TensorStats.from_array(data("normal"))
    assert 20 <= len(candidate_scales(stats, "F143")) <= 45
    assert len(candidate_scales(stats, "F152")) <= 60


@pytest.mark.parametrize("fmt", FORMATS)
def test_window_upper_end_is_where_everything_first_rounds_to_zero(fmt):
    x = data("normal")
    window = candidate_scales(TensorStats.from_array(x), fmt)
    assert not np.any(round_trip(x, fmt, window.stop - 1))
    assert np.any(round_trip(x, fmt, window.stop - 2))


def test_tie_data_really_has_ties_and_they_change_the_loss():
    """Rounding the bins' edge values like their interior would be wrong on this data.

    A tie's error is the same whichever way it rounds, so mse, mae and snr cannot tell; the
    rounded values themselves differ, which cos_dist and kld see.
    """
    x = data("tie_heavy")
    stats = TensorStats.from_array(x)
    assert stats.edge_count.sum() > 0.5 * x.size
    bins = stats.binned_values()
    ties_as_interior = BinnedValues(
        bins.key, bins.count, bins.reference, bins.sum_dev, bins.sum_dev_sq,
        bin_interior_representative(bins.key))
    wrong = 0
    for loss in (losses.cos_dist, losses.kld):
        for fmt in FORMATS:
            for s in (-3, -1, 0, 2, 4):
                exact = loss(x, round_trip(x, fmt, s))
                assert loss.from_bins(bins, round_trip(bins.representative, fmt, s)) == (
                    pytest.approx(exact, rel=RTOL, abs=1e-15))
                naive = loss.from_bins(ties_as_interior,
                                       round_trip(ties_as_interior.representative, fmt, s))
                wrong += not math.isclose(naive, exact, rel_tol=1e-6)
    assert wrong >= 10


def test_values_next_to_an_fp8_value_keep_their_digits():
    """x just below an FP8 value: the error is 1 ulp of float32, far below a bin's width."""
    x = np.full(1000, np.nextafter(np.float32(1.0), np.float32(0)), np.float32)
    for loss in ("mse", "mae", "snr"):
        binned = search(TensorStats.from_array(x), loss, FORMATS, range(-4, 5))
        assert_losses_match(binned, brute_force_search(x, loss, FORMATS, range(-4, 5)), loss)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 40),
                  elements=st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=True)),
       st.sampled_from(list(LOSSES)))
def test_binned_equals_brute_force_on_arbitrary_float32(x, loss):
    stats = TensorStats.from_array(x)
    result = search(stats, loss, FORMATS)
    for fmt in FORMATS:
        window = candidate_scales(stats, fmt)
        reference = brute_force_search(x, loss, [fmt], window)
        assert_losses_match(search(stats, loss, [fmt], window), reference, loss)
    wide = brute_force_search(x, loss, FORMATS, range(max(SCALE_LIMITS[0], -130), 101))
    assert (result.format, result.scale) == (wide.format, wide.scale)


def test_merge_equals_one_stream_and_is_associative():
    x = data("laplace")
    whole = TensorStats.from_array(x)
    a, b, c = (TensorStats.from_array(p) for p in np.split(x, [777, 12345]))
    left = a.copy().merge(b).merge(c)
    right = a.copy().merge(b.copy().merge(c))
    for merged in (left, right):
        np.testing.assert_array_equal(merged.interior_count, whole.interior_count)
        np.testing.assert_array_equal(merged.edge_count, whole.edge_count)
        np.testing.assert_allclose(merged.sum_dev, whole.sum_dev, rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(merged.sum_dev_sq, whole.sum_dev_sq, rtol=1e-12, atol=1e-300)
        for key, value in whole.summary().items():
            assert merged.summary()[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_moments_match_a_two_pass_float64_reference():
    rng = np.random.default_rng(7)
    # offset far from 0 and skewed: naive power sums would lose every digit of M3 and M4
    x = (1000.0 + rng.gamma(2.0, 1.0, 300_000)).astype(np.float32)
    stats = TensorStats()
    for batch in np.array_split(x, 7):
        stats.update(batch)
    ref = x.astype(np.float64)
    d = ref - ref.mean()
    m2, m3, m4 = (np.mean(d**2), np.mean(d**3), np.mean(d**4))
    assert stats.count == x.size
    assert stats.mean == pytest.approx(ref.mean(), rel=1e-13)
    assert stats.variance == pytest.approx(m2, rel=1e-10)
    assert stats.skewness == pytest.approx(m3 / m2**1.5, rel=1e-8)
    assert stats.kurtosis == pytest.approx(m4 / m2**2 - 3.0, rel=1e-8)
    assert (stats.min, stats.max, stats.absmax) == (x.min(), x.max(), np.abs(x).max())


def test_non_finite_values_are_counted_and_ignored():
    x = data("normal").copy()
    finite = x.copy()
    x[[3, 50, 900]] = np.nan
    x[[7, 8]] = np.inf
    x[11] = -np.inf
    stats = TensorStats.from_array(x)
    assert (stats.nan_count, stats.posinf_count, stats.neginf_count) == (3, 2, 1)
    assert stats.count == x.size - 6
    kept = TensorStats.from_array(finite[np.isfinite(x)])
    assert stats.summary() | {"nan_count": 0, "posinf_count": 0, "neginf_count": 0} == (
        kept.summary())
    for loss in ("mse", "kld"):
        assert search(stats, loss) == search(kept, loss)
        assert_losses_match(search(stats, loss, FORMATS, range(-8, 8)),
                            brute_force_search(x, loss, FORMATS, range(-8, 8)), loss)


def test_a_tensor_without_finite_values_raises_a_clear_error():
    stats = TensorStats.from_array(np.array([np.nan, np.inf], np.float32))
    with pytest.raises(NoFiniteValuesError, match="no finite values"):
        search(stats, "mse")


def test_all_zero_tensor_is_exact_at_scale_zero():
    x = np.zeros(1000, np.float32)
    x[::2] = -0.0
    for loss in LOSSES:
        result = search_weight(x, loss)
        assert (result.format, result.scale, result.loss) == ("F143", 0, 0.0)
        assert brute_force_search(x, loss, FORMATS, WIDE).scale == 0


def test_stats_memory_does_not_grow_with_the_data():
    stats = TensorStats()
    empty = stats.nbytes
    for n in (10, 100_000, 1_000_000):
        stats.update(np.random.default_rng(n).standard_normal(n).astype(np.float32))
    assert stats.nbytes == empty == 458_752


def test_serialised_stats_round_trip_and_store_only_occupied_bins():
    x = data("wide_range")
    stats = stats_in_batches(x)
    again = TensorStats.from_bytes(stats.to_bytes())
    assert again == stats
    assert search(again, "kld") == search(stats, "kld")
    assert len(stats.to_bytes()) < stats.nbytes / 3


def test_loss_brute_force_forms_match_textbook_formulas():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32)
    q = round_trip(x, "F143", -4)
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    assert losses.mse(x, q) == pytest.approx(np.mean((x64 - q64) ** 2), rel=1e-12)
    assert losses.mae(x, q) == pytest.approx(np.mean(np.abs(x64 - q64)), rel=1e-12)
    assert losses.snr(x, q) == pytest.approx(np.sum((x64 - q64) ** 2) / np.sum(x64**2), rel=1e-12)
    naive_cos = 1 - x64 @ q64 / (np.linalg.norm(x64) * np.linalg.norm(q64))
    assert losses.cos_dist(x, q) == pytest.approx(naive_cos, rel=1e-6)
    assert losses.snr_db(losses.snr(x, q)) == pytest.approx(
        10 * np.log10(np.sum(x64**2) / np.sum((x64 - q64) ** 2)))


def kld_by_dictionaries(x: np.ndarray, q: np.ndarray) -> float:
    """kld's docstring, written out value by value."""
    mags = [abs(float(v)) for v in x.astype(np.float32)]
    cells = [int(k) & (NUM_BINS // 2 - 1) for k in bin_keys(x).tolist()]  # stats bin of |x|
    top = max(BIN_LOWER_EDGE[c] + BIN_WIDTH[c] for c in cells)  # A

    def linear_bin(c):
        if c == 0:
            return 0
        return min(math.floor((BIN_LOWER_EDGE[c] + BIN_WIDTH[c] / 2) * KLD_BINS / top),
                   KLD_BINS - 1)

    r = max(abs(float(v)) for v in q.astype(np.float32))
    flushed = [c for m, c, g in zip(mags, cells, q.tolist()) if g == 0 and m <= r]
    at_zero = bool(flushed) and max(BIN_LOWER_EDGE[c] + BIN_WIDTH[c] for c in flushed) > (
        top / KLD_BINS)
    p_count, q_count = {}, {}
    for m, c, g in zip(mags, cells, q.tolist()):
        p_count[linear_bin(c)] = p_count.get(linear_bin(c), 0) + 1
        if m <= r:  # saturated values (|x| > R) are missing from Q
            b = 0 if (g == 0 and at_zero) else linear_bin(c)
            q_count[b] = q_count.get(b, 0) + 1
    n = len(x)
    return sum(c / n * math.log(c / (q_count.get(b, 0) + KLD_EPSILON * (c - q_count.get(b, 0))))
               for b, c in p_count.items())


@pytest.mark.parametrize("scale", [-9, -4, 0, 6])
def test_kld_matches_its_definition_written_out(scale):
    x = np.random.default_rng(scale + 20).laplace(0, 1, 3000).astype(np.float32)
    q = round_trip(x, "F143", scale)
    assert losses.kld(x, q) == pytest.approx(kld_by_dictionaries(x, q), rel=1e-12, abs=1e-15)
    q_odd = np.round(x * 3) / 3  # not an FP8 round trip: the general grouping path
    assert losses.kld(x, q_odd) == pytest.approx(kld_by_dictionaries(x, q_odd), rel=1e-12)


def test_loss_edge_cases():
    x = np.array([1.0, -2.0, 3.0], np.float32)
    zeros = np.zeros(3, np.float32)
    assert losses.cos_dist(zeros, zeros) == 0.0
    assert losses.cos_dist(x, zeros) == 1.0
    assert losses.snr(zeros, zeros) == 0.0
    assert losses.kld(x, x) == 0.0
    # flushing everything to zero: every nonzero value lies beyond R = 0, Q has none of them
    assert losses.kld(x, zeros) == pytest.approx(math.log(1 / KLD_EPSILON))
    # flushing values that share the first linear bin [0, A/2048) with zero is free ...
    spread = np.array([1000.0, 1e-3, -2e-3, 0.0], np.float32)
    assert losses.kld(spread, np.array([1000.0, 0, 0, 0], np.float32)) == 0.0
    # ... a saturated value (beyond R) is missing from Q: ln(1/eps) for it, alone in its bin
    assert losses.kld(spread, np.array([990.0, 1e-3, -2e-3, 0.0], np.float32)) == pytest.approx(
        0.25 * math.log(1 / KLD_EPSILON))
    assert losses.cos_dist(x, 4 * x) == pytest.approx(0.0, abs=1e-16)


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(UnknownLossError, match="mse, mae, snr, cos_dist, kld"):
        get_loss("l2")
    assert get_loss(" KLD ") is LOSSES["kld"]


def test_scales_outside_the_limits_are_refused():
    stats = TensorStats.from_array(data("normal"))
    with pytest.raises(ScaleRangeError, match="integers in"):
        search(stats, "mse", FORMATS, range(-200, 0))


def test_search_result_reports_every_candidate_in_order():
    stats = TensorStats.from_array(data("relu"))
    result = search(stats, "kld", ["F152", "F143"])
    formats = [c.format for c in result.candidates]
    assert formats == sorted(formats, key=["F152", "F143"].index)
    for fmt in ("F152", "F143"):
        scales = [c.scale for c in result.candidates if c.format == fmt]
        assert scales == list(candidate_scales(stats, get_format(fmt)))
    assert result.loss == result.loss_of(result.format, result.scale)
    assert result.loss == min(c.loss for c in result.candidates)
    assert result.to_dict()["candidates"][0].keys() == {"format", "scale", "loss", "mse"}
