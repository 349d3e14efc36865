"""Opsets 11 up to the newest the installed onnx defines, IR versions 3 up to the newest onnx
writes, and custom-domain nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from onnxq.load.opset import default_opset, MIN_OPSET, runtime_ir_version, runtime_opset
from tests.graphs import consumers, initializers, make_model, producer, run, sqnr_db
from tests.test_cli_errors import assert_clean_failure, onnxq as run_cli

NEWEST = onnx.defs.onnx_opset_version()
X = np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)


def _model(opset: int) -> onnx.ModelProto:
    """Conv -> Clip -> Split -> Add -> Relu -> Reshape -> MatMul -> Add -> Softmax, and a
    ReduceMean, written as ``opset`` requires: Split's sizes an attribute before 13, an input
    after; ReduceMean's axes an attribute before 18, an input after; the same weights always."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)), "b": rng.normal(0, 0.1, 4), "lo": np.array(0.0), "hi": np.array(6.0),
        "fc": rng.normal(0, 0.1, (128, 10)), "fcb": rng.normal(0, 0.1, 10),
    }
    arrays = {name: np.asarray(a, np.float32) for name, a in weights.items()} | {"shape": np.array([-1, 128], np.int64)}
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Clip", ["c", "lo", "hi"], ["r6"])]
    if opset < 13:
        nodes.append(oh.make_node("Split", ["r6"], ["s1", "s2"], axis=1, split=[2, 2]))
    else:
        arrays["split"] = np.array([2, 2], np.int64)
        nodes.append(oh.make_node("Split", ["r6", "split"], ["s1", "s2"], axis=1))
    nodes += [
        oh.make_node("Add", ["s1", "s2"], ["a"]), oh.make_node("Relu", ["a"], ["ar"]),
        oh.make_node("Reshape", ["ar", "shape"], ["f"]), oh.make_node("MatMul", ["f", "fc"], ["m"]),
        oh.make_node("Add", ["m", "fcb"], ["logits"]), oh.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    if opset < 18:
        nodes.append(oh.make_node("ReduceMean", ["a"], ["pooled"], axes=[2, 3], keepdims=0))
    else:
        arrays["axes"] = np.array([2, 3], np.int64)
        nodes.append(oh.make_node("ReduceMean", ["a", "axes"], ["pooled"], keepdims=0))
    graph = oh.make_graph(
        nodes, f"opset{opset}", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10]),
         oh.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, ["N", 2])],
        [onh.from_array(array, name) for name, array in arrays.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", range(11, NEWEST + 1))
def test_every_opset_converts_loads_and_stays_close_to_float(tmp_path, opset):
    result = onnxq.convert(_model(opset), tmp_path / "q.onnx", {"x": X}, onnxq.QuantConfig(batch_size=8))
    quantized = onnx.load(tmp_path / "q.onnx")
    expected_opset = min(max(opset, MIN_OPSET), runtime_opset())
    assert default_opset(quantized) == expected_opset
    if expected_opset != opset:
        assert any(f"from opset {opset} to {expected_opset}" in note for note in result.notes)
    assert result.op_counts["Conv"].quantized == 1 and result.op_counts["MatMul"].quantized == 1
    # the float reference: ONNX Runtime on the same network written at an opset it runs
    reference = run(_model(min(opset, runtime_opset())), {"x": X[:8]})
    for float_out, quant_out in zip(reference, run(quantized, {"x": X[:8]})):
        assert sqnr_db(float_out, quant_out) > 25


def _custom_domain_model() -> onnx.ModelProto:
    """MatMul -> com.microsoft Gelu -> com.microsoft FusedMatMul (alpha, transB) ->
    com.example ScaledTanh (a model-local function) -> MatMul."""
    rng = np.random.default_rng(2)
    scaled_tanh = oh.make_function(
        "com.example", "ScaledTanh", ["X"], ["Y"],
        [oh.make_node("Constant", [], ["k"], value_float=1.5), oh.make_node("Tanh", ["X"], ["t"]),
         oh.make_node("Mul", ["t", "k"], ["Y"])],
        [oh.make_opsetid("", 17)],
    )
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        oh.make_node("Gelu", ["h1"], ["g"], domain="com.microsoft", name="gelu"),
        oh.make_node("FusedMatMul", ["g", "w2"], ["h2"], domain="com.microsoft", alpha=0.5, transB=1, name="fused"),
        oh.make_node("ScaledTanh", ["h2"], ["s"], domain="com.example", name="custom"),
        oh.make_node("MatMul", ["s", "w3"], ["y"], name="mm2"),
    ]
    weights = {"w1": (16, 32), "w2": (16, 32), "w3": (16, 8)}
    graph = oh.make_graph(
        nodes, "custom", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        [onh.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name) for name, shape in weights.items()],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1), oh.make_opsetid("com.example", 1)]
    model = oh.make_model(graph, opset_imports=opsets, functions=[scaled_tanh], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _unnamed(function: onnx.FunctionProto) -> bytes:
    """The function's definition, without the names of its nodes (onnxq names every node)."""
    copy = onnx.FunctionProto()
    copy.CopyFrom(function)
    for node in copy.node:
        node.ClearField("name")
    return copy.SerializeToString()


def test_custom_domain_nodes_pass_through_and_compute_around_them_is_quantized(tmp_path):
    model = _custom_domain_model()
    x = np.random.default_rng(3).normal(size=(32, 16)).astype(np.float32)
    result = onnxq.convert(model, tmp_path / "q.onnx", {"x": x}, onnxq.QuantConfig(batch_size=8))
    quantized = onnx.load(tmp_path / "q.onnx")
    originals = {node.name: node for node in model.graph.node if node.domain}
    kept = {node.name: node for node in quantized.graph.node if node.domain}
    assert set(kept) == set(originals)
    for name, node in originals.items():
        assert (kept[name].op_type, kept[name].domain, list(kept[name].attribute)) == (
            node.op_type, node.domain, list(node.attribute))
    assert [_unnamed(f) for f in quantized.functions] == [_unnamed(f) for f in model.functions]
    assert {(o.domain, o.version) for o in quantized.opset_import} == {(o.domain, o.version) for o in model.opset_import}
    assert result.op_counts["MatMul"].quantized == 2
    for name in ("mm1", "mm2"):
        matmul = next(node for node in quantized.graph.node if node.name == name)
        assert all(producer(quantized, i).op_type == "DequantizeLinear" for i in matmul.input)
        assert [c.op_type for c in consumers(quantized, matmul.output[0])] == ["QuantizeLinear"]
    assert sqnr_db(run(model, {"x": x})[0], run(quantized, {"x": x})[0]) > 25


def test_custom_op_onnx_runtime_does_not_know_is_a_clean_error(tmp_path):
    model = _custom_domain_model()
    del model.functions[:]  # ScaledTanh now has no implementation anywhere
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "c.npz", x=np.ones((2, 16), np.float32))
    out = tmp_path / "out.onnx"
    result = run_cli("convert", path, "-o", out, "--calibration-data", tmp_path / "c.npz")
    assert_clean_failure(result, out, "ONNX Runtime cannot load", "ScaledTanh")


