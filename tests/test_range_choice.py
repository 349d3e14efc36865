"""--method auto: each activation's range chosen by the error it causes in the layers reading it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from onnxq.calibration.holdout import HOLD_OUT_EVERY
from onnxq.load.prepare import load
from onnxq.workspace.steps import LayersStep
from onnxq.workspace.store import Workspace
from tests.graphs import make_model, run, sqnr_db

PLAIN = onnxq.FallbackOptions(auto=False)  # plain int8: no safety-net fallback hides a range's error
OUTLIER = 80.0
SHAPE = [1, 8, 48, 48]  # 18432 values a sample: enough to tell a tail from the range


def _conv_model(weights: np.ndarray) -> onnx.ModelProto:
    return make_model([oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                      [("x", SHAPE)], [("y", None)], [("w", weights)])


def _samples(rng: np.random.Generator, count: int, outlier_at: int | None = None,
             outlier: float = OUTLIER) -> dict[str, np.ndarray]:
    """``count`` samples of N(0, 1); with ``outlier_at``, that sample holds one value ``outlier``."""
    x = rng.standard_normal((count, *SHAPE)).astype(np.float32)
    if outlier_at is not None:
        x[outlier_at, 0, 3, 5, 7] = outlier
    return {"x": x}


def _calibrated(samples: np.ndarray) -> np.ndarray:
    """The samples calibration sees: every ``HOLD_OUT_EVERY``-th is held out to measure on."""
    return np.delete(samples, np.arange(HOLD_OUT_EVERY - 1, len(samples), HOLD_OUT_EVERY), axis=0)


def _convert(model: onnx.ModelProto, data, tmp_path, method: str, name: str) -> tuple[bytes, onnxq.ConversionResult]:
    output = tmp_path / f"{name}.onnx"
    result = onnxq.convert(model, output, data, onnxq.QuantConfig(method=method), fallback=PLAIN,
                           workspace=tmp_path / f"{name}.ws")
    return output.read_bytes(), result


def _scales(model_bytes: bytes) -> dict[str, float]:
    """The scale of each QuantizeLinear's float input, read off the written model."""
    model = onnx.load_from_string(model_bytes)
    constants = {init.name: onh.to_array(init) for init in model.graph.initializer}
    return {node.input[0]: float(constants[node.input[1]]) for node in model.graph.node if node.op_type == "QuantizeLinear"}


def _recorded_ranges(workspace, model: onnx.ModelProto) -> dict[str, list[float]]:
    """The ranges the layers step of ``workspace`` recorded, by tensor name."""
    names = {key: name for name, key in load(model).keys.tensors.items()}
    return {names[key]: r for key, r in Workspace.open(workspace).latest(LayersStep).read(LayersStep).ranges.items()}


def test_a_tensor_with_a_rare_huge_outlier_feeding_a_conv_gets_a_clipped_range_and_a_better_conv(tmp_path):
    rng = np.random.default_rng(0)
    model = _conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2)
    calibration = _samples(rng, 24, outlier_at=9)  # one value of 80 among 442368 in N(0, 1)
    auto, result = _convert(model, calibration, tmp_path, "auto", "auto")
    minmax, _ = _convert(model, calibration, tmp_path, "minmax", "minmax")
    assert any(note.startswith("clipped the ranges of 2 tensor(s)") for note in result.notes)  # x and the Conv's output

    assert _scales(minmax)["x"] == pytest.approx((OUTLIER - _calibrated(calibration["x"]).min()) / 255, rel=1e-6)
    assert _scales(auto)["x"] < _scales(minmax)["x"] / 10
    low, high = _recorded_ranges(tmp_path / "auto.ws", model)["x"]
    assert calibration["x"].min() <= low < 0 < high < OUTLIER / 10

    held_out = _samples(np.random.default_rng(1), 8)["x"].reshape(8, *SHAPE[1:])
    references = np.concatenate([run(model, {"x": held_out[i:i + 1]})[0] for i in range(8)])
    outputs = {name: np.concatenate([run(onnx.load_from_string(data), {"x": held_out[i:i + 1]}, fused=False)[0]
                                     for i in range(8)]) for name, data in (("auto", auto), ("minmax", minmax))}
    assert sqnr_db(references, outputs["auto"]) > sqnr_db(references, outputs["minmax"]) + 6


