"""Bias correction: the shift int8 weights cause, recorded as numpy computes it from the DESIGN
formulas, and removed, so that the output's mean error per channel and its SQNR against ONNX
Runtime on the float model improve; a MatMul's shift goes into the Add after it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import pytest

import onnxq
from onnxq.workspace.steps import LayersStep
from onnxq.workspace.store import Workspace
from tests.graphs import make_model, run, sqnr_db

SIZE = 10


def _weights() -> dict[str, np.ndarray]:
    """A Conv without bias whose channel 0 sets the per-tensor weight scale, so that the small,
    positive weights of channels 1-3 all round the same way; a MatMul + Add on the flattened
    input likewise (its channels 1-4 round to 0)."""
    rng = np.random.default_rng(0)
    conv = rng.uniform(0.001, 0.012, (4, 3, 3, 3)).astype(np.float32)
    conv[0] = rng.normal(0, 1, (3, 3, 3))
    head = rng.uniform(0.001, 0.011, (3 * SIZE * SIZE, 5)).astype(np.float32)
    head[0, 0] = 3.0
    return {"w": conv, "wm": head, "bm": np.zeros(5, np.float32)}


def layer_with_skewed_rounding():
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["y"]),
        oh.make_node("Flatten", ["x"], ["f"]),
        oh.make_node("MatMul", ["f", "wm"], ["m"]),
        oh.make_node("Add", ["m", "bm"], ["z"]),
    ]
    return make_model(nodes, [("x", [1, 3, SIZE, SIZE])], [("y", None), ("z", None)], list(_weights().items()))


def _samples(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(count)]


def _per_tensor_int8(weight: np.ndarray) -> np.ndarray:
    """DESIGN.md section 3: symmetric int8, s = max|w| / 127, round half to even."""
    scale = np.abs(weight).max() / 127
    return np.clip(np.round(weight / scale), -127, 127) * scale


def _convert(tmp_path, correction: bool):
    config = onnxq.QuantConfig(per_channel=False, bias_correction=correction, equalize=False, hold_out=False)
    output = tmp_path / f"correction-{correction}.onnx"
    result = onnxq.convert(layer_with_skewed_rounding(), output, [{"x": x} for x in _samples(16, 1)], config,
                           fallback=onnxq.FallbackOptions(auto=False), workspace=tmp_path / f"ws-{correction}")
    return output, result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bias")
    return {correction: _convert(folder, correction) for correction in (False, True)}


def test_recorded_conv_shift_is_the_weight_rounding_error_on_the_mean_input(converted):
    workspace = converted[True][1].workspace
    shifts = Workspace.open(workspace).latest(LayersStep).read(LayersStep).bias_shifts
    conv_shift = next(np.array(s) for s in shifts.values() if len(s) == 4)
    # the quantized Conv minus the float one, on the mean input patch of the first 4 batches
    x = np.concatenate(_samples(4, 1))
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3)).mean(axis=(0, 2, 3))  # (3, 3, 3)
    weight = _weights()["w"]
    expected = ((_per_tensor_int8(weight) - weight) * windows).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(conv_shift[1:], expected[1:], rtol=0.05)
    assert np.all(np.abs(expected[1:]) > 0.01)  # the rounding really is skewed


def test_correction_removes_the_mean_error_per_channel_and_raises_sqnr(converted):
    held_out = _samples(8, 7)
    model = layer_with_skewed_rounding()
    reference = [np.concatenate(outputs) for outputs in zip(*(run(model, {"x": x}) for x in held_out))]
    results = {}
    for correction, (output, _) in converted.items():
        quantized = [np.concatenate(outputs) for outputs in zip(*(run(str(output), {"x": x}) for x in held_out))]
        conv_mean_error = np.abs((quantized[0] - reference[0]).mean(axis=(0, 2, 3)))
        head_mean_error = np.abs((quantized[1] - reference[1]).mean(axis=0))
        results[correction] = conv_mean_error, head_mean_error, [sqnr_db(r, q) for r, q in zip(reference, quantized)]
    (conv_off, head_off, sqnr_off), (conv_on, head_on, sqnr_on) = results[False], results[True]
    assert conv_on[1:].max() < conv_off[1:].max() / 4, (conv_on, conv_off)
    assert head_on[1:].max() < head_off[1:].max() / 4, (head_on, head_off)
    assert sqnr_on[0] > sqnr_off[0] + 1 and sqnr_on[1] > sqnr_off[1] + 1, (sqnr_on, sqnr_off)


def test_correction_off_records_no_shifts(converted):
    workspace = converted[False][1].workspace
    assert Workspace.open(workspace).latest(LayersStep).read(LayersStep).bias_shifts == {}


def test_a_layer_kept_float_is_not_corrected(tmp_path):
    output = tmp_path / "kept.onnx"
    onnxq.convert(layer_with_skewed_rounding(), output, [{"x": x} for x in _samples(8, 1)],
                  onnxq.QuantConfig(per_channel=False, hold_out=False),
                  fallback=onnxq.FallbackOptions(keep_float=("Conv",), auto=False))
    model = onnx.load(output)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert list(conv.input) == ["x", "w"]  # no bias added: float has no shift to remove
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(
        next(init for init in model.graph.initializer if init.name == "w")), _weights()["w"])
