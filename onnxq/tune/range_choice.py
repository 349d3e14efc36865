"""Each activation's range chosen by the error it causes in the layers that read it (``--method auto``).

One calibration method for the whole model fits some tensors and hurts others: min/max spends
the 256 levels of a tensor with a few huge outliers on those outliers; a clip saturates them and
keeps the levels for the rest, which is worse for a tensor whose extremes matter. Rules:
1. The candidates of a group of tensors that share one scale (``onnxq.rewrite.plan`` rule 2) are
   its calibrated range (min/max), the ``PERCENTILES`` percentile clips and the MSE-optimal clip
   of its values, read off one histogram of its members' values on the first calibration batches
   (``CANDIDATE_SAMPLES`` samples) and kept inside the calibrated range. Groups with fewer than
   ``MIN_VALUES`` values there (too
   few to tell a tail from the range), or holding constants or tensors of If/Loop/Scan bodies,
   keep min/max.
2. The candidates are judged on the next calibration batches (``JUDGED_SAMPLES`` samples), which
   they were not read off (on their own samples a clip at their largest value would look free; one
   sample of each tells a tail from an image's content poorly): a candidate's error is the
   error it causes in the outputs of the weighted layers (a Conv, ConvTranspose, Gemm or MatMul
   with constant weights) that read a member of the group. Each such layer runs alone (float
   weights; every such layer of the model side by side in one ONNX Runtime session) on the
   member's float values and on them quantized and dequantized with the candidate's scale and
   zero point; the squared error of its output, relative to that output's energy, is summed over
   the layers. A group that no weighted layer reads is judged by its members' own quantization
   error, relative to their energy, and so is every group of a model whose weights lie in external
   data (its layers side by side would be another model of that size). With no batch left to
   judge on after the candidates' (``CANDIDATE_SAMPLES`` samples or fewer in all), or data that
   can be read only once, every tensor keeps min/max.
3. A clip replaces min/max only when it lowers that error by at least ``CLIP_GAIN``: a clip that
   saves little on one batch may cost more on data it has not seen, where more lies beyond it.
4. The chosen range is recorded for every member of the group (``LayersStep.ranges``, by tensor
   key): the plan then computes the group's scale from it (``onnxq.rewrite.plan`` rule 4), and
   ``--resume`` and ``onnx recover`` rebuild the same model without data.
Cost: one float run of the model on each batch read (exposing the quantized tensors, one batch's
tensors in memory at a time), and per judged batch one run of the weighted layers alone for the
float values and for each candidate (at most 1 + 3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir

from onnxq.calibration.data import BatchSource
from onnxq.calibration.observers import HistogramObserver, MinMaxObserver, MseObserver, PercentileObserver
from onnxq.config import QuantConfig
from onnxq.graph import constant_array, is_constant, owning_graph
from onnxq.load.prepare import LoadedModel
from onnxq.rewrite.plan import QuantPlan, Range
from onnxq.rewrite.quant_math import activation_params
from onnxq.runtime import create_session
from onnxq.tune.tensor_error import fake_quantized, float_batches

PERCENTILES = (99.99, 99.999)
CANDIDATE_SAMPLES = 4  # samples the candidate clips are read off (rule 1)
JUDGED_SAMPLES = 4  # further samples they are judged on (rule 2)
MIN_VALUES = 2**14  # a 99.99 percentile needs 10**4 values to differ from the maximum
CLIP_GAIN = 0.1  # a clip must lower the readers' error by 10 % (0.46 dB) to replace min/max
_SAME = 0.01  # candidates within 1 % of the calibrated width of each other at both ends are one


def _energy(values: np.ndarray) -> float:
    flat = values.reshape(-1)
    return float(np.dot(flat, flat))


@dataclasses.dataclass
class _Group:
    """Tensors sharing one scale: their names, calibrated range, the weighted layers reading
    them (each with the member it reads) and their indices in ``_Readers``, candidates and, per
    candidate, the squared error of each output judged (rule 2) with its energy."""

    members: list[str]
    calibrated: Range
    layers: list[tuple[ir.Node, str]]
    readers: list[int] = dataclasses.field(default_factory=list)
    histogram: HistogramObserver = dataclasses.field(default_factory=HistogramObserver)
    candidates: list[Range] = dataclasses.field(default_factory=list)
    noise: np.ndarray | None = None  # [candidate, judged output]
    signal: np.ndarray | None = None  # [judged output]

    def choose_candidates(self) -> None:
        """Rule 1: min/max first, then the distinct clips inside it (none from too few values)."""
        low, high = self.calibrated
        width = max(high - low, 1e-30)
        self.candidates = [self.calibrated]
        sampled = self.histogram.counts.sum()
        for observer in [] if sampled < MIN_VALUES else [PercentileObserver(p) for p in PERCENTILES] + [MseObserver()]:
            observer.merge(self.histogram)
            clip_low, clip_high = observer.range()
            clip = (float(max(low, clip_low)), float(min(high, clip_high)))
            if clip[0] <= clip[1] and all(abs(clip[0] - c[0]) > _SAME * width or abs(clip[1] - c[1]) > _SAME * width
                                          for c in self.candidates):
                self.candidates.append(clip)
        judged = len(self.layers) or len(self.members)
        self.noise, self.signal = np.zeros((len(self.candidates), judged)), np.zeros(judged)

    def quantized(self, values: dict[str, np.ndarray], candidate: int, activations: str) -> dict[str, np.ndarray]:
        """The members' values quantized and dequantized with candidate ``candidate``'s params."""
        params = activation_params(*self.candidates[candidate], activations)
        return {name: fake_quantized(values[name], params) for name in self.members}

    def add(self, candidate: int | None, outputs: list[np.ndarray], references: list[np.ndarray]) -> None:
        """Add the judged outputs of one batch: the references' energy (``candidate`` None), or
        a candidate's squared error against them."""
        if candidate is None:
            self.signal += [_energy(reference) for reference in references]
        else:
            self.noise[candidate] += [_energy(output - reference) for output, reference in zip(outputs, references)]

    def choice(self) -> Range | None:
        """The clip that replaces min/max (rule 3), or ``None``."""
        errors = (self.noise / np.maximum(self.signal, 1e-30)).sum(axis=1)
        best = int(np.argmin(errors[1:])) + 1
        return self.candidates[best] if np.isfinite(errors[best]) and errors[best] <= (1 - CLIP_GAIN) * errors[0] else None


