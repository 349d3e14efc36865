"""onnxq: ONNX float model in, accurate int8 ONNX model out."""

import importlib

from onnxq._version import __version__
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    DeviceError,
    ModelError,
    OnnxqError,
    OutputError,
    WorkspaceError,
)

# The public names below are imported when first used: ``import onnxq`` (and so ``onnxq --help``)
# does not load ONNX, ONNX Runtime and their dependencies until a conversion needs them.
_LAZY = {
    "parse_rule": "onnxq.analysis.rules",
    "save_rules": "onnxq.analysis.rules",
    "ConversionResult": "onnxq.api",
    "convert": "onnxq.api",
    "recover": "onnxq.api",
    "ImageFolder": "onnxq.calibration.images",
    "FallbackOptions": "onnxq.config",
    "QuantConfig": "onnxq.config",
    "RunOptions": "onnxq.config",
    "Comparison": "onnxq.report.compare",
    "LayerFidelity": "onnxq.report.compare",
    "compare": "onnxq.report.compare",
    "Fidelity": "onnxq.report.evaluate",
    "OutputFidelity": "onnxq.report.evaluate",
    "OpCount": "onnxq.rewrite.build",
    "FallbackReport": "onnxq.tune.fallback",
    "KeptNode": "onnxq.tune.fallback",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
