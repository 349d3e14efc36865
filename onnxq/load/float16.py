"""Float16 models, computed in float32 inside the model and float16 at its interface.

ONNX Runtime's CPU provider quantizes and fuses float32 Q/DQ groups (QLinearConv and friends
take float32 scales); a float16 graph would get neither. So a float16 model is lifted:

Rules:
1. A model with a float16 tensor (an input, output, initializer, constant or annotated value,
   in bodies too) and no Q/DQ nodes is lifted; an already quantized model is left as it is.
2. Every float16 initializer, constant and annotation becomes float32 (values converted
   exactly), and every Cast or ``dtype`` attribute to float16 targets float32 instead.
3. Each float16 graph input stays float16 and feeds a Cast to float32 that its readers read;
   each float16 graph output keeps its name and type, computed by a Cast from the float32
   value. The model's interface is unchanged.
Calibration, rewriting and the fidelity report then see a float32 graph (the reference is the
float16 model computed in float32); the int8 weights halve the float16 file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.graph import all_nodes, bodies, taken_names, unique_name
from onnxq.rewrite.qoperator import has_quantize_nodes

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
_DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; RandomNormal/RandomUniform/EyeLike/... output types


def _graphs(model: ir.Model) -> list[ir.Graph]:
    return [model.graph, *(body for node in all_nodes(model.graph) for _, body in bodies(node))]


def _values(graph: ir.Graph) -> list[ir.Value]:
    """Every tensor ``graph`` defines or returns: inputs, initializers, node outputs, outputs."""
    return [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs), *graph.outputs]


def _float16_attributes(node: ir.Node) -> list[ir.Attr]:
    return [
        attr for attr in node.attributes.values()
        if (attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F16)
        or (attr.name in _DTYPE_ATTRIBUTES and attr.type == ir.AttributeType.INT and attr.value == F16)
    ]


def computes_in_float16(model: ir.Model) -> bool:
    """Rule 1's test: a float16 tensor somewhere, and no Q/DQ node."""
    has_float16 = any(v.dtype == F16 for g in _graphs(model) for v in _values(g)) or any(
        _float16_attributes(node) for node in all_nodes(model.graph))
    return has_float16 and not has_quantize_nodes(model)


def _lift_values(model: ir.Model) -> None:
    """Rule 2: float16 tensors, constants and target types become float32 (main inputs stay)."""
    main_inputs = set(model.graph.inputs)
    for graph in _graphs(model):
        for value in _values(graph):
            if value.dtype != F16 or value in main_inputs:
                continue
            value.dtype = F32
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    for node in all_nodes(model.graph):
        for attr in _float16_attributes(node):
            if attr.type == ir.AttributeType.TENSOR:
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.tensor(attr.value.numpy().astype(np.float32)))
            else:
                node.attributes[attr.name] = ir.AttrInt64(attr.name, F32)


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    node = ir.node("Cast", [value], attributes={"to": to}, name=f"{name}_cast")
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = name, to, value.shape
    return node


def _cast_interface(model: ir.Model, float16_outputs: list[int]) -> None:
    """Rule 3: Casts after the float16 inputs and before the float16 outputs (by index)."""
    graph, taken = model.graph, taken_names(model.graph)
    casts = []
    for value in graph.inputs:
        uses = list(value.uses())
        if value.dtype != F16 or not uses:
            continue
        cast = _cast(value, F32, unique_name(f"{value.name}_float32", taken))
        for use in uses:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        casts.append(cast)
    if casts:
        graph.insert_before(graph[0], casts)
    cast_outputs: dict[ir.Value, ir.Value] = {}  # one Cast per value, however often it is returned
    for index in float16_outputs:
        value = graph.outputs[index]
        if value.dtype == F16:  # a float16 input returned as it is
            continue
        if value not in cast_outputs:
            name = value.name
            value.name = unique_name(f"{name}_float32", taken)
            cast = _cast(value, F16, name)
            graph.append(cast)
            cast_outputs[value] = cast.outputs[0]
        graph.outputs[index] = cast_outputs[value]


def lift_float16(proto: onnx.ModelProto, external_folder: Path | None = None) -> tuple[onnx.ModelProto, str | None]:
    """``proto`` computed in float32 with its float16 interface kept (see the module rules), and
    a note; ``proto`` itself when it has no float16 tensor or is already quantized. Weights in
    external data files (in ``external_folder``) are read to be converted."""
    model = ir.from_proto(proto)
    if external_folder is not None:
        ir.external_data.set_base_dir(model.graph, external_folder)
    if not computes_in_float16(model):
        return proto, None
    float16_outputs = [index for index, value in enumerate(model.graph.outputs) if value.dtype == F16]
    _lift_values(model)
    _cast_interface(model, float16_outputs)
    return ir.to_proto(model), (
        "float16 model: computed and quantized in float32 inside, its float16 inputs and outputs kept through Casts"
    )
