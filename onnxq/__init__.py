"""onnxq: ONNX float model in, accurate int8 ONNX model out."""

from onnxq.config import QuantConfig
from onnxq.convert import ConversionResult, OpCount, convert
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    ModelError,
    OnnxqError,
    OutputError,
)
from onnxq.evaluate import Fidelity, OutputFidelity

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "ConversionResult",
    "Fidelity",
    "ModelError",
    "OnnxqError",
    "OpCount",
    "OutputError",
    "OutputFidelity",
    "QuantConfig",
    "convert",
]
