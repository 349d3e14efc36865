"""Clean-up before calibration: the cleaned graph computes what the original computes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnxq
from onnxq.config import FallbackOptions, QuantConfig
from onnxq.analysis.cleanup import clean_up
from onnxq.load.prepare import load
from onnxq.passes import GraphPass, PassResult
from onnxq.report.inspect import inspect_model
from tests.graphs import initializers, make_model, producer, run, sqnr_db

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


def _stored_weight(spelling: str) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """A model whose one weight (over onnxscript's default folding limit of 8192 elements) is
    stored behind ``spelling``; returns it, the weight as the op sees it (computed in numpy)
    and the axis of its output channels."""
    if spelling == "float16-conv-weight-behind-cast":
        stored = RNG.normal(0, 0.3, (64, 32, 3, 3)).astype(np.float16)
        nodes = [oh.make_node("Cast", ["stored"], ["w"], to=onnx.TensorProto.FLOAT),
                 oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
        shapes, weight, axis, extra = ([1, 32, 8, 8], [1, 64, 8, 8]), stored.astype(np.float32), 0, []
    elif spelling == "reshaped-matmul-weight":
        weight = _f(128, 96)
        stored, extra = weight.reshape(-1), [("shape", np.array([128, 96], np.int64))]
        nodes = [oh.make_node("Reshape", ["stored", "shape"], ["w"]), oh.make_node("MatMul", ["x", "w"], ["y"])]
        shapes, axis = ([4, 128], [4, 96]), 1
    elif spelling == "transposed-gemm-weight":
        weight = _f(128, 96)  # (K, N): Gemm without transB, channels on axis 1
        stored, extra = np.ascontiguousarray(weight.T), []
        nodes = [oh.make_node("Transpose", ["stored"], ["w"], perm=[1, 0]), oh.make_node("Gemm", ["x", "w"], ["y"])]
        shapes, axis = ([4, 128], [4, 96]), 1
    else:  # an Unsqueeze after a Squeeze: the same weight, spelled twice
        weight = _f(64, 32, 3, 3)
        stored, extra = weight[None], [("axis0", np.array([0], np.int64))]
        nodes = [oh.make_node("Squeeze", ["stored", "axis0"], ["w"]), oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
        shapes, axis = ([1, 32, 8, 8], [1, 64, 8, 8]), 0
    model = make_model(nodes, [("x", shapes[0])], [("y", shapes[1])], [("stored", stored), *extra])
    return model, weight, axis


@pytest.mark.parametrize("spelling", ["float16-conv-weight-behind-cast", "reshaped-matmul-weight",
                                      "transposed-gemm-weight", "squeezed-conv-weight"])
def test_weight_behind_a_cast_or_reshape_gets_per_channel_int8_and_no_float_copy(tmp_path, spelling):
    model, weight, axis = _stored_weight(spelling)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = {"x": RNG.normal(size=[16, *x_shape[1:]]).astype(np.float32)}
    # 8-bit weights whatever the CPU (on one without VNNI these layers saturate and would get 7 bits,
    # or the safety net would keep them float); the output is checked with exact QDQ arithmetic
    result = onnxq.convert(model, tmp_path / "q.onnx", data, config=QuantConfig(reduce_range="never"),
                           fallback=FallbackOptions(auto=False))
    quantized = onnx.load(tmp_path / "q.onnx")
    op = next(n for n in quantized.graph.node if n.op_type in ("Conv", "MatMul", "Gemm"))
    dequantize = producer(quantized, op.input[1])
    assert dequantize is not None and dequantize.op_type == "DequantizeLinear"
    stored = initializers(quantized)
    q, scale = stored[dequantize.input[0]], stored[dequantize.input[1]]
    assert q.dtype == np.int8 and q.shape == weight.shape and scale.shape == (weight.shape[axis],)  # per channel
    expected_scale = np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1) / 127
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(q, np.round(weight / np.expand_dims(scale, [a for a in range(weight.ndim) if a != axis])))
    assert not [name for name, a in stored.items() if a.dtype.kind == "f" and a.size >= weight.size]  # no float copy
    bias_bytes = 8 * weight.shape[axis]  # bias correction may add an int32 bias and its per-channel scale
    assert (tmp_path / "q.onnx").stat().st_size < 0.3 * weight.size * 4 + bias_bytes
    assert result.op_counts[op.op_type].quantized == 1
    assert inspect_model(tmp_path / "q.onnx", fusion=False).op_counts()[op.op_type] == {"int8": 1, "float": 0}
    feed = {"x": data["x"][: x_shape[0]]}
    assert sqnr_db(run(model, feed)[0], run(quantized, feed, fused=False)[0]) > 30


def test_inspect_counts_an_op_whose_weight_is_float_as_float(tmp_path):
    """A Conv between Q/DQ pairs whose weight is a float16 initializer cast to float at run time
    is not int8, though its activation is."""
    weight = RNG.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float16)
    scale, zero = np.array(0.05, np.float32), np.array(128, np.uint8)
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), oh.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             oh.make_node("Cast", ["w16"], ["w"], to=onnx.TensorProto.FLOAT), oh.make_node("Conv", ["xd", "w"], ["c"], name="conv"),
             oh.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]), oh.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 8, 6, 6])], [("w16", weight), ("s", scale), ("z", zero)])
    assert inspect_model(model, fusion=False).op_counts()["Conv"] == {"int8": 0, "float": 1}


class _DoubleConvWeights(GraphPass):
    """A test pass: every Conv weight times 2 (so its effect on the outputs is known)."""

    def call(self, model):
        for node in model.graph:
            if node.op_type == "Conv":
                weight = node.inputs[1]
                weight.const_value = ir.tensor(weight.const_value.numpy() * 2)
        return PassResult(model, True, ["doubled the Conv weights"])


@pytest.mark.parametrize("external", [False, True])
def test_with_passes_rewrites_a_copy_and_fresh_copies_keep_it(tmp_path, external):
    """``LoadedModel.with_passes``: the passes' graph is what ``fresh`` copies and the float
    session run (also for a model whose weights stay in an external file), the original is untouched."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    model = make_model([oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [("x", [1, 3, 8, 8])],
                       [("y", [1, 4, 8, 8])], [("w", weight)])
    feed = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    (reference,) = run(model, feed)
    source = model
    if external:
        source = tmp_path / "conv.onnx"
        onnx.save_model(model, source, save_as_external_data=True, location="conv.weights", size_threshold=0)
    loaded = load(source)
    doubled = loaded.with_passes((_DoubleConvWeights(),))
    np.testing.assert_allclose(loaded.float_session().run(None, feed)[0], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(doubled.float_session().run(None, feed)[0], 2 * reference, rtol=1e-5, atol=1e-5)
    copy = doubled.fresh()
    conv = next(node for node in copy.graph if node.op_type == "Conv")
    np.testing.assert_array_equal(conv.inputs[1].const_value.numpy(), 2 * weight)
    assert "doubled the Conv weights" in doubled.notes and "doubled the Conv weights" not in loaded.notes
