"""Small models built in the tests, and helpers to run and inspect them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort

FLOAT = onnx.TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """A checked model from helper nodes; ``inputs``/``outputs`` are ``(name, shape)`` pairs."""
    graph = oh.make_graph(
        nodes,
        "test",
        [oh.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [oh.make_tensor_value_info(name, FLOAT, shape) for name, shape in outputs],
        [onh.from_array(np.asarray(array), name) for name, array in initializers],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
    for index, (name, shape) in enumerate(outputs):
        if shape is None:  # take the output's type from shape inference
            model.graph.output[index].CopyFrom(inferred[name])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto | str, feed: dict[str, np.ndarray], fused: bool = True) -> list[np.ndarray]:
    """Outputs of ``model`` on ``feed`` with ONNX Runtime's CPU provider.

    ``fused=False`` turns graph optimizations off, so Q/DQ nodes run as written (the ONNX
    semantics) instead of as fused integer kernels, whose u8 x s8 products can saturate on
    CPUs without VNNI.
    """
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB, computed directly with numpy."""
    noise = np.sum((reference.astype(np.float64) - approximation) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: onh.to_array(init) for init in model.graph.initializer}


def consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if name in node.input]


def producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((node for node in model.graph.node if name in node.output), None)


def fused_op_types(path: str) -> list[str]:
    """Op types left after ONNX Runtime's CPU graph optimizations, as it would run the model."""
    options = ort.SessionOptions()
    optimized = f"{path}.optimized.onnx"
    options.optimized_model_filepath = optimized
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(optimized).graph.node]
