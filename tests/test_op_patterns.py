"""Each op pattern on a small model built here: what is quantized, how, and that it still computes
what the float model computes (checked against ONNX Runtime on the float model)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from tests.graphs import consumers, fused_op_types, initializers, make_model, producer, run, sqnr_db

RNG = np.random.default_rng(42)


def _w(*shape):
    return RNG.normal(0, 0.3, size=shape).astype(np.float32)


def _conv(name, x, out, cin, cout, k=3):
    inits = [(f"{name}_w", _w(cout, cin, k, k)), (f"{name}_b", _w(cout))]
    node = oh.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], pads=[k // 2] * 4, name=name)
    return node, inits


def _conv_relu_op_conv(op_nodes, op_inits=(), x_shape=(1, 4, 8, 8), mid="mid", tail_channels=4, out_shape=None):
    """Conv+Relu -> the ops under test (reading 'a', writing ``mid``) -> Conv: the op's input is quantized."""
    c1, i1 = _conv("c1", "x", "a0", x_shape[1], 4)
    c2, i2 = _conv("c2", mid, "y", tail_channels, 4, k=1)
    nodes = [c1, oh.make_node("Relu", ["a0"], ["a"]), *op_nodes, c2]
    return make_model(nodes, [("x", list(x_shape))], [("y", out_shape)], [*i1, *op_inits, *i2])


def _data(shape, n=24, seed=0):
    """Inputs in [-1, 1]; seed 0 is the calibration data, other seeds unseen data."""
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, *shape[1:])).astype(np.float32)


def _convert(tmp_path, model, x_shape, **config):
    """Convert with 8-bit weights everywhere and every quantizable node quantized, fused by ONNX
    Runtime or not, and no safety-net fallback (7-bit weights, fusion coverage and the safety net
    have tests of their own)."""
    out = tmp_path / "model.int8.onnx"
    calibration = {"x": _data(x_shape)}
    config.setdefault("reduce_range", "never")
    config.setdefault("quantize_unfused", True)
    result = onnxq.convert(model, out, calibration, onnxq.QuantConfig(**config),
                           fallback=onnxq.FallbackOptions(auto=False))
    return result, onnx.load(out), str(out)


def _fidelity(model, quantized, x_shape):
    x = _data(x_shape, n=x_shape[0], seed=1)
    return sqnr_db(run(model, {"x": x})[0], run(quantized, {"x": x}, fused=False)[0])


def _dq_of_weight(quantized, weight_name):
    (dq,) = consumers(quantized, f"{weight_name}_quantized")
    assert dq.op_type == "DequantizeLinear"
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return dq, axis


@pytest.mark.parametrize(
    "op, make_node, weight_shape, bias_len, axis",
    [
        ("Conv", lambda: oh.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]), (6, 4, 3, 3), 6, 0),
        ("ConvTranspose", lambda: oh.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2]), (4, 6, 2, 2), 6, 1),
        ("Gemm transB=0", lambda: oh.make_node("Gemm", ["x", "w", "b"], ["y"]), (4, 6), 6, 1),
        ("Gemm transB=1", lambda: oh.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1), (6, 4), 6, 0),
        ("MatMul", lambda: oh.make_node("MatMul", ["x", "w"], ["y"]), (4, 6), None, 1),
    ],
)
def test_weights_are_int8_per_output_channel_on_the_right_axis(tmp_path, op, make_node, weight_shape, bias_len, axis):
    x_shape = [2, 4, 5, 5] if "Conv" in op else [2, 4]
    w = _w(*weight_shape)
    inits = [("w", w)] + ([("b", _w(bias_len))] if bias_len else [])
    model = make_model([make_node()], [("x", x_shape)], [("y", None)], inits)
    result, quantized, _ = _convert(tmp_path, model, x_shape)

    stored = initializers(quantized)
    assert "w" not in stored and "b" not in stored, "float copies of quantized weights must be removed"
    dq, dq_axis = _dq_of_weight(quantized, "w")
    assert dq_axis == axis
    scale = stored[dq.input[1]]
    expected_scale = np.abs(np.moveaxis(w, axis, 0)).reshape(weight_shape[axis], -1).max(axis=1) / 127
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    q = stored["w_quantized"]
    assert q.dtype == np.int8 and stored[dq.input[2]].dtype == np.int8 and not stored[dq.input[2]].any()
    shape = [1] * w.ndim
    shape[axis] = -1
    np.testing.assert_array_equal(q, np.rint(w / scale.reshape(shape)).astype(np.int8))
    assert _fidelity(model, quantized, x_shape) > 30


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_bias_is_int32_with_scale_of_input_scale_times_weight_scale(tmp_path, op):
    if op == "Conv":
        x_shape, node = [1, 3, 6, 6], oh.make_node("Conv", ["x", "w", "b"], ["y"])
        w = _w(5, 3, 3, 3)
    else:
        x_shape, node = [1, 3], oh.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        w = _w(5, 3)
    b = _w(5)
    model = make_model([node], [("x", x_shape)], [("y", None)], [("w", w), ("b", b)])
    _, quantized, _ = _convert(tmp_path, model, x_shape, bias_correction=False)  # the bias as given, quantized
    stored = initializers(quantized)
    (bias_dq,) = consumers(quantized, "b_quantized")
    bias_scale = stored[bias_dq.input[1]]
    assert stored["b_quantized"].dtype == np.int32
    (input_q,) = [n for n in consumers(quantized, "x") if n.op_type == "QuantizeLinear"]
    weight_dq, _ = _dq_of_weight(quantized, "w")
    expected = stored[input_q.input[1]] * stored[weight_dq.input[1]]
    np.testing.assert_array_equal(bias_scale, expected.astype(np.float32))
    np.testing.assert_array_equal(stored["b_quantized"], np.rint(b / expected).astype(np.int32))


