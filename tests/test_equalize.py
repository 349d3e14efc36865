"""Cross-layer equalization: exact in float (ONNX Runtime on the model before and after), weight
ranges balanced as numpy computes them, chains through non-homogeneous activations left alone,
and a badly balanced model quantized with per-tensor weights more accurate with it."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnxq
from onnxq.transform.equalize import MAX_SCALE, EqualizePass
from tests.graphs import initializers, make_model, run, sqnr_db

CHANNEL_SCALES = np.array([6, 0.15, 1, 4, 0.2, 5, 0.5, 2], np.float32)  # per output channel of the first Conv


def _unbalanced_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * CHANNEL_SCALES[:, None, None, None],
        "b1": rng.normal(size=8).astype(np.float32),
        "wd": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "bd": rng.normal(size=8).astype(np.float32),
        "w2": (rng.normal(size=(6, 8, 1, 1)) / CHANNEL_SCALES[None, :, None, None]).astype(np.float32),
        "slope": np.full((8, 1, 1), 0.2, np.float32),
        "wg": rng.normal(size=(6, 5)).astype(np.float32),
        "bg": rng.normal(size=5).astype(np.float32),
        "wm": rng.normal(size=(5, 4)).astype(np.float32) * np.array([1, 30, 0.05, 1], np.float32),
    }


def separable_block(activation: str = "Relu"):
    """Conv -> ``activation`` -> depthwise Conv -> PRelu -> pointwise Conv -> pool -> Gemm ->
    LeakyRelu -> MatMul: three Conv pairs and one Gemm/MatMul pair."""
    weights = _unbalanced_weights()
    act = [oh.make_node("Relu", ["a"], ["r"])] if activation == "Relu" else \
        [oh.make_node("Clip", ["a", "lo", "hi"], ["r"])] if activation == "Clip" else \
        [oh.make_node("HardSwish", ["a"], ["r"])]
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]), *act,
        oh.make_node("Conv", ["r", "wd", "bd"], ["d"], group=8, pads=[1, 1, 1, 1]),
        oh.make_node("PRelu", ["d", "slope"], ["p"]),
        oh.make_node("Conv", ["p", "w2"], ["c"]),
        oh.make_node("GlobalAveragePool", ["c"], ["g"]),
        oh.make_node("Flatten", ["g"], ["f"]),
        oh.make_node("Gemm", ["f", "wg", "bg"], ["h"]),
        oh.make_node("LeakyRelu", ["h"], ["l"], alpha=0.1),
        oh.make_node("MatMul", ["l", "wm"], ["y"]),
    ]
    extra = [("lo", np.float32(0)), ("hi", np.float32(6))] if activation == "Clip" else []
    return make_model(nodes, [("x", [1, 3, 12, 12])], [("y", None)], list(weights.items()) + extra)


def _equalized(model):
    converted = ir.from_proto(model)
    result = EqualizePass()(converted)
    return ir.to_proto(converted), result


def test_equalization_keeps_the_float_outputs_to_1e_5():
    model = separable_block()
    equalized, result = _equalized(model)
    assert result.modified
    x = np.random.default_rng(1).normal(size=(1, 3, 12, 12)).astype(np.float32)
    before, after = run(model, {"x": x})[0], run(equalized, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert not np.allclose(initializers(equalized)["w1"], initializers(model)["w1"])


def test_equalized_pairs_have_equal_channel_ranges():
    weights = initializers(_equalized(separable_block())[0])
    dw_out = np.abs(weights["wd"]).reshape(8, -1).max(axis=1)
    dw_in = dw_out  # a depthwise Conv's input channel i is its output channel i
    first_out = np.abs(weights["w1"]).reshape(8, -1).max(axis=1)
    pointwise_in = np.abs(weights["w2"]).max(axis=(0, 2, 3))
    gemm_out, matmul_in = np.abs(weights["wg"]).max(axis=0), np.abs(weights["wm"]).max(axis=1)
    np.testing.assert_allclose(first_out, dw_in, rtol=1e-2)  # both pairs round-robin to a fixed point
    np.testing.assert_allclose(dw_out, pointwise_in, rtol=1e-2)
    np.testing.assert_allclose(gemm_out, matmul_in, rtol=1e-5)


def test_a_dead_channel_is_not_blown_up_beyond_the_scale_bound():
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32), np.full(4, 0.5, np.float32)
    w1[2] *= 1e-9  # channel 2 is dead in the first layer: its balanced scale would be ~1e-5
    w2 = rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    model = make_model([oh.make_node("Conv", ["x", "w1", "b1"], ["a"]), oh.make_node("Relu", ["a"], ["r"]),
                        oh.make_node("Conv", ["r", "w2"], ["y"])], [("x", [1, 3, 4, 4])], [("y", None)],
                       [("w1", w1), ("b1", b1), ("w2", w2)])
    weights = initializers(_equalized(model)[0])
    growth = weights["b1"] / b1  # the bias, and so the activation, of each channel grows by 1 / s_i
    assert growth[2] == pytest.approx(MAX_SCALE, rel=1e-5)
    assert np.all(growth <= MAX_SCALE * (1 + 1e-5)) and np.all(growth >= 1 / MAX_SCALE / (1 + 1e-5))
    np.testing.assert_allclose(weights["w2"][:, 2], w2[:, 2] / MAX_SCALE, rtol=1e-5)


@pytest.mark.parametrize("activation", ["Clip", "HardSwish"])
def test_chains_through_non_homogeneous_activations_are_left_alone(activation):
    model = separable_block(activation)
    equalized, _ = _equalized(model)
    before, after = initializers(model), initializers(equalized)
    np.testing.assert_array_equal(after["w1"], before["w1"])  # Conv -> Clip/HardSwish -> Conv: not a pair
    assert not np.array_equal(after["wd"], before["wd"])  # depthwise -> PRelu -> pointwise still is


def test_equalization_raises_per_tensor_int8_accuracy(tmp_path):
    model = separable_block()
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.normal(size=(1, 3, 12, 12)).astype(np.float32)} for _ in range(24)]
    held_out = [rng.normal(size=(1, 3, 12, 12)).astype(np.float32) for _ in range(8)]
    reference = np.concatenate([run(model, {"x": x})[0] for x in held_out])
    sqnr = {}
    for equalize in (False, True):
        config = onnxq.QuantConfig(per_channel=False, equalize=equalize, bias_correction=False)
        output = tmp_path / f"equalize-{equalize}.onnx"
        onnxq.convert(model, output, calibration, config, fallback=onnxq.FallbackOptions(auto=False))
        sqnr[equalize] = sqnr_db(reference, np.concatenate([run(str(output), {"x": x})[0] for x in held_out]))
    assert sqnr[True] > sqnr[False] + 6, sqnr
