"""Observers against numpy references: ranges, exact merging, serialization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxq.calibration.observers import HISTOGRAM_BINS, METHODS, HistogramObserver, make_observer, observer_from_dict

RNG = np.random.default_rng(7)


def _data(n=200_000):
    values = np.concatenate([RNG.normal(0.5, 1.5, n), RNG.laplace(-1.0, 0.3, n // 4)])
    return RNG.permutation(values).astype(np.float32)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(percentile):
    data = _data()
    observer = make_observer("percentile", percentile)
    for chunk in np.array_split(data, 13):
        observer.update(chunk)
    low, high = observer.range()
    expected_low, expected_high = np.percentile(data.astype(np.float64), [100 - percentile, percentile])
    assert abs(low - expected_low) <= observer.bin_width
    assert abs(high - expected_high) <= observer.bin_width


@pytest.mark.parametrize("method", METHODS)
def test_merging_two_halves_equals_one_run_over_all(method):
    data = _data()
    whole = make_observer(method)
    for chunk in np.array_split(data, 9):
        whole.update(chunk)
    # The halves see different ranges (the second holds the extremes), so their histograms
    # grow to different sizes before being merged.
    order = np.argsort(np.abs(data))
    first, second = make_observer(method), make_observer(method)
    for chunk in np.array_split(data[order[: len(data) // 2]], 5):
        first.update(chunk)
    for chunk in np.array_split(data[order[len(data) // 2 :]], 4):
        second.update(chunk)
    first.merge(second)
    assert first.range() == whole.range()
    assert first.to_dict() == whole.to_dict()


def test_histogram_does_not_depend_on_the_order_of_the_data():
    data = _data(20_000)
    forward, backward = HistogramObserver(), HistogramObserver()
    for chunk in np.array_split(data, 10):
        forward.update(chunk)
    for chunk in np.array_split(data[::-1], 3):
        backward.update(chunk)
    np.testing.assert_array_equal(forward.counts, backward.counts)
    assert forward.counts.sum() == data.size


def test_growing_the_range_keeps_every_count_in_the_right_bin():
    observer = HistogramObserver()
    observer.update(np.array([0.1, -0.2, 0.3], np.float32))
    observer.update(np.array([100.0], np.float32))  # the range grows several times
    counts, edges = observer.counts, observer.bin_edges()
    expected, _ = np.histogram([0.1, -0.2, 0.3, 100.0], bins=edges)
    np.testing.assert_array_equal(counts, expected)


def _reference_counts(values: np.ndarray, exponent: int) -> np.ndarray:
    """The histogram as onnxq first computed it: each float32 value divided by the bin width in
    float64 (exact for every float32), floored, offset to the middle bin, counted."""
    width = 2.0 ** (exponent + 1) / HISTOGRAM_BINS
    index = np.floor(values.astype(np.float64) / width).astype(np.int64) + HISTOGRAM_BINS // 2
    return np.bincount(index, minlength=HISTOGRAM_BINS)


def _edge_values(exponent: int) -> np.ndarray:
    """Every bin edge of the range ``[-2**exponent, 2**exponent)``, the float32 values just
    beside each, the smallest and largest subnormals, tiny normals and signed zeros."""
    width = np.float32(2.0 ** (exponent + 1) / HISTOGRAM_BINS)
    edges = (np.arange(-HISTOGRAM_BINS // 2, HISTOGRAM_BINS // 2) * width).astype(np.float32)
    tiny = np.array([1e-45, 1.1754942e-38, 1.1754944e-38, 1e-30, 1e-12], np.float32)
    values = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf)),
                             tiny, -tiny, np.array([0.0, -0.0], np.float32)])
    limit = np.float32(2.0**exponent)
    return values[np.abs(values) < limit]


@pytest.mark.parametrize("exponent", [-40, -12, 0, 3, 10, 11, 30, 127])
def test_counts_at_bin_edges_equal_float64_division(exponent):
    values = _edge_values(exponent)
    observer = HistogramObserver()
    observer.update(values)
    assert observer.exponent == exponent  # the largest value sits just below the top edge
    np.testing.assert_array_equal(observer.counts, _reference_counts(values, exponent))


def test_counts_of_growing_ranges_equal_float64_division_at_the_final_range():
    batches = [RNG.choice(_edge_values(exponent), 500) for exponent in (-20, 2, 9, 12, 40)]
    observer = HistogramObserver()
    for batch in batches:
        observer.update(batch)
    assert observer.exponent == 40
    np.testing.assert_array_equal(observer.counts, _reference_counts(np.concatenate(batches), 40))


def test_tiny_negative_values_in_wide_bins_fall_below_zero():
    observer = HistogramObserver()
    observer.update(np.array([-1e-45, -1e-30, 0.0, 5000.0], np.float32))  # bins 8 wide
    half = HISTOGRAM_BINS // 2
    assert observer.counts[half - 1] == 2 and observer.counts[half] == 1


def test_minmax_is_the_exact_extremes():
    data = _data(10_000)
    observer = make_observer("minmax")
    for chunk in np.array_split(data, 7):
        observer.update(chunk)
    assert observer.range() == (float(data.min()), float(data.max()))


def test_non_finite_values_are_ignored():
    observer = make_observer("percentile")
    observer.update(np.array([1.0, np.inf, -2.0, np.nan], np.float32))
    assert observer.range()[0] >= -2.0 and observer.range()[1] <= 1.0


def test_entropy_clips_rare_far_outliers_but_keeps_the_bulk():
    data = np.concatenate([RNG.normal(0, 1, 100_000), [60.0, -55.0, 58.0] * 3]).astype(np.float32)
    observer = make_observer("entropy")
    observer.update(data)
    low, high = observer.range()
    assert 3.0 <= high <= 10.0 and -10.0 <= low <= -3.0


def test_mse_clips_a_long_thin_tail():
    bulk = RNG.uniform(-1, 1, 100_000)
    tail = np.linspace(1, 50, 30)  # a few values spread far out
    observer = make_observer("mse")
    observer.update(np.concatenate([bulk, tail]).astype(np.float32))
    low, high = observer.range()
    assert low < -0.9 and 1.0 < high < 50.0


@pytest.mark.parametrize("method", METHODS)
def test_state_survives_json_round_trip(method):
    observer = make_observer(method)
    observer.update(_data(5_000))
    restored = observer_from_dict(json.loads(json.dumps(observer.to_dict())))
    assert restored.range() == observer.range()
    assert restored.to_dict() == observer.to_dict()
