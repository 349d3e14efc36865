"""Opset fitting: per-channel Q/DQ needs opset 13, and ONNX Runtime may lag the onnx package."""

from __future__ import annotations

import functools

import onnx
import onnx.version_converter
import onnxruntime as ort

from onnxq.errors import ModelError, first_line
from onnxq.load.model import uses_external_data

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no ai.onnx opset; it is not a standard ONNX model")


@functools.cache
def runtime_opset() -> int:
    """The newest ``ai.onnx`` opset the installed ONNX Runtime loads, probed with one-node models
    (it may be older than the newest opset the installed onnx package defines)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals are expected
    for version in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1):
        probe = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
            ),
            opset_imports=[onnx.helper.make_opsetid("", version)],
        )
        probe.ir_version = onnx.helper.find_min_ir_version_for(probe.opset_import)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:
            continue
        return version
    return MIN_OPSET


def fit_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Bring a model below opset 13 up to 13 (per-channel Q/DQ), and one above the newest
    opset ONNX Runtime loads (``runtime_opset``) down to it; returns the model and a note
    when it converted."""
    version = default_opset(proto)
    newest = runtime_opset()
    if version < MIN_OPSET:
        target, why = MIN_OPSET, "which per-channel quantization needs"
    elif version > newest:
        target, why = newest, f"the newest the installed ONNX Runtime {ort.__version__} runs"
    else:
        return proto, None
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        if not uses_external_data(converted):  # else the output's check covers it, by path
            onnx.checker.check_model(converted)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {version} and could not be converted to opset {target}, {why} "
            f"({type(exc).__name__}: {first_line(exc)}); re-export it with opset {target}"
        ) from exc
    return converted, f"model converted from opset {version} to {target}, {why}"
