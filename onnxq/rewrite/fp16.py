"""Float islands in fp16: nodes that stay out of int8 run in half precision, for GPU targets.

Rules:
1. An island node computes in float16 on every float32 input and output that its ONNX schema
   lets be float16; other slots (say Resize's scales) stay float32.
2. A float32 constant read only by island nodes is stored as float16 (no fp32 copy is kept);
   any other float32 input gets one Cast to float16 per tensor.
3. An island output read outside the island, or a graph output, gets a Cast back to float32, so
   the rest of the graph and the model's interface are unchanged.
4. Reductions, exponentials and normalizations (``onnxq.ops``: not ``fp16_safe``, and every node of a decomposed
   LayerNorm) stay float32: a variance or a sum of exponentials overflows float16's 65504 long
   before the values themselves do (and ONNX Runtime 1.31 mis-fuses a float16 decomposed
   LayerNorm fed by a Cast).
"""

from __future__ import annotations

import numpy as np
import onnx.defs
import onnx_ir as ir

from onnxq.analysis.rules import PATTERNS
from onnxq.graph import is_constant
from onnxq.ops import FP32_ONLY
from onnxq.passes import GraphPass, PassResult
from onnxq.rewrite.qdq import Emitter

_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16


def _half_slots(node: ir.Node, opset: int) -> tuple[set[int], set[int]]:
    """The input and output slots of ``node`` whose type constraint allows float16."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return set(), set()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def slots(formals, count: int) -> set[int]:
        result = set()
        for slot in range(count):
            formal = formals[min(slot, len(formals) - 1)] if formals else None
            if formal is not None and "tensor(float16)" in allowed.get(formal.type_str, {formal.type_str}):
                result.add(slot)
        return result

    return slots(schema.inputs, len(node.inputs)), slots(schema.outputs, len(node.outputs))


class Fp16IslandsPass(GraphPass):
    """Rewrite ``nodes`` of a model's main graph to float16 with Casts at the island borders
    (the rules above); notes say which nodes had to stay float32."""

    def __init__(self, nodes: set[ir.Node]) -> None:
        super().__init__()
        self.nodes = nodes

    def call(self, model: ir.Model) -> PassResult:
        nodes = self.nodes
        graph = model.graph
        opset = model.opset_imports.get("", 13)
        emitter = Emitter(graph)
        half_inputs: dict[ir.Node, set[int]] = {}
        skipped = []
        kept_fp32 = {node for node in nodes if node.op_type in FP32_ONLY} | (set(PATTERNS["normalization"](graph)) & nodes)
        for node in graph:
            if node not in nodes or node in kept_fp32:
                continue
            inputs, outputs = _half_slots(node, opset)
            float_outputs = {i for i, v in enumerate(node.outputs) if v.dtype == _FLOAT}
            if float_outputs and float_outputs <= outputs:
                half_inputs[node] = {i for i, v in enumerate(node.inputs) if v is not None and v.dtype == _FLOAT} & inputs
            else:
                skipped.append(node)
        island = set(half_inputs)
        casts: dict[ir.Value, ir.Value] = {}
        for node, slots in half_inputs.items():
            for slot in sorted(slots):
                value = node.inputs[slot]
                if value.producer() in island:
                    continue  # already float16
                if is_constant(value) and all(use.node in island and use.idx in half_inputs[use.node] for use in value.uses()):
                    if value.dtype == _FLOAT:
                        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
                        value.type = ir.TensorType(_HALF)  # a new type: value types may be shared objects
                    continue
                if value not in casts:
                    half = ir.Value(name=emitter.unique(f"{value.name}_fp16"), type=ir.TensorType(_HALF), shape=value.shape)
                    graph.append(ir.node("Cast", [value], {"to": _HALF}, outputs=[half], name=emitter.unique(f"{value.name}_to_fp16")))
                    casts[value] = half
                node.replace_input_with(slot, casts[value])
            for value in node.outputs:
                if value.dtype != _FLOAT:
                    continue
                outside = [(use.node, use.idx) for use in value.uses() if use.node not in island]
                value.type = ir.TensorType(_HALF)
                if not outside and not value.is_graph_output():
                    continue
                back = ir.Value(name=emitter.unique(f"{value.name}_fp32"), type=ir.TensorType(_FLOAT), shape=value.shape)
                graph.append(ir.node("Cast", [value], {"to": _FLOAT}, outputs=[back], name=emitter.unique(f"{value.name}_to_fp32")))
                if value.is_graph_output():
                    # the graph output keeps its name and float32 type: the Cast's output takes both
                    index = list(graph.outputs).index(value)
                    name = value.name
                    value.name, back.name = back.name, name
                    graph.outputs[index] = back
                for consumer, slot in outside:
                    consumer.replace_input_with(slot, back)
        graph.sort()
        notes = []
        if island:
            notes.append(f"{len(island)} float node(s) run in fp16 (--fallback-dtype fp16), with Casts at their borders")
        if kept_fp32:
            notes.append(f"{len(kept_fp32)} float node(s) stay fp32 for range and precision (reductions, exponentials, "
                         "normalizations)")
        if skipped:
            ops = sorted({n.op_type for n in skipped})
            notes.append(f"{len(skipped)} float node(s) stay fp32: their ops take no float16 here ({', '.join(ops)})")
        return PassResult(model, bool(island), notes)
