"""Observers: per-tensor statistics updated batch by batch, mergeable and serializable.

Every observer has a small state, ``update(array)`` per batch, ``merge(other)`` (merging the
states of two halves of the data gives exactly the state of one run over all of it),
``range()`` for the chosen ``(rmin, rmax)``, and a JSON-safe ``to_dict()`` / ``from_dict()``.

Histogram observers bin values over ``[-R, R)`` with ``R`` a power of two and a fixed number of
bins. When a value reaches ``R`` the range doubles and pairs of bins are added together; since
the bin edges of coarser ranges are edges of the finer ones, the final histogram does not depend
on the order or the grouping in which the data arrived.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import ClassVar

import numpy as np

from onnxq.config import METHODS

HISTOGRAM_BINS = 2048  # over [-R, R); must be a multiple of 4
_MIN_EXPONENT = -40


def _finite_extremes(array: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """The finite values of ``array`` (flat, float32) with their minimum and maximum, or ``None``
    when there are none. The extremes come first: NaN propagates through them and an infinity is
    one of them, so they are finite exactly when every value is, and only then is no filter needed."""
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    if not flat.size:
        return None
    low, high = flat.min(), flat.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        flat = flat[np.isfinite(flat)]
        if not flat.size:
            return None
        low, high = flat.min(), flat.max()
    return flat, float(low), float(high)


def _bin_counts(values: np.ndarray, width: float) -> np.ndarray:
    """How many of ``values`` (float32, each ``|v| < HISTOGRAM_BINS / 2 * width``) fall in each bin
    ``[(k - HISTOGRAM_BINS / 2) * width, (k + 1 - HISTOGRAM_BINS / 2) * width)``, ``width`` a power of two.

    The bin index is ``floor(v / width)``. For ``width <= 1`` it is computed in float32: ``v``
    times the power of two ``1 / width`` is exact (a float32 scaled up, below 1024 in magnitude),
    and so are its floor and the offset; counting bins with ``bincount`` on those indices gives the
    same counts as float64 division, at a fraction of the memory traffic. A wider bin would scale
    down, where a tiny negative ``v`` can round to -0 and land in the bin above: those go through
    float64, which holds every float32 quotient exactly.
    """
    if width <= 1.0:
        scaled = np.multiply(values, np.float32(1.0 / width))
    else:
        scaled = np.divide(values, width, dtype=np.float64)
    np.floor(scaled, out=scaled)
    scaled += HISTOGRAM_BINS // 2
    return np.bincount(scaled.astype(np.intp), minlength=HISTOGRAM_BINS)


class MinMaxObserver:
    """Running minimum and maximum of the finite values seen."""

    kind: ClassVar[str] = "minmax"

    def __init__(self) -> None:
        self.minimum = math.inf
        self.maximum = -math.inf

    def update(self, array: np.ndarray) -> None:
        found = _finite_extremes(array)
        if found is not None:
            self.update_bounds(found[1], found[2])

    def update_bounds(self, low: float, high: float) -> None:
        """Update with the extremes of a batch computed elsewhere (inside the ONNX graph)."""
        if math.isfinite(low) and math.isfinite(high):
            self.minimum = min(self.minimum, low)
            self.maximum = max(self.maximum, high)

    def merge(self, other: MinMaxObserver) -> None:
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @property
    def observed(self) -> bool:
        return self.minimum <= self.maximum

    def range(self) -> tuple[float, float]:
        return self.minimum, self.maximum

    def to_dict(self) -> dict:
        return {"kind": self.kind, "minimum": self.minimum, "maximum": self.maximum}

    def _load(self, state: dict) -> None:
        self.minimum, self.maximum = float(state["minimum"]), float(state["maximum"])


class HistogramObserver(MinMaxObserver):
    """A histogram over a power-of-two range that grows with the data; also tracks min/max."""

    kind: ClassVar[str] = "histogram"

    def __init__(self) -> None:
        super().__init__()
        self.exponent: int | None = None  # R = 2 ** exponent
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)

    @property
    def bin_width(self) -> float:
        return 2.0 ** (self.exponent + 1) / HISTOGRAM_BINS

    def _grow_to(self, exponent: int) -> None:
        half = HISTOGRAM_BINS // 2
        while self.exponent < exponent:
            padded = np.zeros(2 * HISTOGRAM_BINS, np.int64)
            padded[half : half + HISTOGRAM_BINS] = self.counts
            self.counts = padded.reshape(HISTOGRAM_BINS, 2).sum(axis=1)
            self.exponent += 1

    @staticmethod
    def _exponent_for(amax: float) -> int:
        # The smallest power of two strictly above amax: values stay inside [-R, R).
        return max(_MIN_EXPONENT, math.floor(math.log2(amax)) + 1) if amax > 0 else _MIN_EXPONENT

    def update(self, array: np.ndarray) -> None:
        found = _finite_extremes(array)
        if found is None:
            return
        values, low, high = found
        self.update_bounds(low, high)
        exponent = self._exponent_for(max(-low, high))  # the largest |value|
        if self.exponent is None:
            self.exponent = exponent
        self._grow_to(exponent)
        self.counts += _bin_counts(values, self.bin_width)

    def merge(self, other: HistogramObserver) -> None:
        if other.exponent is None:
            return
        super().merge(other)
        if self.exponent is None:
            self.exponent, self.counts = other.exponent, other.counts.copy()
            return
        other_counts = other.counts
        if other.exponent < self.exponent:
            aligned = HistogramObserver()
            aligned.exponent, aligned.counts = other.exponent, other.counts.copy()
            aligned._grow_to(self.exponent)
            other_counts = aligned.counts
        else:
            self._grow_to(other.exponent)
        self.counts = self.counts + other_counts

    def bin_edges(self) -> np.ndarray:
        return (np.arange(HISTOGRAM_BINS + 1) - HISTOGRAM_BINS // 2) * self.bin_width

    def to_dict(self) -> dict:
        state = super().to_dict()
        state.update(
            exponent=self.exponent,
            counts=base64.b64encode(zlib.compress(self.counts.astype("<i8").tobytes())).decode("ascii"),
        )
        return state

    def _load(self, state: dict) -> None:
        super()._load(state)
        self.exponent = None if state["exponent"] is None else int(state["exponent"])
        raw = zlib.decompress(base64.b64decode(state["counts"]))
        self.counts = np.frombuffer(raw, dtype="<i8").astype(np.int64)
        if self.counts.size != HISTOGRAM_BINS:
            raise ValueError(f"histogram has {self.counts.size} bins, expected {HISTOGRAM_BINS}")

    def _clamped(self, low: float, high: float) -> tuple[float, float]:
        return max(low, self.minimum), min(high, self.maximum)


class PercentileObserver(HistogramObserver):
    """Range from the ``percentile`` and ``100 - percentile`` points of the distribution."""

    kind: ClassVar[str] = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.percentile = percentile

    def _quantile(self, q: float) -> float:
        cumulative = np.cumsum(self.counts)
        target = q * cumulative[-1]
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, HISTOGRAM_BINS - 1)
        before = cumulative[index - 1] if index else 0
        inside = self.counts[index]
        fraction = 0.0 if inside == 0 else (target - before) / inside
        return float(self.bin_edges()[index] + fraction * self.bin_width)

    def range(self) -> tuple[float, float]:
        if self.exponent is None:
            return super().range()
        q = self.percentile / 100.0
        return self._clamped(self._quantile(1.0 - q), self._quantile(q))


def _abs_histogram(observer: HistogramObserver) -> np.ndarray:
    half = HISTOGRAM_BINS // 2
    return observer.counts[half:] + observer.counts[:half][::-1]


class EntropyObserver(HistogramObserver):
    """TensorRT-style threshold: the clip of |x| whose 128-level quantization loses least
    information (smallest KL divergence from the clipped distribution)."""

    kind: ClassVar[str] = "entropy"
    LEVELS = 128

    def range(self) -> tuple[float, float]:
        if self.exponent is None:
            return super().range()
        hist = _abs_histogram(self).astype(np.float64)
        nonzero = np.flatnonzero(hist)
        if nonzero.size == 0:
            return super().range()
        last = int(nonzero[-1]) + 1
        if last <= self.LEVELS:
            threshold = last * self.bin_width
            return self._clamped(-threshold, threshold)
        candidates = np.unique(np.linspace(self.LEVELS, last, num=min(64, last - self.LEVELS + 1)).astype(int))
        best, best_kl = last, math.inf
        for i in candidates:
            reference = hist[:i].copy()
            reference[-1] += hist[i:].sum()
            kl = _kl_after_requantizing(reference, hist[:i], self.LEVELS)
            if kl < best_kl:
                best, best_kl = int(i), kl
        threshold = best * self.bin_width
        return self._clamped(-threshold, threshold)


def _kl_after_requantizing(reference: np.ndarray, clipped: np.ndarray, levels: int) -> float:
    """KL(P || Q): P the clipped histogram with the outliers added to its last bin, Q the
    clipped histogram merged into ``levels`` groups and spread back evenly over the bins that
    are non-empty in P (zeros smoothed, as TensorRT does)."""
    size = clipped.size
    starts = (np.arange(levels) * size) // levels  # group boundaries, like np.array_split
    group = np.repeat(np.arange(levels), np.diff(np.append(starts, size)))
    nonempty = reference > 0
    totals = np.add.reduceat(clipped, starts)
    counts = np.add.reduceat(nonempty.astype(np.float64), starts)
    per_bin = np.divide(totals, counts, out=np.zeros(levels), where=counts > 0)
    expanded = np.where(nonempty, per_bin[group], 0.0)
    p = reference / reference.sum()
    positive = expanded[expanded > 0]
    q = np.where(nonempty & (expanded == 0), 1e-4 * (positive.min() if positive.size else 1.0), expanded)
    q = q / q.sum()
    return float(np.sum(p[nonempty] * np.log(p[nonempty] / q[nonempty])))


class MseObserver(HistogramObserver):
    """The range inside [min, max] that minimizes the expected squared error of 8-bit
    quantization: rounding noise ``step**2 / 12`` inside, clipping error outside. Both ends are
    searched independently on a grid of fractions of the observed extremes."""

    kind: ClassVar[str] = "mse"
    LEVELS = 255
    GRID = 64

    def range(self) -> tuple[float, float]:
        if self.exponent is None:
            return super().range()
        centers = self.bin_edges()[:-1] + self.bin_width / 2
        weights = self.counts.astype(np.float64)
        fractions = np.linspace(1.0 / self.GRID, 1.0, self.GRID)
        lows = min(self.minimum, 0.0) * fractions  # candidates for rmin
        highs = max(self.maximum, 0.0) * fractions  # candidates for rmax
        below = np.clip(lows[:, None] - centers[None, :], 0, None)
        above = np.clip(centers[None, :] - highs[:, None], 0, None)
        low_error, low_count = (weights * below**2).sum(axis=1), (weights * (below > 0)).sum(axis=1)
        high_error, high_count = (weights * above**2).sum(axis=1), (weights * (above > 0)).sum(axis=1)
        step = (highs[None, :] - lows[:, None]) / self.LEVELS
        inside = weights.sum() - low_count[:, None] - high_count[None, :]
        total = low_error[:, None] + high_error[None, :] + inside * step**2 / 12
        i, j = np.unravel_index(int(np.argmin(total)), total.shape)
        return float(lows[i]), float(highs[j])


_KINDS: dict[str, type[MinMaxObserver]] = {
    cls.kind: cls for cls in (MinMaxObserver, HistogramObserver, PercentileObserver, EntropyObserver, MseObserver)
}


def make_observer(method: str, percentile: float = 99.99) -> MinMaxObserver:
    """A fresh observer for a calibration method (``minmax``, ``percentile``, ``entropy``, ``mse``)."""
    if method == "percentile":
        return PercentileObserver(percentile)
    return _KINDS[method]()


def observer_from_dict(state: dict, percentile: float = 99.99) -> MinMaxObserver:
    """Rebuild an observer from ``to_dict()`` output."""
    observer = make_observer(state["kind"], percentile) if state["kind"] in METHODS else _KINDS[state["kind"]]()
    observer._load(state)
    return observer
