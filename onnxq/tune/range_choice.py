"""Each activation's range chosen by the error it causes in the layers that read it (``--method auto``).

One calibration method for the whole model fits some tensors and hurts others: min/max spends
the 256 levels of a tensor with a few huge outliers on those outliers; a clip saturates them and
keeps the levels for the rest, which is worse for a tensor whose extremes matter. Rules:
1. The candidates of a group of tensors that share one scale (``onnxq.rewrite.plan`` rule 2) are
   its calibrated range (min/max), the ``PERCENTILES`` percentile clips and the MSE-optimal clip
   of its values, the clips read off one histogram of its members' values on the first
   ``SAMPLED_BATCHES`` calibration batches and kept inside the calibrated range. Groups holding
   constants or tensors of If/Loop/Scan bodies keep min/max.
2. A candidate's error is the error it causes in the outputs of the weighted layers (a Conv,
   ConvTranspose, Gemm or MatMul with constant weights) that read a member of the group: each
   such layer runs alone in ONNX Runtime (float weights) on the member's float values and on
   them quantized and dequantized with the candidate's scale and zero point; the squared error
   of its output, relative to that output's energy, is summed over the layers. A group that no
   weighted layer reads is judged by its members' own quantization error, relative to their energy.
3. A clip replaces min/max only when it lowers that error by at least ``CLIP_GAIN`` on the
   sampled batches: a clip that saves little there may cost more on data it has not seen, since
   what lies beyond it saturates.
4. The chosen range is recorded for every member of the group (``LayersStep.ranges``, by tensor
   key): the plan then computes the group's scale from it (``onnxq.rewrite.plan`` rule 4), and
   ``--resume`` and ``onnx recover`` rebuild the same model without data.
Cost: two float runs of the model per sampled batch (histograms, then values), and per group
one run of each weighted reader per candidate and batch.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort

from onnxq.calibration.data import BatchSource
from onnxq.calibration.observers import HistogramObserver, MinMaxObserver, MseObserver, PercentileObserver
from onnxq.config import QuantConfig
from onnxq.graph import constant_array, is_constant, owning_graph
from onnxq.load.prepare import LoadedModel
from onnxq.report.evaluate import ErrorAccumulator
from onnxq.rewrite.plan import QuantPlan, Range
from onnxq.rewrite.quant_math import activation_params
from onnxq.runtime import create_session
from onnxq.tune.tensor_error import fake_quantized, float_values

PERCENTILES = (99.9, 99.99, 99.999)
SAMPLED_BATCHES = 2
CLIP_GAIN = 0.1  # a clip must lower the readers' error by 10 % (0.46 dB) to replace min/max
_SAME = 0.01  # candidates within 1 % of the calibrated width of each other at both ends are one


@dataclasses.dataclass
class _Reader:
    """A weighted layer reading the group member ``member``, run alone on it (rule 2)."""

    node: ir.Node
    member: str
    opset: list[onnx.OperatorSetIdProto]
    ir_version: int  # the float model's: one ONNX Runtime reads

    @functools.cached_property
    def session(self) -> ort.InferenceSession:
        return create_session(_reader_model(self.node, self.opset, self.ir_version), f"layer {self.node.name!r} alone")

    def run(self, values: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": values})[0]


@dataclasses.dataclass
class _Group:
    """Tensors sharing one scale: their names, calibrated range, weighted readers and candidates."""

    members: list[str]
    calibrated: Range
    readers: list[_Reader]
    histogram: HistogramObserver = dataclasses.field(default_factory=HistogramObserver)
    candidates: list[Range] = dataclasses.field(default_factory=list)

    def choose_candidates(self) -> None:
        """Rule 1: min/max first, then the distinct clips inside it."""
        low, high = self.calibrated
        width = max(high - low, 1e-30)
        self.candidates = [self.calibrated]
        for observer in [PercentileObserver(p) for p in PERCENTILES] + [MseObserver()]:
            observer.merge(self.histogram)
            clip_low, clip_high = observer.range()
            clip = (float(max(low, clip_low)), float(min(high, clip_high)))
            if clip[0] <= clip[1] and all(abs(clip[0] - c[0]) > _SAME * width or abs(clip[1] - c[1]) > _SAME * width
                                          for c in self.candidates):
                self.candidates.append(clip)


def _reader_model(node: ir.Node, opset: list[onnx.OperatorSetIdProto], ir_version: int) -> onnx.ModelProto:
    """``node`` alone: its activation input fed as ``x``, its constant inputs as initializers."""
    proto = ir.serde.serialize_node(node)
    initializers = []
    for slot, value in enumerate(node.inputs):
        if slot == 0 or value is None:
            continue
        name = f"c{slot}"
        proto.input[slot] = name
        initializers.append(onnx.numpy_helper.from_array(constant_array(value), name))
    proto.input[0] = "x"
    del proto.output[1:]
    proto.output[0] = "y"
    graph = oh.make_graph([proto], "reader", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers)
    return oh.make_model(graph, opset_imports=opset, ir_version=ir_version)


def _weighted_readers(value: ir.Value, plan: QuantPlan) -> list[ir.Node]:
    """Rule 2's layers: quantized nodes with int8 weights reading ``value`` at their activation
    input, every other input constant."""
    readers = []
    for use in value.uses():
        decision = plan.decisions.get(use.node)
        if (decision is not None and decision.weight_slot is not None and use.idx == 0
                and all(v is None or is_constant(v) for v in use.node.inputs[1:])):
            readers.append(use.node)
    return readers


def _groups(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, calibrated: dict[str, Range]) -> list[_Group]:
    """The groups of ``plan`` whose range can be chosen (rule 1), with their readers' sessions."""
    opset, ir_version = list(loaded.cleaned.opset_import), loaded.cleaned.ir_version
    groups = []
    for values in plan.groups:
        if any(is_constant(v) or owning_graph(v) is not graph or v.name not in calibrated for v in values):
            continue
        union = MinMaxObserver()
        for v in values:
            union.update_bounds(*calibrated[v.name])
        readers = [_Reader(node, v.name, opset, ir_version) for v in values for node in _weighted_readers(v, plan)]
        groups.append(_Group([v.name for v in values], union.range(), readers))
    return groups


