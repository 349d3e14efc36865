"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"): the per-channel weight ranges of two layers in a row are balanced, exactly in
float, so that per-tensor (and per-channel) int8 weights lose less.

Rules:
1. A pair is a first layer (Conv, Gemm, or MatMul with a constant 2-D weight) whose output, through
   at most one positive-homogeneous activation (Relu, LeakyRelu, PRelu: ``f(x / s) = f(x) / s`` for
   ``s > 0``) or none, is read only by the data input of a second such layer; grouped and depthwise
   Convs included. Clip (a fixed bound such as 6), HardSwish, SiLU, Sigmoid and GELU are not
   positive-homogeneous: a chain through them is left alone, as is one through any other node.
2. Both layers' weights (and the first's bias) are float32 constants read by that layer alone,
   and neither tensor between them is a graph output.
3. For each channel ``i`` between them, ``r1_i`` is the range (max |w|) of the first layer's
   output channel ``i`` and ``r2_i`` that of the second layer's input channel ``i``;
   ``s_i = sqrt(r1_i * r2_i) / r2_i`` (1 where either is 0). The first layer's weight and bias of
   channel ``i`` are divided by ``s_i``, the second layer's weight of input channel ``i`` is
   multiplied by it: both ranges become ``sqrt(r1_i * r2_i)``. Zero padding stays zero, so
   padded Convs are exact too.
4. A pair's scales, over all rounds together, stay within ``[1 / MAX_SCALE, MAX_SCALE]``: a
   channel almost dead in one layer (weights near 0) would otherwise be multiplied by orders of
   magnitude in the other, its bias with it, and widen the range of the tensor between them,
   which has one scale.
5. Pairs sharing a layer (Conv -> depthwise Conv -> Conv) are balanced in turn, over rounds,
   until no scale moves by more than ``TOLERANCE`` (relative) or ``MAX_ROUNDS`` rounds are done.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.graph import constant_array, set_constant_input, taken_names
from onnxq.passes import GraphPass, PassResult

POSITIVE_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})
MAX_ROUNDS = 20
TOLERANCE = 1e-3
MAX_SCALE = 16.0


