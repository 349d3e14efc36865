"""Carry out a ``QuantPlan`` as QuantizeLinear/DequantizeLinear nodes on an ``onnx_ir`` graph.

Rules:
1. A quantized weight becomes an int8 initializer feeding a DequantizeLinear (per channel where
   the plan says so); the float initializer is removed, never kept beside it.
2. A quantized bias becomes an int32 initializer with scale ``s_x * s_w``; weight scales are
   widened first on channels whose bias would not fit in int32.
3. A quantized activation gets QuantizeLinear -> DequantizeLinear. When a quantized node produced
   it, every consumer reads the dequantized tensor (so the producer can run in integers); when a
   float node produced it, only the quantized consumers do.
4. A quantized constant activation (say the constant of an Add) is stored quantized with a
   DequantizeLinear, and every consumer reads that.
5. Graph inputs and outputs keep their names and types.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.model_io import release_mapped
from onnxq.plan import QuantPlan, is_constant
from onnxq.quant_math import REDUCED_WEIGHT_QMAX, WEIGHT_QMAX, QuantParams, quantize, quantize_bias, weight_scale


class Emitter:
    """Creates uniquely named values, initializers and Q/DQ nodes in one graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._names = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            self._names.update(v.name for v in node.outputs)

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self._names:
            candidate, index = f"{name}_{index}", index + 1
        self._names.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        name = self.unique(name)
        value = ir.Value(
            name=name,
            const_value=ir.tensor(array, name=name),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
        )
        self.graph.register_initializer(value)
        return value

    def params(self, base: str, params: QuantParams) -> tuple[ir.Value, ir.Value]:
        scale = self.initializer(f"{base}_scale", params.scale)
        zero_point = self.initializer(f"{base}_zero_point", params.zero_point)
        return scale, zero_point

    def node(self, op_type: str, inputs: list[ir.Value], output: ir.Value, axis: int | None = None) -> ir.Node:
        attributes = {} if axis is None else {"axis": axis}
        node = ir.node(op_type, inputs, attributes, outputs=[output], name=self.unique(f"{output.name}_node"))
        self.graph.append(node)
        return node

    def dequantize(self, quantized: ir.Value, scale: ir.Value, zero_point: ir.Value, like: ir.Value, axis: int | None = None) -> ir.Value:
        output = ir.Value(name=self.unique(f"{like.name}_dequantized"), type=like.type, shape=like.shape)
        self.node("DequantizeLinear", [quantized, scale, zero_point], output, axis)
        return output

    def remove_if_unused(self, value: ir.Value) -> None:
        if not value.uses() and not value.is_graph_output() and value.name in self.graph.initializers:
            self.graph.initializers.pop(value.name)


@dataclasses.dataclass
class RewriteReport:
    """What the rewrite had to adjust beyond the plan."""

    notes: list[str]


def _quantize_weights_and_biases(
    emitter: Emitter, plan: QuantPlan, notes: list[str], reduced_range: set[ir.Node]
) -> None:
    uses: dict[ir.Value, list[ir.Node]] = {}
    for node, decision in plan.decisions.items():
        if decision.weight_slot is not None:
            uses.setdefault(node.inputs[decision.weight_slot], []).append(node)
    for weight, nodes in uses.items():
        axes = {plan.decisions[node].weight_axis for node in nodes}
        axis = axes.pop() if len(axes) == 1 else None  # consumers disagree: one scale for all
        array = weight.const_value.numpy()
        qmax = REDUCED_WEIGHT_QMAX if reduced_range.intersection(nodes) else WEIGHT_QMAX
        scale = weight_scale(array, axis, qmax)
        biased = [(n, plan.decisions[n].bias_slot) for n in nodes if plan.decisions[n].bias_slot is not None]
        for node, slot in biased:  # widen the scale first, so that every bias fits
            fitted = quantize_bias(node.inputs[slot].const_value.numpy(), _input_scale(plan, node), scale)
            if fitted.widened_channels:
                notes.append(
                    f"{node.op_type} {node.name!r}: weight scale widened on "
                    f"{len(fitted.widened_channels)} channel(s) so its int32 bias does not overflow"
                )
            scale = fitted.weight_scale
        params = QuantParams(scale, np.zeros(scale.shape, np.int8), axis if scale.ndim else None)
        quantized = emitter.initializer(f"{weight.name}_quantized", quantize(array, params))
        dequantized = emitter.dequantize(quantized, *emitter.params(weight.name, params), weight, params.axis)
        weight.replace_all_uses_with(dequantized)
        emitter.remove_if_unused(weight)
        del array
        release_mapped(weight.const_value)  # a big model's float weight, mapped from disk, is done with
        for node, slot in biased:
            bias = node.inputs[slot]
            fitted = quantize_bias(bias.const_value.numpy(), _input_scale(plan, node), scale)
            bias_params = QuantParams(fitted.scale, np.zeros(fitted.scale.shape, np.int32))
            values = emitter.initializer(f"{bias.name}_quantized", fitted.values)
            bias_axis = 0 if fitted.scale.ndim else None
            node.replace_input_with(
                slot, emitter.dequantize(values, *emitter.params(bias.name, bias_params), bias, bias_axis)
            )
            emitter.remove_if_unused(bias)


def _input_scale(plan: QuantPlan, node: ir.Node) -> np.ndarray:
    return plan.params[node.inputs[0]].scale


def _quantize_activations(emitter: Emitter, plan: QuantPlan) -> None:
    shared_params: dict[int, tuple[ir.Value, ir.Value]] = {}
    for value, params in plan.params.items():
        if id(params) not in shared_params:
            shared_params[id(params)] = emitter.params(value.name, params)
        scale, zero_point = shared_params[id(params)]
        if is_constant(value):
            stored = emitter.initializer(f"{value.name}_quantized", quantize(value.const_value.numpy(), params))
            value.replace_all_uses_with(emitter.dequantize(stored, scale, zero_point, value))
            emitter.remove_if_unused(value)
            continue
        quantized = ir.Value(
            name=emitter.unique(f"{value.name}_quantized"),
            type=ir.TensorType(ir.DataType.from_numpy(params.dtype)),
            shape=value.shape,
        )
        quantize_node = emitter.node("QuantizeLinear", [value, scale, zero_point], quantized)
        dequantized = emitter.dequantize(quantized, scale, zero_point, value)
        produced_quantized = value in plan.quantized_outputs
        for consumer, slot in list(value.uses()):
            if consumer is quantize_node:
                continue
            decision = plan.decisions.get(consumer)
            if produced_quantized or (decision is not None and slot in decision.activation_slots):
                consumer.replace_input_with(slot, dequantized)
        if produced_quantized and value.is_graph_output():
            name = value.name
            value.name = emitter.unique(f"{name}_float")
            dequantized.name = name
            outputs = emitter.graph.outputs
            for index, output in enumerate(outputs):
                if output is value:
                    outputs[index] = dequantized


def apply_qdq(model: ir.Model, plan: QuantPlan, reduced_range: set[ir.Node] = frozenset()) -> RewriteReport:
    """Rewrite ``model``'s main graph in place to the QDQ form ``plan`` describes; the weights of
    ``reduced_range`` nodes get 7 bits."""
    emitter = Emitter(model.graph)
    notes: list[str] = []
    _quantize_weights_and_biases(emitter, plan, notes, set(reduced_range))
    _quantize_activations(emitter, plan)
    model.graph.sort()
    return RewriteReport(notes)
