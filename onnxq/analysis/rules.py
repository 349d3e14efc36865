"""Keep-float rules: which nodes stay float, said by op type, name, position, pattern or file.

Forms (``--keep-float``, repeatable; the same strings in the Python API):

- ``op:Softmax`` or a bare op type ``Softmax``: every node of that type;
- ``name:GLOB`` or a bare glob: nodes whose name (or an output's name) matches, ``fnmatch`` style;
- ``first:Conv`` / ``last:Gemm``: the first or last node of that type in topological order;
- ``pattern:NAME``: structural patterns (``PATTERNS``), found by topology, not by names;
- ``sig:KEY``: a node by topology signature (what rules files hold);
- ``file:PATH`` or a bare ``*.json`` path: a rules file written by ``save_rules`` (``--save-rules``).

Every rule resolves to nodes of the graph; a rules file stores their topology signatures
(``onnxq.analysis.signatures``), so a file made on one export applies to a re-export with other names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path

import onnx.defs
import onnx_ir as ir

from onnxq.errors import ConfigError
from onnxq.files import write_atomically
from onnxq.graph import all_nodes, is_constant
from onnxq.ops import NORMALIZATION_OPS, REDUCTIONS

RULES_FORMAT = "onnxq-rules"
RULES_VERSION = 1
KINDS = ("op", "name", "first", "last", "pattern", "sig", "file")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One keep-float rule: a kind from ``KINDS`` and its argument."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_rule(text: str) -> Rule:
    """Read one rule string (see the module docstring); a malformed one is a ``ConfigError``."""
    text = text.strip()
    kind, sep, value = text.partition(":")
    if sep and kind in KINDS:
        if not value:
            raise ConfigError(f"keep-float rule {text!r} has nothing after '{kind}:'; e.g. {kind}:{_EXAMPLES[kind]}")
        rule = Rule(kind, value)
    elif text.endswith(".json"):
        rule = Rule("file", text)
    elif text and onnx.defs.has(text):
        rule = Rule("op", text)
    elif text:
        rule = Rule("name", text)
    else:
        raise ConfigError("empty keep-float rule; give an op type, a name glob, first:OP, last:OP or pattern:NAME")
    if rule.kind == "pattern" and rule.value not in PATTERNS:
        raise ConfigError(f"unknown keep-float pattern {rule.value!r}; choose one of {', '.join(PATTERNS)}")
    if rule.kind in ("first", "last", "op") and not onnx.defs.has(rule.value):
        raise ConfigError(f"keep-float rule {text!r}: {rule.value!r} is not an ONNX op type; check the spelling")
    if rule.kind == "file" and not Path(rule.value).is_file():
        raise ConfigError(f"rules file {rule.value} not found; write one with --save-rules or fix the path")
    return rule


_EXAMPLES = {"op": "Softmax", "name": "/model/head/*", "first": "Conv", "last": "Gemm",
             "pattern": "attention-softmax", "sig": "Conv:...:0", "file": "rules.json"}


def _float_inputs_reach(graph: ir.Graph) -> set[ir.Value]:
    """Tensors computed (directly or not) from a float graph input."""
    reached = {v for v in graph.inputs if v.dtype == ir.DataType.FLOAT and not is_constant(v)}
    for node in graph:
        if any(v in reached for v in node.inputs if v is not None):
            reached.update(node.outputs)
    return reached


def _ancestors(value: ir.Value, limit: int = 256) -> set[ir.Node]:
    """Nodes upstream of ``value`` (at most ``limit`` of them)."""
    seen: set[ir.Node] = set()
    stack = [value.producer()]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def _attention_softmax(graph: ir.Graph) -> dict[ir.Node, str]:
    """Softmax over attention scores (a MatMul of two activations), with the scale and mask
    ops between them."""
    found = {}
    passthrough = {"Add", "Div", "Mul", "Sub", "Where", "Cast", "Reshape", "Transpose"}
    for node in graph:
        if node.op_type != "Softmax":
            continue
        chain, value = [node], node.inputs[0]
        for _ in range(6):
            producer = value.producer() if value is not None else None
            if producer is None:
                break
            if producer.op_type == "MatMul" and not any(is_constant(v) for v in producer.inputs):
                found.update((n, "pattern:attention-softmax") for n in chain)
                break
            if producer.op_type not in passthrough:
                break
            chain.append(producer)
            # follow the activation operand (the one that is not a constant or a mask)
            operands = [v for v in producer.inputs if v is not None and not is_constant(v)]
            value = max(operands, key=lambda v: len(_ancestors(v, 64)), default=None)
    return found


def _mask_adds(graph: ir.Graph) -> dict[ir.Node, str]:
    """Adds of a tensor computed only from non-float inputs (an attention mask) to activations."""
    float_reached = _float_inputs_reach(graph)
    found = {}
    for node in graph:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        computed = [v for v in (a, b) if v is not None and not is_constant(v)]
        if len(computed) == 2 and sum(v in float_reached for v in computed) == 1:
            found[node] = "pattern:mask-add"
    return found


def _computed_from(value: ir.Value, source: ir.Value) -> bool:
    """Whether ``source`` feeds, directly or not, the computation of ``value``."""
    return any(source in node.inputs for node in _ancestors(value))


def _residual_adds(graph: ir.Graph) -> dict[ir.Node, str]:
    """Adds joining a skip connection: one operand is computed from the other."""
    found = {}
    for node in graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs):
            continue
        a, b = node.inputs
        if _computed_from(a, b) or _computed_from(b, a):
            found[node] = "pattern:residual-add"
    return found


def _constant_operand(node: ir.Node) -> bool:
    return len(node.inputs) == 2 and any(is_constant(v) for v in node.inputs)


_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Max", "Min", "Clip",
                         "Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand"})
_STATISTIC_DEPTH = 6  # elementwise steps followed from a reduction to where it meets its data again


def _data_sources(value: ir.Value) -> dict[ir.Value, list[ir.Node]]:
    """``value`` and the tensors it is computed from by elementwise ops (a few steps up), each
    with the nodes between it and ``value``."""
    sources = {value: []}
    frontier = [value]
    for _ in range(_STATISTIC_DEPTH):
        step = []
        for current in frontier:
            producer = current.producer()
            if producer is None or producer.op_type not in _ELEMENTWISE:
                continue
            for operand in producer.inputs:
                if operand is not None and not is_constant(operand) and operand not in sources:
                    sources[operand] = [*sources[current], producer]
                    step.append(operand)
        frontier = step
    return sources


def _statistics(reduction: ir.Node) -> set[ir.Node]:
    """The nodes that compute a statistic of a tensor (``reduction`` and the elementwise ops
    after it) and apply it to that tensor again (centering, scaling by a reciprocal spread, a
    softmax's normalizing sum), with the ops that made the reduced tensor from the data: empty
    when the reduction's result never meets its data again."""
    sources = _data_sources(reduction.inputs[0])
    found: set[ir.Node] = set()
    frontier = [(reduction.outputs[0], [reduction])]
    for _ in range(_STATISTIC_DEPTH):
        step = []
        for value, chain in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type not in _ELEMENTWISE:
                    continue
                met = [v for v in node.inputs if v is not None and v is not value and v in sources]
                if met:
                    found.update(chain, [node], *(sources[v] for v in met))
                else:
                    step.extend((out, [*chain, node]) for out in node.outputs)
        frontier = step
    return found


def _affine_tail(node: ir.Node) -> list[ir.Node]:
    """The single-use Mul then Add by constants (a normalization's scale and shift) after ``node``."""
    tail = []
    for op in ("Mul", "Add"):
        uses = node.outputs[0].uses()
        if len(uses) != 1 or uses[0].node.op_type != op or not _constant_operand(uses[0].node):
            break
        node = uses[0].node
        tail.append(node)
    return tail


def _normalizations(graph: ir.Graph) -> dict[ir.Node, str]:
    """Normalization ops, and normalizations spelled out in any ops, found by dataflow: a
    reduction whose result meets its own data again (``_statistics``: a layer norm as
    ReduceMean/Sub/Pow/Sqrt/Div, as ReduceSum times 1/n with Reciprocal(Sqrt(...)), RMS norms,
    L2 normalization, a softmax written out), with their affine scale and shift."""
    found = {node for node in graph if node.op_type in NORMALIZATION_OPS}
    for node in graph:
        if node.op_type in REDUCTIONS and node.inputs and node.inputs[0] is not None:
            found |= _statistics(node)
    ends = [node for node in found if not any(use.node in found for out in node.outputs for use in out.uses())]
    for node in ends:
        found.update(_affine_tail(node))
    return dict.fromkeys(found, "pattern:normalization")


PATTERNS = {
    "attention-softmax": _attention_softmax,
    "mask-add": _mask_adds,
    "residual-add": _residual_adds,
    "normalization": _normalizations,
}


def _read_rules_file(path: str) -> list[str]:
    try:
        record = json.loads(Path(path).read_text())
        if record.get("format") != RULES_FORMAT:
            raise ValueError(f"not a {RULES_FORMAT} file")
        return [entry["signature"] for entry in record["keep_float"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"rules file {path} is unreadable ({exc}); write it again with --save-rules") from exc


def resolve_rules(
    rules: Iterable[str | Rule], graph: ir.Graph, keys: dict[ir.Node, str]
) -> tuple[dict[ir.Node, str], list[str]]:
    """The nodes that ``rules`` keep float, each with the rule that matched it, and notes for
    rules that matched nothing. ``keys`` are the graph's topology signatures."""
    by_key = {key: node for node, key in keys.items()}
    nodes = list(all_nodes(graph))
    matched: dict[ir.Node, str] = {}
    notes = []
    for rule in rules:
        rule = rule if isinstance(rule, Rule) else parse_rule(rule)
        if rule.kind == "op":
            hits = {n: str(rule) for n in nodes if n.op_type == rule.value}
        elif rule.kind == "name":
            hits = {
                n: str(rule) for n in nodes
                if fnmatch.fnmatchcase(n.name or "", rule.value)
                or any(fnmatch.fnmatchcase(v.name or "", rule.value) for v in n.outputs)
            }
        elif rule.kind in ("first", "last"):
            typed = [n for n in nodes if n.op_type == rule.value]
            hits = {} if not typed else {typed[0 if rule.kind == "first" else -1]: str(rule)}
        elif rule.kind == "pattern":
            hits = PATTERNS[rule.value](graph)
        elif rule.kind == "sig":
            hits = {by_key[rule.value]: str(rule)} if rule.value in by_key else {}
        else:
            signatures = _read_rules_file(rule.value)
            hits = {by_key[s]: str(rule) for s in signatures if s in by_key}
            if len(hits) < len(signatures):
                notes.append(
                    f"rules file {rule.value}: {len(signatures) - len(hits)} of {len(signatures)} entries match "
                    "no node of this model (a different network, or a different export structure)"
                )
        if not hits and rule.kind != "file":
            notes.append(f"keep-float rule {rule} matched no node")
        for node, reason in hits.items():
            matched.setdefault(node, reason)
    return matched, notes


def save_rules(path: str | os.PathLike, kept: dict[ir.Node, str], keys: dict[ir.Node, str]) -> None:
    """Write the nodes in ``kept`` (with their reasons) as a rules file, keyed by signature."""
    entries = [
        {"signature": keys[node], "op": node.op_type, "name": node.name or "", "reason": reason}
        for node, reason in sorted(kept.items(), key=lambda item: keys[item[0]])
    ]
    record = {"format": RULES_FORMAT, "version": RULES_VERSION, "keep_float": entries}
    write_atomically(json.dumps(record, indent=2).encode(), Path(path))