def test_bias_overflow_is_widened_and_reported_not_wrapped(tmp_path):
    w = _w(2, 3, 1, 1)
    w[1] = 1e-9  # a nearly dead channel with a large bias: b / (s_x * s_w) far beyond int32
    b = np.array([0.1, 50.0], np.float32)
    model = make_model([oh.make_node("Conv", ["x", "w", "b"], ["y"])], [("x", [1, 3, 4, 4])], [("y", None)], [("w", w), ("b", b)])
    result, quantized, _ = _convert(tmp_path, model, [1, 3, 4, 4])
    assert any("widened" in note for note in result.notes)
    x = _data([1, 3, 4, 4], n=1)
    reference, approximation = run(model, {"x": x})[0], run(quantized, {"x": x}, fused=False)[0]
    np.testing.assert_allclose(approximation[0, 1], reference[0, 1], atol=0.2)  # ~50, not a wrapped value


def _quantized_count(result, op):
    return result.op_counts[op].quantized


PATTERNS = {
    "MaxPool": ([oh.make_node("MaxPool", ["a"], ["mid"], kernel_shape=[2, 2], strides=[2, 2])], [], None),
    "AveragePool": ([oh.make_node("AveragePool", ["a"], ["mid"], kernel_shape=[2, 2])], [], None),
    "Reshape": ([oh.make_node("Reshape", ["a", "shape"], ["mid"])], [("shape", np.array([1, 4, 4, 16], np.int64))], None),
    "Transpose": ([oh.make_node("Transpose", ["a"], ["mid"], perm=[0, 1, 3, 2])], [], None),
    "Resize": ([oh.make_node("Resize", ["a", "", "scales"], ["mid"], mode="nearest")],
               [("scales", np.array([1, 1, 2, 2], np.float32))], None),
    "Pad": ([oh.make_node("Pad", ["a", "pads"], ["mid"])], [("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], None),
    "Slice": ([oh.make_node("Slice", ["a", "starts", "ends", "axes"], ["mid"])],
              [("starts", np.array([1], np.int64)), ("ends", np.array([6], np.int64)), ("axes", np.array([2], np.int64))], None),
    "Squeeze/Unsqueeze": ([oh.make_node("Unsqueeze", ["a", "ax"], ["u"]), oh.make_node("Squeeze", ["u", "ax"], ["mid"])],
                          [("ax", np.array([2], np.int64))], None),
    "Split": ([oh.make_node("Split", ["a"], ["s0", "s1"], axis=1), oh.make_node("Concat", ["s1", "s0"], ["mid"], axis=1)], [], None),
    "Gather": ([oh.make_node("Gather", ["a", "idx"], ["mid"], axis=1)], [("idx", np.array([3, 0, 1, 2], np.int64))], None),
    "Sigmoid": ([oh.make_node("Sigmoid", ["a"], ["mid"])], [], None),
    "Add": ([oh.make_node("Add", ["a", "a"], ["mid"])], [], None),
    # a constant that is not per-channel, so that the Mul is not folded into c2
    "Mul": ([oh.make_node("Mul", ["a", "k"], ["mid"])], [("k", np.full((1, 1, 8, 8), 0.7, np.float32))], None),
    "Concat": ([oh.make_node("Concat", ["a", "x"], ["mid"], axis=1)], [], 8),
    "GlobalAveragePool": ([oh.make_node("GlobalAveragePool", ["a"], ["mid"])], [], None),
}

# What ONNX Runtime's CPU provider turns each quantized node group into.
FUSED = {"Add": "QLinearAdd", "Mul": "QLinearMul", "Sigmoid": "QLinearSigmoid", "Concat": "QLinearConcat",
         "AveragePool": "QLinearAveragePool", "GlobalAveragePool": "QLinearGlobalAveragePool"}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_op_pattern_is_quantized_and_stays_close_to_float(tmp_path, name):
    nodes, inits, tail_channels = PATTERNS[name]
    model = _conv_relu_op_conv(nodes, inits, tail_channels=tail_channels or 4)
    result, quantized, path = _convert(tmp_path, model, [1, 4, 8, 8])
    for node in nodes:
        assert result.op_counts[node.op_type].float == 0, f"{node.op_type} was left float"
    assert _fidelity(model, quantized, [1, 4, 8, 8]) > 28
    if name in FUSED:
        assert FUSED[name] in fused_op_types(path)


def test_quantized_convs_fuse_into_integer_kernels_in_onnx_runtime(tmp_path):
    model = _conv_relu_op_conv([oh.make_node("MaxPool", ["a"], ["mid"], kernel_shape=[2, 2])])
    _, _, path = _convert(tmp_path, model, [1, 4, 8, 8])
    ops = fused_op_types(path)
    assert ops.count("QLinearConv") == 2
    assert "Conv" not in ops and "Relu" not in ops


def test_relu_and_clip_after_a_quantized_op_are_absorbed_into_its_output_range(tmp_path):
    for activation, extra in [("Relu", []), ("Clip", ["lo", "hi"])]:
        nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"]), oh.make_node(activation, ["c", *extra], ["y"])]
        inits = [("w", _w(4, 3, 1, 1)), ("b", _w(4)), ("lo", np.float32(0)), ("hi", np.float32(0.5))]
        model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], inits[: 2 + len(extra)])
        _, quantized, _ = _convert(tmp_path, model, [1, 3, 4, 4])
        assert not [n for n in consumers(quantized, "c") if n.op_type == "QuantizeLinear"], "no Q between op and activation"
        y_dq = producer(quantized, "y")
        assert y_dq.op_type == "DequantizeLinear"
        zero_point = initializers(quantized)[y_dq.input[2]]
        assert zero_point == 0  # the range starts at 0: Relu/Clip's floor is the uint8 minimum


def test_int8_activations_are_symmetric(tmp_path):
    model = _conv_relu_op_conv([oh.make_node("Sigmoid", ["a"], ["mid"])])
    _, quantized, _ = _convert(tmp_path, model, [1, 4, 8, 8], activations="int8")
    stored = initializers(quantized)
    q_nodes = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    for node in q_nodes:
        assert stored[node.input[2]].dtype == np.int8 and stored[node.input[2]] == 0
    assert _fidelity(model, quantized, [1, 4, 8, 8]) > 25


def test_per_tensor_option_gives_one_weight_scale(tmp_path):
    model = make_model([oh.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 4, 4])], [("y", None)], [("w", _w(4, 3, 1, 1))])
    _, quantized, _ = _convert(tmp_path, model, [1, 3, 4, 4], per_channel=False)
    dq, axis = _dq_of_weight(quantized, "w")
    assert axis is None and initializers(quantized)[dq.input[1]].ndim == 0


