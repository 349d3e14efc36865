"""Observers: small per-tensor statistics updated batch by batch, mergeable and serializable."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class MinMaxObserver:
    """Running minimum and maximum of a tensor over all batches seen."""

    minimum: float = math.inf
    maximum: float = -math.inf

    def update(self, array: np.ndarray) -> None:
        if array.size:
            self.minimum = min(self.minimum, float(array.min()))
            self.maximum = max(self.maximum, float(array.max()))

    def merge(self, other: MinMaxObserver) -> None:
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @property
    def observed(self) -> bool:
        return self.minimum <= self.maximum

    def range(self) -> tuple[float, float]:
        return self.minimum, self.maximum

    def to_dict(self) -> dict[str, float]:
        return {"minimum": self.minimum, "maximum": self.maximum}

    @classmethod
    def from_dict(cls, state: dict[str, float]) -> MinMaxObserver:
        return cls(float(state["minimum"]), float(state["maximum"]))
