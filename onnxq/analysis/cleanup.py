"""Graph clean-up before calibration, so that ranges are measured on the graph that will run.

Rules, in order:
1. Constant nodes become initializers; constant subgraphs (shape arithmetic on static shapes,
   say) are folded into initializers, and nodes left without consumers are removed. A node on
   constants whose output holds no more elements than the constants it alone reads is folded
   whatever their size: weights stored behind a Cast (float16 weights), Reshape, Transpose,
   Squeeze/Unsqueeze, Identity or Flatten become plain initializers that get int8 weights, and
   no float copy is left. Larger results (a Tile, an Expand) stay within the optimizer's limits.
2. BatchNormalization right after a Conv, ConvTranspose or Gemm is folded into its weights.
3. A Mul, Div, Add or Sub by a per-channel (or scalar) constant right after a Conv is folded
   into the Conv's weights and bias, and one right before an unpadded Conv into that Conv
   (PP-LCNetV3's learnable affine blocks and HardSwish's division, for example), so that no
   requantization sits between a Conv and its activation.
4. Every node gets a unique name, across If/Loop/Scan bodies too (reports name nodes).
The graph's inputs and outputs keep their names.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxq.graph import add_initializer, all_nodes, constant_array, taken_names
from onnxq.passes import GraphPass, PassResult, run_passes

_BATCHNORM_RULES = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]


def _per_channel(constant: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``constant`` as one float32 value per output channel, if it broadcasts over a Conv output
    of ``rank`` dimensions along the channel axis only (a scalar counts), else ``None``."""
    if constant is None or constant.dtype != np.float32 or constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(constant.reshape(-1), (channels,)).astype(np.float32)


_AFFINE = {"Mul": "scale", "Div": "scale", "Add": "offset", "Sub": "offset"}


def _affine_of(node: ir.Node) -> tuple[ir.Value, str, np.ndarray] | None:
    """``(x, "scale" | "offset", c)`` when ``node`` computes ``x * c`` or ``x + c`` with a float32
    constant ``c`` (``x / c`` and ``x - c`` as ``x * (1/c)`` and ``x + (-c)``), else ``None``."""
    kind = _AFFINE.get(node.op_type) if node.domain in ("", "ai.onnx") and len(node.inputs) == 2 else None
    if kind is None or any(value is None for value in node.inputs):
        return None
    for slot in (0, 1) if node.op_type in ("Mul", "Add") else (0,):
        x, constant = node.inputs[slot], constant_array(node.inputs[1 - slot])
        if constant is None or constant.dtype != np.float32 or constant_array(x) is not None:
            continue
        if node.op_type == "Div":
            if not np.all(constant != 0):
                return None
            constant = (1 / constant).astype(np.float32)
        return x, kind, -constant if node.op_type == "Sub" else constant
    return None


def _conv_parts(conv: ir.Node | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A standard Conv's constant float32 weight and bias (``None`` when it has none)."""
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.inputs) < 2:
        return None
    weight = constant_array(conv.inputs[1])
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    bias = constant_array(conv.inputs[2]) if has_bias else None
    if weight is None or weight.dtype != np.float32 or (has_bias and bias is None):
        return None
    return weight, bias


def _set_conv_parts(graph: ir.Graph, conv: ir.Node, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
    """Give ``conv`` new weight and/or bias initializers (``None``: keep that input)."""
    taken, base = taken_names(graph), conv.name or "conv"
    if weight is not None:
        conv.replace_input_with(1, add_initializer(graph, taken, f"{base}_weight_folded", weight.astype(np.float32)))
    if bias is not None:
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, add_initializer(graph, taken, f"{base}_bias_folded", bias.astype(np.float32)))


def _try_fold_after_conv(graph: ir.Graph, node: ir.Node) -> bool:
    """Fold a per-channel affine ``node`` that is the only reader of a Conv's output into the
    Conv's weights and bias (exact); returns whether it did."""
    affine = _affine_of(node)
    if affine is None:
        return False
    conv_out, kind, constant = affine
    conv = conv_out.producer()
    parts = _conv_parts(conv)
    if parts is None or len(conv_out.uses()) != 1 or conv_out.is_graph_output():
        return False
    weight, bias = parts
    values = _per_channel(constant, weight.shape[0], weight.ndim)  # the output's rank is the weight's
    if values is None:
        return False
    if kind == "offset":
        _set_conv_parts(graph, conv, None, values if bias is None else bias + values)
    else:
        scaled = weight * values.reshape((-1,) + (1,) * (weight.ndim - 1))
        _set_conv_parts(graph, conv, scaled, None if bias is None else bias * values)
    output = node.outputs[0]
    output.replace_all_uses_with(conv_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    conv_out.name, old_name = output.name, conv_out.name
    output.name = f"{old_name}_unused"
    return True


def _try_fold_before_conv(graph: ir.Graph, node: ir.Node) -> bool:
    """Fold a per-channel affine ``node`` whose only reader is an unpadded Conv's input into that
    Conv's weights (scale) or bias (offset); exact because no padding mixes in zeros."""
    affine = _affine_of(node)
    output = node.outputs[0]
    uses = list(output.uses())
    if affine is None or len(uses) != 1 or uses[0].idx != 0 or output.is_graph_output():
        return False
    conv = uses[0].node
    parts = _conv_parts(conv)
    if parts is None or any(conv.attributes.get_ints("pads", ())) \
            or conv.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    x, kind, constant = affine
    if x.shape is None or output.shape is None or len(x.shape) != len(output.shape) or x.shape[1] != output.shape[1]:
        return False  # the constant may broadcast x to a larger shape (or it is not known that it does not)
    weight, bias = parts
    groups = conv.attributes.get_int("group", 1)
    values = _per_channel(constant, weight.shape[1] * groups, weight.ndim)
    if values is None or weight.shape[0] % groups:
        return False
    grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)  # (g, out/g, in/g, kernel)
    per_input = values.reshape(groups, 1, weight.shape[1], 1)
    if kind == "scale":
        _set_conv_parts(graph, conv, (grouped * per_input).reshape(weight.shape), None)
    else:
        added = (grouped * per_input).sum(axis=(2, 3)).reshape(weight.shape[0])
        _set_conv_parts(graph, conv, None, added if bias is None else bias + added)
    conv.replace_input_with(0, x)
    graph.remove(node, safe=True)
    return True


