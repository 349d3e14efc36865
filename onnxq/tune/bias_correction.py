"""Bias correction (Nagel et al. 2019): the mean shift int8 causes in each weighted layer's output,
measured on calibration data and removed through the layer's bias.

Rules:
1. Every main-graph layer the plan quantizes with a constant weight (Conv, ConvTranspose, Gemm,
   MatMul) is measured when its output can take a correction (rule 3).
2. A layer's shift is its own error: per output channel, the mean over the first
   ``MEASURED_BATCHES`` calibration batches of its output in the plain QDQ model (int8 input,
   int8 weight, 7-bit where the layers step says so, int32 bias) minus the float layer (float
   weight and bias) applied to the same input before its QuantizeLinear. Shifts that upstream layers cause are theirs to correct, so
   every layer is measured in one run and corrected at once, and a layer's correction does not
   depend on which other nodes a fallback keeps float.
3. The shift is subtracted from the layer's bias: a Conv or ConvTranspose without one gets one;
   a Gemm's C takes ``shift / beta`` (a Gemm with ``beta = 0`` is not corrected); a MatMul's is
   the per-channel constant of the one Add that reads its output, if there is one (else it is
   not corrected).
4. Shifts are recorded by topology key in the workspace's layers step, so that a resumed run and
   ``onnxq recover`` apply the same ones; ``BiasCorrectionPass`` applies them to the nodes a
   model quantizes, in ``onnxq.rewrite.build``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import KEPT_BATCHES, BatchSource
from onnxq.files import offloaded
from onnxq.graph import add_initializer, constant_array, set_constant_input, taken_names, unique_name, with_outputs
from onnxq.load.prepare import LoadedModel
from onnxq.ops import output_channels
from onnxq.passes import GraphPass, PassResult
from onnxq.rewrite.plan import QuantPlan
from onnxq.rewrite.qdq import QdqPass
from onnxq.runtime import create_session

MEASURED_BATCHES = KEPT_BATCHES  # the first calibration batches, which a one-shot source keeps too


def _bias_target(node: ir.Node) -> tuple[ir.Node, int, float] | None:
    """Where a shift of ``node``'s output is subtracted (rule 3): the node, its input slot and
    the factor the shift is divided by; ``None`` where it cannot be."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return node, 2, 1.0
    if node.op_type == "Gemm":
        beta = node.attributes.get_float("beta", 1.0)
        return (node, 2, beta) if beta != 0 else None
    if node.op_type != "MatMul":
        return None
    output, weight = node.outputs[0], constant_array(node.inputs[1])
    uses = list(output.uses())
    if weight is None or len(uses) != 1 or output.is_graph_output() or uses[0].node.op_type != "Add" \
            or uses[0].node.domain not in ("", "ai.onnx"):
        return None
    add, slot = uses[0].node, 1 - uses[0].idx
    constant = constant_array(add.inputs[slot])  # per channel or less, so that the Add's output keeps its shape
    if constant is None or constant.dtype != np.float32 or constant.ndim > len(output.shape or ()) \
            or constant.shape[-1:] not in ((), (1,), (weight.shape[-1],)):
        return None
    return add, slot, 1.0


def _channel_axis(node: ir.Node) -> int:
    """The axis of ``node``'s output that holds its output channels."""
    return 1 if node.op_type in ("Conv", "ConvTranspose") else -1


def correctable_layers(graph: ir.Graph, plan: QuantPlan) -> list[ir.Node]:
    """The layers of rule 1, in graph order."""
    return [node for node in graph
            if node in plan.decisions and plan.decisions[node].weight_slot is not None and _bias_target(node)]