def _conv_classifier(opset: int, ir_version: int) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm, written as ``opset`` and ``ir_version`` require: below IR
    4 every initializer is also a graph input."""
    rng = np.random.default_rng(4)
    weights = {"w": rng.normal(0, 0.3, (8, 3, 3, 3)), "b": rng.normal(0, 0.1, 8),
               "fc": rng.normal(0, 0.1, (10, 8 * 6 * 6)), "fcb": rng.normal(0, 0.1, 10)}
    arrays = {name: np.asarray(array, np.float32) for name, array in weights.items()}
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Flatten", ["r"], ["f"]), oh.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc")]
    inputs = [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])]
    if ir_version < 4:
        inputs += [oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, a.shape) for name, a in arrays.items()]
    graph = oh.make_graph(nodes, "classifier", inputs, [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
                          [onh.from_array(array, name) for name, array in arrays.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_int8_weights_of(quantized: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Each Conv/Gemm weight is an int8 initializer whose DequantizeLinear gives back the float
    weight within half a step, and no float copy of it is left."""
    floats, stored = initializers(model), initializers(quantized)
    for node in (n for n in quantized.graph.node if n.op_type in ("Conv", "Gemm")):
        dequantize = producer(quantized, node.input[1])
        assert dequantize.op_type == "DequantizeLinear"
        q, scale = stored[dequantize.input[0]], stored[dequantize.input[1]]
        weight = floats["w" if node.op_type == "Conv" else "fc"]
        assert q.dtype == np.int8 and q.shape == weight.shape
        assert np.abs(q * scale.reshape(-1, *[1] * (q.ndim - 1)) - weight).max() <= scale.max() / 2 + 1e-7
    assert not any(a.dtype == np.float32 and a.size > 64 for a in stored.values())


