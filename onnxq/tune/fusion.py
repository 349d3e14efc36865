"""Fusion coverage: which quantized node groups ONNX Runtime's CPU provider would not turn into
integer kernels.

ONNX Runtime is asked to write the model after its graph optimizations (the extended level,
where QDQ groups become QLinearConv, QGemm, QLinearAdd, ...). A compute op that still reads a
DequantizeLinear there would run as dequantize -> float op -> quantize: slower than float and
less accurate. Those nodes are better left float.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxq.graph import proto_bodies
from onnxq.ops import FUSION_CHECKED
from onnxq.runtime import session_options


def _node_names(graph: onnx.GraphProto) -> set[str]:
    """The names of the nodes of ``graph`` and its bodies."""
    names = {node.name for node in graph.node if node.name}
    for node in graph.node:
        for body in proto_bodies(node):
            names |= _node_names(body)
    return names


def unfused_nodes(qdq_model: onnx.ModelProto, external_folder: Path | None = None) -> list[str]:
    """Names of the compute nodes of ``qdq_model`` (If/Loop/Scan bodies included) that would
    still read dequantized tensors after ONNX Runtime's CPU graph optimizations;
    ``external_folder`` holds the external data files the model references, if any. Nodes
    ONNX Runtime made itself (such as the HardSigmoid and Mul a float HardSwish becomes) are not
    the model's and are not listed."""
    with tempfile.TemporaryDirectory(prefix="onnxq-fusion-") as folder:
        path = Path(folder) / "optimized.onnx"
        options = session_options(external_folder)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(path)
        if external_folder is not None:  # the optimized model's weights, which are not read back
            key = "session.optimized_model_external_initializers_file_name"
            options.add_session_config_entry(key, "optimized.data")
        ort.InferenceSession(qdq_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path, load_external_data=False)
    own = _node_names(qdq_model.graph)
    return [name for name in _unfused_in(optimized.graph, {}) if name in own]


def _unfused_in(graph: onnx.GraphProto, outer_producers: dict[str, onnx.NodeProto]) -> list[str]:
    """Unfused compute nodes of ``graph`` and its subgraphs; a body sees its outer graphs' tensors."""
    producers = outer_producers | {output: node for node in graph.node for output in node.output}
    found = [
        node.name
        for node in graph.node
        if node.op_type in FUSION_CHECKED
        and node.domain in ("", "ai.onnx")
        and any(name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input)
    ]
    for node in graph.node:
        for body in proto_bodies(node):
            found += _unfused_in(body, producers)
    return found
