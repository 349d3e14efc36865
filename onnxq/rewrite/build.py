"""Building one quantized model from calibrated state: plan, QDQ rewrite, fp16 islands and
QOperator form, on a fresh copy of the cleaned-up graph (``onnxq.save`` checks and writes it)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.analysis.rules import PATTERNS
from onnxq.analysis.subgraphs import control_flow_notes
from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig
from onnxq.graph import all_nodes
from onnxq.load.prepare import LoadedModel
from onnxq.ops import rule_for
from onnxq.passes import GraphPass, run_passes
from onnxq.rewrite.fp16 import Fp16IslandsPass
from onnxq.rewrite.plan import QuantPlan, plan_quantization
from onnxq.rewrite.qdq import QdqPass
from onnxq.rewrite.qoperator import QOperatorPass
from onnxq.tune.bias_correction import BiasCorrectionPass, correctable_layers
from onnxq.tune.tensor_error import POOR_TENSOR_DB
from onnxq.workspace.steps import LayersStep, decode_array


@dataclasses.dataclass(frozen=True)
class OpCount:
    """How many nodes of one op type were quantized and how many stayed float."""

    quantized: int
    float: int


def _op_counts(graph: ir.Graph, plan: QuantPlan) -> dict[str, OpCount]:
    quantized, total = collections.Counter(), collections.Counter()
    for node in all_nodes(graph):
        total[node.op_type] += 1
        quantized[node.op_type] += node in plan.decisions
    return {op: OpCount(quantized[op], total[op] - quantized[op]) for op in sorted(total)}


def plan_for_state(
    graph: ir.Graph, tensor_keys: dict[str, str], state: CalibrationState, config: QuantConfig, sentinel=(),
    keep_float=frozenset(), chosen: dict[str, list[float]] | None = None,
) -> QuantPlan:
    """The plan for ``graph`` from the calibrated ranges (by tensor key), leaving the
    ``sentinel`` tensors and the ``keep_float`` nodes float; ``chosen`` ranges (by tensor key,
    ``LayersStep.ranges``) replace the calibrated ones."""
    by_key = state.ranges()
    excluded = set(sentinel)
    ranges = {name: by_key[key] for name, key in tensor_keys.items() if key in by_key and key not in excluded}
    chosen_ranges = {name: tuple(chosen[key]) for name, key in tensor_keys.items() if chosen and key in chosen}
    left_float = frozenset(name for name, key in tensor_keys.items() if key in by_key and key in excluded)
    return plan_quantization(graph, ranges, config, keep_float, chosen_ranges, left_float)


def reduced_layers(plan: QuantPlan, keys: dict[ir.Node, str], config: QuantConfig, reduced: tuple[str, ...]) -> set[ir.Node]:
    """The quantized nodes that get 7-bit weights: every weighted one with ``reduce_range="always"``,
    else those whose key is in ``reduced`` (measured by ``onnxq.tune.layers``)."""
    if config.reduce_range == "always":
        return {node for node, decision in plan.decisions.items() if decision.weight_slot is not None}
    wanted = set(reduced)
    return {node for node in plan.decisions if keys[node] in wanted}


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """One quantized model, not yet checked: the rewritten graph, per-op counts, notes, its
    fallback units (see ``_fallback_units``) and the nodes it kept float on purpose (key: why)."""

    model: ir.Model
    op_counts: dict[str, OpCount]
    notes: list[str]
    units: tuple[tuple[str, ...], ...]
    kept_float: dict[str, str]


def _fallback_units(graph: ir.Graph, plan: QuantPlan, keys: dict[ir.Node, str]) -> tuple[tuple[str, ...], ...]:
    """The node sets a fallback keeps float together, one per quantized tensor source: a tensor
    is float only when its producer and every quantized reader are, so a unit is a quantized
    compute node (or a graph input) with the compute nodes reading its output, through the
    data-movement ops that share its scale."""
    candidates = {n for n, d in plan.decisions.items() if d.rule.kind in ("compute", "concat")}

    def readers(values) -> set[ir.Node]:
        found, stack = set(), list(values)
        while stack:
            for use in stack.pop().uses():
                if use.node in candidates:
                    found.add(use.node)
                elif use.node in plan.decisions:
                    stack.extend(use.node.outputs)
        return found

    units: dict[tuple[str, ...], None] = {}
    sources = [({}, [value]) for value in graph.inputs] + [({node}, node.outputs) for node in all_nodes(graph) if node in candidates]
    for own, values in sources:
        unit = tuple(sorted(keys[n] for n in set(own) | readers(values)))
        if unit:
            units[unit] = None
    return tuple(units)


def _keep_float(nodes: list[ir.Node], keys: dict[ir.Node, str], keep_float: dict[str, str], reason: str,
                what: str, after: str = "") -> list[str]:
    """Add ``nodes`` (those not there yet) to ``keep_float`` with ``reason``; returns the note:
    how many, ``what`` they are, by op type, then ``after``."""
    nodes = [node for node in nodes if keys[node] not in keep_float]
    keep_float.update((keys[node], reason) for node in nodes)
    if not nodes:
        return []
    ops = collections.Counter(node.op_type for node in nodes)
    return [f"kept float {len(nodes)} node(s) {what} ({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))}){after}"]


def _keep_unfused_float(graph: ir.Graph, keys: dict[ir.Node, str], unfused: set[str], keep_float: dict[str, str]) -> list[str]:
    """Add the nodes ONNX Runtime would not fuse to ``keep_float``; returns the note."""
    return _keep_float([node for node in all_nodes(graph) if keys[node] in unfused], keys, keep_float,
                       "not fused by ONNX Runtime", "that ONNX Runtime's CPU provider would not fuse into integer kernels",
                       "; --quantize-unfused quantizes them anyway")


def _keep_normalizations_float(graph: ir.Graph, keys: dict[ir.Node, str], keep_float: dict[str, str]) -> list[str]:
    """Add the quantizable nodes of normalizations found by dataflow (``PATTERNS["normalization"]``)
    to ``keep_float``: a statistic applied back to its own data cancels or divides, and 8-bit
    steps there are errors of the whole tensor's size. Returns the note."""
    return _keep_float([node for node in PATTERNS["normalization"](graph) if rule_for(node) is not None], keys,
                       keep_float, "normalization (statistics of a tensor applied back to it)",
                       "of normalizations found by dataflow, a mean, spread or sum of a tensor applied back to it")


