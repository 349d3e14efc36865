"""Which tensors calibration observes: those whose range a quantization decision may need."""

from __future__ import annotations

import onnx_ir as ir

from onnxq.analysis.subgraphs import quantizable_nodes
from onnxq.graph import is_constant, owning_graph
from onnxq.ops import rule_for


def _may_be_float(value: ir.Value | None) -> bool:
    return value is not None and not is_constant(value) and value.dtype in (None, ir.DataType.FLOAT)


def candidate_tensors(graph: ir.Graph, method: str) -> list[ir.Value]:
    """Every tensor whose range a quantization decision may need, in graph order; inside the
    If/Loop/Scan bodies that ``method`` can calibrate, only tensors known to be float."""
    values: dict[str, ir.Value] = {}
    for node in quantizable_nodes(graph, method):
        rule = rule_for(node)
        if rule is None:
            continue
        slots = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
        if rule.weight_input is not None:
            slots = (*slots, rule.weight_input)
        tensors = [node.inputs[slot] for slot in slots if slot < len(node.inputs)] + list(node.outputs)
        for value in tensors:
            in_body = value is not None and owning_graph(value) is not graph
            if _may_be_float(value) and not (in_body and value.dtype != ir.DataType.FLOAT):
                values[value.name] = value
    return list(values.values())
