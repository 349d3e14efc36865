"""What a model holds, for ``onnxq inspect``: per-node precision, sizes by dtype, weight
sparsity (the 2:4 pattern along the axis each op sums over), and quantized groups ONNX Runtime
would not fuse.

It answers "why is my quantized model not smaller (or not faster)?": float weights left beside
quantized ones show in the size breakdown, unfused groups in the fusion list. Nodes and
initializers inside subgraphs (If branches, Loop and Scan bodies) are counted like the main
graph's.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper

from onnxq.graph import proto_bodies
from onnxq.load.model import external_data_folder, load_model
from onnxq.load.model import model_bytes as bytes_on_disk
from onnxq.ops import OPS, QLINEAR_OPS, reduction_axis
from onnxq.tune.fusion import unfused_nodes

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One node: name, op type (the float op for QLinear operators), precision, output dtypes."""

    name: str
    op_type: str
    precision: str  # "int8" or "float"
    output_dtypes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    """One initializer with at least two dimensions: dtype, bytes, exact zeros (count and share)
    among its elements, 2:4 pattern along ``two_four_axes`` (the axes its ops sum over: Conv
    input channels, MatMul and Gemm K; the last axis for an initializer no such op reads)."""

    name: str
    dtype: str
    bytes: int
    zero_fraction: float
    two_four_sparse: bool
    elements: int
    zeros: int
    two_four_axes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Everything ``onnxq inspect`` reports about a model."""

    nodes: tuple[NodeInfo, ...]
    bytes_by_dtype: dict[str, int]
    weights: tuple[WeightInfo, ...]
    unfused: tuple[str, ...]
    quantize_nodes: int
    dequantize_nodes: int
    model_bytes: int  # the file (or serialized ModelProto)

    @property
    def weight_zero_fraction(self) -> float:
        """Share of exact zeros over the elements of every weight (initializers of 2+ dims)."""
        elements = sum(w.elements for w in self.weights)
        return sum(w.zeros for w in self.weights) / elements if elements else 0.0

    def op_counts(self) -> dict[str, dict[str, int]]:
        """``{op_type: {"int8": n, "float": m}}``."""
        counts: dict[str, dict[str, int]] = {}
        for node in self.nodes:
            counts.setdefault(node.op_type, {"int8": 0, "float": 0})[node.precision] += 1
        return dict(sorted(counts.items()))


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _is_two_four(array: np.ndarray, axis: int) -> bool:
    """At least 2 exact zeros in every group of 4 consecutive values along ``axis``."""
    if array.shape[axis] % 4:
        return False
    groups = (np.moveaxis(array, axis, -1).reshape(-1, 4) == 0).sum(axis=1)
    return bool((groups >= 2).all())


def _weight_reads(graphs: list[tuple[onnx.GraphProto, dict, dict, dict]]) -> dict[str, list[tuple[str, bool]]]:
    """``{initializer: [(float op type, transB), ...]}`` for each op that reads it as its weight
    (``OpInfo.weight_input``; a QLinear operator's weight follows its input's scale and zero
    point, so it sits at three times that slot), directly or through a DequantizeLinear."""
    reads: dict[str, list[tuple[str, bool]]] = {}
    for graph, producers, _, _ in graphs:
        for node in graph.node:
            op_type = QLINEAR_OPS.get(node.op_type, node.op_type)
            info = OPS.get(op_type)
            if info is None or info.weight_input is None:
                continue
            slot = info.weight_input * (3 if node.op_type in QLINEAR_OPS else 1)
            if slot >= len(node.input):
                continue
            name = node.input[slot]
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                name = producer.input[0]
            trans_b = any(attr.name == "transB" and attr.i for attr in node.attribute)
            reads.setdefault(name, []).append((op_type, trans_b))
    return reads


def _two_four_axes(array: np.ndarray, reads: list[tuple[str, bool]]) -> tuple[int, ...]:
    """The axes a 2:4 pattern is checked along: those the reading ops sum over, else the last."""
    axes = {reduction_axis(op_type, array.ndim, trans_b) for op_type, trans_b in reads} - {None}
    return tuple(sorted(axes)) or (array.ndim - 1,)


def _runs_quantized(node: onnx.NodeProto, producers: dict, consumers: dict) -> bool:
    """A QLinear operator, or (QDQ form) an op that reads a DequantizeLinear (on its weight, when
    it has one) and whose outputs reach a QuantizeLinear, directly or through a Relu/Clip; such a
    Relu/Clip runs inside the integer kernel of the op before it."""
    if node.op_type in QLINEAR_OPS:
        return True
    source = producers.get(node.input[0]) if node.input else None
    if node.op_type in ("Relu", "Clip") and source is not None and source.op_type not in QDQ_OPS:
        # absorbed: the op before it runs quantized with this node's range (the plan's ``activation`` rule)
        return _runs_quantized(source, producers, consumers)
    info = OPS.get(node.op_type)
    if info is None or (info.kind is None and not info.compute):
        return False  # no integer kernel: a dequantize -> float op -> quantize island
    dequantized = [name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input]
    if not any(dequantized):
        return False
    if info.weight_input is not None and info.weight_input < len(node.input) and not dequantized[info.weight_input]:
        return False  # a float weight (an initializer, or computed at run time) leaves the op float
    for output in node.output:
        uses = consumers.get(output, [])
        if len(uses) == 1 and uses[0].op_type in ("Relu", "Clip"):
            uses = consumers.get(uses[0].output[0], [])
        if not uses or any(use.op_type != "QuantizeLinear" for use in uses):
            return False
    return True


def _array(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
    """A tensor's values; external data is read from ``folder`` into a copy of the tensor, so that
    the model's protobuf never takes in the weights."""
    if folder is None or not onnx.external_data_helper.uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return onnx.numpy_helper.to_array(copy, str(folder))


