"""Graph helpers every stage uses: constants, the subgraphs of If/Loop/Scan nodes, tensors
exposed as extra graph outputs, and new names that no tensor of the model has yet."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir


def is_constant(value: ir.Value | None) -> bool:
    """An initializer the user cannot override at run time."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The values of a constant (see ``is_constant``), else ``None``."""
    return value.const_value.numpy() if is_constant(value) else None


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


def proto_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs, recursively."""
    return [graph] + [sub for node in graph.node for body in proto_bodies(node) for sub in proto_graphs(body)]


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the tensors ``names`` (those not outputs already)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    existing = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    return augmented


def taken_names(graph: ir.Graph) -> set[str]:
    """The tensor names of ``graph`` and its subgraphs: inputs, initializers, node outputs."""
    names: set[str] = set()
    for current in [graph, *(body for node in all_nodes(graph) for _, body in bodies(node))]:
        names.update(v.name for v in current.inputs)
        names.update(current.initializers)
        names.update(v.name for node in current for v in node.outputs)
    return names


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever is not in ``taken``; it is taken then."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def add_initializer(graph: ir.Graph, taken: set[str], name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph`` holding ``array``, named ``name`` made unique in ``taken``."""
    name = unique_name(name, taken)
    value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array), name=name),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
    graph.register_initializer(value)
    return value


def set_constant_input(graph: ir.Graph, taken: set[str], node: ir.Node, slot: int, array: np.ndarray) -> None:
    """Make input ``slot`` of ``node`` the constant ``array``: the initializer there takes the new
    values when ``node`` alone reads it, else a new initializer does (the input list grows to
    ``slot`` where needed)."""
    value = node.inputs[slot] if slot < len(node.inputs) else None
    if is_constant(value) and len(value.uses()) == 1 and not value.is_graph_output() and value.graph is graph:
        value.const_value = ir.Tensor(np.asarray(array), name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    if slot >= len(node.inputs):
        node.resize_inputs(slot + 1)
    node.replace_input_with(slot, add_initializer(graph, taken, f"{node.name or node.op_type}_input{slot}", array))
