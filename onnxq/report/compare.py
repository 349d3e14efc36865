"""``onnxq compare``: how far a quantized model is from its float original, output by output and
tensor by tensor.

Per-layer matching is by topology, not by names:
1. The float model is cleaned up as ``convert`` does (folded constants and BatchNorms).
2. In a copy of the quantized model every QuantizeLinear -> DequantizeLinear pair is bypassed
   and every quantized constant is dequantized, which gives back the float graph's structure.
3. Both graphs get topology signatures; a quantized tensor (a DequantizeLinear output) is
   paired with the float tensor of the same signature.
Per-layer values are read with those tensors exposed as extra model outputs, so they come from
unfused QDQ arithmetic; per-output metrics come from the models as they are.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir

from onnxq.analysis.signatures import tensor_keys
from onnxq.calibration.data import BatchSource, DataSource, model_inputs
from onnxq.graph import constant_array, with_outputs
from onnxq.load.model import external_data_folder, load_model
from onnxq.load.prepare import ModelInput, load
from onnxq.report.evaluate import ErrorAccumulator, Fidelity, compare_models
from onnxq.runtime import create_session


@dataclasses.dataclass(frozen=True)
class LayerFidelity:
    """One quantized tensor against its float counterpart: the float tensor's name, the op that
    produces it (``input`` for a graph input), and SQNR, cosine and max abs error."""

    tensor: str
    op: str
    sqnr_db: float
    cosine: float
    max_abs_error: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Per-output fidelity and the per-layer table, worst SQNR first."""

    fidelity: Fidelity
    layers: tuple[LayerFidelity, ...]
    notes: tuple[str, ...]


def _dequantized(node: ir.Node) -> np.ndarray:
    """The float values of a DequantizeLinear of constants."""
    q, scale = constant_array(node.inputs[0]), constant_array(node.inputs[1])
    zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros_like(scale)
    axis = node.attributes.get("axis")
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim:
        shape[(axis.as_int() if axis is not None else 1) % q.ndim] = scale.size
    return ((q.astype(np.float64) - zero.reshape(shape or ())) * scale.reshape(shape or ())).astype(np.float32)


def _strip_qdq(model: ir.Model) -> dict[str, str]:
    """Bypass Q->DQ pairs and dequantize quantized constants in place; returns, for each
    DequantizeLinear output of an activation, the name of the float tensor it stands for."""
    graph = model.graph
    pairs = {}
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.outputs[0].is_graph_output():
            continue
        source = node.inputs[0]
        producer = source.producer()
        if producer is not None and producer.op_type == "QuantizeLinear":
            original = producer.inputs[0]
        elif constant_array(source) is not None and constant_array(node.inputs[1]) is not None:
            array = _dequantized(node)
            original = ir.Value(name=f"{node.outputs[0].name}_float", const_value=ir.tensor(array),
                                type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape))
            graph.register_initializer(original)
        else:
            continue
        if producer is not None:
            pairs[node.outputs[0].name] = original.name
        node.outputs[0].replace_all_uses_with(original)
        graph.remove(node, safe=True)
        if producer is not None and not producer.outputs[0].uses() and not producer.outputs[0].is_graph_output():
            graph.remove(producer, safe=True)
    return pairs


def compare(
    float_model: ModelInput,
    quantized_model: ModelInput,
    data: DataSource,
    batch_size: int = 1,
    max_samples: int | None = None,
) -> Comparison:
    """Run both models on ``data``: per-output SQNR, cosine, max error and top-1 (``Fidelity``),
    and each quantized tensor's SQNR vs float, located by topology. Either model may keep its
    weights in external data files beside it."""
    loaded = load(float_model)
    float_ir, float_proto = loaded.model, loaded.cleaned
    quant_proto = load_model(quantized_model)
    quant_folder = external_data_folder(quantized_model, quant_proto)
    stripped = ir.from_proto(onnx.shape_inference.infer_shapes(quant_proto, strict_mode=False, data_prop=True))
    if quant_folder is not None:
        ir.external_data.set_base_dir(stripped.graph, quant_folder)
    pairs = _strip_qdq(stripped)
    quant_keys = tensor_keys(stripped.graph)
    float_by_key = {key: name for name, key in loaded.keys.tensors.items()}
    producers = {v.name: "input" for v in float_ir.graph.inputs}
    for node in float_ir.graph:
        producers.update((v.name, node.op_type) for v in node.outputs)
    matched = {dq: float_by_key[quant_keys[x]] for dq, x in pairs.items() if quant_keys.get(x) in float_by_key}
    notes = []
    if not pairs:
        notes.append("the quantized model has no QuantizeLinear/DequantizeLinear pairs (QOperator form?): "
                     "only per-output metrics")
    elif len(matched) < len(pairs):
        notes.append(f"{len(pairs) - len(matched)} of {len(pairs)} quantized tensors have no float counterpart "
                     "of the same structure and are not in the per-layer table")


    def quantized_session(proto: onnx.ModelProto):
        return create_session(proto, "the quantized model", external_folder=quant_folder)

    inputs = model_inputs(float_proto)
    source = BatchSource(data, inputs, batch_size, max_samples)
    fidelity = compare_models(loaded.float_session(float_proto), quantized_session(quant_proto), source())
    accumulators = {dq: ErrorAccumulator() for dq in matched}
    if matched:
        float_names = sorted(set(matched.values()))
        float_session = loaded.float_session(with_outputs(float_proto, float_names))
        quant_session = quantized_session(with_outputs(quant_proto, list(matched)))
        for batch in source():
            reference = dict(zip(float_names, float_session.run(float_names, batch.feed)))
            quantized = quant_session.run(list(matched), batch.feed)
            for (dq, float_name), values in zip(matched.items(), quantized):
                accumulators[dq].update(reference[float_name], values)
    layers = []
    for dq, float_name in matched.items():
        result = accumulators[dq].result(float_name)
        layers.append(LayerFidelity(float_name, producers.get(float_name, "?"), result.sqnr_db, result.cosine,
                                    result.max_abs_error))
    layers.sort(key=lambda layer: layer.sqnr_db)
    return Comparison(fidelity, tuple(layers), tuple(notes))
