"""Topology signatures: names for nodes and tensors that survive a re-export.

Node names and tensor names change between exports of the same network; stored decisions
(observer state, fallbacks) are keyed by structure instead:
1. A node's local signature hashes its op type and domain, its attributes (subgraphs by their
   own signatures), the rank and dtype of its inputs and outputs, and for constant inputs their
   shape.
2. Weisfeiler-Lehman refinement: ``DEPTH`` times, each node's signature is rehashed with the
   signatures of its producers (per input slot and output index) and of its consumers.
3. Nodes with equal final signatures are told apart by their occurrence index in topological
   order.
4. Nodes inside subgraphs (If branches, Loop and Scan bodies) are keyed within their own graph
   as above, prefixed with their parent node's key and the attribute that holds the graph, so
   the keys of a body do not depend on the rest of the model and never collide with others.
A tensor is keyed by its producer's key and output index; a graph input by its position (in a
body: below the parent node's key).
"""

from __future__ import annotations

import dataclasses
import hashlib

import onnx_ir as ir

from onnxq.graph import all_nodes, bodies

DEPTH = 4


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def _value_type(value: ir.Value | None) -> tuple:
    if value is None:
        return ("absent",)
    rank = None if value.shape is None else len(value.shape)
    dtype = None if value.dtype is None else value.dtype.name
    constant = None
    if value.const_value is not None and not value.is_graph_input():
        constant = tuple(value.const_value.shape)
    return (rank, dtype, constant)


def _attribute(attr: ir.Attr) -> tuple:
    if attr.type == ir.AttributeType.GRAPH:
        return (attr.name, graph_fingerprint(attr.value))
    if attr.type == ir.AttributeType.GRAPHS:
        return (attr.name, tuple(graph_fingerprint(g) for g in attr.value))
    if attr.type == ir.AttributeType.TENSOR:
        return (attr.name, tuple(attr.value.shape), attr.value.dtype.name)
    value = attr.value
    return (attr.name, tuple(value) if isinstance(value, (list, tuple)) else value)


def _local(node: ir.Node) -> str:
    attributes = tuple(sorted(_attribute(a) for a in node.attributes.values()))
    return _digest(
        node.domain, node.op_type, attributes,
        tuple(_value_type(v) for v in node.inputs), tuple(_value_type(v) for v in node.outputs),
    )


def _graph_signatures(graph: ir.Graph) -> dict[ir.Node, str]:
    nodes = list(graph)
    signature = {node: _local(node) for node in nodes}
    for _ in range(DEPTH):
        refined = {}
        for node in nodes:
            producers = tuple(
                (slot, signature.get(v.producer()), v.index()) if v is not None and v.producer() else (slot, None, None)
                for slot, v in enumerate(node.inputs)
            )
            consumers = tuple(
                sorted((index, signature[use.node], use.idx) for index, v in enumerate(node.outputs)
                       for use in v.uses() if use.node in signature)
            )
            refined[node] = _digest(signature[node], producers, consumers)
        signature = refined
    seen: dict[str, int] = {}
    keys = {}
    for node in nodes:
        occurrence = seen.get(signature[node], 0)
        seen[signature[node]] = occurrence + 1
        keys[node] = f"{node.op_type}:{signature[node]}:{occurrence}"
    return keys


def node_signatures(graph: ir.Graph) -> dict[ir.Node, str]:
    """A key per node of ``graph`` and of its subgraphs, stable under renaming of nodes and tensors."""
    keys = _graph_signatures(graph)
    for node, key in list(keys.items()):
        for label, body in bodies(node):
            keys.update((inner, f"{key}/{label}/{inner_key}") for inner, inner_key in node_signatures(body).items())
    return keys


def tensor_keys(graph: ir.Graph, prefix: str = "") -> dict[str, str]:
    """Map each tensor name of ``graph`` and its subgraphs (graph inputs and node outputs) to
    its structural key."""
    keys = {value.name: f"{prefix}input:{index}" for index, value in enumerate(graph.inputs)}
    for node, key in _graph_signatures(graph).items():
        for index, value in enumerate(node.outputs):
            keys[value.name] = f"{prefix}{key}/{index}"
        for label, body in bodies(node):
            keys.update(tensor_keys(body, f"{prefix}{key}/{label}/"))
    return keys


def graph_fingerprint(graph: ir.Graph) -> str:
    """A hash of the graph's structure, independent of node and tensor names."""
    return _digest(tuple(sorted(node_signatures(graph).values())))


@dataclasses.dataclass(frozen=True)
class GraphKeys:
    """The node and tensor keys of one graph, computed once; ``for_copy`` carries the node keys
    over to a copy of the same graph (made by ``ir.from_proto`` or the same clean-up), whose
    nodes come in the same order."""

    nodes: dict[ir.Node, str]
    tensors: dict[str, str]
    order: tuple[ir.Node, ...]  # the nodes in ``all_nodes`` order

    @classmethod
    def of(cls, graph: ir.Graph) -> GraphKeys:
        return cls(node_signatures(graph), tensor_keys(graph), tuple(all_nodes(graph)))

    def for_copy(self, graph: ir.Graph) -> dict[ir.Node, str]:
        """The node keys of ``graph``, a copy of the graph these keys were computed on."""
        originals = self.order
        copies = list(all_nodes(graph))
        if len(copies) != len(originals) or any(a.op_type != b.op_type for a, b in zip(copies, originals)):
            raise RuntimeError("the graph is not a copy of the one its keys were computed on")
        return {copy: self.nodes[original] for copy, original in zip(copies, originals)}