def test_concat_of_very_different_ranges_is_kept_float_with_a_note(tmp_path):
    # Like YOLO's head: boxes in pixels (0..320) concatenated with class scores (0..1).
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["feat"]),
        oh.make_node("Sigmoid", ["feat"], ["scores"]),
        oh.make_node("Mul", ["scores", "stride"], ["boxes"]),
        oh.make_node("Concat", ["boxes", "scores"], ["y"], axis=1),
    ]
    inits = [("w", _w(2, 3, 1, 1)), ("b", _w(2)), ("stride", np.array(320.0, np.float32))]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], inits)
    result, quantized, _ = _convert(tmp_path, model, [1, 3, 4, 4])
    assert result.op_counts["Concat"].float == 1
    assert any("Concat" in note and "kept float" in note for note in result.notes)
    x = _data([1, 3, 4, 4], n=1)  # a calibration sample: inside the calibrated ranges
    reference, approximation = run(model, {"x": x})[0], run(quantized, {"x": x}, fused=False)[0]
    # The scores keep their own fine scale: error well under 1/255 of the 0..320 range.
    assert np.abs(reference[:, 2:] - approximation[:, 2:]).max() < 0.01


def test_concat_of_similar_ranges_shares_one_scale(tmp_path):
    model = _conv_relu_op_conv(PATTERNS["Concat"][0], tail_channels=8)
    _, quantized, _ = _convert(tmp_path, model, [1, 4, 8, 8])
    concat = next(n for n in quantized.graph.node if n.op_type == "Concat")
    scales = {producer(quantized, name).input[1] for name in concat.input}
    output_q = next(n for n in consumers(quantized, concat.output[0]) if n.op_type == "QuantizeLinear")
    assert scales == {output_q.input[1]}


def test_model_below_opset_13_is_upgraded_and_runs(tmp_path):
    model = make_model([oh.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 4, 4])], [("y", None)],
                       [("w", _w(4, 3, 1, 1))], opset=11)
    result, quantized, _ = _convert(tmp_path, model, [1, 3, 4, 4])
    assert {o.domain: o.version for o in quantized.opset_import}[""] == 13
    assert any("opset 11" in note for note in result.notes)
    assert _fidelity(model, quantized, [1, 3, 4, 4]) > 30


def test_output_keeps_inputs_outputs_and_checks_fully(tmp_path):
    model = _conv_relu_op_conv([oh.make_node("MaxPool", ["a"], ["mid"], kernel_shape=[2, 2])])
    _, quantized, _ = _convert(tmp_path, model, [1, 4, 8, 8])
    onnx.checker.check_model(quantized, full_check=True)
    assert [i.name for i in quantized.graph.input] == ["x"]
    assert [o.name for o in quantized.graph.output] == ["y"]
    assert quantized.graph.output[0].type == model.graph.output[0].type