def _quantized_source(value: ir.Value) -> ir.Value | None:
    """The float tensor a QDQ model quantizes to make ``value`` (DequantizeLinear of a QuantizeLinear)."""
    dequantize = value.producer()
    quantize = dequantize.inputs[0].producer() if dequantize is not None and dequantize.op_type == "DequantizeLinear" \
        else None
    return quantize.inputs[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else None


def _add_float_twin(graph: ir.Graph, taken: set[str], node: ir.Node, weight: np.ndarray,
                    bias: np.ndarray | None) -> ir.Value | None:
    """A float copy of the quantized ``node`` reading its input before quantization, with the
    float ``weight`` and ``bias``; returns its output (``None``: the input is not quantized)."""
    source = _quantized_source(node.inputs[0])
    if source is None:
        return None
    inputs = [source, add_initializer(graph, taken, f"{node.name}_float_weight", weight)]
    if bias is not None:
        inputs.append(add_initializer(graph, taken, f"{node.name}_float_bias", bias))
    attributes = [ir.Attr(attr.name, attr.type, attr.value) for attr in node.attributes.values()]
    name = unique_name(f"{node.name}_float_twin", taken)
    twin = ir.Node(node.domain, node.op_type, inputs, attributes, name=name, outputs=[ir.Value(name=name)])
    graph.append(twin)
    return twin.outputs[0]


def measure_bias_shifts(loaded: LoadedModel, model: ir.Model, plan: QuantPlan, source: BatchSource,
                        keys: dict[ir.Node, str], reduced: set[ir.Node] = frozenset()) -> dict[str, list[float]]:
    """The shift per output channel of each layer of rule 1 (by topology key), measured as rule 2
    says on ``model`` (a fresh copy of the float graph, which ``plan`` is for; it is rewritten, with
    7-bit weights on the ``reduced`` layers)."""
    graph = model.graph
    layers = correctable_layers(graph, plan)
    if not layers:
        return {}
    floats = {node: (constant_array(node.inputs[1]), constant_array(node.inputs[2]) if len(node.inputs) > 2 else None)
              for node in layers}
    QdqPass(plan, reduced)(model)
    taken = taken_names(graph)
    pairs = {}
    for node in layers:
        twin = _add_float_twin(graph, taken, node, *floats[node])
        if twin is not None:
            pairs[node] = (node.outputs[0].name, twin.name)
    names = [name for pair in pairs.values() for name in pair]
    totals = {node: 0.0 for node in pairs}
    counts = dict.fromkeys(pairs, 0)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(offloaded(model)) if loaded.offload else None
        session = create_session(with_outputs(ir.to_proto(model), names), "the bias measuring model",
                                 external_folder=folder)
        for batch in source.first_batches(MEASURED_BATCHES):
            values = dict(zip(names, session.run(names, batch.feed)))
            for node, (quantized, float_twin) in pairs.items():
                axis = _channel_axis(node)
                error = np.moveaxis(values[quantized].astype(np.float64) - values[float_twin], axis, -1)
                totals[node] = totals[node] + error.reshape(-1, error.shape[-1]).sum(axis=0)
                counts[node] += error.size // error.shape[-1]
    return {keys[node]: [float(v) for v in (totals[node] / counts[node]).astype(np.float32)]
            for node in pairs if counts[node] and np.all(np.isfinite(totals[node]))}


class BiasCorrectionPass(GraphPass):
    """Subtract each layer's recorded shift (``shifts``: node -> per-channel shift) through its
    bias, or where rule 3 says; the float model's other nodes are left as they are."""

    def __init__(self, shifts: dict[ir.Node, np.ndarray]) -> None:
        super().__init__()
        self.shifts = shifts

    def call(self, model: ir.Model) -> PassResult:
        taken = taken_names(model.graph)
        corrected = 0
        for node, shift in self.shifts.items():
            target = _bias_target(node)
            if target is None:
                continue
            owner, slot, divisor = target
            current = constant_array(owner.inputs[slot]) if slot < len(owner.inputs) else None
            if current is None:
                if slot < len(owner.inputs) and owner.inputs[slot] is not None:
                    continue  # a bias computed at run time
                weight = constant_array(node.inputs[1])
                current = np.zeros(output_channels(node, weight.shape), np.float32)
            if current.dtype != np.float32 or current.ndim and current.shape[-1] not in (1, shift.shape[0]):
                continue
            set_constant_input(owner.graph, taken, owner, slot, (current - shift / divisor).astype(np.float32))
            corrected += 1
        notes = [f"bias correction: the mean int8 shift of {corrected} layer(s) removed through their bias"] \
            if corrected else []
        return PassResult(model, corrected > 0, notes)
