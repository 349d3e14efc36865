"""Calibration samples held back to measure the converted model on, when no evaluation data is given.

Rules:
1. Every ``HOLD_OUT_EVERY``-th batch (the 8th, 16th, ...) is held out until ``HOLD_OUT_SAMPLES``
   samples are; every other batch calibrates. Spread over the data, the held-out samples are
   like the rest; calibration loses at most an eighth of its samples, and none past the cap.
2. With fewer than ``HOLD_OUT_EVERY`` batches nothing is held out (nor with ``--no-hold-out``):
   the model is then measured on the calibration samples themselves (the first
   ``HOLD_OUT_SAMPLES``), and the summary says so.
3. The split depends only on the order of the batches, so a resumed run splits the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from onnxq.calibration.data import Batch, BatchSource

HOLD_OUT_EVERY = 8
HOLD_OUT_SAMPLES = 32


def first_samples(batches: Iterable[Batch], samples: int) -> list[Batch]:
    """The first batches of ``batches`` that hold ``samples`` samples (or all, when fewer)."""
    taken, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        taken.append(batch)
        count += batch.samples
    return taken


class HeldOutSplit(BatchSource):
    """A ``BatchSource`` of the calibration batches of ``source``, with its held-out batches
    (``held_out()``) set apart by the module's rules."""

    def __init__(self, source: BatchSource) -> None:  # wraps a source that has read its first batch
        self.source = source
        self.first = source.first
        self._held: list[Batch] | None = None

    @property
    def one_shot(self) -> bool:
        return self.source.one_shot

    def _split(self, batches: Iterable[Batch] | None = None) -> Iterator[tuple[bool, Batch]]:
        held = 0
        for index, batch in enumerate(self.source() if batches is None else batches):
            take = held < HOLD_OUT_SAMPLES and index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
            held += batch.samples if take else 0
            yield take, batch

    def __call__(self) -> Iterator[Batch]:
        held = []
        for take, batch in self._split():
            if take:
                held.append(batch)
            else:
                yield batch
        if self._held is None:  # a one-shot source cannot be read again for them
            self._held = held

    def first_batches(self, count: int) -> list[Batch]:
        """The first ``count`` calibration batches (of those a one-shot source kept)."""
        if not self.one_shot:
            return list(itertools.islice(self(), count))
        return [batch for take, batch in self._split(self.source.first_batches(count)) if not take]

    def held_out(self) -> list[Batch]:
        """The held-out batches (none with fewer than ``HOLD_OUT_EVERY`` batches: rule 2)."""
        if self._held is None:
            self._held = [batch for take, batch in self._split() if take]
        return self._held
