"""Quantization options shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
from typing import Literal

from onnxq.errors import ConfigError

ActivationType = Literal["uint8", "int8"]
Method = Literal["minmax", "percentile", "entropy", "mse"]
Device = Literal["auto", "cpu", "cuda"]
Format = Literal["qdq", "qoperator"]
Target = Literal["cpu", "cuda", "tensorrt"]
ReduceRange = Literal["auto", "always", "never"]
ExternalData = Literal["auto", "always", "never"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        target: where the model will run; it sets the defaults: ``cpu`` and ``cuda`` uint8
            activations, ``tensorrt`` int8 symmetric activations (TensorRT takes only those).
        format: ``qdq`` (QuantizeLinear/DequantizeLinear around float ops) or ``qoperator``
            (QLinearConv, QLinearMatMul and ONNX Runtime's QGemm, QLinearAdd, ...). QOperator is
            refused for ``cuda`` and ``tensorrt`` targets unless ``force_format``.
        activations: ``uint8`` asymmetric activations (best on CPUs) or ``int8`` symmetric
            (TensorRT-style); default from the target.
        per_channel: int8 weights with one scale per output channel (else one per tensor).
        batch_size: samples per calibration run when the model's batch axis is dynamic.
        max_samples: stop calibration after this many samples (``None``: use all).
        max_shared_range_ratio: a Concat whose inputs' ranges differ by more than this factor is
            kept in float instead of forcing them through one scale.
        method: how activation ranges are chosen from the calibration data: ``minmax``,
            ``percentile`` (of ``percentile`` and ``100 - percentile``), ``entropy`` (KL
            divergence, TensorRT-style) or ``mse`` (least expected squared error).
        device: where calibration runs: ``cuda`` only if ONNX Runtime's CUDA provider really
            loads (``auto`` falls back to ``cpu`` and says so).
        memory_budget_mb: calibration exposes at most about this much tensor data per batch;
            beyond it, tensors are calibrated in several passes over the data.
        checkpoint_interval_s: seconds between calibration checkpoints in the workspace.
        quantize_unfused: also quantize the nodes whose quantized form ONNX Runtime's CPU provider
            would not fuse into an integer kernel (by default they stay float).
        reduce_range: 7-bit weights: ``auto`` only on the layers this CPU's integer kernels
            would saturate (measured on calibration data; none on CPUs with VNNI), ``always``
            on every layer, ``never``.
        external_data: how the output is written: ``auto`` as one protobuf file unless the float
            model kept its weights in external data or the output would pass protobuf's 2 GB
            limit, then with its tensors in ``OUTPUT.data`` beside it; ``always`` with
            ``OUTPUT.data``; ``never`` as one file (an error when it cannot fit).
    """

    activations: ActivationType | None = None
    target: Target = "cpu"
    format: Format = "qdq"
    force_format: bool = False
    per_channel: bool = True
    batch_size: int = 1
    max_samples: int | None = None
    max_shared_range_ratio: float = 16.0
    method: Method = "minmax"
    percentile: float = 99.99
    device: Device = "auto"
    memory_budget_mb: float = 2048.0
    checkpoint_interval_s: float = 30.0
    reduce_range: ReduceRange = "auto"
    quantize_unfused: bool = False
    external_data: ExternalData = "auto"

    def __post_init__(self) -> None:
        if self.target not in ("cpu", "cuda", "tensorrt"):
            raise ConfigError(f"target must be cpu, cuda or tensorrt, not {self.target!r}")
        if self.format not in ("qdq", "qoperator"):
            raise ConfigError(f"format must be qdq or qoperator, not {self.format!r}")
        if self.format == "qoperator" and self.target != "cpu" and not self.force_format:
            raise ConfigError(
                f"QOperator form for a {self.target} target would run on the CPU or not at all: ONNX "
                "Runtime's CUDA and TensorRT providers have no QLinear kernels; use --format qdq, or "
                "--force-format to write it anyway"
            )
        if self.activations is None:
            object.__setattr__(self, "activations", "int8" if self.target == "tensorrt" else "uint8")
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
        if self.method not in ("minmax", "percentile", "entropy", "mse"):
            raise ConfigError(
                f"method must be minmax, percentile, entropy or mse, not {self.method!r}"
            )
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], not {self.percentile}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.reduce_range not in ("auto", "always", "never"):
            raise ConfigError(f"reduce range must be auto, always or never, not {self.reduce_range!r}")
        if self.external_data not in ("auto", "always", "never"):
            raise ConfigError(f"external data must be auto, always or never, not {self.external_data!r}")
        if self.memory_budget_mb <= 0 or self.checkpoint_interval_s < 0:
            raise ConfigError("memory budget must be positive and checkpoint interval non-negative")
        if self.max_shared_range_ratio <= 1:
            raise ConfigError(
                f"max shared range ratio must be above 1, not {self.max_shared_range_ratio}"
            )

    def result_options(self) -> dict:
        """The options that determine the quantized model (not where or how fast it is made)."""
        fields = (
            "activations", "format", "per_channel", "batch_size", "max_samples", "max_shared_range_ratio", "method",
            "reduce_range", "quantize_unfused",
        )
        options = {name: getattr(self, name) for name in fields}
        if self.method == "percentile":
            options["percentile"] = self.percentile
        return options