def _name_nodes_apart(graph: ir.Graph) -> None:
    """Suffix node names that repeat across graphs (``NameFixPass`` makes them unique per graph)."""
    seen: set[str] = set()
    for node in all_nodes(graph):
        name, index = node.name, 1
        while name in seen:
            name, index = f"{node.name}_{index}", index + 1
        node.name = name
        seen.add(name)


def _folds_without_growth(node: ir.Node) -> bool | None:
    """Fold ``node`` (whose inputs are all constants) when its output holds no more elements
    than the inputs only it reads, which folding then removes; ``None``: the optimizer's own
    size limits decide (and its rule that Q/DQ nodes, the quantization of a quantized model, stay)."""
    if "QuantizeLinear" in node.op_type:  # QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear
        return None
    outputs = [value.shape for value in node.outputs]
    if not outputs or any(shape is None or not shape.is_static() for shape in outputs):
        return None
    produced = sum(math.prod(shape.numpy()) for shape in outputs)
    freed = sum(value.const_value.size for value in node.inputs
                if value is not None and value.const_value is not None and len(value.uses()) == 1)
    return True if produced <= freed else None


class FoldConstantsPass(GraphPass):
    """Rule 1: Constant nodes become initializers, constant subgraphs are folded into
    initializers (weights behind Cast/Reshape/Transpose and the like whatever their size), and
    nodes left without consumers are removed."""

    def call(self, model: ir.Model) -> PassResult:
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        before = len(model.graph)
        optimizer.fold_constants(model, should_fold=_folds_without_growth)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        folded = before - len(model.graph)
        return PassResult(model, folded != 0, [f"{folded} constant node(s) folded"] if folded > 0 else [])


class FoldBatchNormPass(GraphPass):
    """Rule 2: BatchNormalization right after a Conv, ConvTranspose or Gemm is folded into its weights."""

    def call(self, model: ir.Model) -> PassResult:
        before = sum(node.op_type == "BatchNormalization" for node in model.graph)
        rewriter.rewrite(model, pattern_rewrite_rules=_BATCHNORM_RULES)
        folded = before - sum(node.op_type == "BatchNormalization" for node in model.graph)
        return PassResult(model, folded > 0,
                          [f"{folded} BatchNormalization node(s) folded into the layer before"] if folded else [])


class FoldAffineIntoConvPass(GraphPass):
    """Rule 3: per-channel Mul/Div/Add/Sub folded into the Conv before them, or the unpadded
    Conv after them; the nodes left without consumers are removed."""

    def call(self, model: ir.Model) -> PassResult:
        # graph order folds a Conv -> Mul -> Add chain into the Conv; reverse order, Mul -> Add -> Conv
        folded = sum(_try_fold_after_conv(model.graph, node) for node in list(model.graph))
        folded += sum(_try_fold_before_conv(model.graph, node) for node in reversed(list(model.graph)))
        common_passes.RemoveUnusedNodesPass()(model)
        note = f"{folded} Mul/Div/Add/Sub node(s) of a per-channel constant folded into a neighbouring Conv"
        return PassResult(model, folded > 0, [note] if folded else [])


class NameNodesApartPass(GraphPass):
    """Rule 4: every node gets a unique name, across If/Loop/Scan bodies too."""

    def call(self, model: ir.Model) -> PassResult:
        before = [node.name for node in all_nodes(model.graph)]
        common_passes.NameFixPass()(model)
        _name_nodes_apart(model.graph)
        return PassResult(model, before != [node.name for node in all_nodes(model.graph)])


CLEANUP: tuple[GraphPass, ...] = (FoldConstantsPass(), FoldBatchNormPass(), FoldAffineIntoConvPass(), NameNodesApartPass())


def clean_up(model: ir.Model) -> list[str]:
    """Apply the ``CLEANUP`` pipeline to ``model`` in place; returns notes on what changed."""
    return run_passes(model, CLEANUP)
