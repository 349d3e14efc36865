"""Carry out a ``QuantPlan`` as QuantizeLinear/DequantizeLinear nodes on an ``onnx_ir`` graph.

Rules:
1. A quantized weight becomes an int8 initializer feeding a DequantizeLinear (per channel where
   the plan says so); the float initializer is removed, never kept beside it.
2. A quantized bias becomes an int32 initializer with scale ``s_x * s_w``; weight scales are
   widened first on channels whose bias would not fit in int32. A weight with learned integers
   (``onnxq.tune.rounding``) gets them where its scale is the one they were rounded for.
3. A quantized activation gets QuantizeLinear -> DequantizeLinear. When a quantized node produced
   it, every consumer reads the dequantized tensor (so the producer can run in integers); when a
   float node produced it, only the quantized consumers do.
4. A quantized constant activation (say the constant of an Add) is stored quantized with a
   DequantizeLinear, and every consumer reads that.
5. Graph inputs and outputs keep their names and types.
6. Inside If/Loop/Scan bodies: the QuantizeLinear (or the integer constant) and its scale sit
   in the graph that defines the tensor, and each graph with consumers gets its own
   DequantizeLinear right beside them, reading the integer tensor and scale as outer-scope
   values where needed. ONNX Runtime fuses such groups inside bodies (QLinearMatMul in a Loop
   body, say), which it would not do across a graph boundary.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.errors import ModelError
from onnxq.files import release_mapped
from onnxq.graph import (
    add_initializer,
    is_constant,
    owning_graph,
    taken_names,
    unique_name,
)
from onnxq.passes import GraphPass, PassResult
from onnxq.rewrite.plan import QuantPlan
from onnxq.rewrite.quant_math import (
    REDUCED_WEIGHT_QMAX,
    WEIGHT_QMAX,
    QuantParams,
    quantize,
    quantize_bias,
    weight_scale,
)


class Emitter:
    """Creates uniquely named values, initializers and Q/DQ nodes in one graph."""

    def __init__(self, graph: ir.Graph, names: set[str] | None = None) -> None:
        """``names``: the names already taken, shared by the emitters of one model's graphs
        (default: those of ``graph`` and its subgraphs)."""
        self.graph = graph
        self._names = taken_names(graph) if names is None else names

    def unique(self, name: str) -> str:
        return unique_name(name, self._names)

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self._names, name, array)

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
        output = ir.Value(name=self.unique(f"{like.name}_dequantized"), type=ir.TensorType(ir.DataType.FLOAT), shape=like.shape)
        self.node("DequantizeLinear", [quantized, scale, zero_point], output, axis)
        return output

    def remove_if_unused(self, value: ir.Value) -> None:
        if not value.uses() and not value.is_graph_output() and value.name in self.graph.initializers:
            self.graph.initializers.pop(value.name)

    def names(self) -> set[str]:
        """The taken names, to share with the emitter of another graph of the same model."""
        return self._names


class _Emitters:
    """One ``Emitter`` per graph of a model (main graph and bodies), sharing one set of names."""

    def __init__(self, model: ir.Model) -> None:
        main = Emitter(model.graph)
        self._by_graph = {model.graph: main}
        self._names = main.names()

    def __getitem__(self, graph: ir.Graph) -> Emitter:
        if graph not in self._by_graph:
            self._by_graph[graph] = Emitter(graph, self._names)
        return self._by_graph[graph]

    def remove_if_unused(self, value: ir.Value) -> None:
        graph = owning_graph(value)
        if graph is not None:
            self[graph].remove_if_unused(value)


class _Dequantized:
    """The dequantized form of one integer tensor: a DequantizeLinear in each graph that reads
    it, made on first request, so that each sits beside its consumers (the integer tensor and
    its scale may live in an outer graph)."""

    def __init__(self, emitters: _Emitters, quantized: ir.Value, scale: ir.Value, zero_point: ir.Value,
                 like: ir.Value, axis: int | None = None) -> None:
        self._emitters = emitters
        self._inputs = (quantized, scale, zero_point)
        self._like, self._axis = like, axis
        self._by_graph: dict[ir.Graph, ir.Value] = {}

    def in_graph(self, graph: ir.Graph) -> ir.Value:
        if graph not in self._by_graph:
            self._by_graph[graph] = self._emitters[graph].dequantize(*self._inputs, self._like, self._axis)
        return self._by_graph[graph]

    def replace_uses(self, value: ir.Value) -> None:
        """Every consumer of ``value``, in any graph, reads the dequantized tensor instead."""
        for consumer, slot in list(value.uses()):
            consumer.replace_input_with(slot, self.in_graph(consumer.graph))


def _finite(value: ir.Value, node: ir.Node) -> np.ndarray:
    """The values of a constant that is to be quantized; NaN or Inf has no integer form."""
    array = value.const_value.numpy()
    if not np.isfinite(array).all():
        raise ModelError(
            f"{value.name!r}, a constant input of {node.op_type} {node.name!r}, holds NaN or Inf, which has no "
            "integer form; fix the model's weights"
        )
    return array


def _weight_values(array: np.ndarray, params: QuantParams, nodes: list[ir.Node],
                   rounded: dict[ir.Node, tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """The learned integers of a weight (``onnxq.tune.rounding``) when they were rounded for
    exactly the scale ``params`` has, else ``None`` (round to nearest)."""
    learned = rounded.get(nodes[0]) if len(nodes) == 1 else None
    if learned is None or learned[0].shape != array.shape or not np.array_equal(learned[1], params.scale):
        return None
    return learned[0]


def _quantize_weights_and_biases(
    emitters: _Emitters, plan: QuantPlan, notes: list[str], reduced_range: set[ir.Node],
    rounded: dict[ir.Node, tuple[np.ndarray, np.ndarray]],
) -> None:
    uses: dict[ir.Value, list[ir.Node]] = {}
    for node, decision in plan.decisions.items():
        if decision.weight_slot is not None:
            uses.setdefault(node.inputs[decision.weight_slot], []).append(node)
    unused = 0
    for weight, nodes in uses.items():
        axes = {plan.decisions[node].weight_axis for node in nodes}
        axis = axes.pop() if len(axes) == 1 else None  # consumers disagree: one scale for all
        array = _finite(weight, nodes[0])
        qmax = REDUCED_WEIGHT_QMAX if reduced_range.intersection(nodes) else WEIGHT_QMAX
        scale = weight_scale(array, axis, qmax)
        biased = [(n, plan.decisions[n].bias_slot) for n in nodes if plan.decisions[n].bias_slot is not None]
        for node, slot in biased:  # widen the scale first, so that every bias fits
            fitted = quantize_bias(_finite(node.inputs[slot], node), _input_scale(plan, node), scale)
            if fitted.widened_channels:
                notes.append(
                    f"{node.op_type} {node.name!r}: weight scale widened on "
                    f"{len(fitted.widened_channels)} channel(s) so its int32 bias does not overflow"
                )
            scale = fitted.weight_scale
        params = QuantParams(scale, np.zeros(scale.shape, np.int8), axis if scale.ndim else None)
        owner = emitters[owning_graph(weight)]
        learned = _weight_values(array, params, nodes, rounded)
        unused += learned is None and any(node in rounded for node in nodes)
        stored = owner.initializer(f"{weight.name}_quantized", quantize(array, params) if learned is None else learned)
        _Dequantized(emitters, stored, *owner.params(weight.name, params), weight, params.axis).replace_uses(weight)
        emitters.remove_if_unused(weight)
        del array
        release_mapped(weight.const_value)  # a big model's float weight, mapped from disk, is done with
        for node, slot in biased:
            bias = node.inputs[slot]
            fitted = quantize_bias(bias.const_value.numpy(), _input_scale(plan, node), scale)
            bias_params = QuantParams(fitted.scale, np.zeros(fitted.scale.shape, np.int32))
            emitter = emitters[node.graph]
            values = emitter.initializer(f"{bias.name}_quantized", fitted.values)
            bias_axis = 0 if fitted.scale.ndim else None
            node.replace_input_with(
                slot, emitter.dequantize(values, *emitter.params(bias.name, bias_params), bias, bias_axis)
            )
            emitters.remove_if_unused(bias)
    if unused:
        notes.append(f"learned rounding not used on {unused} layer(s) whose weight scale differs from the one it "
                     "was rounded for (widened so that the int32 bias fits): rounded to nearest there")


def _input_scale(plan: QuantPlan, node: ir.Node) -> np.ndarray:
    return plan.params[node.inputs[0]].scale


def _quantize_activations(emitters: _Emitters, plan: QuantPlan) -> None:
    shared_params: dict[tuple[int, ir.Graph], tuple[ir.Value, ir.Value]] = {}
    for value, params in plan.params.items():
        emitter = emitters[owning_graph(value)]
        if (id(params), emitter.graph) not in shared_params:  # a group's scale, once per graph
            shared_params[id(params), emitter.graph] = emitter.params(value.name, params)
        scale, zero_point = shared_params[id(params), emitter.graph]
        if is_constant(value):
            stored = emitter.initializer(f"{value.name}_quantized", quantize(value.const_value.numpy(), params))
            _Dequantized(emitters, stored, scale, zero_point, value).replace_uses(value)
            emitter.remove_if_unused(value)
            continue
        quantized = ir.Value(
            name=emitter.unique(f"{value.name}_quantized"),
            type=ir.TensorType(ir.DataType.from_numpy(params.dtype)),
            shape=value.shape,
        )
        quantize_node = emitter.node("QuantizeLinear", [value, scale, zero_point], quantized)
        dequantized = _Dequantized(emitters, quantized, scale, zero_point, value)
        produced_quantized = value in plan.quantized_outputs
        for consumer, slot in list(value.uses()):
            if consumer is quantize_node:
                continue
            decision = plan.decisions.get(consumer)
            if produced_quantized or (decision is not None and slot in decision.activation_slots):
                consumer.replace_input_with(slot, dequantized.in_graph(consumer.graph))
        if produced_quantized and value.is_graph_output():
            output_value = dequantized.in_graph(emitter.graph)
            name = value.name
            value.name = emitter.unique(f"{name}_float")
            output_value.name = name
            outputs = emitter.graph.outputs
            for index, output in enumerate(outputs):
                if output is value:
                    outputs[index] = output_value


class QdqPass(GraphPass):
    """Rewrite a model (main graph and bodies) to the QDQ form ``plan`` describes (the rules
    above); the weights of ``reduced_range`` nodes get 7 bits. Notes say what the rewrite had to
    adjust beyond the plan."""

    def __init__(self, plan: QuantPlan, reduced_range: set[ir.Node] = frozenset(),
                 rounded: dict[ir.Node, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        super().__init__()
        self.plan, self.reduced_range, self.rounded = plan, set(reduced_range), dict(rounded or {})

    def call(self, model: ir.Model) -> PassResult:
        emitters = _Emitters(model)
        notes: list[str] = []
        _quantize_weights_and_biases(emitters, self.plan, notes, self.reduced_range, self.rounded)
        _quantize_activations(emitters, self.plan)
        model.graph.sort()
        return PassResult(model, bool(self.plan.decisions), notes)
