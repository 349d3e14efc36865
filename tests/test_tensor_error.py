"""Poor tensors measured where they are used (``onnxq.tune.tensor_error``): a residual stream
whose few huge channels set one coarse scale looks fine on its own and is ruined by the layer
norm that reads it, in either spelling of the norm; checked against ONNX Runtime on the float model."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from onnxq.config import FallbackOptions
from onnxq.tune import tensor_error
from tests.graphs import make_model, run, sqnr_db

WIDTH, TOKENS = 64, 16


def _layer_norm(spelling: str, source: str, output: str) -> tuple[list, list]:
    """Nodes and initializers of a layer norm over the last axis, one op or written out."""
    gamma = np.ones(WIDTH, np.float32)
    gamma[:2] = 1e-3  # the outlier channels are scaled down again, as trained encoders do
    beta = np.zeros(WIDTH, np.float32)
    if spelling == "op":
        return [oh.make_node("LayerNormalization", [source, "gamma", "beta"], [output], axis=-1, epsilon=1e-5)], \
            [("gamma", gamma), ("beta", beta)]
    nodes = [
        oh.make_node("ReduceMean", [source], ["mean"], axes=[-1]),
        oh.make_node("Sub", [source, "mean"], ["centered"]),
        oh.make_node("Mul", ["centered", "centered"], ["squared"]),
        oh.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        oh.make_node("Add", ["variance", "epsilon"], ["variance_eps"]),
        oh.make_node("Sqrt", ["variance_eps"], ["deviation"]),
        oh.make_node("Div", ["centered", "deviation"], ["normalized"]),
        oh.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        oh.make_node("Add", ["scaled", "beta"], [output]),
    ]
    return nodes, [("gamma", gamma), ("beta", beta), ("epsilon", np.array(1e-5, np.float32))]


def residual_block(spelling: str) -> onnx.ModelProto:
    """x -> MatMul (two output channels 100x the rest) -> + bias -> + x -> layer norm -> MatMul -> y."""
    rng = np.random.default_rng(0)
    first = rng.normal(0, 0.15, (WIDTH, WIDTH)).astype(np.float32)
    first[:, 0] *= 100
    first[:, 1] = -first[:, 0]  # opposite outliers: the mean over channels stays that of the small ones
    second = rng.normal(0, 0.15, (WIDTH, WIDTH)).astype(np.float32)
    norm, norm_weights = _layer_norm(spelling, "residual", "normed")
    nodes = [
        oh.make_node("MatMul", ["x", "first"], ["dense"]),
        oh.make_node("Add", ["dense", "bias"], ["biased"]),
        oh.make_node("Add", ["biased", "x"], ["residual"]),
        *norm,
        oh.make_node("MatMul", ["normed", "second"], ["y"]),
    ]
    weights = [("first", first), ("bias", rng.normal(0, 0.1, WIDTH).astype(np.float32)), ("second", second)]
    return make_model(nodes, [("x", [1, TOKENS, WIDTH])], [("y", [1, TOKENS, WIDTH])], weights + norm_weights, opset=17)


def _data(seed: int, count: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (count, 1, TOKENS, WIDTH)).astype(np.float32)}


def _convert(model, tmp_path, name: str):
    return onnxq.convert(model, tmp_path / f"{name}.onnx", _data(1, 16), workspace=tmp_path / f"{name}.ws",
                         fallback=FallbackOptions(auto=False))


@pytest.mark.parametrize("spelling", ["op", "written-out"])
def test_a_residual_stream_ruined_after_its_layer_norm_is_kept_float(spelling, tmp_path, monkeypatch):
    model = residual_block(spelling)
    held_out = _data(2, 8)["x"]
    reference = np.concatenate([run(model, {"x": x})[0] for x in held_out])

    def fidelity(result) -> float:
        return sqnr_db(reference, np.concatenate([run(str(result.output), {"x": x})[0] for x in held_out]))

    measured = _convert(model, tmp_path, "measured")
    assert any("poor" in note and "residual" in note for note in measured.notes)
    assert measured.op_counts["MatMul"].quantized == 2  # the first writes float from int8 inputs
    monkeypatch.setattr("onnxq.tune.tensor_error.REGION_DEPTH", 0)  # the tensors alone: they look fine
    alone = _convert(model, tmp_path, "alone")
    assert not any("poor" in note for note in alone.notes)
    assert fidelity(measured) > 20 > fidelity(alone) + 10


def test_the_measured_figure_is_the_worst_over_the_tensor_and_what_its_readers_compute(tmp_path, monkeypatch):
    """``tensor_errors`` against numpy: Q/DQ of the tensor with its planned params, then the
    readers' arithmetic (a Sub of a constant and a Relu), the SQNR of each, the least of them."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    model = make_model(
        [oh.make_node("MatMul", ["x", "w"], ["t"]), oh.make_node("Sub", ["t", "c"], ["d"]),
         oh.make_node("Relu", ["d"], ["r"]), oh.make_node("MatMul", ["r", "w"], ["y"])],
        [("x", [1, 8])], [("y", [1, 8])], [("w", weight), ("c", np.full(8, 2.5, np.float32))])
    seen = {}

    def recording(loaded, graph, plan, source):
        seen.update(plan=plan, batches=list(itertools.islice(source(), tensor_error.MEASURED_BATCHES)))
        seen["figures"] = tensor_error.tensor_errors(loaded, graph, plan, source)
        return seen["figures"]

    monkeypatch.setattr("onnxq.tune.layers.tensor_errors", recording)
    onnxq.convert(model, tmp_path / "m.onnx", {"x": rng.normal(0, 3, (24, 1, 8)).astype(np.float32)},
                  workspace=tmp_path / "ws", fallback=FallbackOptions(auto=False))
    params = next(p for value, p in seen["plan"].params.items() if value.name == "t")
    scale, zero = float(params.scale), float(params.zero_point)
    totals = {name: [0.0, 0.0] for name in ("t", "d", "r")}
    for batch in seen["batches"]:
        t = batch.feed["x"].astype(np.float32) @ weight
        q = (np.clip(np.round(t / scale) + zero, 0, 255) - zero) * scale
        for name, exact, quantized in (("t", t, q), ("d", t - 2.5, q - 2.5),
                                       ("r", np.maximum(t - 2.5, 0), np.maximum(q - 2.5, 0))):
            totals[name][0] += float(np.sum(exact.astype(np.float64) ** 2))
            totals[name][1] += float(np.sum((exact.astype(np.float64) - quantized) ** 2))
    figures = {name: 10 * np.log10(signal / noise) for name, (signal, noise) in totals.items()}
    assert figures["r"] < figures["t"]  # the Relu keeps the error and drops most of the signal
    assert seen["figures"]["t"] == pytest.approx(min(figures.values()), abs=0.05)
