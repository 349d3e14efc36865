"""onnxq: ONNX float model in, accurate int8 ONNX model out."""

from onnxq.compare import Comparison, LayerFidelity, compare
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
from onnxq.rules import parse_rule, save_rules
from onnxq.tuning import FallbackOptions, FallbackReport, KeptNode

from onnxq._version import __version__

__all__ = [
    "CalibrationDataError",
    "Comparison",
    "ConfigError",
    "ConversionResult",
    "FallbackOptions",
    "FallbackReport",
    "Fidelity",
    "ImageFolder",
    "KeptNode",
    "LayerFidelity",
    "ModelError",
    "OnnxqError",
    "OpCount",
    "OutputError",
    "OutputFidelity",
    "QuantConfig",
    "compare",
    "convert",
    "parse_rule",
    "recover",
    "save_rules",
]
