"""Tensors whose 8-bit error is poor where it is used, measured on calibration data, whatever op made them.

Export styles spell the same computation many ways (a layer norm as one op, as ReduceMean
chains, as ReduceSum times 1/n with Reciprocal(Sqrt(...)); masks as Add, Where or Mul with
huge constants): rules written for one spelling miss the next. Measuring does not. Rules:
1. Every activation tensor the plan quantizes (of the main graph) is quantized and dequantized
   with its planned scale and zero point, alone, on the first ``MEASURED_BATCHES`` calibration
   batches. Its error is measured on the tensor itself and where what its readers compute from it
   leaves them: the readers are followed breadth first, up to ``REGION_DEPTH`` nodes deep and
   ``REGION_NODES`` nodes in all, stopping at weighted layers (quantized Conv, ConvTranspose, Gemm,
   MatMul with constant weights: what they read is the tensor itself), nodes with bodies and
   shape reads; their outputs read by other nodes, or by none, or by the graph are compared.
   The tensor's figure is the worst SQNR among them:
   an error harmless on the tensor can be ruinous after the ops that read it (a residual stream
   whose few huge channels set one coarse scale is normalized next, and every small channel is lost).
2. The readers run as copies beside the float graph, reading the quantized tensor and the float
   values of everything else, all tensors in one ONNX Runtime session; the graph itself reduces
   each compared pair to two sums (signal, error), so only scalars come out.
3. A tensor whose figure is under ``POOR_TENSOR_DB`` is left float, with the nodes that write and
   read it (a writer that may compute from int8 into float, ``OpInfo.float_output``, keeps its
   int8 inputs): its 8-bit form has lost what it carries (a variance whose range is set by one
   row, a reciprocal of a near-zero spread, a tensor with a few huge outliers).
4. Without calibration data nothing is measured.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir

from onnxq.calibration.data import BatchSource
from onnxq.graph import bodies, is_constant, owning_graph, taken_names, unique_name, with_outputs
from onnxq.load.prepare import LoadedModel
from onnxq.rewrite.plan import QuantPlan
from onnxq.rewrite.quant_math import QuantParams, dequantize, quantize

POOR_TENSOR_DB = 12.0  # the error's RMS is a quarter of the signal's
MEASURED_BATCHES = 4
REGION_DEPTH = 12  # deep enough to pass a layer norm written out in ten ops
REGION_NODES = 16  # the cost bound: an unrolled recurrent net has long chains of elementwise ops
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
_SHAPE_READS = frozenset({"Shape", "Size"})


def float_values(loaded: LoadedModel, names: list[str], source: BatchSource,
                 batches: int = MEASURED_BATCHES) -> Iterator[dict[str, np.ndarray]]:
    """The float values of the tensors ``names`` on each of the first ``batches`` calibration batches."""
    for _, values in itertools.islice(float_batches(loaded, names, source), batches):
        yield values


def float_batches(loaded: LoadedModel, names: list[str], source: BatchSource) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Each calibration batch's sample count and the float values of the tensors ``names`` on it."""
    session = loaded.float_session(with_outputs(loaded.cleaned, names))
    for batch in source():
        yield batch.samples, dict(zip(names, session.run(names, batch.feed)))


