"""Normalizations found by what the graph computes, whatever ops spell them (one op, torch-style
ReduceMean chains, jax2tf-style ReduceSum x 1/n with Reciprocal(Sqrt), RMS norm, L2 norm), and
attention masks found by their values (Add -1e4, Where with the float minimum, -inf); each
converted model checked against ONNX Runtime on the float model."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest

import onnxq
from onnxq.analysis.rules import PATTERNS
from onnxq.load.prepare import load
from tests.graphs import make_model, run, sqnr_db

TOKENS, DIM = 8, 16
N = oh.make_node


def _block(norm_nodes: list, extra_initializers=()) -> object:
    """``x -> MatMul + 40 (rows far from zero) -> [normalization: h -> normalized] -> MatMul -> y``."""
    rng = np.random.default_rng(0)
    nodes = [
        N("MatMul", ["x", "w_in"], ["h0"], name="proj_in"),
        N("Add", ["h0", "offset"], ["h"], name="offset_add"),
        *norm_nodes,
        N("MatMul", ["normalized", "w_out"], ["y"], name="proj_out"),
    ]
    initializers = [
        ("w_in", rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32)),
        ("offset", np.full(DIM, 40.0, np.float32)),
        ("w_out", rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32)),
        ("gamma", rng.uniform(0.5, 1.5, DIM).astype(np.float32)),
        ("beta", rng.normal(0, 0.1, DIM).astype(np.float32)),
        ("eps", np.array(1e-5, np.float32)),
        ("two", np.array(2.0, np.float32)),
        ("inv_n", np.array(1.0 / DIM, np.float32)),
        *extra_initializers,
    ]
    return make_model(nodes, [("x", [1, TOKENS, DIM])], [("y", [1, TOKENS, DIM])], initializers)


SPELLINGS = {
    "one op": ([N("LayerNormalization", ["h", "gamma", "beta"], ["normalized"], axis=-1, name="ln")], {"ln"}),
    "ReduceMean chain": ([
        N("ReduceMean", ["h"], ["mean"], axes=[-1], name="mean"),
        N("Sub", ["h", "mean"], ["centered"], name="center"),
        N("Pow", ["centered", "two"], ["squared"], name="square"),
        N("ReduceMean", ["squared"], ["variance"], axes=[-1], name="variance"),
        N("Add", ["variance", "eps"], ["variance_eps"], name="add_eps"),
        N("Sqrt", ["variance_eps"], ["std"], name="sqrt"),
        N("Div", ["centered", "std"], ["unit"], name="divide"),
        N("Mul", ["unit", "gamma"], ["scaled"], name="scale"),
        N("Add", ["scaled", "beta"], ["normalized"], name="shift"),
    ], {"mean", "center", "square", "variance", "add_eps", "sqrt", "divide", "scale", "shift"}),
    "jax2tf ReduceSum x 1/n, Reciprocal": ([
        N("ReduceSum", ["h", "axes"], ["total"], name="sum"),
        N("Mul", ["total", "inv_n"], ["mean"], name="mean_mul"),
        N("Sub", ["h", "mean"], ["centered"], name="center"),
        N("Mul", ["centered", "centered"], ["squared"], name="square_mul"),
        N("ReduceSum", ["squared", "axes"], ["squared_total"], name="sum_squares"),
        N("Mul", ["squared_total", "inv_n"], ["variance"], name="variance_mul"),
        N("Add", ["variance", "eps"], ["variance_eps"], name="add_eps"),
        N("Sqrt", ["variance_eps"], ["std"], name="sqrt"),
        N("Reciprocal", ["std"], ["inv_std"], name="reciprocal"),
        N("Mul", ["centered", "inv_std"], ["unit"], name="normalize_mul"),
        N("Mul", ["unit", "gamma"], ["scaled"], name="scale"),
        N("Add", ["scaled", "beta"], ["normalized"], name="shift"),
    ], {"sum", "mean_mul", "center", "square_mul", "sum_squares", "variance_mul", "add_eps", "sqrt", "reciprocal",
        "normalize_mul", "scale", "shift"}),
    "RMS norm": ([
        N("Pow", ["h", "two"], ["squared"], name="square"),
        N("ReduceMean", ["squared"], ["mean_square"], axes=[-1], name="mean_square"),
        N("Add", ["mean_square", "eps"], ["mean_square_eps"], name="add_eps"),
        N("Sqrt", ["mean_square_eps"], ["rms"], name="sqrt"),
        N("Reciprocal", ["rms"], ["inv_rms"], name="reciprocal"),
        N("Mul", ["h", "inv_rms"], ["unit"], name="normalize_mul"),
        N("Mul", ["unit", "gamma"], ["normalized"], name="scale"),
    ], {"square", "mean_square", "add_eps", "sqrt", "reciprocal", "normalize_mul", "scale"}),
    "L2 norm": ([
        N("ReduceL2", ["h"], ["norm"], axes=[-1], name="l2"),
        N("Max", ["norm", "eps"], ["safe_norm"], name="clamp"),
        N("Div", ["h", "safe_norm"], ["normalized"], name="divide"),
    ], {"l2", "clamp", "divide"}),
}


def _model(spelling: str):
    nodes, _ = SPELLINGS[spelling]
    extra = [("axes", np.array([-1], np.int64))] if "jax2tf" in spelling else []
    return _block(nodes, extra)


def _data(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (samples, TOKENS, DIM)).astype(np.float32)}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_spelling_of_a_normalization_is_found_by_dataflow(spelling):
    graph = load(_model(spelling)).model.graph
    found = {node.name for node in PATTERNS["normalization"](graph)}
    assert found == SPELLINGS[spelling][1]


def test_a_statistic_that_only_feeds_other_layers_is_not_a_normalization():
    """Squeeze-and-excitation: a mean that goes through a MatMul before it scales its data."""
    rng = np.random.default_rng(1)
    nodes = [
        N("ReduceMean", ["x"], ["pooled"], axes=[1], name="pool"),
        N("MatMul", ["pooled", "w"], ["gate_logits"], name="excite"),
        N("Sigmoid", ["gate_logits"], ["gate"], name="gate"),
        N("Mul", ["x", "gate"], ["y"], name="reweight"),
    ]
    model = make_model(nodes, [("x", [1, TOKENS, DIM])], [("y", [1, TOKENS, DIM])],
                       [("w", rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32))])
    assert PATTERNS["normalization"](load(model).model.graph) == {}


@pytest.mark.parametrize("spelling", [s for s in SPELLINGS if s != "one op"])
def test_spelled_out_normalizations_stay_float_and_the_block_stays_accurate(tmp_path, spelling):
    model = _model(spelling)
    np.savez(tmp_path / "calibration.npz", **_data(32, seed=2))
    result = onnxq.convert(model, tmp_path / "out.onnx", str(tmp_path / "calibration.npz"),
                           fallback=onnxq.FallbackOptions(auto=False))  # the rule alone, not the safety net
    counts = result.op_counts
    assert counts["MatMul"].quantized == 2 and counts["Add"].quantized == 1  # the offset Add; no statistic
    assert "Mul" not in counts or counts["Mul"].quantized == 0
    held_out = _data(8, seed=3)["x"]
    reference = np.concatenate([run(model, {"x": x[None]})[0] for x in held_out])
    quantized = np.concatenate([run(str(result.output), {"x": x[None]})[0] for x in held_out])
    assert sqnr_db(reference, quantized) >= 25
