"""The calibration model: a copy of the float model that exposes exactly the tensors to observe.

Rules:
1. Main-graph tensors become extra outputs. For ``minmax``, ReduceMin/ReduceMax nodes are added
   instead, so only two scalars per tensor leave ONNX Runtime (on CUDA, only those cross to
   the host); tensors of rank >= 3 are reduced over their trailing axes only, which ONNX
   Runtime runs in parallel over the kept axes.
2. ONNX Runtime returns only main-graph outputs, so a body tensor is carried out to the main
   graph ("tapped") through added outputs, level by level. For ``minmax`` the body reduces the
   tensor to its minimum and maximum; an If branch that does not compute it outputs the
   neutral +inf / -inf instead, a Loop or Scan stacks the scalars of its iterations, which its
   parent graph reduces again (after a neutral element, so zero iterations give +inf / -inf
   too). Observers skip the non-finite pairs, so a branch never taken adds nothing.
3. Histogram methods need the values: the body flattens the tensor, an If branch that does not
   compute it outputs an empty tensor, a Loop or Scan stacks the values of its iterations
   (which must then have one size) and its parent flattens them again.
4. Taps are added as extra outputs after the existing ones, so the model computes exactly what
   it computed before; the augmented copy is used only for calibration.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper

from onnxq.analysis.subgraphs import CONTROL_FLOW
from onnxq.graph import proto_bodies


def _reduction(graph: onnx.GraphProto, name: str, op: str, rank: int | None, opset: int) -> str:
    """Append ``op`` (ReduceMin/ReduceMax) of tensor ``name`` to ``graph``; returns its output.

    Tensors of rank >= 3 are reduced over their trailing axes only, keeping batch and channels:
    ONNX Runtime runs that kernel in parallel over the kept axes, several times faster than a
    reduction to one scalar. The few values left are reduced on the host.
    """
    output = f"{name}__onnxq_{op}"
    axes = list(range(2, rank)) if rank is not None and rank >= 3 else None
    if axes is None:
        graph.node.append(oh.make_node(op, [name], [output], keepdims=0))
    elif opset >= 18:  # axes became an input
        axes_name = f"{output}_axes"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        graph.node.append(oh.make_node(op, [name, axes_name], [output], keepdims=0))
    else:
        graph.node.append(oh.make_node(op, [name], [output], keepdims=0, axes=axes))
    graph.output.append(oh.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return output


def augmented_model(
    proto: onnx.ModelProto, names: list[str], reduce_in_graph: dict[str, int | None]
) -> tuple[onnx.ModelProto, dict[str, dict[str, str]]]:
    """The model with ``names`` exposed, and where each one can be read: ``{"values": output}``,
    or ``{"min": output, "max": output}`` for those in ``reduce_in_graph`` (name -> rank).
    Tensors inside If/Loop/Scan bodies are carried out by ``expose_body_tensors``."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    graph = augmented.graph
    opset = next(o.version for o in augmented.opset_import if o.domain in ("", "ai.onnx"))
    present = {output.name for output in graph.output}
    known = {info.name: info for info in graph.value_info}
    main = {v.name for v in [*graph.input, *graph.initializer]} | {o for node in graph.node for o in node.output}
    exposed: dict[str, dict[str, str]] = {}
    for name in names:
        if name not in main:
            continue
        if name in reduce_in_graph:
            low, high = (_reduction(graph, name, op, reduce_in_graph[name], opset) for op in ("ReduceMin", "ReduceMax"))
            exposed[name] = {"min": low, "max": high}
            continue
        if name not in present:
            info = onnx.ValueInfoProto()
            if name in known:
                info.CopyFrom(known[name])
            else:
                info.name = name
            graph.output.append(info)
        exposed[name] = {"values": name}
    in_bodies = {name: name in reduce_in_graph for name in names if name not in main}
    if in_bodies:
        exposed.update(expose_body_tensors(augmented, in_bodies))
    return augmented, exposed


def carries_body_values(name: str, sources: dict[str, str]) -> bool:
    """Whether a tensor's values are read from an output carried out of a body (stacked over
    the iterations of any Loop or Scan on the way), rather than under its own name."""
    return "values" in sources and sources["values"] != name


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
