"""onnxq: ONNX float model in, accurate int8 ONNX model out."""

from onnxq._version import __version__
from onnxq.analysis.rules import parse_rule, save_rules
from onnxq.api import ConversionResult, convert, recover
from onnxq.calibration.images import ImageFolder
from onnxq.config import FallbackOptions, QuantConfig, RunOptions
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    DeviceError,
    ModelError,
    OnnxqError,
    OutputError,
    WorkspaceError,
)
from onnxq.report.compare import Comparison, LayerFidelity, compare
from onnxq.report.evaluate import Fidelity, OutputFidelity
from onnxq.rewrite.build import OpCount
from onnxq.tune.fallback import FallbackReport, KeptNode

__all__ = [
    "__version__",
    "CalibrationDataError",
    "Comparison",
    "ConfigError",
    "ConversionResult",
    "DeviceError",
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
    "RunOptions",
    "compare",
    "convert",
    "parse_rule",
    "recover",
    "save_rules",
    "WorkspaceError",
]
