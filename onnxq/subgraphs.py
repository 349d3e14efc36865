"""Control flow: the bodies of If, Loop and Scan nodes.

ONNX Runtime returns only main-graph outputs, so a tensor inside a body cannot be observed as it
is. Rules:
1. The bodies of standard-domain If, Loop and Scan nodes (nested to any depth) are calibrated
   and quantized like the main graph. Bodies of any other op (a custom-domain op with a graph
   attribute) stay float, with a note.
2. A body tensor is carried out to the main graph ("tapped") through added outputs, level by
   level. For ``minmax`` the body reduces the tensor to its minimum and maximum, two scalars;
   an If branch that does not compute it outputs the neutral +inf / -inf instead, a Loop or
   Scan stacks the scalars of its iterations, which its parent graph reduces again (after a
   neutral element, so zero iterations give +inf / -inf too). Observers skip the non-finite
   pairs, so a branch never taken or a loop never run adds nothing.
3. Histogram methods need the values: the body flattens the tensor, an If branch that does not
   compute it outputs an empty tensor, a Loop or Scan stacks the values of its iterations
   (which must then have one size) and its parent flattens them again. An If branch inside a
   Loop or Scan body would stack values of different sizes: such branches stay float, with a note.
4. Taps are added as extra outputs after the existing ones, so the model computes exactly what it
   computed before; the augmented copy is used only for calibration.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx_ir as ir

from onnxq.ops import rule_for

CONTROL_FLOW = ("If", "Loop", "Scan")
_LOOPS = ("Loop", "Scan")


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """The nodes of ``graph`` and, right after each node, those of its subgraphs (recursively)."""
    return iter(ir.traversal.RecursiveGraphIterator(graph))


def bodies(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """The subgraphs of ``node``, each with a label: the attribute name (and index for lists)."""
    found = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((attr.name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((f"{attr.name}[{index}]", graph) for index, graph in enumerate(attr.value))
    return found


def proto_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs of a protobuf node (``bodies`` for ``onnx_ir`` nodes)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)]


def owning_graph(value: ir.Value) -> ir.Graph | None:
    """The graph that defines ``value`` (as a node output, graph input or initializer)."""
    producer = value.producer()
    return producer.graph if producer is not None else value.graph


def _is_control_flow(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW


def unsupported_bodies(graph: ir.Graph, method: str) -> dict[ir.Graph, tuple[ir.Node, str, str]]:
    """The subgraphs (at any depth) whose tensors cannot be calibrated with ``method``, each
    with its parent node, its label (``bodies``) and the reason (see the rules above)."""
    found: dict[ir.Graph, tuple[ir.Node, str, str]] = {}

    def visit(current: ir.Graph, in_loop: bool, reason: str | None) -> None:
        for node in current:
            for label, body in bodies(node):
                body_reason = reason
                if body_reason is None and not _is_control_flow(node):
                    body_reason = f"onnxq calibrates only the bodies of {', '.join(CONTROL_FLOW)}"
                elif body_reason is None and node.op_type == "If" and in_loop and method != "minmax":
                    body_reason = (
                        f"--method {method} cannot observe If branches inside a Loop or Scan body "
                        "(use --method minmax)"
                    )
                if body_reason is not None:
                    found[body] = (node, label, body_reason)
                visit(body, in_loop or node.op_type in _LOOPS, body_reason)

    visit(graph, False, None)
    return found


def quantizable_nodes(graph: ir.Graph, method: str) -> Iterator[ir.Node]:
    """The nodes of ``graph`` and of the bodies that can be calibrated with ``method``, in
    topological order of each graph."""
    skipped = unsupported_bodies(graph, method)
    return (node for node in all_nodes(graph) if node.graph not in skipped)


def control_flow_notes(graph: ir.Graph, method: str, quantized: set[ir.Node]) -> list[str]:
    """Notes on the bodies: how many of the ``quantized`` nodes are inside them, and which
    bodies with quantizable nodes stayed float and why."""
    skipped = unsupported_bodies(graph, method)
    notes = []
    for body, (parent, label, reason) in skipped.items():
        candidates = [n for n in all_nodes(body) if rule_for(n) is not None]
        if candidates and parent.graph not in skipped:  # one note for the outermost skipped body
            notes.append(
                f"kept float the {label} of {parent.op_type} {parent.name!r} ({len(candidates)} quantizable "
                f"node(s), nested bodies included): {reason}"
            )
    inside = collections.Counter(node.op_type for node in quantized if node.graph is not graph)
    if inside:
        ops = ", ".join(f"{count} {op}" for op, count in sorted(inside.items()))
        notes.append(f"quantized {sum(inside.values())} node(s) inside If/Loop/Scan bodies ({ops})")
    return notes


# --- calibration taps, on the protobuf the calibration session loads ---------------------------


class _Names:
    """Fresh tensor names, unique across the whole model (bodies included)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._used: set[str] = set()
        self._collect(graph)
        self._counter = itertools.count()

    def _collect(self, graph: onnx.GraphProto) -> None:
        self._used.update(v.name for v in [*graph.input, *graph.output, *graph.initializer])
        for node in graph.node:
            self._used.update(node.output)
            for body in proto_bodies(node):
                self._collect(body)

    def new(self, base: str) -> str:
        name = f"{base}__onnxq_tap{next(self._counter)}"
        while name in self._used:
            name = f"{base}__onnxq_tap{next(self._counter)}"
        self._used.add(name)
        return name