def _float_tensor_notes(names: list[str], why: str) -> list[str]:
    """The note on tensors left float (with the nodes that read or write them) and ``why``."""
    if not names:
        return []
    names = sorted(names)
    more = f" and {len(names) - 6} more" if len(names) > 6 else ""
    return [f"kept float {len(names)} tensor(s) {why}, and the nodes that read or write them: "
            f"{', '.join(names[:6])}{more}"]


def _reduced_notes(graph: ir.Graph, reduced: set[ir.Node]) -> list[str]:
    names = ", ".join(sorted(node.name or node.op_type for node in reduced)[:8])
    more = f" and {len(reduced) - 8} more" if len(reduced) > 8 else ""
    notes = [
        f"7-bit weights on {len(reduced)} layer(s) whose 8-bit form this CPU's integer kernels "
        f"would saturate (no VNNI): {names}{more}"
    ]
    in_bodies = sum(node.graph is not graph for node in reduced)
    if in_bodies:
        notes.append(
            f"{in_bodies} of those are inside If/Loop/Scan bodies, where saturation cannot be "
            "measured: they get 7-bit weights to be safe"
        )
    return notes


def _fp16_islands(graph: ir.Graph, plan: QuantPlan, kept: frozenset[ir.Node], sentinel_names: set[str]) -> set[ir.Node]:
    """The main-graph nodes left float that run in fp16: kept on purpose or quantizable but not
    quantized, and touching no sentinel tensor."""
    return {
        node for node in graph
        if (node in kept or rule_for(node) is not None) and node not in plan.decisions
        and not any(v is not None and v.name in sentinel_names for v in (*node.inputs, *node.outputs))
    }


