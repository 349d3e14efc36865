"""onnxq: ONNX float model in, accurate int8 ONNX model out."""

from onnxq.config import QuantConfig
from onnxq.convert import ConversionResult, OpCount, convert, recover
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    ModelError,
    OnnxqError,
    OutputError,
)
from onnxq.evaluate import Fidelity, OutputFidelity
from onnxq.images import ImageFolder

from onnxq._version import __version__

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "ConversionResult",
    "Fidelity",
    "ImageFolder",
    "ModelError",
    "OnnxqError",
    "OpCount",
    "OutputError",
    "OutputFidelity",
    "QuantConfig",
    "convert",
    "recover",
]