def _constant(graph: onnx.GraphProto, names: _Names, base: str, array: np.ndarray) -> str:
    name = names.new(base)
    graph.node.append(oh.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name)))
    return name


def _neutral(role: str) -> np.ndarray:
    """What a tap carries where its tensor was not computed: the identity of its reduction."""
    if role == "min":
        return np.array(np.inf, np.float32)
    if role == "max":
        return np.array(-np.inf, np.float32)
    return np.zeros((0,), np.float32)


_Tap = tuple[str, str, str]  # (tensor observed, role "min" | "max" | "values", name in this graph)


def _tap_own_tensors(graph: onnx.GraphProto, wanted: dict[str, bool], names: _Names) -> list[_Tap]:
    taps = []
    defined = [v.name for v in graph.input] + [o for node in graph.node for o in node.output]
    for tensor in defined:
        if tensor not in wanted:
            continue
        if wanted[tensor]:  # reduce to min and max
            for role, op in (("min", "ReduceMin"), ("max", "ReduceMax")):
                output = names.new(tensor)
                graph.node.append(oh.make_node(op, [tensor], [output], keepdims=0))
                taps.append((tensor, role, output))
        else:
            shape = _constant(graph, names, tensor, np.array([-1], np.int64))
            output = names.new(tensor)
            graph.node.append(oh.make_node("Reshape", [tensor, shape], [output]))
            taps.append((tensor, "values", output))
    return taps


def _lift_through_if(
    graph: onnx.GraphProto, node: onnx.NodeProto, names: _Names, wanted: dict[str, bool]
) -> list[_Tap]:
    """Taps of both branches become If outputs (the branch without the tensor gives the neutral)."""
    branches = {attr.name: attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH}
    taps = []
    for name, branch in branches.items():
        for tensor, role, inner in _tap_graph(branch, wanted, names):
            for other_name, other in branches.items():
                carried = inner if other_name == name else _constant(other, names, tensor, _neutral(role))
                other.output.append(oh.make_tensor_value_info(carried, onnx.TensorProto.FLOAT, None))
            output = names.new(tensor)
            node.output.append(output)
            taps.append((tensor, role, output))
    return taps


def _lift_through_loop(
    graph: onnx.GraphProto, node: onnx.NodeProto, names: _Names, wanted: dict[str, bool]
) -> list[_Tap]:
    """Taps of a Loop or Scan body become scan outputs, reduced again or flattened in ``graph``."""
    body = next(attr.g for attr in node.attribute if attr.name == "body")
    taps = []
    for tensor, role, inner in _tap_graph(body, wanted, names):
        body.output.append(oh.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
        for attr in node.attribute:  # a Scan lists an axis and a direction per scan output
            if attr.name in ("scan_output_axes", "scan_output_directions"):
                attr.ints.append(0)
        stacked = names.new(tensor)
        node.output.append(stacked)
        output = names.new(tensor)
        if role == "values":
            shape = _constant(graph, names, tensor, np.array([-1], np.int64))
            graph.node.append(oh.make_node("Reshape", [stacked, shape], [output]))
        else:
            neutral = _constant(graph, names, tensor, _neutral(role).reshape(1))
            joined = names.new(tensor)
            graph.node.append(oh.make_node("Concat", [neutral, stacked], [joined], axis=0))
            op = "ReduceMin" if role == "min" else "ReduceMax"
            graph.node.append(oh.make_node(op, [joined], [output], keepdims=0))
        taps.append((tensor, role, output))
    return taps


def _tap_graph(graph: onnx.GraphProto, wanted: dict[str, bool], names: _Names) -> list[_Tap]:
    """Taps for the wanted tensors of ``graph`` (a body) and of the bodies inside it."""
    taps = _tap_own_tensors(graph, wanted, names)
    return taps + _tap_nested(graph, wanted, names)


def _tap_nested(graph: onnx.GraphProto, wanted: dict[str, bool], names: _Names) -> list[_Tap]:
    taps = []
    for node in list(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in CONTROL_FLOW:
            continue
        lift = _lift_through_if if node.op_type == "If" else _lift_through_loop
        taps += lift(graph, node, names, wanted)
    return taps


def expose_body_tensors(model: onnx.ModelProto, wanted: dict[str, bool]) -> dict[str, dict[str, str]]:
    """Add main-graph outputs to ``model`` (in place) that carry the body tensors ``wanted``
    (name -> reduce to min/max, else values); returns ``{tensor: {role: output name}}`` with
    roles ``min`` and ``max``, or ``values``. Tensors that no If/Loop/Scan chain reaches are
    left out."""
    graph = model.graph
    exposed: dict[str, dict[str, str]] = {}
    for tensor, role, output in _tap_nested(graph, wanted, _Names(graph)):
        graph.output.append(oh.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
        exposed.setdefault(tensor, {})[role] = output
    return exposed
