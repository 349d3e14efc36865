"""Sentinel ranges: tensors whose calibrated range is made by mask values, not by data.

A tensor whose range reaches ``SENTINEL_MAGNITUDE`` is looked at on up to ``SENTINEL_BATCHES``
calibration batches. It is a sentinel tensor, left float, when its range is not finite (-inf),
or when its extreme E comes from values near E (|x| >= E/10) with nothing between E/100 and E/10
(masks of -1e4, -1e9, the float minimum); without data to look at, when its range reaches
``SURE_SENTINEL``. Dense large data (audio in +-30000) is not affected.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnxq.calibration.data import BatchSource
from onnxq.calibration.state import CalibrationState
from onnxq.graph import with_outputs
from onnxq.load.prepare import LoadedModel

SENTINEL_MAGNITUDE = 5e3  # a range reaching this far is checked for sentinel (mask) values
SURE_SENTINEL = 1e8  # ... and one reaching this far, where the values cannot be looked at, is one
SENTINEL_BATCHES = 32  # calibration batches searched for the values behind a suspect range


def _is_sentinel_range(low: float, high: float, threshold: float) -> bool:
    return not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) >= threshold


def sentinel_tensors(loaded: LoadedModel, state: CalibrationState, source: BatchSource | None) -> list[str]:
    """Keys of the tensors whose range is dominated by sentinel values (masks of -1e4, -1e9, the
    float minimum, -inf...): a non-finite range, or one reaching ``SENTINEL_MAGNITUDE`` whose
    extreme E is made by values near it (|x| >= E/10) with a gap below them: every other value
    is under E/100, in the first calibration batches. Where those batches never show values
    near E, a range reaching ``SURE_SENTINEL`` counts as one."""
    suspects = {key: r for key, r in state.ranges().items() if _is_sentinel_range(*r, SENTINEL_MAGNITUDE)}
    if not suspects:
        return []
    names = {key: name for name, key in loaded.keys.tensors.items() if key in suspects}
    extreme = {key: max(-low, high) for key, (low, high) in suspects.items()}
    near_seen = {key: not math.isfinite(extreme[key]) for key in names}
    rest_seen = {key: 0.0 for key in names}  # largest |x| below E/10
    if source is not None:
        wanted = [key for key in names if not near_seen[key]]
        session = loaded.float_session(with_outputs(loaded.cleaned, [names[k] for k in wanted])) if wanted else None
        for batch in itertools.islice(source(), SENTINEL_BATCHES) if wanted else ():
            for key, values in zip(wanted, session.run([names[k] for k in wanted], batch.feed)):
                magnitude = np.abs(np.asarray(values, dtype=np.float64))
                near = magnitude >= extreme[key] / 10
                near_seen[key] |= bool(near.any())
                if (~near).any():
                    rest_seen[key] = max(rest_seen[key], float(magnitude[~near].max()))
            if all(near_seen[k] for k in wanted):
                break
    return sorted(
        key for key, (low, high) in suspects.items()
        if not math.isfinite(extreme[key])
        or (near_seen[key] and rest_seen[key] <= extreme[key] / 100)
        or (not near_seen[key] and _is_sentinel_range(low, high, SURE_SENTINEL))
    )
