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


def attention_block(mask_value: float = float(np.finfo(np.float32).min), dim: int = 16, seed: int = 0,
                    mask_style: str = "add") -> onnx.ModelProto:
    """One self-attention layer as exporters write it: Q/K/V projections, scaled scores masked
    from an int64 ``attention_mask`` (``mask_style="add"``: plus ``(1 - mask) * mask_value``;
    ``"where"``: ``Where(mask, scores, mask_value)``, as current exporters write it), Softmax,
    output projection, residual Add and a decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 1 / np.sqrt(shape[0]), size=shape).astype(np.float32)

    n = oh.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q"], name="attn_q"),
        n("MatMul", ["x", "wk"], ["k"], name="attn_k"),
        n("MatMul", ["x", "wv"], ["v"], name="attn_v"),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="attn_kt"),
        n("MatMul", ["q", "kt"], ["scores"], name="attn_scores"),
        n("Div", ["scores", "sqrt_d"], ["scaled"], name="attn_scale"),
        *({
            "add": [
                n("Cast", ["attention_mask"], ["mask_f"], to=FLOAT, name="mask_cast"),
                n("Sub", ["one", "mask_f"], ["inverted"], name="mask_invert"),
                n("Mul", ["inverted", "mask_value"], ["mask_add"], name="mask_scale"),
                n("Unsqueeze", ["mask_add", "axis1"], ["mask_3d"], name="mask_unsqueeze"),
                n("Add", ["scaled", "mask_3d"], ["masked"], name="attn_mask_add"),
            ],
            "where": [
                n("Cast", ["attention_mask"], ["mask_b"], to=onnx.TensorProto.BOOL, name="mask_cast"),
                n("Unsqueeze", ["mask_b", "axis1"], ["mask_3d"], name="mask_unsqueeze"),
                n("Where", ["mask_3d", "scaled", "mask_value"], ["masked"], name="attn_mask_where"),
            ],
        }[mask_style]),
        n("Softmax", ["masked"], ["probs"], axis=-1, name="attn_softmax"),
        n("MatMul", ["probs", "v"], ["context"], name="attn_context"),
        n("MatMul", ["context", "wo"], ["projected"], name="attn_out"),
        n("Add", ["x", "projected"], ["residual"], name="residual_add"),
        n("ReduceMean", ["residual"], ["mean"], axes=[-1], name="ln_mean"),
        n("Sub", ["residual", "mean"], ["centered"], name="ln_sub"),
        n("Pow", ["centered", "two"], ["squared"], name="ln_pow"),
        n("ReduceMean", ["squared"], ["variance"], axes=[-1], name="ln_var"),
        n("Add", ["variance", "eps"], ["variance_eps"], name="ln_eps"),
        n("Sqrt", ["variance_eps"], ["std"], name="ln_sqrt"),
        n("Div", ["centered", "std"], ["normalized"], name="ln_div"),
        n("Mul", ["normalized", "gamma"], ["scaled_ln"], name="ln_gamma"),
        n("Add", ["scaled_ln", "beta"], ["y"], name="ln_beta"),
    ]
    inits = {
        "wq": w(dim, dim), "wk": w(dim, dim), "wv": w(dim, dim), "wo": w(dim, dim),
        "sqrt_d": np.array(np.sqrt(dim), np.float32), "one": np.array(1.0, np.float32),
        "mask_value": np.array(mask_value, np.float32), "axis1": np.array([1], np.int64),
        "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
        "gamma": (1 + 0.1 * rng.normal(size=dim)).astype(np.float32), "beta": (0.1 * rng.normal(size=dim)).astype(np.float32),
    }
    graph = oh.make_graph(
        nodes, "attention",
        [oh.make_tensor_value_info("x", FLOAT, [1, "T", dim]),
         oh.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [1, "T"])],
        [oh.make_tensor_value_info("y", FLOAT, [1, "T", dim])],
        [onh.from_array(array, name) for name, array in inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def attention_data(samples: int, length: int = 8, dim: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Samples for ``attention_block``: random tokens, the last 0-4 positions padded (mask 0)."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(samples):
        mask = np.ones((1, length), np.int64)
        mask[0, length - rng.integers(0, 5):] = 0
        data.append({"x": rng.normal(0, 1, (1, length, dim)).astype(np.float32), "attention_mask": mask})
    return data


def conv_classifier(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv 3->32 -> Relu -> Conv 32->64 -> Relu -> Conv 64->128 -> Relu -> GlobalAveragePool ->
    Flatten -> Gemm 128->10: 94k weights."""
    def w(*shape):
        return rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape).astype(np.float32)

    nodes, inits, previous = [], [], "x"
    for index, (cin, cout) in enumerate([(3, 32), (32, 64), (64, 128)]):
        nodes += [oh.make_node("Conv", [previous, f"w{index}", f"b{index}"], [f"c{index}"], pads=[1, 1, 1, 1]),
                  oh.make_node("Relu", [f"c{index}"], [f"r{index}"])]
        inits += [(f"w{index}", w(cout, cin, 3, 3)), (f"b{index}", (0.1 * rng.normal(size=cout)).astype(np.float32))]
        previous = f"r{index}"
    nodes += [oh.make_node("GlobalAveragePool", [previous], ["p"]), oh.make_node("Flatten", ["p"], ["f"]),
              oh.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    inits += [("fc", w(10, 128)), ("fcb", np.zeros(10, np.float32))]
    return make_model(nodes, [("x", ["N", 3, 16, 16])], [("y", ["N", 10])], inits)


def as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network stored and computed in float16, as GPU exports are."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(onh.from_array(onh.to_array(init).astype(np.float16), init.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half
