"""Quantization options shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
from typing import Literal

from onnxq.errors import ConfigError

ActivationType = Literal["uint8", "int8"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        activations: ``uint8`` asymmetric activations (best on CPUs) or ``int8`` symmetric
            (TensorRT-style).
        per_channel: int8 weights with one scale per output channel (else one per tensor).
        batch_size: samples per calibration run when the model's batch axis is dynamic.
        max_samples: stop calibration after this many samples (``None``: use all).
        max_shared_range_ratio: a Concat whose inputs' ranges differ by more than this factor is
            kept in float instead of forcing them through one scale.
    """

    activations: ActivationType = "uint8"
    per_channel: bool = True
    batch_size: int = 1
    max_samples: int | None = None
    max_shared_range_ratio: float = 16.0

    def __post_init__(self) -> None:
        if self.activations not in ("uint8", "int8"):
            raise ConfigError(
                f"activations must be 'uint8' or 'int8', not {self.activations!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(
                f"max samples must be at least 1 (or unset for all), not {self.max_samples}"
            )
        if self.max_shared_range_ratio <= 1:
            raise ConfigError(
                f"max shared range ratio must be above 1, not {self.max_shared_range_ratio}"
            )