@dataclasses.dataclass
class _Layer:
    """A weighted layer and how its weight's channels lie: ``out_axis`` holds its output
    channels; ``in_axis`` (within ``groups`` groups of the output axis) its input channels."""

    node: ir.Node
    out_axis: int
    in_axis: int
    groups: int = 1

    @property
    def weight(self) -> np.ndarray:
        return constant_array(self.node.inputs[1])

    @property
    def bias(self) -> np.ndarray | None:
        return constant_array(self.node.inputs[2]) if len(self.node.inputs) > 2 else None

    def out_ranges(self) -> np.ndarray:
        weight = self.weight
        return np.abs(np.moveaxis(weight, self.out_axis, 0)).reshape(weight.shape[self.out_axis], -1).max(axis=1)

    def in_ranges(self) -> np.ndarray:
        """Max |w| per input channel (all groups' channels, in order)."""
        grouped = self._grouped(self.weight)  # (groups, out/groups, in/groups, rest)
        return np.abs(grouped).max(axis=(1, 3)).reshape(-1)

    def _grouped(self, weight: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(weight, (self.out_axis, self.in_axis), (0, 1))
        return moved.reshape(self.groups, moved.shape[0] // self.groups, moved.shape[1], -1)

    def scale_inputs(self, scales: np.ndarray) -> np.ndarray:
        """The weight with input channel ``i`` multiplied by ``scales[i]``."""
        weight = self.weight
        grouped = self._grouped(weight) * scales.reshape(self.groups, 1, -1, 1)
        moved_shape = np.moveaxis(weight, (self.out_axis, self.in_axis), (0, 1)).shape
        return np.moveaxis(grouped.reshape(moved_shape), (0, 1), (self.out_axis, self.in_axis)).astype(np.float32)

    def divide_outputs(self, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight and bias with output channel ``i`` divided by ``scales[i]``."""
        shape = [1] * self.weight.ndim
        shape[self.out_axis] = -1
        bias = self.bias
        return (self.weight / scales.reshape(shape)).astype(np.float32), \
            None if bias is None else (bias / scales.reshape(bias.shape)).astype(np.float32)


def _layer(node: ir.Node | None) -> _Layer | None:
    """``node`` as a layer of rule 1 whose constants satisfy rule 2, else ``None``."""
    if node is None or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = constant_array(node.inputs[1])
    if not _own_float_constant(node.inputs[1]):
        return None
    layer = None
    if node.op_type == "Conv" and weight.ndim >= 3 and weight.shape[0] % node.attributes.get_int("group", 1) == 0:
        layer = _Layer(node, 0, 1, node.attributes.get_int("group", 1))
    elif node.op_type == "Gemm" and weight.ndim == 2 and not node.attributes.get_int("transA", 0):
        layer = _Layer(node, 0, 1) if node.attributes.get_int("transB", 0) else _Layer(node, 1, 0)
    elif node.op_type == "MatMul" and weight.ndim == 2:
        layer = _Layer(node, 1, 0)
    if layer is None or len(node.inputs) < 3 or node.inputs[2] is None:
        return layer
    bias = constant_array(node.inputs[2])  # per output channel (not a (M, N) or scalar Gemm C)
    if not _own_float_constant(node.inputs[2]) or bias.shape != (weight.shape[layer.out_axis],):
        return None
    return layer


def _own_float_constant(value: ir.Value) -> bool:
    """A float32 constant that one node alone reads and that is no graph output (rule 2)."""
    array = constant_array(value)
    return array is not None and array.dtype == np.float32 and len(value.uses()) == 1 and not value.is_graph_output()


def _only_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` at input 0, if that is its only use and it is no graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].idx != 0 or value.is_graph_output():
        return None
    return uses[0].node


def _second_layer(first: ir.Node) -> ir.Node | None:
    """The layer ``first`` feeds through at most one positive-homogeneous activation (rule 1)."""
    reader = _only_reader(first.outputs[0])
    if reader is not None and reader.op_type in POSITIVE_HOMOGENEOUS and reader.domain in ("", "ai.onnx"):
        slope_ok = reader.op_type != "PRelu" or constant_array(reader.inputs[1]) is not None
        reader = _only_reader(reader.outputs[0]) if slope_ok else None
    return reader


def equalization_pairs(graph: ir.Graph) -> list[tuple[_Layer, _Layer]]:
    """The pairs of rule 1 and 2 in ``graph``, in graph order."""
    pairs = []
    for node in graph:
        first = _layer(node)
        second = _layer(_second_layer(node)) if first is not None else None
        if second is None:
            continue
        channels = first.weight.shape[first.out_axis]
        if second.weight.shape[second.in_axis] * second.groups == channels:
            pairs.append((first, second))
    return pairs


def equalization_scales(out_ranges: np.ndarray, in_ranges: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i * r2_i) / r2_i`` of rule 3, 1 where a range is 0."""
    r1, r2 = out_ranges.astype(np.float64), in_ranges.astype(np.float64)
    usable = (r1 > 0) & (r2 > 0)
    scales = np.ones_like(r1)
    scales[usable] = np.sqrt(r1[usable] * r2[usable]) / r2[usable]
    return scales.astype(np.float32)


class EqualizePass(GraphPass):
    """Balance the weight ranges of Conv/Gemm/MatMul pairs of the main graph (the rules above)."""

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        pairs = equalization_pairs(graph)
        if not pairs:
            return PassResult(model, False)
        taken = taken_names(graph)
        totals = [np.ones(first.weight.shape[first.out_axis], np.float32) for first, _ in pairs]
        for _ in range(MAX_ROUNDS):
            moved = 0.0
            for (first, second), total in zip(pairs, totals):
                wanted = equalization_scales(first.out_ranges(), second.in_ranges())
                scales = np.clip(total * wanted, 1 / MAX_SCALE, MAX_SCALE) / total  # rule 4
                total *= scales
                moved = max(moved, float(np.max(np.abs(scales - 1))))
                weight, bias = first.divide_outputs(scales)
                set_constant_input(graph, taken, first.node, 1, weight)
                if bias is not None:
                    set_constant_input(graph, taken, first.node, 2, bias)
                set_constant_input(graph, taken, second.node, 1, second.scale_inputs(scales))
            if moved < TOLERANCE:
                break
        layers = len({id(layer.node) for pair in pairs for layer in pair})
        return PassResult(model, True, [f"cross-layer equalization balanced {len(pairs)} pair(s) of layers "
                                        f"({layers} layers)"])