class _Readers:
    """Every weighted layer of rule 2 alone, side by side in one model: layer ``i`` reads input
    ``x{i}`` (the tensor ``inputs[i]``) and its constant inputs, and writes ``y{i}``."""

    def __init__(self, loaded: LoadedModel, layers: list[tuple[ir.Node, str]]) -> None:
        self.inputs = [name for _, name in layers]
        nodes, initializers = [], []
        for index, (node, _) in enumerate(layers):
            proto = ir.serde.serialize_node(node)
            for slot, value in enumerate(node.inputs):
                if slot and value is not None:
                    proto.input[slot] = f"c{index}_{slot}"
                    initializers.append(onh.from_array(constant_array(value), proto.input[slot]))
            proto.input[0] = f"x{index}"
            del proto.output[1:]
            proto.output[0] = f"y{index}"
            nodes.append(proto)
        graph = oh.make_graph(
            nodes, "weighted layers", [oh.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, None) for i in range(len(layers))],
            [oh.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(len(layers))], initializers)
        cleaned = loaded.cleaned
        model = oh.make_model(graph, opset_imports=list(cleaned.opset_import), ir_version=cleaned.ir_version)
        self.session = create_session(model, "the weighted layers alone") if layers else None

    def run(self, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Each layer's output on ``values`` (by tensor name) of its input."""
        if self.session is None:
            return []
        return self.session.run(None, {f"x{i}": values[name] for i, name in enumerate(self.inputs)})


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


def _groups(graph: ir.Graph, plan: QuantPlan, calibrated: dict[str, Range], with_readers: bool) -> list[_Group]:
    """The groups of ``plan`` whose range can be chosen (rule 1), with the weighted layers reading
    them (none without ``with_readers``)."""
    groups = []
    for values in plan.groups:
        if any(is_constant(v) or owning_graph(v) is not graph or v.name not in calibrated for v in values):
            continue
        union = MinMaxObserver()
        for v in values:
            union.update_bounds(*calibrated[v.name])
        layers = [(node, v.name) for v in values for node in _weighted_readers(v, plan)] if with_readers else []
        groups.append(_Group([v.name for v in values], union.range(), layers))
    return groups


def _measure(groups: list[_Group], values: dict[str, np.ndarray], readers: _Readers, activations: str) -> None:
    """Rule 2 on one batch: the readers run on the float values, then once per candidate index
    (groups with fewer candidates feed their float values there, and are not judged)."""
    references = readers.run(values)
    for group in groups:
        group.add(None, [], [references[i] for i in group.readers] or [values[name] for name in group.members])
    for candidate in range(max(len(group.candidates) for group in groups)):
        measured = [group for group in groups if candidate < len(group.candidates)]
        quantized = {}
        for group in measured:
            quantized.update(group.quantized(values, candidate, activations))
        outputs = readers.run(values | quantized)
        for group in measured:
            if group.readers:
                group.add(candidate, [outputs[i] for i in group.readers], [references[i] for i in group.readers])
            else:
                group.add(candidate, [quantized[name] for name in group.members], [values[name] for name in group.members])


def choose_ranges(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, calibrated: dict[str, Range],
                  config: QuantConfig, source: BatchSource) -> dict[str, Range]:
    """The clipped ranges chosen for the main-graph activation tensors of ``plan`` (by name;
    tensors that keep their calibrated range are left out), read off the first calibration batches
    and judged on the next (rules 1-3). ``calibrated``: the calibrated range of each tensor, by name."""
    groups = _groups(graph, plan, calibrated, with_readers=not loaded.offload)
    names = sorted({name for group in groups for name in group.members})
    if not names:
        return {}
    with np.errstate(invalid="ignore", over="ignore"):
        batches = float_batches(loaded, names, source)
        read = 0  # stays 0 for data that could be read only once (calibration read it)
        for samples, values in batches:
            for group in groups:
                for name in group.members:
                    group.histogram.update(values[name])
            read += samples
            del values  # one batch's tensors in memory at a time
            if read >= CANDIDATE_SAMPLES:
                break
        if not read:
            return {}
        for group in groups:
            group.choose_candidates()
        groups = [group for group in groups if len(group.candidates) > 1]
        if not groups:
            return {}
        layers: list[tuple[ir.Node, str]] = []
        for group in groups:
            group.readers = list(range(len(layers), len(layers) + len(group.layers)))
            layers += group.layers
        readers, judged = _Readers(loaded, layers), 0
        for samples, values in batches:
            _measure(groups, values, readers, config.activations)
            judged += samples
            del values
            if judged >= JUDGED_SAMPLES:
                break
        if not judged:
            return {}
    chosen = {}
    for group in groups:
        clip = group.choice()
        if clip is not None:
            chosen.update((name, clip) for name in group.members)
    return chosen
