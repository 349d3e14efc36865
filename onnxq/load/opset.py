"""Opset and IR version fitting: per-channel Q/DQ needs opset 13, and ONNX Runtime may lag the
onnx package (in opsets and in IR versions).

Rules:
1. A model below opset 13 is converted up to 13; one above the newest opset ONNX Runtime loads
   is converted down to it.
2. A model below IR version 4 (where every initializer must also be a graph input) is raised to
   the IR version its opsets need, and its initializers are no longer listed as graph inputs:
   they are the model's weights, which IR 3 could not mark as constants, and only constants are
   quantized. IR 4 changed nothing else a model relies on, so this is always safe.
3. A model whose IR version is below the one its (fitted) opsets need is raised to it.
4. A model whose IR version is newer than ONNX Runtime reads is lowered to the newest it reads
   when nothing in it needs more (its opsets and its tensor element types); otherwise it is
   refused with the IR version it needs.
Each change is reported in a note.
"""

from __future__ import annotations

import functools

import onnx
import onnx.version_converter
import onnxruntime as ort

from onnxq.errors import ModelError, first_line
from onnxq.graph import proto_graphs
from onnxq.load.model import uses_external_data

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
SEPARATE_INITIALIZERS_IR = 4  # initializers need not be graph inputs since IR version 4

_T = onnx.TensorProto
ELEMENT_TYPE_IR = {  # element types added after IR version 3, with the IR version that added them
    _T.BFLOAT16: 4,
    _T.FLOAT8E4M3FN: 9, _T.FLOAT8E4M3FNUZ: 9, _T.FLOAT8E5M2: 9, _T.FLOAT8E5M2FNUZ: 9,
    _T.UINT4: 10, _T.INT4: 10,
    _T.FLOAT4E2M1: 11,
    _T.FLOAT8E8M0: 12,
    _T.UINT2: 13, _T.INT2: 13,
    _T.FLOAT6E2M3: 14, _T.FLOAT6E3M2: 14,
}


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no ai.onnx opset; it is not a standard ONNX model")


def _runtime_loads(opset: int, ir_version: int | None = None) -> bool:
    """Whether the installed ONNX Runtime loads a one-node model of ``opset`` and ``ir_version``
    (default: the lowest IR version ``opset`` allows)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals are expected
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
    )
    probe.ir_version = ir_version or onnx.helper.find_min_ir_version_for(probe.opset_import)
    try:
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


@functools.cache
def runtime_opset() -> int:
    """The newest ``ai.onnx`` opset the installed ONNX Runtime loads, probed with one-node models
    (it may be older than the newest opset the installed onnx package defines)."""
    return next((v for v in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1) if _runtime_loads(v)), MIN_OPSET)


@functools.cache
def runtime_ir_version() -> int:
    """The newest IR version the installed ONNX Runtime loads, probed like ``runtime_opset``."""
    return next((v for v in range(onnx.IR_VERSION, 7, -1) if _runtime_loads(MIN_OPSET, v)), 7)


def fit_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Rule 1: bring a model below opset 13 up to 13 (per-channel Q/DQ), and one above the newest
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


def _drop_initializer_inputs(proto: onnx.ModelProto) -> int:
    """Remove the initializers of ``proto`` from its graph inputs (the IR 3 rule), in place;
    returns how many were listed there."""
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    dropped = len(proto.graph.input) - len(inputs)
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    return dropped


def needed_ir_version(proto: onnx.ModelProto) -> int:
    """The lowest IR version ``proto`` can declare: what its opsets and tensor element types need."""
    needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    for graph in proto_graphs(proto.graph):
        types = [init.data_type for init in graph.initializer]
        types += [value.type.tensor_type.elem_type for value in [*graph.input, *graph.output, *graph.value_info]]
        types += [attr.t.data_type for node in graph.node for attr in node.attribute if attr.HasField("t")]
        needed = max([needed, *(ELEMENT_TYPE_IR.get(t, 0) for t in types)])
    return needed


def fit_ir_version(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Rules 2-4, on a model whose opset is fitted: its IR version fitted to what it needs and
    ONNX Runtime reads; returns the model and a note when it changed."""
    version, needed, newest = proto.ir_version, needed_ir_version(proto), runtime_ir_version()
    if needed > newest:
        raise ModelError(
            f"the model needs IR version {needed}, newer than the {newest} the installed ONNX Runtime "
            f"{ort.__version__} reads; upgrade onnxruntime"
        )
    if version >= SEPARATE_INITIALIZERS_IR and needed <= version <= newest:
        return proto, None
    fitted = onnx.ModelProto()
    fitted.CopyFrom(proto)
    fitted.ir_version = min(max(version, needed), newest)
    if version < SEPARATE_INITIALIZERS_IR:
        why = f"its {_drop_initializer_inputs(fitted)} initializer(s) are weights, no longer listed as graph inputs"
    elif version > newest:
        why = f"the newest the installed ONNX Runtime {ort.__version__} reads; nothing in the model needs more"
    else:
        why = "which its opsets need"
    return fitted, f"model IR version {version} changed to {fitted.ir_version}, {why}"
