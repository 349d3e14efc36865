"""onnxq inspect: precision per node, sizes by dtype, sparsity, unfused groups."""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh

import onnxq
from onnxq.inspect import inspect_model
from tests.graphs import make_model
from tests.test_cli_errors import DEMO, ROOT, onnxq as run_cli
from tests.test_fusion import _conv_transpose_model, _data


def test_float_model_is_all_float_and_all_float32():
    report = inspect_model(DEMO)
    assert all(node.precision == "float" for node in report.nodes)
    assert set(report.bytes_by_dtype) == {"float32", "int64"} or set(report.bytes_by_dtype) == {"float32"}
    assert report.quantize_nodes == report.dequantize_nodes == 0 and report.unfused == ()


def test_quantized_demo_counts_and_sizes(tmp_path):
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", ROOT / "models" / "calib.npz")
    report = inspect_model(tmp_path / "m.onnx")
    counts = report.op_counts()
    for op, count in result.op_counts.items():
        if op != "Relu":  # absorbed into the output range: it stays in the graph as a float node
            assert counts[op] == {"int8": count.quantized, "float": count.float}, op
    int8_share = report.bytes_by_dtype["int8"] / sum(report.bytes_by_dtype.values())
    assert int8_share > 0.9  # weights are int8; no float copies left beside them


def test_unfused_groups_are_listed(tmp_path):
    onnxq.convert(_conv_transpose_model(), tmp_path / "m.onnx", _data(), onnxq.QuantConfig(quantize_unfused=True))
    assert inspect_model(tmp_path / "m.onnx").unfused == ("deconv",)


def test_sparsity_and_two_four_pattern():
    dense = np.ones((4, 8), np.float32)
    two_four = np.tile(np.array([1, 0, 2, 0], np.float32), (8, 2))  # 2 zeros in every 4
    unstructured = two_four.copy()
    unstructured[0, :4] = 0  # 4 zeros in one group, 0 in the next: as sparse, but not 2:4
    unstructured[0, 4:8] = 3
    model = make_model(
        [oh.make_node("MatMul", ["x", "dense"], ["h"]), oh.make_node("MatMul", ["h", "sparse"], ["g"]),
         oh.make_node("MatMul", ["g", "unstructured"], ["y"])],
        [("x", [1, 4])], [("y", [1, 8])], [("dense", dense), ("sparse", two_four), ("unstructured", unstructured)],
    )
    weights = {w.name: w for w in inspect_model(model).weights}
    assert weights["dense"].zero_fraction == 0 and not weights["dense"].two_four_sparse
    assert weights["sparse"].zero_fraction == 0.5 and weights["sparse"].two_four_sparse
    assert weights["unstructured"].zero_fraction == 0.5 and not weights["unstructured"].two_four_sparse


def test_cli_json_and_errors(tmp_path):
    result = run_cli("inspect", DEMO, "--json")
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["op_counts"]["Conv"] == {"int8": 0, "float": 4}
    missing = run_cli("inspect", tmp_path / "none.onnx")
    assert missing.returncode == 2 and missing.stderr.startswith("error: model file not found")
