"""Calibration state: observers by tensor key and how far the passes over the data got."""

from __future__ import annotations

import dataclasses

from onnxq.calibration.observers import MinMaxObserver, observer_from_dict
from onnxq.errors import WorkspaceError
from onnxq.workspace.steps import CalibrationStep


@dataclasses.dataclass
class CalibrationState:
    """Observer state keyed by tensor signature, and how far calibration got."""

    observers: dict[str, MinMaxObserver]
    passes: list[list[str]]
    pass_index: int = 0
    samples_done: int = 0
    complete: bool = False
    samples_seen: int = 0  # samples in the data, as counted on the first pass
    data_done_sha256: str = ""  # fingerprint of the batches done in the pass in progress
    data_sha256: str = ""  # fingerprint of all the data, once the first pass is done

    def to_step(self) -> CalibrationStep:
        """The workspace step that records this state."""
        observers = {key: observer.to_dict() for key, observer in sorted(self.observers.items())}
        return CalibrationStep(observers, self.passes, self.pass_index, self.samples_done, self.complete,
                               self.samples_seen, self.data_done_sha256, self.data_sha256)

    @classmethod
    def from_step(cls, step: CalibrationStep, percentile: float) -> CalibrationState:
        """The state a calibration step recorded (``percentile``: of ``--method percentile``)."""
        try:
            observers = {key: observer_from_dict(state, percentile) for key, state in step.observers.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WorkspaceError(
                f"a calibration step holds a malformed observer ({type(exc).__name__}: {exc}); the workspace is "
                "damaged, start a new run"
            ) from exc
        if not all(isinstance(p, list) and all(k in observers for k in p) for p in step.passes):
            raise WorkspaceError("a calibration step's passes name unknown tensors; the workspace is damaged, "
                                 "start a new run")
        return cls(observers, step.passes, step.pass_index, step.samples_done, step.complete, step.samples_seen,
                   step.data_done_sha256, step.data_sha256)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The chosen range of every observed tensor, by signature."""
        return {key: o.range() for key, o in self.observers.items() if o.observed}
