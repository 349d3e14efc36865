"""Operator form: each QLinear op against ONNX Runtime running the equivalent QDQ model, models
that arrive already quantized (PyTorch fake-quant export, ORT's quantizer, a float bias), idempotence."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from tests.graphs import initializers, make_model, producer, run
from tests.test_cli_errors import onnxq as run_cli
from tests.test_op_patterns import PATTERNS, _conv_relu_op_conv, _data, _w

FIXTURE = Path(__file__).parent / "fixtures" / "fake_quant_cnn.onnx"


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def _output_step(path) -> float:
    model = onnx.load(path)
    dq = producer(model, model.graph.output[0].name)
    assert dq.op_type == "DequantizeLinear"
    return float(initializers(model)[dq.input[1]].reshape(-1)[0])


def _both_forms(tmp_path, model, x_shape=(1, 4, 8, 8)):
    calibration = {"x": _data(list(x_shape))}
    qdq, qop = tmp_path / "qdq.onnx", tmp_path / "qop.onnx"
    plain = onnxq.FallbackOptions(auto=False)  # the forms compared node for node: no safety-net fallback
    onnxq.convert(model, qdq, calibration, onnxq.QuantConfig(format="qdq"), fallback=plain)
    onnxq.convert(model, qop, calibration, onnxq.QuantConfig(format="qoperator"), fallback=plain)
    return qdq, qop


@pytest.mark.parametrize(
    "name, qlinear",
    [("Add", "QLinearAdd"), ("Mul", "QLinearMul"), ("Concat", "QLinearConcat"), ("Sigmoid", "QLinearSigmoid"),
     ("AveragePool", "QLinearAveragePool"), ("GlobalAveragePool", "QLinearGlobalAveragePool")],
)
def test_qlinear_op_matches_the_qdq_model_within_one_step(tmp_path, name, qlinear):
    nodes, inits, tail = PATTERNS[name]
    model = _conv_relu_op_conv(nodes, inits, tail_channels=tail or 4)
    qdq, qop = _both_forms(tmp_path, model)
    ops = _ops(qop)
    assert ops[qlinear] == 1 and ops["QLinearConv"] >= 1 and name not in ops
    x = _data([1, 4, 8, 8], n=1, seed=5)
    difference = np.abs(run(str(qdq), {"x": x})[0] - run(str(qop), {"x": x})[0])
    assert difference.max() <= _output_step(qop) * 1.001


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_matmul_and_gemm_become_qlinearmatmul_and_qgemm(tmp_path, op):
    node = oh.make_node(op, ["x", "w"] + (["b"] if op == "Gemm" else []), ["y"], **({"transB": 1} if op == "Gemm" else {}))
    inits = [("w", _w(6, 4) if op == "Gemm" else _w(4, 6))] + ([("b", _w(6))] if op == "Gemm" else [])
    model = make_model([node], [("x", [3, 4])], [("y", None)], inits)
    qdq, qop = _both_forms(tmp_path, model, (3, 4))
    assert _ops(qop)[{"MatMul": "QLinearMatMul", "Gemm": "QGemm"}[op]] == 1
    x = _data([3, 4], n=3, seed=5)
    assert np.abs(run(str(qdq), {"x": x})[0] - run(str(qop), {"x": x})[0]).max() <= _output_step(qop) * 1.001


@pytest.mark.parametrize("name", ["MaxPool", "Reshape", "Transpose", "Pad", "Resize", "Slice", "Gather", "Split",
                                  "Squeeze/Unsqueeze"])
def test_data_movement_runs_on_the_integer_tensor(tmp_path, name):
    nodes, inits, tail = PATTERNS[name]
    model = _conv_relu_op_conv(nodes, inits, tail_channels=tail or 4)
    qdq, qop = _both_forms(tmp_path, model)
    quantized = onnx.load(qop)
    moved = [n for n in quantized.graph.node if n.op_type == nodes[0].op_type]
    assert moved and all(producer(quantized, n.input[0]).op_type.startswith("QLinear") for n in moved[:1])
    x = _data([1, 4, 8, 8], n=1, seed=5)
    assert np.abs(run(str(qdq), {"x": x})[0] - run(str(qop), {"x": x})[0]).max() <= _output_step(qop) * 1.001


def _hand_qdq(op_node, extra_inits=()):
    """x -> Q -> DQ -> op -> Q -> DQ -> y, with fixed params (as another tool would write it)."""
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
        oh.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
        op_node,
        oh.make_node("QuantizeLinear", ["t", "s_out", "z_out"], ["tq"]),
        oh.make_node("DequantizeLinear", ["tq", "s_out", "z_out"], ["y"]),
    ]
    inits = [("s_in", np.float32(0.02)), ("z_in", np.uint8(128)), ("s_out", np.float32(1 / 255)),
             ("z_out", np.uint8(0)), *extra_inits]
    return make_model(nodes, [("x", [2, 10])], [("y", [2, 10])], inits, opset=13)


@pytest.mark.parametrize(
    "op_node, qlinear",
    [(oh.make_node("Softmax", ["xd"], ["t"], axis=1), "QLinearSoftmax"),
     (oh.make_node("Sigmoid", ["xd"], ["t"]), "QLinearSigmoid")],
)
def test_already_quantized_model_converts_without_calibration(tmp_path, op_node, qlinear):
    model = _hand_qdq(op_node)
    out = tmp_path / "qop.onnx"
    result = onnxq.convert(model, out, None, onnxq.QuantConfig(format="qoperator"))
    assert result.calibration_samples == 0 and result.workspace is None
    assert _ops(out)[qlinear] == 1
    x = np.random.default_rng(2).uniform(-2, 2, (2, 10)).astype(np.float32)
    assert np.abs(run(model, {"x": x}, fused=False)[0] - run(str(out), {"x": x})[0]).max() <= 1 / 255 * 1.001


def test_leaky_relu_becomes_qlinear_leaky_relu(tmp_path):
    model = _hand_qdq(oh.make_node("LeakyRelu", ["xd"], ["t"], alpha=0.1))
    model.graph.initializer[3].CopyFrom(onnx.numpy_helper.from_array(np.uint8(26), "z_out"))  # range [-0.1, 0.9]
    out = tmp_path / "qop.onnx"
    onnxq.convert(model, out, None, onnxq.QuantConfig(format="qoperator"))
    assert _ops(out)["QLinearLeakyRelu"] == 1
    x = np.random.default_rng(2).uniform(-1, 0.9, (2, 10)).astype(np.float32)
    assert np.abs(run(model, {"x": x}, fused=False)[0] - run(str(out), {"x": x})[0]).max() <= 1 / 255 * 1.001


def _prequantized_conv_with_float_bias():
    w = _w(4, 3, 3, 3)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.rint(w / w_scale[:, None, None, None]).astype(np.int8)
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]),
        oh.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"]),
        oh.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["wd"], axis=0),
        oh.make_node("Conv", ["xd", "wd", "bias"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("QuantizeLinear", ["c", "s_y", "z_y"], ["cq"]),
        oh.make_node("DequantizeLinear", ["cq", "s_y", "z_y"], ["y"]),
    ]
    bias = _w(4)
    inits = [("s_x", np.float32(0.01)), ("z_x", np.uint8(100)), ("w_q", w_q), ("s_w", w_scale),
             ("z_w", np.zeros(4, np.int8)), ("bias", bias), ("s_y", np.float32(0.05)), ("z_y", np.uint8(128))]
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits, opset=13), bias, w_scale


def test_float_bias_of_a_prequantized_checkpoint_becomes_int32(tmp_path):
    model, bias, w_scale = _prequantized_conv_with_float_bias()
    out = tmp_path / "qdq.onnx"
    result = onnxq.convert(model, out, None)
    stored = initializers(onnx.load(out))
    expected_scale = (np.float32(0.01) * w_scale).astype(np.float32)
    np.testing.assert_array_equal(stored["bias_scale"], expected_scale)
    np.testing.assert_array_equal(stored["bias_quantized"], np.rint(bias / expected_scale).astype(np.int32))
    assert "bias" not in stored and any("int32" in note for note in result.notes)
    qop = tmp_path / "qop.onnx"
    onnxq.convert(model, qop, None, onnxq.QuantConfig(format="qoperator"))
    assert _ops(qop) == Counter({"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1})
    x = np.random.default_rng(4).uniform(-1, 1.5, (1, 3, 6, 6)).astype(np.float32)
    assert np.abs(run(str(out), {"x": x})[0] - run(str(qop), {"x": x})[0]).max() <= 0.05 * 1.001


def test_converting_twice_changes_nothing(tmp_path):
    model = _conv_relu_op_conv(PATTERNS["MaxPool"][0])
    qdq, qop = _both_forms(tmp_path, model)
    for path, form in ((qop, "qoperator"), (qdq, "qdq")):
        again = tmp_path / f"again.{form}.onnx"
        result = run_cli("convert", path, "-o", again, "--format", form, "-q")
        assert result.returncode == 0, result.stderr
        assert again.read_bytes() == path.read_bytes()


def test_pytorch_fake_quant_export_converts_and_runs(tmp_path):
    out = tmp_path / "qop.onnx"
    result = onnxq.convert(FIXTURE, out, None, onnxq.QuantConfig(format="qoperator"))
    assert _ops(out)["QLinearConv"] == 2 and "QuantizeLinear" in _ops(out)
    assert any("float bias quantized" in note for note in result.notes)
    x = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    reference, converted = run(str(FIXTURE), {"x": x}, fused=False)[0], run(str(out), {"x": x})[0]
    assert np.abs(reference - converted).max() <= _output_step(out) * 1.001


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_live_pytorch_fake_quant_export(tmp_path):
    import sys

    sys.path.insert(0, str(FIXTURE.parent))
    from export_fake_quant import export

    exported, out = tmp_path / "exported.onnx", tmp_path / "qop.onnx"
    export(exported, seed=1)
    onnxq.convert(exported, out, None, onnxq.QuantConfig(format="qoperator"))
    assert _ops(out)["QLinearConv"] == 2


def test_onnx_runtime_quantizer_output_converts_to_operator_form(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = _conv_relu_op_conv(PATTERNS["Add"][0])
    float_path, ort_path, out = tmp_path / "f.onnx", tmp_path / "ort.onnx", tmp_path / "qop.onnx"
    onnx.save(model, float_path)
    samples = iter([{"x": sample[None]} for sample in _data([1, 4, 8, 8], n=16)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(samples, None)

    quantize_static(str(float_path), str(ort_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    onnxq.convert(ort_path, out, None, onnxq.QuantConfig(format="qoperator"))
    assert _ops(out)["QLinearConv"] == 2 and _ops(out)["QLinearAdd"] == 1
    x = _data([1, 4, 8, 8], n=1, seed=5)
    assert np.abs(run(str(ort_path), {"x": x})[0] - run(str(out), {"x": x})[0]).max() <= _output_step(out) * 1.001


def test_qoperator_for_cuda_is_refused_unless_forced(tmp_path):
    result = run_cli("convert", FIXTURE, "-o", tmp_path / "m.onnx", "--format", "qoperator", "--target", "cuda")
    assert result.returncode == 2 and "no QLinear kernels" in result.stderr
    forced = run_cli("convert", FIXTURE, "-o", tmp_path / "m.onnx", "--format", "qoperator", "--target", "cuda",
                     "--force-format", "-q")
    assert forced.returncode == 0, forced.stderr


def test_tensorrt_target_defaults_to_int8_symmetric_activations():
    assert onnxq.QuantConfig(target="tensorrt").activations == "int8"
    assert onnxq.QuantConfig(target="cpu").activations == "uint8"
    assert onnxq.QuantConfig(target="tensorrt", activations="uint8").activations == "uint8"