def test_a_tensor_without_outliers_keeps_its_min_max_range(tmp_path):
    rng = np.random.default_rng(2)
    model = _conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2)
    calibration = {"x": rng.uniform(-1, 1, (24, *SHAPE)).astype(np.float32)}
    auto, _ = _convert(model, calibration, tmp_path, "auto", "auto")
    assert "x" not in _recorded_ranges(tmp_path / "auto.ws", model)  # the Conv's output, Gaussian-like, may be clipped
    x = _calibrated(calibration["x"])
    assert _scales(auto)["x"] == pytest.approx((x.max() - x.min()) / 255, rel=1e-6)


def test_a_concat_group_gets_one_clipped_range(tmp_path):
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1
    model = make_model(
        [oh.make_node("Concat", ["a", "b"], ["c"], axis=1), oh.make_node("Conv", ["c", "w"], ["y"], pads=[1, 1, 1, 1])],
        [("a", SHAPE), ("b", SHAPE)], [("y", None)], [("w", weights)])
    a = _samples(rng, 24, outlier_at=11, outlier=30.0)["x"]  # under 16x b's range: the Concat is quantized
    b = _samples(rng, 24)["x"]
    auto, _ = _convert(model, {"a": a, "b": b}, tmp_path, "auto", "auto")
    recorded = _recorded_ranges(tmp_path / "auto.ws", model)
    assert recorded["a"] == recorded["b"] == recorded["c"]
    low, high = recorded["c"]
    assert min(a.min(), b.min()) <= low < 0 < high < 30.0 / 5
    scales = _scales(auto)
    assert scales["a"] == scales["b"] == scales["c"] == np.float32((high - min(low, 0)) / 255)


def test_recover_and_resume_give_the_same_bytes_without_measuring_again(tmp_path):
    rng = np.random.default_rng(4)
    model = _conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2)
    calibration = _samples(rng, 24, outlier_at=9)
    auto, _ = _convert(model, calibration, tmp_path, "auto", "auto")
    assert _recorded_ranges(tmp_path / "auto.ws", model)

    onnxq.recover(model, tmp_path / "auto.ws", tmp_path / "recovered.onnx")
    assert (tmp_path / "recovered.onnx").read_bytes() == auto
    onnxq.convert(model, tmp_path / "resumed.onnx", None, onnxq.QuantConfig(method="auto"), fallback=PLAIN,
                  workspace=tmp_path / "auto.ws", resume=True)
    assert (tmp_path / "resumed.onnx").read_bytes() == auto


def test_a_tensor_no_weighted_layer_reads_is_judged_by_its_own_error(tmp_path):
    model = make_model([oh.make_node("Sigmoid", ["x"], ["y"])], [("x", SHAPE)], [("y", None)])
    rng = np.random.default_rng(5)
    calibration = _samples(rng, 24, outlier_at=9)
    auto, _ = _convert(model, calibration, tmp_path, "auto", "auto")
    minmax, _ = _convert(model, calibration, tmp_path, "minmax", "minmax")
    low, high = _recorded_ranges(tmp_path / "auto.ws", model)["x"]
    assert calibration["x"].min() <= low < 0 < high < OUTLIER / 10

    held_out = _samples(np.random.default_rng(6), 1)["x"][0]
    float_y = 1 / (1 + np.exp(-held_out.astype(np.float64)))  # numpy's sigmoid
    errors = {name: sqnr_db(float_y, run(onnx.load_from_string(data), {"x": held_out}, fused=False)[0])
              for name, data in (("auto", auto), ("minmax", minmax))}
    assert errors["auto"] > errors["minmax"] + 3


def test_with_nothing_left_to_judge_on_after_the_candidates_samples_every_tensor_keeps_min_max(tmp_path):
    """Four samples in all: the candidate clips are read off all of them, and a clip judged on
    the samples it was read off would look free: min/max stays."""
    rng = np.random.default_rng(7)
    model = _conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2)
    calibration = _samples(rng, 4, outlier_at=2)
    auto, _ = _convert(model, calibration, tmp_path, "auto", "auto")
    assert _recorded_ranges(tmp_path / "auto.ws", model) == {}
    assert _scales(auto)["x"] == pytest.approx((OUTLIER - calibration["x"].min()) / 255, rel=1e-6)
