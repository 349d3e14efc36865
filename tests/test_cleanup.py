"""Clean-up before calibration: the cleaned graph computes what the original computes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnxq
from onnxq.cleanup import clean_up
from tests.graphs import make_model, run

RNG = np.random.default_rng(9)


def _f(*shape):
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def _conv_bn():
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"])]
    inits = [("w", _f(4, 3, 3, 3)), ("b", _f(4)), ("scale", _f(4)), ("shift", _f(4)), ("mean", _f(4)),
             ("var", np.abs(_f(4)) + 0.5)]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def _conv_add(offset_shape):
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"]), oh.make_node("Add", ["c", "offset"], ["y"])]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], [("w", _f(4, 3, 1, 1)), ("offset", _f(*offset_shape))])


def _constant_subgraph():
    nodes = [oh.make_node("Shape", ["k"], ["s"]), oh.make_node("Reshape", ["x", "s"], ["r"]),
             oh.make_node("Relu", ["r"], ["y"])]
    return make_model(nodes, [("x", [2, 6])], [("y", [3, 4])], [("k", np.zeros((3, 4), np.float32))])


def _cleaned(model):
    ir_model = ir.from_proto(model)
    notes = clean_up(ir_model)
    return ir.to_proto(ir_model), notes


@pytest.mark.parametrize(
    "build, gone, note",
    [(_conv_bn, "BatchNormalization", "BatchNormalization"),
     (lambda: _conv_add((1, 4, 1, 1)), "Add", "Conv bias"),
     (lambda: _conv_add((4, 1, 1)), "Add", "Conv bias"),
     (_constant_subgraph, "Shape", "constant")],
)
def test_clean_up_removes_the_node_and_keeps_the_outputs(build, gone, note):
    model = build()
    cleaned, notes = _cleaned(model)
    assert gone not in Counter(n.op_type for n in cleaned.graph.node)
    assert any(note in n for n in notes)
    x = RNG.normal(size=[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    np.testing.assert_allclose(run(cleaned, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert [o.name for o in cleaned.graph.output] == [o.name for o in model.graph.output]


def test_add_that_is_not_per_channel_stays():
    cleaned, _ = _cleaned(_conv_add((1, 1, 8, 8)))
    assert "Add" in Counter(n.op_type for n in cleaned.graph.node)


def test_folded_batchnorm_quantizes_as_one_fused_conv(tmp_path):
    data = {"x": RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)}
    result = onnxq.convert(_conv_bn(), tmp_path / "m.onnx", data)
    assert "BatchNormalization" not in result.op_counts and result.op_counts["Conv"].quantized == 1
    assert not [n for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type == "BatchNormalization"]
