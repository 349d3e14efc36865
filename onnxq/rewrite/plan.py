"""Choose what to quantize, from the op rules and the calibrated ranges.

The plan is the single source of the quantization decisions; the rewrite only carries it out.
Rules, in order:
1. Nodes are visited in topological order, those of If/Loop/Scan bodies right after their
   parent node (``onnxq.analysis.subgraphs``); each op's rule in the registry (``onnxq.ops``) says when its node is
   quantized. A node whose activations lack a float range stays float; so does one whose output
   lacks it, unless the output was calibrated and is left float on purpose (``float_outputs``:
   a poor or sentinel tensor) and the op may compute into a float output (``OpInfo.float_output``,
   QDQ form): it then reads int8 inputs and writes float.
2. Tensors that must share a scale (a data-movement op's input and output, a Concat's inputs
   and output) form one group; the group's range is the union of its members' ranges.
3. A group whose members' magnitudes differ by more than ``max_shared_range_ratio`` would lose
   the small members to one coarse scale: the Concats that formed it are kept float, with a
   note, and the plan is made again.
4. A group's scale and zero point come from the union of its members' ranges: the range chosen
   for a member (``chosen``, by ``onnxq.tune.range_choice``) where there is one, else its
   calibrated range. Rule 3 always looks at the calibrated ranges.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.analysis.subgraphs import quantizable_nodes
from onnxq.config import QuantConfig
from onnxq.graph import constant_array, is_constant
from onnxq.ops import OpInfo, bias_is_foldable, output_channels, rule_for, weight_axis
from onnxq.rewrite.quant_math import QuantParams, activation_params

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class NodeDecision:
    """How one node is quantized: which input slots are activations, weight and bias."""

    rule: OpInfo
    activation_slots: tuple[int, ...]
    weight_slot: int | None = None
    weight_axis: int | None = None
    bias_slot: int | None = None


@dataclasses.dataclass
class QuantPlan:
    """The decisions for a whole graph.

    ``decisions`` holds the quantized nodes; ``params`` every activation tensor that is
    quantized (with its group's scale and zero point); ``quantized_outputs`` the tensors that
    quantized nodes produce in integer form, which every consumer then reads dequantized;
    ``groups`` the sets of tensors that share one scale (rule 2).
    """

    decisions: dict[ir.Node, NodeDecision]
    params: dict[ir.Value, QuantParams]
    quantized_outputs: set[ir.Value]
    notes: list[str]
    groups: list[list[ir.Value]] = dataclasses.field(default_factory=list)


def value_range(value: ir.Value | None, ranges: dict[str, Range]) -> Range | None:
    """The float range of a tensor: calibrated, or read off a float32 constant."""
    if value is None:
        return None
    if is_constant(value):
        array = constant_array(value)
        if array.dtype != np.float32 or array.size == 0:
            return None
        return float(array.min()), float(array.max())
    return ranges.get(value.name)


def _decide_compute(node: ir.Node, rule: OpInfo, ranges: dict[str, Range], config: QuantConfig,
                    float_outputs: frozenset[str]) -> NodeDecision | None:
    inputs = node.inputs
    slots = list(rule.activation_inputs)
    weight_slot = axis = bias_slot = None
    if rule.weight_input is not None and rule.weight_input < len(inputs):
        weight = inputs[rule.weight_input]
        if is_constant(weight) and constant_array(weight).dtype == np.float32:
            weight_slot = rule.weight_input
            rank = len(weight.const_value.shape)
            axis = weight_axis(node, rank) if config.per_channel else None
        else:
            slots.append(rule.weight_input)
    for slot in slots:
        if slot >= len(inputs) or value_range(inputs[slot], ranges) is None:
            return None
    writes_float = node.outputs and node.outputs[0].name in float_outputs and rule.float_output \
        and config.format == "qdq" and weight_slot is not None
    if not node.outputs or (node.outputs[0].name not in ranges and not writes_float):
        return None
    if weight_slot is not None and rule.bias_input is not None and rule.bias_input < len(inputs):
        bias = inputs[rule.bias_input]
        if is_constant(bias) and bias_is_foldable(node):
            array = constant_array(bias)
            channels = output_channels(node, tuple(weight.const_value.shape))
            if array.dtype == np.float32 and array.shape == (channels,):
                bias_slot = rule.bias_input
    return NodeDecision(rule, tuple(slots), weight_slot, axis, bias_slot)


def _decide_nodes(
    graph: ir.Graph, ranges: dict[str, Range], config: QuantConfig, float_nodes: set[ir.Node],
    float_outputs: frozenset[str],
) -> tuple[dict[ir.Node, NodeDecision], set[ir.Value]]:
    decisions: dict[ir.Node, NodeDecision] = {}
    quantized_outputs: set[ir.Value] = set()
    for node in quantizable_nodes(graph, config.observer_method):
        rule = rule_for(node)
        if rule is None or node in float_nodes:
            continue
        decision = None
        if rule.kind == "compute":
            decision = _decide_compute(node, rule, ranges, config, float_outputs)
        elif rule.kind == "shared":
            if node.inputs and node.inputs[0] in quantized_outputs:
                decision = NodeDecision(rule, (0,))
        elif rule.kind == "concat":
            if all(value_range(v, ranges) is not None for v in node.inputs):
                decision = NodeDecision(rule, tuple(range(len(node.inputs))))
        elif rule.kind == "activation":
            source = node.inputs[0]
            producer = source.producer()
            bounds_constant = all(v is None or is_constant(v) for v in node.inputs[1:])
            if (
                producer in decisions
                and decisions[producer].rule.kind == "compute"
                and len(source.uses()) == 1
                and not source.is_graph_output()
                and bounds_constant
                and node.outputs[0].name in ranges
            ):
                decision = NodeDecision(rule, ())
                quantized_outputs.discard(source)  # absorbed: the Q moves after this node
        if decision is not None:
            decisions[node] = decision
            quantized_outputs.update(v for v in node.outputs if v.name in ranges)
    return decisions, quantized_outputs


class _Groups:
    """Union-find over tensors that must share one scale and zero point."""

    def __init__(self) -> None:
        self._parent: dict[ir.Value, ir.Value] = {}

    def find(self, value: ir.Value) -> ir.Value:
        self._parent.setdefault(value, value)
        while self._parent[value] is not value:
            self._parent[value] = self._parent[self._parent[value]]
            value = self._parent[value]
        return value

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self._parent[self.find(a)] = self.find(b)


def _magnitude(r: Range) -> float:
    return max(abs(r[0]), abs(r[1]))


def plan_quantization(
    graph: ir.Graph, ranges: dict[str, Range], config: QuantConfig, keep_float: frozenset[ir.Node] = frozenset(),
    chosen: dict[str, Range] | None = None, float_outputs: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Decide which nodes and tensors of ``graph`` are quantized, and with which params;
    ``keep_float`` nodes stay float; ``chosen`` ranges (by tensor name) replace calibrated ones (rule 4);
    ``float_outputs``: calibrated tensors left float on purpose (rule 1)."""
    float_nodes: set[ir.Node] = set(keep_float)
    notes: list[str] = []
    while True:
        decisions, quantized_outputs = _decide_nodes(graph, ranges, config, float_nodes, float_outputs)
        groups = _Groups()
        members: dict[ir.Value, None] = {}  # ordered: names in the output must not depend on hashing
        concats_of: dict[ir.Value, list[ir.Node]] = {}
        for node, decision in decisions.items():
            members.update((node.inputs[slot], None) for slot in decision.activation_slots)
            members.update((v, None) for v in node.outputs if v in quantized_outputs)
            if decision.rule.kind == "shared":
                for output in node.outputs:
                    if output in quantized_outputs:
                        groups.union(node.inputs[0], output)
            elif decision.rule.kind == "concat":
                for value in node.inputs:
                    groups.union(value, node.outputs[0])
        for node, decision in decisions.items():
            if decision.rule.kind == "concat":
                concats_of.setdefault(groups.find(node.outputs[0]), []).append(node)
        group_members: dict[ir.Value, list[ir.Value]] = {}
        for value in members:
            group_members.setdefault(groups.find(value), []).append(value)
        too_wide = []
        for root, concats in concats_of.items():
            magnitudes = [_magnitude(value_range(v, ranges)) for v in group_members[root]]
            positive = [m for m in magnitudes if m > 0]
            if positive and max(positive) > config.max_shared_range_ratio * min(positive):
                ratio = max(positive) / min(positive)
                for node in concats:
                    notes.append(
                        f"Concat {node.name or node.outputs[0].name!r} kept float: the ranges it "
                        f"would force through one scale differ {ratio:.0f}x (|x| up to "
                        f"{max(positive):.3g} vs {min(positive):.3g}), which would erase the small ones"
                    )
                too_wide.extend(concats)
        if not too_wide:
            break
        float_nodes.update(too_wide)
    params = {}
    chosen = chosen or {}
    for root, values in group_members.items():
        value_ranges = [chosen.get(v.name) or value_range(v, ranges) for v in values]
        group_params = activation_params(
            min(r[0] for r in value_ranges), max(r[1] for r in value_ranges), config.activations
        )
        params.update((v, group_params) for v in values)
    return QuantPlan(decisions, params, quantized_outputs, notes, list(group_members.values()))
