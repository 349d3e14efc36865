"""Topology signatures: names for nodes and tensors that survive a re-export.

Node names and tensor names change between exports of the same network; stored decisions
(observer state, fallbacks) are keyed by structure instead:
1. A node's local signature hashes its op type and domain, its attributes (subgraphs by their
   own signatures), the rank and dtype of its inputs and outputs, and for constant inputs their
   shape.
2. Weisfeiler-Lehman refinement: ``DEPTH`` times, each node's signature is rehashed with the
   signatures of its producers (per input slot and output index) and of its consumers.
3. Nodes with equal final signatures are told apart by an occurrence index, given in the order
   of their place between the graph's inputs and outputs (depth below the inputs, height above
   the outputs, which inputs reach them and which outputs they reach, by position), then of a
   fingerprint of their constant inputs' bytes, then of topological order. Only nodes equal in
   all of these (``GraphKeys.tied``) are numbered by the order the export happened to give them.
4. Nodes inside subgraphs (If branches, Loop and Scan bodies) are keyed within their own graph
   as above, prefixed with their parent node's key and the attribute that holds the graph, so
   the keys of a body do not depend on the rest of the model and never collide with others.
A tensor is keyed by its producer's key and output index; a graph input by its position (in a
body: below the parent node's key).
"""

from __future__ import annotations

import collections
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


def _positions(graph: ir.Graph, nodes: list[ir.Node]) -> dict[ir.Node, tuple[int, int, int, int]]:
    """Each node's place between the graph's inputs and outputs, independent of names and node
    order: (longest path from an input, longest path to an output, the inputs that reach it and
    the outputs it reaches as bit masks of their positions)."""
    input_bits = {value: 1 << index for index, value in enumerate(graph.inputs)}
    output_bits = {value: 1 << index for index, value in enumerate(graph.outputs)}
    depth, reached_by, height, reaches = {}, {}, {}, {}
    for node in nodes:
        producers = [v.producer() for v in node.inputs if v is not None and v.producer() in depth]
        depth[node] = 1 + max((depth[p] for p in producers), default=-1)
        reached_by[node] = sum(input_bits.get(v, 0) for v in set(node.inputs)) if node.inputs else 0
        for producer in set(producers):
            reached_by[node] |= reached_by[producer]
    for node in reversed(nodes):
        consumers = {use.node for v in node.outputs for use in v.uses() if use.node in height}
        height[node] = 1 + max((height[c] for c in consumers), default=-1)
        reaches[node] = sum(output_bits.get(v, 0) for v in node.outputs)
        for consumer in consumers:
            reaches[node] |= reaches[consumer]
    return {node: (depth[node], height[node], reached_by[node], reaches[node]) for node in nodes}


def _weights_digest(node: ir.Node) -> str:
    """A fingerprint of the bytes of ``node``'s constant inputs."""
    digest = hashlib.sha256()
    for value in node.inputs:
        if value is not None and value.const_value is not None:
            digest.update(value.const_value.tobytes())
    return digest.hexdigest()


def _graph_signatures(graph: ir.Graph, tied: set[ir.Node] | None = None) -> dict[ir.Node, str]:
    """The keys of the nodes of ``graph`` (rules 1-3); the nodes only topological order tells
    apart are added to ``tied``."""
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
    groups: dict[str, list[ir.Node]] = {}
    for node in nodes:
        groups.setdefault(signature[node], []).append(node)
    occurrence, positions = {}, None
    for group in groups.values():
        if len(group) > 1:
            positions = positions or _positions(graph, nodes)
            rank = {node: (positions[node], _weights_digest(node)) for node in group}
            group = sorted(group, key=rank.__getitem__)  # stable: equal ranks keep topological order
            counts = collections.Counter(rank.values())
            if tied is not None:
                tied.update(node for node in group if counts[rank[node]] > 1)
        occurrence.update((node, index) for index, node in enumerate(group))
    return {node: f"{node.op_type}:{signature[node]}:{occurrence[node]}" for node in nodes}


def node_signatures(graph: ir.Graph, tied: set[ir.Node] | None = None) -> dict[ir.Node, str]:
    """A key per node of ``graph`` and of its subgraphs, stable under renaming of nodes and tensors
    and under reordering; the nodes only their order tells apart are added to ``tied``."""
    keys = _graph_signatures(graph, tied)
    for node, key in list(keys.items()):
        for label, body in bodies(node):
            inner_keys = node_signatures(body, tied).items()
            keys.update((inner, f"{key}/{label}/{inner_key}") for inner, inner_key in inner_keys)
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
    tied: frozenset[ir.Node] = frozenset()  # nodes only their order in the graph tells apart (rule 3)

    @classmethod
    def of(cls, graph: ir.Graph) -> GraphKeys:
        tied: set[ir.Node] = set()
        nodes = node_signatures(graph, tied)
        return cls(nodes, tensor_keys(graph), tuple(all_nodes(graph)), frozenset(tied))

    def tied_names(self) -> dict[str, str]:
        """The key -> ``node name(output names)`` of the tied nodes: what a workspace records to
        know, on resume, whether they come in the same order with the same names."""
        return {
            self.nodes[node]: f"{node.name}({', '.join(v.name for v in node.outputs)})"
            for node in self.order if node in self.tied
        }

    def for_copy(self, graph: ir.Graph) -> dict[ir.Node, str]:
        """The node keys of ``graph``, a copy of the graph these keys were computed on."""
        originals = self.order
        copies = list(all_nodes(graph))
        if len(copies) != len(originals) or any(a.op_type != b.op_type for a, b in zip(copies, originals)):
            raise RuntimeError("the graph is not a copy of the one its keys were computed on")
        return {copy: self.nodes[original] for copy, original in zip(copies, originals)}