def _relative_errors(group: _Group, values: dict[str, np.ndarray], config: QuantConfig,
                     errors: list[dict[int | str, ErrorAccumulator]]) -> None:
    """Add one batch's errors of each candidate to ``errors`` (per candidate, per reader or member)."""
    references = [reader.run(values[reader.member]) for reader in group.readers]
    for candidate, accumulators in zip(group.candidates, errors):
        params = activation_params(*candidate, config.activations)
        quantized = {name: fake_quantized(values[name], params) for name in group.members}
        if group.readers:
            for index, reader in enumerate(group.readers):
                accumulator = accumulators.setdefault(index, ErrorAccumulator())
                accumulator.update(references[index], reader.run(quantized[reader.member]))
        else:
            for name in group.members:
                accumulators.setdefault(name, ErrorAccumulator()).update(values[name], quantized[name])


def _total(accumulators: dict[int | str, ErrorAccumulator]) -> float:
    return sum(a.noise / a.signal if a.signal > 0 else 0.0 for a in accumulators.values())


def choose_ranges(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, calibrated: dict[str, Range],
                  config: QuantConfig, source: BatchSource) -> dict[str, Range]:
    """The clipped ranges chosen for the main-graph activation tensors of ``plan`` (by name;
    tensors that keep their calibrated range are left out), measured on the first calibration
    batches (rules 1-3). ``calibrated``: the calibrated range of each tensor, by name."""
    groups = _groups(loaded, graph, plan, calibrated)
    names = sorted({name for group in groups for name in group.members})
    if not names:
        return {}
    with np.errstate(invalid="ignore", over="ignore"):
        for values in float_values(loaded, names, source, SAMPLED_BATCHES):
            for group in groups:
                for name in group.members:
                    group.histogram.update(values[name])
        for group in groups:
            group.choose_candidates()
        groups = [group for group in groups if len(group.candidates) > 1]
        if not groups:
            return {}
        errors = {id(group): [{} for _ in group.candidates] for group in groups}
        for values in float_values(loaded, sorted({n for group in groups for n in group.members}), source,
                                   SAMPLED_BATCHES):
            for group in groups:
                _relative_errors(group, values, config, errors[id(group)])
    chosen = {}
    for group in groups:
        totals = [_total(accumulators) for accumulators in errors[id(group)]]
        best = int(np.argmin(totals[1:])) + 1
        if np.isfinite(totals[best]) and totals[best] <= (1 - CLIP_GAIN) * totals[0]:
            chosen.update((name, group.candidates[best]) for name in group.members)
    return chosen
