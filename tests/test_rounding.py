"""Learned weight rounding (``--rounding gptq``): lower layer-output error than round-to-nearest, recorded for recover."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from tests.graphs import initializers, make_model, run

NO_FALLBACK = onnxq.FallbackOptions(auto=False)


def _correlated_inputs(rng: np.random.Generator, rows: int, columns: int, count: int = 1) -> np.ndarray:
    """``count`` arrays of inputs whose columns are correlated the same way, as real layer inputs
    are (what GPTQ exploits)."""
    mixing = rng.normal(0, 1, (columns, columns)) * np.linspace(2, 0.1, columns)[:, None]
    return (rng.normal(0, 1, (count, rows, columns)) @ mixing).astype(np.float32)


def test_gptq_round_has_a_lower_output_error_than_round_to_nearest():
    from onnxq.tune.rounding import gptq_round

    rng = np.random.default_rng(0)
    x = _correlated_inputs(rng, 512, 48)[0].astype(np.float64)
    w = rng.normal(0, 0.2, (24, 48))
    scale = np.abs(w).max(1, keepdims=True) / 127
    nearest = np.clip(np.rint(w / scale), -127, 127)
    learned = gptq_round(w, x.T @ x, scale, 127).astype(np.float64)
    assert np.abs(learned).max() <= 127

    def error(q):
        return np.sum((x @ w.T - x @ (q * scale).T) ** 2)
    assert error(learned) < 0.7 * error(nearest), (error(learned), error(nearest))


def matmul_layer(rng: np.random.Generator):
    nodes = [oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Add", ["m", "b"], ["y"])]
    inits = [("w", rng.normal(0, 0.2, (48, 24)).astype(np.float32)), ("b", rng.normal(0, 0.1, 24).astype(np.float32))]
    return make_model(nodes, [("x", [1, 16, 48])], [("y", [1, 16, 24])], inits)


def conv_layer(rng: np.random.Generator):
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=2),
             oh.make_node("Relu", ["c"], ["y"])]
    inits = [("w", rng.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32)), ("b", rng.normal(0, 0.1, 8).astype(np.float32))]
    return make_model(nodes, [("x", [1, 8, 10, 10])], [("y", [1, 8, 10, 10])], inits)


def _feeds(model, rng: np.random.Generator, count: int):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    columns = shape[-1] if len(shape) == 3 else shape[1]
    if len(shape) == 3:
        return [{"x": x.reshape(shape)} for x in _correlated_inputs(rng, shape[1], columns, count)]
    feeds = []
    for x in _correlated_inputs(rng, shape[2] * shape[3], columns, count):  # neighbouring pixels correlated too
        x = x.T.reshape(shape)
        feeds.append({"x": (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3)).astype(np.float32)})
    return feeds


def _dequantized_weight(quantized: onnx.ModelProto) -> np.ndarray:
    """The weight as the quantized model computes with it: its int8 initializer times its scale."""
    values = initializers(quantized)
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and values.get(node.input[0]) is not None \
                and values[node.input[0]].dtype == np.int8:
            scale = values[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * values[node.input[0]].ndim
            shape[axis] = -1
            return values[node.input[0]] * scale.reshape(shape if scale.ndim else [])
    raise AssertionError("no int8 weight in the quantized model")


def _weight_error(model, quantized_path, feeds) -> float:
    """Output error, on ``feeds``, of the float model with its weight replaced by the quantized
    model's dequantized weight (ONNX Runtime runs both: the weight's rounding error alone)."""
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    weight = _dequantized_weight(onnx.load(quantized_path)).astype(np.float32)
    for index, init in enumerate(swapped.graph.initializer):
        if init.name == "w":
            swapped.graph.initializer[index].CopyFrom(onh.from_array(weight, "w"))
    return sum(float(np.sum((run(model, f)[0] - run(swapped, f)[0]) ** 2)) for f in feeds)


@pytest.mark.parametrize("build", [matmul_layer, conv_layer])
def test_gptq_lowers_the_layer_error_on_calibration_inputs(build, tmp_path):
    rng = np.random.default_rng(1)
    model = build(rng)
    feeds = _feeds(model, rng, 16)
    errors = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.onnx"
        onnxq.convert(model, out, feeds, onnxq.QuantConfig(rounding=rounding, hold_out=False), fallback=NO_FALLBACK)
        errors[rounding] = _weight_error(model, out, feeds)
    assert errors["gptq"] < 0.8 * errors["nearest"], errors
    assert model.SerializeToString() == build(np.random.default_rng(1)).SerializeToString()  # float model untouched


def test_recover_and_resume_write_the_learned_weights_again(tmp_path):
    rng = np.random.default_rng(2)
    model = matmul_layer(rng)
    config = onnxq.QuantConfig(rounding="gptq")
    out, workspace = tmp_path / "model.int8.onnx", tmp_path / "ws"
    onnxq.convert(model, out, _feeds(model, rng, 16), config, fallback=NO_FALLBACK, workspace=workspace)
    onnxq.recover(model, workspace, tmp_path / "recovered.onnx")
    assert (tmp_path / "recovered.onnx").read_bytes() == out.read_bytes()
    onnxq.convert(model, tmp_path / "resumed.onnx", None, config, fallback=NO_FALLBACK, workspace=workspace, resume=True)
    assert (tmp_path / "resumed.onnx").read_bytes() == out.read_bytes()
    nearest = tmp_path / "nearest.onnx"
    onnxq.convert(model, nearest, _feeds(model, np.random.default_rng(2), 16), fallback=NO_FALLBACK)
    assert not np.array_equal(_dequantized_weight(onnx.load(nearest)), _dequantized_weight(onnx.load(out)))


def test_a_scale_widened_for_the_bias_gets_round_to_nearest_not_integers_rounded_for_another_scale(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1e-6, (8, 48)).astype(np.float32)
    bias = np.full(8, 1.0, np.float32)  # far beyond 2^31 * s_x * s_w: the weight scale must widen
    model = make_model([oh.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [("x", [16, 48])], [("y", [16, 8])],
                       [("w", w), ("b", bias)])
    feeds = [{"x": x * 1e-3} for x in _correlated_inputs(rng, 16, 48, 16)]
    out = tmp_path / "gptq.onnx"
    result = onnxq.convert(model, out, feeds, onnxq.QuantConfig(rounding="gptq"), fallback=NO_FALLBACK)
    assert any("learned rounding not used on 1 layer" in note for note in result.notes), result.notes
    quantized = onnx.load(out)
    values = initializers(quantized)
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and values.get(n.input[0]) is not None
              and values[n.input[0]].dtype == np.int8)
    scale = values[dq.input[1]]
    assert scale.max() > np.abs(w).max(1).max() / 127  # widened
    np.testing.assert_array_equal(values[dq.input[0]], np.clip(np.rint(w / scale[:, None]), -127, 127))