def fake_quantized(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """``values`` quantized and dequantized with ``params``, as a QDQ pair computes them."""
    return dequantize(quantize(values, params), params)


def _readers(value: ir.Value, stops: set[ir.Node], order: dict[ir.Node, int]) -> list[ir.Node]:
    """Rule 1's nodes computing from ``value`` (up to ``REGION_DEPTH`` deep, ``REGION_NODES`` in all), in graph order."""
    found: set[ir.Node] = set()
    level = [value]
    for _ in range(REGION_DEPTH):
        following = []
        for current in level:
            for use in current.uses():
                node = use.node
                if node in found or node in stops or node not in order or bodies(node) or node.op_type in _SHAPE_READS:
                    continue
                found.add(node)
                following += node.outputs
                if len(found) == REGION_NODES:
                    return sorted(found, key=order.__getitem__)
        level = following
    return sorted(found, key=order.__getitem__)


class _ErrorModel:
    """Rule 2's model: the float graph; per measured tensor a QuantizeLinear/DequantizeLinear pair
    and copies of its readers reading it; per compared pair of tensors two scalar outputs, the
    float tensor's sum of squares and the difference's."""

    def __init__(self, loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, measured: dict[ir.Value, QuantParams]):
        self.proto = onnx.ModelProto()
        self.proto.CopyFrom(loaded.cleaned)
        self._taken = taken_names(graph)
        self._doubles: dict[str, str] = {}
        self.signals: dict[str, str] = {}  # float tensor -> its sum of squares
        self.errors: dict[str, list[tuple[str, str]]] = {}  # measured tensor -> (its error sum, the signal's)
        stops = {node for node, decision in plan.decisions.items() if decision.weight_slot is not None}
        order = {node: index for index, node in enumerate(graph)}
        for value, params in measured.items():
            self._measure(value, params, _readers(value, stops, order))
        self.outputs = [*self.signals.values(), *(error for pairs in self.errors.values() for error, _ in pairs)]
        self.proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in self.outputs)

    def _name(self, base: str) -> str:
        return unique_name(base, self._taken)

    def _add(self, op_type: str, inputs: list[str], base: str, **attributes) -> str:
        output = self._name(base)
        self.proto.graph.node.append(oh.make_node(op_type, inputs, [output], **attributes))
        return output

    def _double(self, name: str) -> str:
        if name not in self._doubles:
            self._doubles[name] = self._add("Cast", [name], f"{name}_double", to=onnx.TensorProto.DOUBLE)
        return self._doubles[name]

    def _compare(self, reference: str, other: str) -> tuple[str, str]:
        if reference not in self.signals:
            self.signals[reference] = self._add("ReduceSumSquare", [self._double(reference)], f"{reference}_energy",
                                                keepdims=0)
        difference = self._add("Sub", [self._double(reference), self._double(other)], f"{other}_error")
        return self._add("ReduceSumSquare", [difference], f"{other}_error_energy", keepdims=0), self.signals[reference]

    def _measure(self, value: ir.Value, params: QuantParams, readers: list[ir.Node]) -> None:
        graph = self.proto.graph
        scale, zero_point = self._name(f"{value.name}_scale"), self._name(f"{value.name}_zero_point")
        graph.initializer.extend([onh.from_array(params.scale.reshape(()), scale),
                                  onh.from_array(params.zero_point.reshape(()), zero_point)])
        quantized = self._add("QuantizeLinear", [value.name, scale, zero_point], f"{value.name}_quantized")
        renamed = {value.name: self._add("DequantizeLinear", [quantized, scale, zero_point], f"{value.name}_dequantized")}
        pairs = [self._compare(value.name, renamed[value.name])]
        region = set(readers)
        for node in readers:
            copy = ir.serde.serialize_node(node)
            copy.name = ""
            for slot, name in enumerate(copy.input):
                copy.input[slot] = renamed.get(name, name)
            for slot, output in enumerate(node.outputs):
                if output.name:
                    renamed[output.name] = copy.output[slot] = self._name(f"{output.name}_requantized")
                    leaves = output.is_graph_output() or not output.uses() or \
                        any(use.node not in region for use in output.uses())
                    if leaves and output.dtype in _FLOATS:
                        pairs.append(self._compare(output.name, renamed[output.name]))
            graph.node.append(copy)
        self.errors[value.name] = pairs


def tensor_errors(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, source: BatchSource) -> dict[str, float]:
    """SQNR in dB of each main-graph activation tensor of ``plan`` (by name) under its own
    quantization: the worst over the tensor and what its readers compute from it, on the first
    calibration batches (rules 1-2)."""
    measured = {value: params for value, params in plan.params.items()
                if not is_constant(value) and owning_graph(value) is graph and params.axis is None}
    if not measured:
        return {}
    model = _ErrorModel(loaded, graph, plan, measured)
    session = loaded.float_session(model.proto)
    names = model.outputs
    totals = dict.fromkeys(names, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN activations (bad weights are refused later) are not poor
        for batch in itertools.islice(source(), MEASURED_BATCHES):
            for name, total in zip(names, session.run(names, batch.feed)):
                totals[name] += float(total)
        return {name: min(_sqnr_db(totals[signal], totals[error]) for error, signal in pairs)
                for name, pairs in model.errors.items()}


def _sqnr_db(signal: float, noise: float) -> float:
    """NaN where either sum is (NaN activations are not poor tensors); an infinite error is -inf."""
    if math.isnan(signal) or math.isnan(noise) or math.isinf(signal):
        return math.nan
    if math.isinf(noise):
        return -math.inf
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def poor_tensors(errors: dict[str, float]) -> list[str]:
    """The tensors of rule 3, by name."""
    return sorted(name for name, sqnr in errors.items() if sqnr < POOR_TENSOR_DB)
