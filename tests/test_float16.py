"""Float16 models: int8 weights, the float16 interface kept, outputs as close to float as the
float32 twin's (checked with ONNX Runtime on both float models)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from onnxq.graph import proto_graphs
from tests.graphs import (
    as_float16,
    conv_classifier,
    initializers,
    make_model,
    producer,
    run,
    sqnr_db,
)

RNG = np.random.default_rng(16)
F16 = onnx.TensorProto.FLOAT16


def _bytes(path) -> int:
    """A model's size on disk: its file and its external data file, if any."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name in (path.name, f"{path.stem}.data", f"{path.name}.data"))


@pytest.mark.parametrize("layout", ["one-file", "external-data"])
def test_float16_model_gets_int8_weights_half_the_file_and_float_fidelity(tmp_path, monkeypatch, layout):
    twin = conv_classifier(RNG)
    model = as_float16(twin)
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "f16.onnx",  # a copy: save moves the data
              save_as_external_data=layout == "external-data", location="f16.data", size_threshold=0)
    monkeypatch.chdir(tmp_path.parent)  # external data is found by the model's folder, not the current one
    x = RNG.normal(size=(32, 3, 16, 16)).astype(np.float16)
    result = onnxq.convert(tmp_path / "f16.onnx", tmp_path / "q.onnx", {"x": x[:24]}, onnxq.QuantConfig(batch_size=8))
    assert any("float16 model" in note for note in result.notes), result.notes
    quantized = onnx.load(tmp_path / "q.onnx")
    assert _bytes(tmp_path / "q.onnx") <= 0.55 * _bytes(tmp_path / "f16.onnx")
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*quantized.graph.input, *quantized.graph.output]] == [
        ("x", F16), ("y", F16)]
    stored, float16_weights = initializers(quantized), initializers(model)
    weighted = [n for n in quantized.graph.node if n.op_type in ("Conv", "Gemm")]
    for node, name in zip(weighted, ["w0", "w1", "w2", "fc"], strict=True):
        dequantize = producer(quantized, node.input[1])
        q, scale = stored[dequantize.input[0]], stored[dequantize.input[1]]
        weight = float16_weights[name].astype(np.float32)
        assert q.dtype == np.int8 and q.shape == weight.shape and scale.shape == (q.shape[0],)  # per output channel
        step = scale.reshape(-1, *[1] * (q.ndim - 1))
        assert np.all(np.abs(q * step - weight) <= step / 2 + 1e-6)
    assert not [name for name, a in stored.items() if a.dtype.kind == "f" and a.size > 128]  # no float weight left
    assert result.op_counts["Conv"].quantized == 3 and result.op_counts["Gemm"].quantized == 1
    held_out = x[24:]
    out = run(quantized, {"x": held_out})[0]
    assert out.dtype == np.float16
    reference = run(twin, {"x": held_out.astype(np.float32)})[0]
    float16_fidelity = sqnr_db(reference, run(model, {"x": held_out})[0])
    assert sqnr_db(reference, out) > 25 and float16_fidelity > sqnr_db(reference, out)


def test_float16_region_inside_a_float32_model_is_quantized(tmp_path):
    """x -> Cast(float16) -> Conv (float16 weights, a float16 Constant bias) -> Relu -> Cast(float):
    the region computes in float32 once lifted, so its Conv gets int8 weights."""
    weight = RNG.normal(0, 0.2, (32, 8, 3, 3)).astype(np.float16)
    bias = oh.make_tensor("bias", F16, [32], (0.1 * RNG.normal(size=32)).astype(np.float16))
    nodes = [oh.make_node("Cast", ["x"], ["h"], to=F16), oh.make_node("Constant", [], ["b"], value=bias),
             oh.make_node("Conv", ["h", "w", "b"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Cast", ["r"], ["y"], to=onnx.TensorProto.FLOAT)]
    model = make_model(nodes, [("x", [1, 8, 8, 8])], [("y", [1, 32, 8, 8])], [("w", weight)])
    x = RNG.normal(size=(16, 1, 8, 8, 8)).astype(np.float32)
    result = onnxq.convert(model, tmp_path / "q.onnx", {"x": x})
    quantized = onnx.load(tmp_path / "q.onnx")
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    assert initializers(quantized)[producer(quantized, conv.input[1]).input[0]].dtype == np.int8
    assert result.op_counts["Conv"].quantized == 1
    assert not any(init.data_type == F16 for init in quantized.graph.initializer)
    assert sqnr_db(run(model, {"x": x[0]})[0], run(quantized, {"x": x[0]})[0]) > 30


def test_float16_model_with_an_if_whose_branches_read_the_input(tmp_path):
    """Both branches read the float16 graph input from the outer scope: they read its Cast to
    float32 once lifted, and the quantized model computes what the float16 model does."""
    weight = RNG.normal(0, 0.5, (16, 16)).astype(np.float16)
    then = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [oh.make_tensor_value_info("t", F16, [4, 16])])
    other = oh.make_graph([oh.make_node("Neg", ["x"], ["e"])], "else", [], [oh.make_tensor_value_info("e", F16, [4, 16])])
    nodes = [oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0), oh.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
             oh.make_node("Greater", ["sf", "zero"], ["c"]), oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    graph = oh.make_graph(nodes, "branches", [oh.make_tensor_value_info("x", F16, [4, 16])],
                          [oh.make_tensor_value_info("y", F16, [4, 16])],
                          [onh.from_array(weight, "w"), onh.from_array(np.array(0, np.float32), "zero")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    samples = [{"x": (sign * np.abs(RNG.normal(size=(4, 16)))).astype(np.float16)} for sign in (1, -1) * 8]
    onnxq.convert(model, tmp_path / "q.onnx", samples)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert quantized.graph.output[0].type.tensor_type.elem_type == F16
    stored = [onh.to_array(init) for graph in proto_graphs(quantized.graph) for init in graph.initializer]
    assert [a.dtype for a in stored if a.shape == weight.shape] == [np.int8]  # the branch's MatMul weight
    for feed in samples[:2]:  # one through each branch
        assert sqnr_db(run(model, feed)[0].astype(np.float32), run(quantized, feed)[0].astype(np.float32)) > 25
