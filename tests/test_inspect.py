"""onnxq inspect: precision per node, sizes by dtype, sparsity, unfused groups."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from onnxq.cli.render import inspection_tables
from onnxq.report.inspect import inspect_model
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
    for op, count in result.op_counts.items():  # an absorbed Relu counts as int8 in both
        assert counts[op] == {"int8": count.quantized, "float": count.float}, op
    int8_share = report.bytes_by_dtype["int8"] / sum(report.bytes_by_dtype.values())
    assert int8_share > 0.9  # weights are int8; no float copies left beside them
    # the Q/DQ counts are said as counts, not in the int8 / float columns of the table
    written = onnx.load(tmp_path / "m.onnx")
    count = {op: sum(node.op_type == op for node in written.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    ops = inspection_tables(report)[0]
    cells = [[str(cell) for cell in column.cells] for column in ops.columns]
    row = cells[0].index(f"QuantizeLinear nodes: {count['QuantizeLinear']}, DequantizeLinear nodes: "
                         f"{count['DequantizeLinear']}")
    assert cells[1][row] == cells[2][row] == ""


def test_unfused_groups_are_listed(tmp_path):
    onnxq.convert(_conv_transpose_model(), tmp_path / "m.onnx", _data(), onnxq.QuantConfig(quantize_unfused=True))
    assert inspect_model(tmp_path / "m.onnx").unfused == ("deconv",)


def test_sparsity_and_two_four_pattern():
    dense = np.ones((4, 8), np.float32)
    two_four = np.tile(np.array([1, 0, 2, 0], np.float32), (8, 2)).T  # 2 zeros in every 4 along K (axis 0)
    unstructured = two_four.copy()
    unstructured[:4, 0] = 0  # 4 zeros in one group, 0 in the next: as sparse, but not 2:4
    unstructured[4:8, 0] = 3
    model = make_model(
        [oh.make_node("MatMul", ["x", "dense"], ["h"]), oh.make_node("MatMul", ["h", "sparse"], ["g"]),
         oh.make_node("MatMul", ["g", "unstructured"], ["y"])],
        [("x", [1, 4])], [("y", [1, 8])], [("dense", dense), ("sparse", two_four), ("unstructured", unstructured)],
    )
    weights = {w.name: w for w in inspect_model(model).weights}
    assert weights["dense"].zero_fraction == 0 and not weights["dense"].two_four_sparse
    assert weights["sparse"].zero_fraction == 0.5 and weights["sparse"].two_four_sparse
    assert weights["unstructured"].zero_fraction == 0.5 and not weights["unstructured"].two_four_sparse


def _pruned_two_four(shape, axis, seed=0):
    """Random non-zero values with the 2 smallest |w| of every 4 along ``axis`` set to zero."""
    w = np.random.default_rng(seed).uniform(0.1, 1, shape).astype(np.float32) * np.where(
        np.random.default_rng(seed + 1).random(shape) < 0.5, -1, 1).astype(np.float32)
    moved = np.moveaxis(w, axis, -1).reshape(-1, 4).copy()
    order = np.argsort(np.abs(moved), axis=1)
    np.put_along_axis(moved, order[:, :2], 0, axis=1)
    return np.moveaxis(moved.reshape(np.moveaxis(w, axis, -1).shape), -1, axis)


def _groups_of_four_have_two_zeros(w, axis):  # the reference, in plain numpy
    groups = np.moveaxis(w, axis, -1).reshape(-1, 4)
    return bool(((groups == 0).sum(axis=1) >= 2).all())


WEIGHTED_CASES = {  # op, weight shape, the axis it sums over, attributes
    "Conv": ("Conv", (8, 8, 3, 4), 1, {}),
    "MatMul": ("MatMul", (8, 12), 0, {}),
    "Gemm": ("Gemm", (8, 12), 0, {}),
    "Gemm transB": ("Gemm", (12, 8), 1, {"transB": 1}),
}


def _weighted_model(op, shape, attributes, w):
    if op == "Conv":
        return make_model([oh.make_node("Conv", ["x", "w"], ["y"])], [("x", [None, 8, 5, 6])], [("y", None)], [("w", w)])
    return make_model([oh.make_node(op, ["x", "w"], ["y"], **attributes)], [("x", [None, 8])], [("y", None)], [("w", w)])


@pytest.mark.parametrize("case", WEIGHTED_CASES)
def test_two_four_is_checked_along_the_axis_each_op_sums_over(case, tmp_path):
    op, shape, axis, attributes = WEIGHTED_CASES[case]
    other = 0 if axis == len(shape) - 1 else len(shape) - 1  # the last axis, or the output axis for Gemm transB
    along_sum = _pruned_two_four(shape, axis)
    along_other = _pruned_two_four(shape, other)
    assert _groups_of_four_have_two_zeros(along_sum, axis) and not _groups_of_four_have_two_zeros(along_sum, other)
    assert not _groups_of_four_have_two_zeros(along_other, axis)
    for weight, expected in ((along_sum, True), (along_other, False)):
        model = _weighted_model(op, shape, attributes, weight)
        info = next(w for w in inspect_model(model).weights if w.name == "w")
        assert (info.two_four_sparse, info.two_four_axes) == (expected, (axis,)), case
    # quantized, as QDQ and as QLinear operators: the int8 weight keeps its zeros and its axis
    model = _weighted_model(op, shape, attributes, along_sum)
    data = {"x": np.random.default_rng(3).normal(size=(4, 8, 5, 6) if op == "Conv" else (4, 8)).astype(np.float32)}
    for form in ("qdq", "qoperator"):
        onnxq.convert(model, tmp_path / f"{form}.onnx", data, onnxq.QuantConfig(format=form))
        int8 = [w for w in inspect_model(tmp_path / f"{form}.onnx").weights if w.dtype == "int8"]
        assert len(int8) == 1 and int8[0].two_four_sparse and int8[0].two_four_axes == (axis,), (case, form)


def test_cli_json_and_errors(tmp_path):
    result = run_cli("inspect", DEMO, "--json")
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["op_counts"]["Conv"] == {"int8": 0, "float": 4}
    missing = run_cli("inspect", tmp_path / "none.onnx")
    assert missing.returncode == 2 and missing.stderr.startswith("error: model file not found")


def _sparse_weights() -> dict[str, np.ndarray]:
    """A Conv weight with ~30% exact zeros and a MatMul weight in the 2:4 pattern; every other
    value has magnitude in [0.5, 1], so no value rounds to zero in int8."""
    rng = np.random.default_rng(7)

    def magnitudes(shape):
        return (rng.uniform(0.5, 1.0, shape) * rng.choice([-1, 1], shape)).astype(np.float32)

    conv = magnitudes((8, 4, 3, 3))
    conv[rng.random(conv.shape) < 0.3] = 0
    matmul = magnitudes((8 * 6 * 6, 8))
    matmul[1::2] = 0  # two zeros in every group of four along K (axis 0), the axis MatMul sums over
    return {"conv_w": conv, "conv_b": rng.normal(0, 0.1, 8).astype(np.float32), "fc": matmul}


def test_inspect_float_and_quantized_side_by_side(tmp_path):
    weights = _sparse_weights()
    model = make_model(
        [oh.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"]), oh.make_node("Relu", ["c"], ["r"]),
         oh.make_node("Flatten", ["r"], ["f"]), oh.make_node("MatMul", ["f", "fc"], ["y"])],
        [("x", [1, 4, 8, 8])], [("y", [1, 8])], list(weights.items()),
    )
    float_path, quant_path = tmp_path / "float.onnx", tmp_path / "quant.onnx"
    float_path.write_bytes(model.SerializeToString())
    calibration = {"x": np.random.default_rng(8).normal(size=(8, 1, 4, 8, 8)).astype(np.float32)}
    onnxq.convert(float_path, quant_path, calibration)

    result = run_cli("inspect", float_path, quant_path, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)

    # sizes: every initializer's numpy bytes, per dtype, computed here from each file
    for side, path in (("before", float_path), ("after", quant_path)):
        expected: dict[str, int] = {}
        for init in onnx.load(path).graph.initializer:
            array = onh.to_array(init)
            expected[array.dtype.name] = expected.get(array.dtype.name, 0) + array.nbytes
        assert payload[side]["bytes_by_dtype"] == expected
        assert payload[side]["model_bytes"] == path.stat().st_size
        assert {d: row[side] for d, row in payload["bytes_by_dtype"].items() if row[side]} == expected
    assert payload["before"]["bytes_by_dtype"] == {"float32": sum(w.nbytes for w in weights.values())}
    assert payload["after"]["bytes_by_dtype"]["int8"] >= weights["conv_w"].size + weights["fc"].size

    # sparsity: exact zeros of the weights as built, the same before and after quantization
    matrices = [weights["conv_w"], weights["fc"]]
    zero_share = sum(int((w == 0).sum()) for w in matrices) / sum(w.size for w in matrices)
    for side in ("before", "after"):
        assert payload[side]["weight_zero_fraction"] == pytest.approx(zero_share, abs=1e-12)
        assert sum(w["two_four_sparse"] for w in payload[side]["weights"]) == 1
    assert {w["dtype"] for w in payload["after"]["weights"]} == {"int8"}

    text = run_cli("inspect", float_path, quant_path)
    assert text.returncode == 0 and "before and after" in text.stdout and f"{zero_share:.2%}" in text.stdout


def test_unfused_list_names_only_quantized_nodes_of_the_model(tmp_path):
    """A float HardSwish (which ONNX Runtime splits into an unnamed HardSigmoid and Mul) and a
    float Softmax reading a dequantized tensor are not quantized nodes that failed to fuse."""
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        oh.make_node("HardSwish", ["c1"], ["h"], name="hardswish"),
        oh.make_node("Conv", ["h", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["c2", "c1"], ["a"], name="add"),
        oh.make_node("Softmax", ["a"], ["y"], name="softmax", axis=1),
    ]
    weights = [("w1", rng.normal(size=(4, 3, 3, 3))), ("b1", rng.normal(size=4)), ("w2", rng.normal(size=(4, 4, 3, 3))),
               ("b2", rng.normal(size=4))]
    model = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                       [(name, array.astype(np.float32)) for name, array in weights])
    data = {"x": rng.normal(size=(4, 1, 3, 8, 8)).astype(np.float32)}
    onnxq.convert(model, tmp_path / "q.onnx", data)
    report = inspect_model(tmp_path / "q.onnx")
    precision = {node.name: node.precision for node in report.nodes}
    assert precision["hardswish"] == precision["softmax"] == "float"
    assert all(name and precision[name] == "int8" for name in report.unfused), report.unfused
    printed = run_cli("inspect", tmp_path / "q.onnx")
    assert ": , " not in printed.stdout and "softmax" not in printed.stdout.split("would not fuse")[-1]
