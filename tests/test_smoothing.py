"""Outlier migration (``--smooth``): float-exact, measured on calibration data, recorded for recover and resume."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest

import onnxq
from onnxq.calibration.data import Batch
from onnxq.load.prepare import load
from onnxq.transform import TransformData, float_exact_passes
from onnxq.transform.smoothing import ALPHAS
from onnxq.workspace.steps import SmoothingStep
from onnxq.workspace.store import Workspace
from tests.graphs import initializers, make_model, run, sqnr_db

DIM, SEQ = 16, 8
OUTLIERS = [3, 11]
NO_FALLBACK = onnxq.FallbackOptions(auto=False)


def _outlier_scale(rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    scale[OUTLIERS] = [60.0, -45.0]  # two outlier channels, as in transformer LayerNorm outputs
    return scale


def layernorm_matmuls(rng: np.random.Generator, residual: bool = False):
    """LayerNorm -> two MatMuls (q and k style), optionally with the LayerNorm output added back."""
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
             oh.make_node("MatMul", ["h", "w1"], ["y1"]),
             oh.make_node("MatMul", ["h", "w2"], ["m2"]),
             oh.make_node("Add", ["m2", "h" if residual else "b2"], ["y2"])]
    w1, w2 = rng.normal(0, 0.3, (2, DIM, DIM)).astype(np.float32)
    w1[OUTLIERS] /= 50  # the outliers' weights are small: they do not dominate the output
    inits = [("gamma", _outlier_scale(rng)), ("beta", rng.normal(0, 0.1, DIM).astype(np.float32)), ("w1", w1), ("w2", w2),
             ("b2", rng.normal(0, 0.1, DIM).astype(np.float32))]
    return make_model(nodes, [("x", [1, SEQ, DIM])], [("y1", [1, SEQ, DIM]), ("y2", [1, SEQ, DIM])], inits)


def decomposed_layernorm_matmuls(rng: np.random.Generator):
    """A LayerNorm spelled as ReduceMean, Sub, Pow, Add, Sqrt, Div, then its affine Mul and Add
    (kept float as a normalization): the division goes into the affine constants."""
    nodes = [oh.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]), oh.make_node("Sub", ["x", "mean"], ["centred"]),
             oh.make_node("Pow", ["centred", "two"], ["squares"]), oh.make_node("ReduceMean", ["squares"], ["var"], axes=[-1]),
             oh.make_node("Add", ["var", "eps"], ["var_eps"]), oh.make_node("Sqrt", ["var_eps"], ["std"]),
             oh.make_node("Div", ["centred", "std"], ["normed"]), oh.make_node("Mul", ["normed", "gamma"], ["scaled"]),
             oh.make_node("Add", ["scaled", "beta"], ["h"]),
             oh.make_node("MatMul", ["h", "w1"], ["y1"]), oh.make_node("MatMul", ["h", "w2"], ["y2"])]
    w1, w2 = rng.normal(0, 0.3, (2, DIM, DIM)).astype(np.float32)
    inits = [("two", np.array(2.0, np.float32)), ("eps", np.array(1e-5, np.float32)), ("gamma", _outlier_scale(rng)),
             ("beta", rng.normal(0, 0.1, DIM).astype(np.float32)), ("w1", w1), ("w2", w2)]
    return make_model(nodes, [("x", [1, SEQ, DIM])], [("y1", [1, SEQ, DIM]), ("y2", [1, SEQ, DIM])], inits, opset=13)


def attention_value_chain(rng: np.random.Generator, bias: bool = False):
    """value MatMul (+ bias) -> heads (Reshape, Transpose) -> probs @ V -> back (Transpose,
    Reshape) -> output MatMul: the division is absorbed into the value projection's columns."""
    heads = 4
    nodes = [oh.make_node("MatMul", ["x", "wv"], ["v0"]), oh.make_node("Add" if bias else "Identity", ["v0", "bv"][:1 + bias], ["v1"]),
             oh.make_node("Reshape", ["v1", "split"], ["v2"]), oh.make_node("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
             oh.make_node("Softmax", ["scores"], ["probs"], axis=-1), oh.make_node("MatMul", ["probs", "v3"], ["c0"]),
             oh.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]), oh.make_node("Reshape", ["c1", "merge"], ["c2"]),
             oh.make_node("MatMul", ["c2", "wo"], ["y"])]
    wv = rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)
    wv[:, [5, 9]] *= 40  # outlier channels of the value, hence of the output projection's input
    inits = [("wv", wv), *([("bv", rng.normal(0, 0.1, DIM).astype(np.float32))] if bias else []),
             ("split", np.array([1, SEQ, heads, DIM // heads], np.int64)), ("merge", np.array([1, SEQ, DIM], np.int64)),
             ("wo", rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32))]
    return make_model(nodes, [("x", [1, SEQ, DIM]), ("scores", [1, heads, SEQ, SEQ])], [("y", [1, SEQ, DIM])], inits)


def _feeds(model, rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return [{name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(count)]


def _smoothed(model, feeds):
    data = TransformData(lambda: [Batch(feed, 1) for feed in feeds])
    return load(model).with_passes(float_exact_passes(onnxq.QuantConfig(smooth=True), data))


@pytest.mark.parametrize("build", [layernorm_matmuls, decomposed_layernorm_matmuls, attention_value_chain])
def test_smoothing_keeps_the_float_outputs_and_changes_the_weights(build):
    rng = np.random.default_rng(0)
    model = build(rng)
    feeds = _feeds(model, rng, 6)
    smoothed = _smoothed(model, feeds)
    assert any("outlier migration" in note for note in smoothed.notes)
    before, after = initializers(model), initializers(smoothed.cleaned)
    changed = [name for name in before if name in after and not np.array_equal(before[name], after[name])]
    assert len(changed) >= 2, changed  # the producer's constants and every reader's weight
    for feed in _feeds(model, rng, 3):
        for expected, got in zip(run(model, feed), run(smoothed.cleaned, feed)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("build", [lambda rng: layernorm_matmuls(rng, residual=True),
                                   lambda rng: attention_value_chain(rng, bias=True)],
                         ids=["layernorm-output-read-by-a-residual-add", "value-made-through-a-bias-add"])
def test_an_activation_that_cannot_be_divided_for_free_is_not_smoothed(build):
    """A residual Add would change with it; a bias Add's constant is quantized per tensor by the
    int8 graph (QLinearAdd), where per-channel factors would cost its precision."""
    rng = np.random.default_rng(1)
    model = build(rng)
    smoothed = _smoothed(model, _feeds(model, rng, 4))
    before, after = initializers(model), initializers(smoothed.cleaned)
    assert len(after) >= 3
    assert all(np.array_equal(before[name], after[name]) for name in after)


def test_factors_follow_the_smoothquant_formula():
    rng = np.random.default_rng(2)
    model = layernorm_matmuls(rng)
    feeds = _feeds(model, rng, 5)
    smoothed = _smoothed(model, feeds)
    # numpy reference: s_j = max|h_j|^a / max|W_j|^(1-a), max over both readers' rows, for one of the alphas tried
    x = np.concatenate([f["x"].reshape(-1, DIM) for f in feeds]).astype(np.float64)
    weights = initializers(model)
    h = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * weights["gamma"] + weights["beta"]
    w_max = np.maximum(np.abs(weights["w1"]).max(1), np.abs(weights["w2"]).max(1))
    factor = initializers(smoothed.cleaned)["w1"][:, 0] / weights["w1"][:, 0]
    alphas = [a for a in ALPHAS if np.allclose(factor, np.abs(h).max(0) ** a / w_max ** (1 - a), rtol=1e-4)]
    assert len(alphas) == 1, factor
    np.testing.assert_allclose(initializers(smoothed.cleaned)["gamma"], weights["gamma"] / factor, rtol=1e-4)
    np.testing.assert_allclose(initializers(smoothed.cleaned)["w2"], weights["w2"] * factor[:, None], rtol=1e-4)


def _output_sqnr(model, quantized, feeds) -> float:
    return min(sqnr_db(np.concatenate([run(model, f)[i] for f in feeds]),
                       np.concatenate([run(str(quantized), f)[i] for f in feeds])) for i in range(len(model.graph.output)))


def test_smoothing_raises_the_output_sqnr_of_a_layer_with_outlier_channels(tmp_path):
    rng = np.random.default_rng(3)
    model = layernorm_matmuls(rng)
    calibration, held_out = _feeds(model, rng, 32), _feeds(model, rng, 16)
    sqnr = {}
    for smooth in (False, True):
        out = tmp_path / f"smooth-{smooth}.onnx"
        onnxq.convert(model, out, calibration, onnxq.QuantConfig(smooth=smooth), fallback=NO_FALLBACK)
        sqnr[smooth] = _output_sqnr(model, out, held_out)
    assert sqnr[True] > sqnr[False] + 6, sqnr


def test_recover_and_resume_apply_the_recorded_factors(tmp_path):
    rng = np.random.default_rng(4)
    model = attention_value_chain(rng)
    config = onnxq.QuantConfig(smooth=True)
    out, workspace = tmp_path / "model.int8.onnx", tmp_path / "ws"
    onnxq.convert(model, out, _feeds(model, rng, 16), config, fallback=NO_FALLBACK, workspace=workspace)
    recorded = Workspace.open(workspace).latest(SmoothingStep.KIND).read(SmoothingStep)
    assert recorded.factors and all("/" in key for key in recorded.factors)  # by topology key, not by name
    onnxq.recover(model, workspace, tmp_path / "recovered.onnx")
    assert (tmp_path / "recovered.onnx").read_bytes() == out.read_bytes()
    onnxq.convert(model, tmp_path / "resumed.onnx", None, config, fallback=NO_FALLBACK, workspace=workspace, resume=True)
    assert (tmp_path / "resumed.onnx").read_bytes() == out.read_bytes()
