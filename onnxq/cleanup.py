"""Graph clean-up before calibration, so that ranges are measured on the graph that will run.

Rules, in order:
1. Constant nodes become initializers; constant subgraphs (shape arithmetic on static shapes,
   say) are folded into initializers, and nodes left without consumers are removed.
2. BatchNormalization right after a Conv, ConvTranspose or Gemm is folded into its weights.
3. An Add of a per-channel constant right after a Conv is folded into the Conv's bias.
4. Every node gets a unique name, across If/Loop/Scan bodies too (reports name nodes).
The graph's inputs and outputs keep their names.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from onnxq.plan import constant_array
from onnxq.subgraphs import all_nodes

_BATCHNORM_RULES = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]


def _try_fold_add_into_conv_bias(graph: ir.Graph, add: ir.Node) -> bool:
    for conv_slot in (0, 1):
        conv_out, other = add.inputs[conv_slot], add.inputs[1 - conv_slot]
        conv = conv_out.producer() if conv_out is not None else None
        offset = constant_array(other)
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or offset is None:
            continue
        weight = constant_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None or len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        channels, rank = weight.shape[0], weight.ndim  # conv output rank equals weight rank
        shape = (1,) * (rank - offset.ndim) + offset.shape
        if offset.dtype != np.float32 or offset.ndim > rank or shape != (1, channels) + (1,) * (rank - 2):
            continue
        old_bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and old_bias is None:
            continue
        bias = offset.reshape(channels) + (0 if old_bias is None else old_bias)
        name = f"{conv.name or 'conv'}_bias_folded"
        value = ir.Value(name=name, const_value=ir.tensor(bias.astype(np.float32), name=name),
                         type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(bias.shape))
        graph.register_initializer(value)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, value)
        output = add.outputs[0]
        output.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        graph.remove(add, safe=True)
        conv_out.name, old_name = output.name, conv_out.name
        output.name = f"{old_name}_unused"
        return True
    return False


def _name_nodes_apart(graph: ir.Graph) -> None:
    """Suffix node names that repeat across graphs (``NameFixPass`` makes them unique per graph)."""
    seen: set[str] = set()
    for node in all_nodes(graph):
        name, index = node.name, 1
        while name in seen:
            name, index = f"{node.name}_{index}", index + 1
        node.name = name
        seen.add(name)


def clean_up(model: ir.Model) -> list[str]:
    """Apply the rules above to ``model`` in place; returns notes on what changed."""
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    before = len(model.graph)
    optimizer.fold_constants(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    folded_nodes = before - len(model.graph)
    batch_norms = sum(node.op_type == "BatchNormalization" for node in model.graph)
    rewriter.rewrite(model, pattern_rewrite_rules=_BATCHNORM_RULES)
    folded_norms = batch_norms - sum(node.op_type == "BatchNormalization" for node in model.graph)
    folded_adds = sum(_try_fold_add_into_conv_bias(model.graph, node) for node in list(model.graph) if node.op_type == "Add")
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.NameFixPass()(model)
    _name_nodes_apart(model.graph)
    notes = []
    if folded_nodes > 0:
        notes.append(f"{folded_nodes} constant node(s) folded")
    if folded_norms:
        notes.append(f"{folded_norms} BatchNormalization node(s) folded into the layer before")
    if folded_adds:
        notes.append(f"{folded_adds} Add(s) of a per-channel constant folded into the Conv bias before")
    return notes
