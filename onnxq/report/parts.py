"""The parts of an output that a single figure would hide, found from the float model's values.

A detector's ``[1, 4 + C, N]`` output holds box coordinates in pixels beside class scores in
[0, 1]: its SQNR is the boxes' and says nothing of the scores. Rules:
1. A part is a contiguous run of indices along one axis of an output (never axis 0, the samples).
2. Along each axis of extent 2 to ``MAX_EXTENT``, every index gets the RMS of its float values;
   the axis splits where every index on one side is at least ``SPLIT_DECADES`` decades (factor
   10) above every index on the other. A clean split like that is what separates two kinds of
   values (pixels and probabilities); positions along an image or a sequence, whose magnitudes
   follow the content, interleave and do not split. Two parts at most: a finer split would
   judge rare classes, whose scores sit below any 8-bit step, on their own.
3. The axis that splits with the largest difference is used; an output with none is one part.
4. An output is a distribution when its values lie in [0, 1] and sum to 1 along the last axis
   (softmax outputs): its arg-max along that axis is the decision that matters, and that axis is
   never split (a face / not-face softmax holds one quantity, not two kinds of values).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_EXTENT = 4096  # longer axes (anchors, pixels, time) are positions, not feature groups
SPLIT_DECADES = 1.0  # two sides whose RMS differ by this many decades are separate parts
_SUM_TOLERANCE = 1e-3
_RMS_FLOOR = 1e-6  # RMS below this fraction of the axis' largest counts as this fraction


@dataclasses.dataclass(frozen=True)
class Part:
    """Indices ``start:stop`` along ``axis`` of an output."""

    axis: int
    start: int
    stop: int

    def label(self) -> str:
        return f"[axis {self.axis}: {self.start}:{self.stop}]"

    def take(self, array: np.ndarray) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[self.axis] = slice(self.start, self.stop)
        return array[tuple(index)]


def _best_split(log_rms: np.ndarray) -> tuple[int, float]:
    """The split point of ``log_rms`` (``k``: left is ``[:k]``) with the widest clean gap between
    the two sides' values, and that gap (negative where the sides overlap everywhere)."""
    n = len(log_rms)
    if n < 2:
        return 0, -np.inf
    left_max, left_min = np.maximum.accumulate(log_rms)[:-1], np.minimum.accumulate(log_rms)[:-1]
    right_max = np.maximum.accumulate(log_rms[::-1])[::-1][1:]
    right_min = np.minimum.accumulate(log_rms[::-1])[::-1][1:]
    gaps = np.maximum(right_min - left_max, left_min - right_max)
    best = int(np.argmax(gaps))
    return best + 1, float(gaps[best])


def output_parts(reference: np.ndarray) -> tuple[Part, ...]:
    """The parts of a float output (see the module docstring); ``()`` when it is all one part."""
    values = np.asarray(reference)
    if values.ndim < 2 or values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return ()
    best: tuple[float, int, int] = (0.0, 0, 0)  # gap, axis, split point
    for axis in range(1, values.ndim - is_distribution(values)):  # rule 4: not a distribution's axis
        extent = values.shape[axis]
        if not 2 <= extent <= MAX_EXTENT:
            continue
        moved = np.moveaxis(values, axis, 0).reshape(extent, -1).astype(np.float64)
        rms = np.sqrt(np.mean(moved * moved, axis=1))
        if not np.isfinite(rms).all():  # non-finite values have no scale to split by
            return ()
        log_rms = np.log10(np.maximum(rms, rms.max() * _RMS_FLOOR + 1e-30))  # a dead row is not a part
        split, gap = _best_split(log_rms)
        if gap >= SPLIT_DECADES and gap > best[0]:
            best = (gap, axis, split)
    _, axis, split = best
    return (Part(axis, 0, split), Part(axis, split, values.shape[axis])) if split else ()


def is_distribution(reference: np.ndarray) -> bool:
    """Whether a float output is a probability distribution along its last axis (rule 4)."""
    values = np.asarray(reference)
    if values.ndim < 1 or values.shape[-1] < 2 or values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return False
    if values.min() < 0 or values.max() > 1 + _SUM_TOLERANCE:
        return False
    return bool(np.all(np.abs(values.sum(axis=-1, dtype=np.float64) - 1) <= _SUM_TOLERANCE))


def labelled_output(reference: list[np.ndarray], labels: np.ndarray) -> int | None:
    """The output the labels are classes of: of the ``[N, classes]`` outputs (N: one per label),
    the first that is a distribution (softmax), else the first with a column for every label;
    ``None`` when there is none (a box regression beside the softmax is never it)."""
    candidates = [i for i, f in enumerate(reference)
                  if f.ndim == 2 and f.shape[0] == labels.size and f.shape[1] > int(labels.max(initial=0))]
    return next((i for i in candidates if is_distribution(reference[i])), candidates[0] if candidates else None)
