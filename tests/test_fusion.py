"""Fusion coverage: quantized groups ONNX Runtime's CPU provider would not fuse stay float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

import onnxq
from onnxq.tune.fusion import unfused_nodes
from tests.graphs import fused_op_types, make_model
from tests.test_cli_errors import DEMO, ROOT
from tests.test_op_patterns import _w


def _conv_transpose_model():
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("ConvTranspose", ["a", "w2", "b2"], ["y"], strides=[2, 2], name="deconv")]
    inits = [("w1", _w(4, 3, 3, 3)), ("b1", _w(4)), ("w2", _w(4, 2, 2, 2)), ("b2", _w(2))]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", None)], inits)


def _data():
    return {"x": np.random.default_rng(0).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)}


def test_every_quantized_group_of_the_demo_fuses(tmp_path):
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", ROOT / "models" / "calib.npz")
    assert not any("would not fuse" in note for note in result.notes)
    assert unfused_nodes(onnx.load(tmp_path / "m.onnx")) == []
    ops = fused_op_types(str(tmp_path / "m.onnx"))
    assert "Conv" not in ops and "Gemm" not in ops and ops.count("QLinearConv") == 4


def test_an_unfusable_quantized_node_stays_float_and_is_reported(tmp_path):
    result = onnxq.convert(_conv_transpose_model(), tmp_path / "m.onnx", _data())
    assert result.op_counts["ConvTranspose"].float == 1 and result.op_counts["Conv"].quantized == 1
    assert any("would not fuse" in note and "1 ConvTranspose" in note for note in result.notes)
    assert "QLinearConv" in fused_op_types(str(tmp_path / "m.onnx"))


def test_quantize_unfused_quantizes_it_anyway(tmp_path):
    result = onnxq.convert(_conv_transpose_model(), tmp_path / "m.onnx", _data(),
                           onnxq.QuantConfig(quantize_unfused=True))
    assert result.op_counts["ConvTranspose"].quantized == 1
    assert unfused_nodes(onnx.load(tmp_path / "m.onnx")) == ["deconv"]