def test_ir_version_3_model_converts_with_int8_weights(tmp_path):
    model = _conv_classifier(opset=7, ir_version=3)
    path, out = tmp_path / "ir3.onnx", tmp_path / "q.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(5).normal(size=(16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = run_cli("convert", path, "-o", out, "--calibration-data", tmp_path / "calib.npz", "--json")
    assert result.returncode == 0, result.stderr
    assert "IR version 3 changed to 7" in result.stdout and "4 initializer(s) are weights" in result.stdout
    quantized = onnx.load(out)
    assert quantized.ir_version == 7 and [i.name for i in quantized.graph.input] == ["x"]
    _assert_int8_weights_of(quantized, model)
    assert out.stat().st_size < 0.5 * path.stat().st_size
    for sample in x[:4]:
        assert sqnr_db(run(model, {"x": sample[None]})[0], run(quantized, {"x": sample[None]})[0]) > 25


def test_ir_version_newer_than_onnx_runtime_reads_is_lowered(tmp_path):
    newest = runtime_ir_version()
    if newest >= onnx.IR_VERSION:
        pytest.skip(f"the installed ONNX Runtime reads IR version {newest}, the newest onnx writes")
    model = _conv_classifier(opset=17, ir_version=newest + 1)
    with pytest.raises(Exception, match="(?i)ir_version|ir version|unsupported model"):
        run(model, {"x": X[:1]})  # ONNX Runtime refuses the model as written
    result = onnxq.convert(model, tmp_path / "q.onnx", {"x": X[:8, :, :, :]})
    assert any(f"IR version {newest + 1} changed to {newest}" in note for note in result.notes), result.notes
    quantized = onnx.load(tmp_path / "q.onnx")
    assert quantized.ir_version == newest
    _assert_int8_weights_of(quantized, model)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = newest  # the float reference, as ONNX Runtime can run it
    assert sqnr_db(run(lowered, {"x": X[:1]})[0], run(quantized, {"x": X[:1]})[0]) > 25


def test_model_that_needs_a_newer_ir_version_than_onnx_runtime_reads_is_refused(tmp_path):
    newest = runtime_ir_version()
    if newest >= 14:
        pytest.skip(f"the installed ONNX Runtime reads IR version {newest}, which has float6")
    model = make_model([oh.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])])
    model.graph.initializer.append(oh.make_tensor("f6", onnx.TensorProto.FLOAT6E2M3, [2], [0, 1]))  # added in IR 14
    model.ir_version = 14
    path, out = tmp_path / "f6.onnx", tmp_path / "q.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", x=np.ones((2, 2), np.float32))
    result = run_cli("convert", path, "-o", out, "--calibration-data", tmp_path / "calib.npz")
    assert_clean_failure(result, out, "needs IR version 14", f"the {newest} the installed", "upgrade onnxruntime")