def build_model(
    loaded: LoadedModel,
    state: CalibrationState,
    config: QuantConfig,
    layers: LayersStep,
    keep_float: dict[str, str] | None = None,
    fallback_dtype: str = "fp32",
) -> BuiltModel:
    """A quantized model from calibrated state, on a fresh copy of the graph: plan and rewrite.
    Nodes whose key is in ``keep_float`` (key: reason) stay float, and so do those in
    ``layers.unfused``, the normalizations found by dataflow and the nodes touching
    ``layers.sentinel`` or ``layers.poor`` tensors; layers in ``layers.reduced`` (every layer, for ``reduce_range="always"``)
    get 7-bit weights; the quantized layers with a shift in ``layers.bias_shifts`` get it removed
    through their bias (``config.bias_correction``); with ``fallback_dtype="fp16"`` nodes left float run in fp16."""
    model = loaded.fresh()
    graph = model.graph
    keys = loaded.keys.for_copy(graph)
    keep_float = dict(keep_float or {})
    notes = _keep_unfused_float(graph, keys, set(layers.unfused), keep_float)
    notes += _keep_normalizations_float(graph, keys, keep_float)
    kept = frozenset(node for node in all_nodes(graph) if keys[node] in keep_float)
    plan = plan_for_state(graph, loaded.keys.tensors, state, config, layers.sentinel + layers.poor, kept, layers.ranges)
    shifts = {node: np.asarray(layers.bias_shifts[keys[node]], np.float32) for node in correctable_layers(graph, plan)
              if config.bias_correction and keys[node] in layers.bias_shifts}
    if shifts:  # then planned again: a layer that had no bias has one to quantize now
        notes += run_passes(model, [BiasCorrectionPass(shifts)])
        plan = plan_for_state(graph, loaded.keys.tensors, state, config, layers.sentinel + layers.poor, kept,
                              layers.ranges)
    sentinel, poor = set(layers.sentinel), set(layers.poor)
    sentinel_names = [name for name, key in loaded.keys.tensors.items() if key in sentinel]
    notes += _float_tensor_notes(sentinel_names, "whose range is dominated by sentinel values (attention masks such "
                                 "as -1e9, the float minimum or -inf)")
    notes += _float_tensor_notes([name for name, key in loaded.keys.tensors.items() if key in poor],
                                 f"whose 8-bit error is poor on calibration data, on them or after the ops reading them (SQNR under "
                                 f"{POOR_TENSOR_DB:g} dB)")
    if layers.ranges:
        notes.append(f"clipped the ranges of {len(layers.ranges)} tensor(s) where that lowered the error of the layers "
                     "reading them (--method auto)")
    op_counts = _op_counts(graph, plan)
    units = _fallback_units(graph, plan, keys)
    reduced = reduced_layers(plan, keys, config, layers.reduced)
    islands = _fp16_islands(graph, plan, kept, set(sentinel_names)) if fallback_dtype == "fp16" else set()
    notes += control_flow_notes(graph, config.observer_method, set(plan.decisions)) + plan.notes
    if reduced and config.reduce_range == "auto":
        notes += _reduced_notes(graph, reduced)
    rounded = {node: (decode_array(r["values"]), decode_array(r["scale"]))
               for node, r in ((node, layers.rounded.get(keys[node])) for node in plan.decisions) if r is not None}
    pipeline: list[GraphPass] = [QdqPass(plan, reduced, rounded)]
    if islands:
        pipeline.append(Fp16IslandsPass(islands))
    if config.format == "qoperator":
        pipeline.append(QOperatorPass())
    notes += run_passes(model, pipeline)
    return BuiltModel(model, op_counts, notes, units, keep_float)
