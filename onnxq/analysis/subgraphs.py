"""Control flow: which bodies of If, Loop and Scan nodes are calibrated and quantized.

Rules:
1. The bodies of standard-domain If, Loop and Scan nodes (nested to any depth) are calibrated
   and quantized like the main graph (``onnxq.calibration.augment`` carries their tensors out).
   Bodies of any other op (a custom-domain op with a graph attribute) stay float, with a note.
2. With a histogram method, an If branch inside a Loop or Scan body would stack values of
   different sizes across iterations: such branches stay float, with a note.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import onnx_ir as ir

from onnxq.graph import all_nodes, bodies
from onnxq.ops import rule_for

CONTROL_FLOW = ("If", "Loop", "Scan")
LOOPS = ("Loop", "Scan")


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
                visit(body, in_loop or node.op_type in LOOPS, body_reason)

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