def _used_inside(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that the nodes of ``graph`` and of its subgraphs read."""
    names = {name for node in graph.node for name in node.input}
    for node in graph.node:
        for body in proto_bodies(node):
            names |= _used_inside(body)
    return names


def _graphs(
    graph: onnx.GraphProto, outer_producers: dict[str, onnx.NodeProto], outer_types: dict[str, int]
) -> list[tuple[onnx.GraphProto, dict, dict, dict]]:
    """``graph`` and its subgraphs (recursively), each with its producers, consumers and types,
    a body seeing the tensors of the graphs around it. A tensor that a body reads counts as
    read by the body's parent node."""
    producers = outer_producers | {output: node for node in graph.node for output in node.output}
    types = outer_types | {
        info.name: info.type.tensor_type.elem_type for info in [*graph.value_info, *graph.output, *graph.input]
    }
    types.update({init.name: init.data_type for init in graph.initializer})
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | {n for body in proto_bodies(node) for n in _used_inside(body)}:
            consumers.setdefault(name, []).append(node)
    found = [(graph, producers, consumers, types)]
    for node in graph.node:
        for body in proto_bodies(node):
            found += _graphs(body, producers, types)
    return found


def inspect_model(model: str | os.PathLike | onnx.ModelProto, fusion: bool = True) -> Inspection:
    """Inspect a model given as a path or a ModelProto, the bodies of If/Loop/Scan nodes (any
    subgraph) included; ``fusion=False`` skips asking ONNX Runtime which quantized groups it
    would fuse."""
    proto = load_model(model)
    folder = external_data_folder(model, proto)
    graphs = _graphs(proto.graph, {}, {})
    all_nodes = [node for graph, *_ in graphs for node in graph.node]
    nodes = []
    for graph, producers, consumers, types in graphs:
        for node in graph.node:
            if node.op_type in QDQ_OPS:
                continue
            precision = "int8" if _runs_quantized(node, producers, consumers) else "float"
            dtypes = tuple(_dtype_name(types[o]) if types.get(o) else "?" for o in node.output)
            nodes.append(NodeInfo(node.name, QLINEAR_OPS.get(node.op_type, node.op_type), precision, dtypes))
    bytes_by_dtype: collections.Counter = collections.Counter()
    weights = []
    reads = _weight_reads(graphs)
    for init in (init for graph, *_ in graphs for init in graph.initializer):
        array = _array(init, folder)
        bytes_by_dtype[array.dtype.name] += array.nbytes
        if array.ndim >= 2:
            zeros = int((array == 0).sum())
            axes = _two_four_axes(array, reads.get(init.name, []))
            weights.append(WeightInfo(init.name, array.dtype.name, array.nbytes, zeros / array.size if array.size else 0.0,
                                      all(_is_two_four(array, axis) for axis in axes), array.size, zeros, axes))
    quantized = any(node.op_type == "DequantizeLinear" for node in all_nodes)
    int8 = {node.name for node in nodes if node.precision == "int8"}  # a float Softmax reading a DQ is not listed
    return Inspection(
        nodes=tuple(nodes),
        bytes_by_dtype=dict(sorted(bytes_by_dtype.items(), key=lambda item: -item[1])),
        weights=tuple(weights),
        unfused=tuple(n for n in unfused_nodes(proto, folder) if n in int8) if quantized and fusion else (),
        quantize_nodes=sum(node.op_type == "QuantizeLinear" for node in all_nodes),
        dequantize_nodes=sum(node.op_type == "DequantizeLinear" for node in all_nodes),
        model_bytes=proto.ByteSize() if isinstance(model, onnx.ModelProto) else bytes_on_disk(Path(model), proto),
    )


@dataclasses.dataclass(frozen=True)
class InspectionPair:
    """A float model and its quantized form inspected side by side (``onnxq inspect FLOAT QUANT``)."""

    before: Inspection
    after: Inspection

    def bytes_by_dtype(self) -> dict[str, tuple[int, int]]:
        """``{dtype: (bytes before, bytes after)}`` over the dtypes of either model, largest first."""
        dtypes = {*self.before.bytes_by_dtype, *self.after.bytes_by_dtype}
        rows = {d: (self.before.bytes_by_dtype.get(d, 0), self.after.bytes_by_dtype.get(d, 0)) for d in dtypes}
        return dict(sorted(rows.items(), key=lambda item: -max(item[1])))


def inspect_pair(
    float_model: str | os.PathLike | onnx.ModelProto, quantized_model: str | os.PathLike | onnx.ModelProto
) -> InspectionPair:
    """Inspect a float model and its quantized form: sizes by precision and weight sparsity,
    before and after."""
    return InspectionPair(inspect_model(float_model, fusion=False), inspect_model(quantized_model))
