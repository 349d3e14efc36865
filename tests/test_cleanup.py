"""Clean-up before calibration: the cleaned graph computes what the original computes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnxq
from onnxq.analysis.cleanup import clean_up
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


def _conv_affine(scale_shape, offset_shape=None, bias=True):
    """Conv -> Mul(constant, conv) [-> Add(conv, constant)]: a learnable affine block."""
    conv_inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [oh.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=2),
             oh.make_node("Mul", ["scale", "c"], ["m" if offset_shape else "y"])]
    inits = [("w", _f(4, 2, 3, 3)), ("scale", _f(*scale_shape))] + ([("b", _f(4))] if bias else [])
    if offset_shape:
        nodes.append(oh.make_node("Add", ["m", "offset"], ["y"]))
        inits.append(("offset", _f(*offset_shape)))
    return make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def _affine_conv(pads=(0, 0, 0, 0), x_channels=4, scale_shape=(1, 4, 1, 1)):
    """HardSwish's Div, then a learnable affine block, then a grouped Conv: x / 6 * s + b -> Conv."""
    nodes = [oh.make_node("Div", ["x", "six"], ["d"]), oh.make_node("Mul", ["d", "scale"], ["m"]),
             oh.make_node("Sub", ["m", "offset"], ["a"]), oh.make_node("Conv", ["a", "w", "b"], ["y"], pads=list(pads), group=2)]
    inits = [("six", np.array(6, np.float32)), ("scale", _f(*scale_shape)), ("offset", _f(4, 1, 1)),
             ("w", _f(6, 2, 1, 1)), ("b", _f(6))]
    return make_model(nodes, [("x", [1, x_channels, 8, 8])], [("y", [1, 6, None, None])], inits)


def _constant_subgraph():
    nodes = [oh.make_node("Shape", ["k"], ["s"]), oh.make_node("Reshape", ["x", "s"], ["r"]),
             oh.make_node("Relu", ["r"], ["y"])]
    return make_model(nodes, [("x", [2, 6])], [("y", [3, 4])], [("k", np.zeros((3, 4), np.float32))])


def _cleaned(model):
    ir_model = ir.from_proto(onnx.shape_inference.infer_shapes(model))  # as convert prepares it
    notes = clean_up(ir_model)
    return ir.to_proto(ir_model), notes


@pytest.mark.parametrize(
    "build, gone, note",
    [(_conv_bn, "BatchNormalization", "BatchNormalization"),
     (lambda: _conv_add((1, 4, 1, 1)), "Add", "folded into a neighbouring Conv"),
     (lambda: _conv_add((4, 1, 1)), "Add", "folded into a neighbouring Conv"),
     (lambda: _conv_add(()), "Add", "folded into a neighbouring Conv"),
     (lambda: _conv_affine(()), "Mul", "folded into a neighbouring Conv"),
     (lambda: _conv_affine((4, 1, 1), bias=False), "Mul", "folded into a neighbouring Conv"),
     (lambda: _conv_affine((1,), offset_shape=(1,)), "Mul", "folded into a neighbouring Conv"),
     (lambda: _conv_affine((1, 4, 1, 1), offset_shape=(4, 1, 1)), "Add", "folded into a neighbouring Conv"),
     (_affine_conv, "Div", "folded into a neighbouring Conv"),
     (_affine_conv, "Mul", "folded into a neighbouring Conv"),
     (_affine_conv, "Sub", "folded into a neighbouring Conv"),
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


@pytest.mark.parametrize("build, stays", [(lambda: _conv_add((1, 1, 8, 8)), "Add"), (lambda: _conv_add((8,)), "Add"),
                                          (lambda: _conv_affine((1, 4, 8, 1)), "Mul"),
                                          (lambda: _affine_conv(pads=(1, 1, 1, 1)), "Sub"),  # padding would see the offset
                                          (lambda: _affine_conv(x_channels=1), "Mul")])  # the constant widens x
def test_constant_that_is_not_per_channel_stays(build, stays):
    cleaned, _ = _cleaned(build())
    assert stays in Counter(n.op_type for n in cleaned.graph.node)


def test_folded_affine_leaves_one_copy_of_the_weights():
    cleaned, _ = _cleaned(_conv_affine((4, 1, 1), offset_shape=(4, 1, 1)))
    assert [n.op_type for n in cleaned.graph.node] == ["Conv"]
    assert sorted(i.dims[0] for i in cleaned.graph.initializer) == [4, 4]  # weights and bias, nothing left over


def test_folded_batchnorm_quantizes_as_one_fused_conv(tmp_path):
    data = {"x": RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)}
    result = onnxq.convert(_conv_bn(), tmp_path / "m.onnx", data)
    assert "BatchNormalization" not in result.op_counts and result.op_counts["Conv"].quantized == 1
    assert not [n for n in onnx.load(tmp_path / "m.onnx").graph.node if n.op_type == "BatchNormalization"]


def test_each_cleanup_pass_says_whether_it_changed_the_model():
    from onnxq.analysis.cleanup import CLEANUP, FoldAffineIntoConvPass, FoldBatchNormPass

    with_norm = ir.from_proto(onnx.shape_inference.infer_shapes(_conv_bn()))
    without_norm = ir.from_proto(onnx.shape_inference.infer_shapes(_conv_add((8,))))  # an Add that is not per channel
    folded, untouched = FoldBatchNormPass()(with_norm), FoldBatchNormPass()(without_norm)
    assert folded.modified and folded.notes == ["1 BatchNormalization node(s) folded into the layer before"]
    assert not untouched.modified and untouched.notes == []
    assert not FoldAffineIntoConvPass()(without_norm).modified
    assert [type(p).__name__ for p in CLEANUP] == [
        "FoldConstantsPass", "FoldBatchNormPass", "FoldAffineIntoConvPass", "NameNodesApartPass"]
