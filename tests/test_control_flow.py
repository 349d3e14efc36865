"""Compute inside If branches and Loop/Scan bodies: calibrated, quantized, keyed, inspected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxq
from onnxq.calibration.candidates import candidate_tensors
from onnxq.report.inspect import inspect_model
from onnxq.rewrite.plan import plan_quantization
from onnxq.tune.saturation import cpu_saturates
from onnxq.analysis.signatures import node_signatures
from onnxq.analysis.subgraphs import control_flow_notes
from tests.graphs import run, sqnr_db

FLOAT, INT64, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
T, D, H = 6, 8, 16  # iterations, input width, hidden width


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=onh.from_array(array.astype(np.float32), name))


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "control_flow",
        [oh.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [oh.make_tensor_value_info(name, FLOAT, shape) for name, shape in outputs],
        [onh.from_array(np.asarray(array), name) for name, array in initializers],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _rnn_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W": (rng.normal(size=(D, H)) / np.sqrt(D)).astype(np.float32),
        "U": (rng.normal(size=(H, H)) / np.sqrt(H)).astype(np.float32),
        "b": (rng.normal(size=H) * 0.1).astype(np.float32),
    }


def _cell(x_t: str) -> list[onnx.NodeProto]:
    """h_out = Tanh(x_t @ W + h_in @ U + b)."""
    return [
        oh.make_node("MatMul", [x_t, "W"], ["xw"]),
        oh.make_node("MatMul", ["h_in", "U"], ["hu"]),
        oh.make_node("Add", ["xw", "hu"], ["pre"]),
        oh.make_node("Add", ["pre", "b"], ["pre_b"]),
        oh.make_node("Tanh", ["pre_b"], ["h_out"]),
    ]


def rnn_loop(weights_in_body: bool, if_in_body: bool = False) -> onnx.ModelProto:
    """A stateful RNN as a Loop carrying h over the T steps of x [T, 1, D]; the weights are
    main-graph initializers read from the body (outer scope) or Constant nodes in the body.
    ``if_in_body``: the step input goes through an If (scaled by 2 where its sum is positive)."""
    weights = _rnn_weights()
    step = [oh.make_node("Gather", ["x", "i"], ["x_t"], axis=0)]
    x_t = "x_t"
    if if_in_body:
        double = oh.make_graph([oh.make_node("Mul", ["x_t", "two"], ["x_doubled"])], "double", [],
                               [oh.make_tensor_value_info("x_doubled", FLOAT, [1, D])])
        keep = oh.make_graph([oh.make_node("Identity", ["x_t"], ["x_kept"])], "keep", [],
                             [oh.make_tensor_value_info("x_kept", FLOAT, [1, D])])
        step += [
            oh.make_node("ReduceSum", ["x_t"], ["x_sum"], keepdims=0),
            oh.make_node("Greater", ["x_sum", "zero"], ["positive"]),
            oh.make_node("If", ["positive"], ["x_branch"], then_branch=double, else_branch=keep),
        ]
        x_t = "x_branch"
    body_nodes = step + _cell(x_t) + [
        oh.make_node("Identity", ["cond_in"], ["cond_out"]),
        oh.make_node("Identity", ["h_out"], ["h_scan"]),
    ]
    initializers = [("T", np.array(T, np.int64)), ("keep_going", np.array(True))]
    if if_in_body:
        initializers += [("two", np.array(2, np.float32)), ("zero", np.array(0, np.float32))]
    if weights_in_body:
        body_nodes = [_constant(name, array) for name, array in weights.items()] + body_nodes
    else:
        initializers += list(weights.items())
    body = oh.make_graph(
        body_nodes, "step",
        [oh.make_tensor_value_info("i", INT64, []), oh.make_tensor_value_info("cond_in", BOOL, []),
         oh.make_tensor_value_info("h_in", FLOAT, [1, H])],
        [oh.make_tensor_value_info("cond_out", BOOL, []), oh.make_tensor_value_info("h_out", FLOAT, [1, H]),
         oh.make_tensor_value_info("h_scan", FLOAT, [1, H])],
    )
    loop = oh.make_node("Loop", ["T", "keep_going", "h0"], ["h_last", "hs"], body=body)
    return _model([loop], [("x", [T, 1, D]), ("h0", [1, H])], [("h_last", [1, H]), ("hs", [T, 1, H])], initializers)


def rnn_scan(time_axis: int = 0) -> onnx.ModelProto:
    """The same RNN as a Scan over x [T, 1, D] (weights in the main graph); with
    ``time_axis=1`` it scans x [1, T, D] along axis 1 and stacks hs [1, T, H] along axis 1,
    in reverse for the output."""
    body = oh.make_graph(
        _cell("x_t") + [oh.make_node("Identity", ["h_out"], ["h_scan"])], "step",
        [oh.make_tensor_value_info("h_in", FLOAT, [1, H]), oh.make_tensor_value_info("x_t", FLOAT, [1, D])],
        [oh.make_tensor_value_info("h_out", FLOAT, [1, H]), oh.make_tensor_value_info("h_scan", FLOAT, [1, H])],
    )
    axes = {} if time_axis == 0 else {"scan_input_axes": [1], "scan_output_axes": [1], "scan_output_directions": [1]}
    scan = oh.make_node("Scan", ["h0", "x"], ["h_last", "hs"], body=body, num_scan_inputs=1, **axes)
    x_shape, hs_shape = ([T, 1, D], [T, 1, H]) if time_axis == 0 else ([1, T, D], [1, T, H])
    return _model([scan], [("x", x_shape), ("h0", [1, H])], [("h_last", [1, H]), ("hs", hs_shape)],
                  list(_rnn_weights().items()))


def branch_model() -> onnx.ModelProto:
    """y = x @ w1 + b1 when sum(x) > 0 (w1, b1 outer-scope initializers), else x @ w2 (a
    Constant in the branch)."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(2, D, 4)).astype(np.float32)
    then = oh.make_graph([oh.make_node("MatMul", ["x", "w1"], ["t_mm"]), oh.make_node("Add", ["t_mm", "b1"], ["t_y"])],
                         "then", [], [oh.make_tensor_value_info("t_y", FLOAT, [1, 4])])
    other = oh.make_graph([_constant("w2", w2), oh.make_node("MatMul", ["x", "w2"], ["e_y"])],
                          "else", [], [oh.make_tensor_value_info("e_y", FLOAT, [1, 4])])
    nodes = [
        oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["positive"]),
        oh.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other),
    ]
    initializers = [("w1", w1), ("b1", rng.normal(size=4).astype(np.float32)), ("zero", np.array(0, np.float32))]
    return _model(nodes, [("x", [1, D])], [("y", [1, 4])], initializers)


def _sequences(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(count, T, 1, D)).astype(np.float32),
            "h0": (rng.normal(size=(count, 1, H)) * 0.5).astype(np.float32)}


def _numpy_rnn(x: np.ndarray, h0: np.ndarray, weights: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Every body tensor of the RNN over the iterations, computed with numpy."""
    seen: dict[str, list[np.ndarray]] = {"h_in": [], "xw": [], "hu": [], "pre": [], "pre_b": []}
    h = h0
    for step in x:
        seen["h_in"].append(h)
        seen["xw"].append(step @ weights["W"])
        seen["hu"].append(h @ weights["U"])
        seen["pre"].append(seen["xw"][-1] + seen["hu"][-1])
        seen["pre_b"].append(seen["pre"][-1] + weights["b"])
        h = np.tanh(seen["pre_b"][-1])
    return seen


def _body(parent: onnx.ModelProto | onnx.GraphProto, op_type: str, attribute: str = "body") -> onnx.GraphProto:
    """The subgraph ``attribute`` of the first ``op_type`` node of a model or graph."""
    graph = parent.graph if isinstance(parent, onnx.ModelProto) else parent
    node = next(n for n in graph.node if n.op_type == op_type)
    return next(a.g for a in node.attribute if a.name == attribute)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _matmuls_read_dequantized(graph: onnx.GraphProto) -> list[bool]:
    """For each MatMul of ``graph``: whether both its inputs come from a DequantizeLinear of
    that same graph (the pattern runtimes fuse into an integer kernel)."""
    producers = _producers(graph)
    return [
        all(name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input)
        for node in graph.node if node.op_type == "MatMul"
    ]


def _optimized(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """``model`` as ONNX Runtime's CPU provider would run it, after its graph optimizations."""
    path = folder / "optimized.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _float_weights(graph: onnx.GraphProto) -> list[str]:
    return [init.name for init in graph.initializer if init.data_type == FLOAT and len(init.dims) >= 2]


def _sqnr_over(float_model, quantized_model, data: dict[str, np.ndarray]) -> list[float]:
    count = len(next(iter(data.values())))
    outputs = [[run(m, {k: v[i] for k, v in data.items()}) for i in range(count)] for m in (float_model, quantized_model)]
    return [
        sqnr_db(np.stack([o[k] for o in outputs[0]]), np.stack([o[k] for o in outputs[1]]))
        for k in range(len(outputs[0][0]))
    ]


def _convert(model, tmp_path: Path, data, name: str = "out", **config) -> tuple[onnx.ModelProto, onnxq.ConversionResult]:
    output = tmp_path / f"{name}.onnx"
    result = onnxq.convert(model, output, data, onnxq.QuantConfig(**config), workspace=tmp_path / f"{name}.ws")
    return onnx.load(output), result


@pytest.mark.parametrize("weights_in_body", [False, True], ids=["outer-scope-weights", "weights-in-body"])
def test_loop_rnn_body_is_quantized_and_close_to_float(tmp_path, weights_in_body):
    model = rnn_loop(weights_in_body)
    quantized, result = _convert(model, tmp_path, _sequences(24, 0))
    body = _body(quantized, "Loop")
    assert _matmuls_read_dequantized(body) == [True, True]
    assert not _float_weights(body) and not _float_weights(quantized.graph)  # no float W, U left anywhere
    holder = body if weights_in_body else quantized.graph  # int8 weights stay where the float ones were
    assert {init.name for init in holder.initializer if init.data_type == onnx.TensorProto.INT8} >= {"W_quantized", "U_quantized"}
    fused = [n.op_type for n in _body(_optimized(quantized, tmp_path), "Loop").node]
    assert fused.count("QLinearMatMul") == 2 and "MatMul" not in fused  # integer kernels inside the body
    assert result.op_counts["MatMul"].quantized == 2 and result.op_counts["Add"].quantized == 2
    assert any("inside If/Loop/Scan bodies" in note for note in result.notes)
    sqnr = _sqnr_over(model, quantized, _sequences(8, 1))
    assert min(sqnr) > 25, sqnr


@pytest.mark.parametrize("time_axis", [0, 1], ids=["default-axes", "axis-1-reversed-output"])
def test_scan_rnn_body_is_quantized_and_close_to_float(tmp_path, time_axis):
    model = rnn_scan(time_axis)

    def data(count: int, seed: int) -> dict[str, np.ndarray]:
        sequences = _sequences(count, seed)
        if time_axis:
            sequences["x"] = sequences["x"].transpose(0, 2, 1, 3)  # [N, 1, T, D]
        return sequences

    quantized, _ = _convert(model, tmp_path, data(24, 0))
    assert _matmuls_read_dequantized(_body(quantized, "Scan")) == [True, True]
    sqnr = _sqnr_over(model, quantized, data(8, 1))
    assert min(sqnr) > 25, sqnr


def _quantize_params(graph: onnx.GraphProto, tensor: str) -> tuple[float, int]:
    """Scale and zero point of the QuantizeLinear that reads ``tensor`` in ``graph``."""
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    values = {init.name: onh.to_array(init) for init in graph.initializer}
    return float(values[node.input[1]]), int(values[node.input[2]])


@pytest.mark.parametrize("op_type", ["Loop", "Scan"])
def test_body_ranges_are_the_extremes_over_every_iteration(tmp_path, op_type):
    data = _sequences(12, 0)
    quantized, _ = _convert(rnn_loop(False) if op_type == "Loop" else rnn_scan(), tmp_path, data, hold_out=False)
    body = _body(quantized, op_type)
    seen = {name: [] for name in ("h_in", "xw", "hu", "pre", "pre_b")}
    for x, h0 in zip(data["x"], data["h0"]):
        for name, values in _numpy_rnn(x, h0, _rnn_weights()).items():
            seen[name] += values
    for name, values in seen.items():
        low, high = min(0.0, min(v.min() for v in values)), max(0.0, max(v.max() for v in values))
        scale, zero_point = _quantize_params(body, name)
        np.testing.assert_allclose(scale, (high - low) / 255, rtol=1e-5, err_msg=name)
        assert zero_point == round(-low / scale), name


def test_if_branches_are_quantized_and_close_to_float(tmp_path):
    model = branch_model()
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(size=(256, 1, D)).astype(np.float32)}
    assert 64 < (data["x"].sum(axis=(1, 2)) > 0).sum() < 192  # both branches run
    quantized, result = _convert(model, tmp_path, data)
    for branch in ("then_branch", "else_branch"):
        assert _matmuls_read_dequantized(_body(quantized, "If", branch)) == [True]
    assert not _float_weights(_body(quantized, "If", "else_branch")) and not _float_weights(quantized.graph)
    optimized = _optimized(quantized, tmp_path)
    for branch in ("then_branch", "else_branch"):  # integer kernels in both branches
        assert "MatMul" not in [n.op_type for n in _body(optimized, "If", branch).node]
    held_out = {"x": rng.normal(scale=0.8, size=(40, 1, D)).astype(np.float32)}  # inside the calibrated range
    sqnr = _sqnr_over(model, quantized, held_out)
    assert min(sqnr) > 30, sqnr


def test_body_layers_get_7_bit_weights_where_kernels_saturate(tmp_path):
    """Saturation of a body layer cannot be measured (it cannot be run alone): on a CPU whose
    u8 x s8 kernels saturate, body layers get 7-bit weights, and the notes say why."""
    rng = np.random.default_rng(2)
    quantized, result = _convert(branch_model(), tmp_path, {"x": rng.normal(size=(64, 1, D)).astype(np.float32)})
    weights = {init.name: onh.to_array(init) for init in quantized.graph.initializer}  # w1 is outer-scope
    largest = int(np.abs(weights["w1_quantized"].astype(np.int32)).max())
    if cpu_saturates():
        assert largest == 63
        assert any("inside If/Loop/Scan bodies, where saturation cannot be measured" in n for n in result.notes)
    else:
        assert largest == 127


def test_a_branch_never_taken_adds_nothing_to_the_ranges(tmp_path):
    model = branch_model()
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(16, 1, D))).astype(np.float32)  # sum > 0: only the then branch runs
    quantized, _ = _convert(model, tmp_path, {"x": x})
    then = _body(quantized, "If", "then_branch")
    w1 = onh.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    t_mm = x @ w1
    scale, _ = _quantize_params(then, "t_mm")
    np.testing.assert_allclose(scale, (max(t_mm.max(), 0) - min(t_mm.min(), 0)) / 255, rtol=1e-5)
    # never calibrated, so kept float: no DequantizeLinear feeds the else branch's MatMul
    assert _matmuls_read_dequantized(_body(quantized, "If", "else_branch")) == [False]


def test_histogram_method_calibrates_loop_bodies(tmp_path):
    model = rnn_loop(False)
    quantized, _ = _convert(model, tmp_path, _sequences(24, 0), method="percentile")
    assert _matmuls_read_dequantized(_body(quantized, "Loop")) == [True, True]
    assert min(_sqnr_over(model, quantized, _sequences(8, 1))) > 22


def test_if_inside_a_loop_body(tmp_path):
    model = rnn_loop(False, if_in_body=True)
    quantized, result = _convert(model, tmp_path, _sequences(24, 0), name="minmax")
    body = _body(quantized, "Loop")
    then = _body(body, "If", "then_branch")
    producers = _producers(then)
    mul = next(n for n in then.node if n.op_type == "Mul")
    assert producers[mul.input[0]].op_type == "DequantizeLinear"  # nested two levels deep
    assert min(_sqnr_over(model, quantized, _sequences(8, 1))) > 25

    quantized, result = _convert(model, tmp_path, _sequences(24, 0), name="percentile", method="percentile")
    then = _body(_body(quantized, "Loop"), "If", "then_branch")
    assert not any(n.op_type == "DequantizeLinear" for n in then.node)  # kept float ...
    assert any("kept float the then_branch of If" in note and "--method minmax" in note for note in result.notes)  # ... and said so
    assert _matmuls_read_dequantized(_body(quantized, "Loop")) == [True, True]  # the rest of the body is quantized


def test_qoperator_form_inside_bodies(tmp_path):
    model = rnn_loop(True)
    quantized, _ = _convert(model, tmp_path, _sequences(24, 0), format="qoperator")
    ops = [n.op_type for n in _body(quantized, "Loop").node]
    assert ops.count("QLinearMatMul") == 2 and "MatMul" not in ops
    assert min(_sqnr_over(model, quantized, _sequences(8, 1))) > 25


def test_body_node_keys_are_below_their_parent_and_survive_renaming():
    model = rnn_loop(False)
    keys = node_signatures(ir.from_proto(model).graph)
    (loop_key,) = [key for node, key in keys.items() if node.op_type == "Loop"]
    body_keys = sorted(key for node, key in keys.items() if node.op_type != "Loop")
    assert len(body_keys) == 8 and all(key.startswith(f"{loop_key}/body/") for key in body_keys)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    body = _body(renamed, "Loop")
    names = {name: f"renamed_{index}" for index, name in enumerate(
        sorted({n for node in body.node for n in [*node.input, *node.output]} - {"x", "W", "U", "b"}))}
    for node in body.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        node.name = f"step_{node.op_type}_{len(node.output)}"
    for value in [*body.input, *body.output]:
        value.name = names[value.name]
    renamed_keys = sorted(node_signatures(ir.from_proto(renamed).graph).values())
    assert renamed_keys == sorted(keys.values())


def test_resume_and_recover_rebuild_bodies_exactly(tmp_path):
    model = rnn_loop(True)
    data = _sequences(24, 0)
    config, run = onnxq.QuantConfig(), onnxq.RunOptions(checkpoint_interval_s=0.0)
    output = tmp_path / "out.onnx"
    onnxq.convert(model, output, data, config, run=run, workspace=tmp_path / "ws")
    expected = output.read_bytes()
    steps = sorted((tmp_path / "ws" / "steps").iterdir())
    observers = json.loads(next(s for s in steps if "calibration" in s.name).read_text())["payload"]["observers"]
    assert any("/body/" in key for key in observers)  # body tensors keyed below the Loop

    onnxq.recover(model, tmp_path / "ws", tmp_path / "recovered.onnx")
    assert (tmp_path / "recovered.onnx").read_bytes() == expected

    shutil.copytree(tmp_path / "ws", tmp_path / "ws2")
    for step in (tmp_path / "ws2" / "steps").iterdir():
        if int(step.name[:6]) > 5:  # killed after 6 of 24 samples
            step.unlink()
    onnxq.convert(model, tmp_path / "resumed.onnx", data, config, run=run, workspace=tmp_path / "ws2", resume=True)
    assert (tmp_path / "resumed.onnx").read_bytes() == expected


def test_inspect_counts_nodes_inside_bodies(tmp_path):
    model = rnn_loop(False)
    quantized, _ = _convert(model, tmp_path, _sequences(24, 0))
    report = inspect_model(quantized)
    counts = report.op_counts()
    assert counts["MatMul"] == {"int8": 2, "float": 0} and counts["Tanh"] == {"int8": 0, "float": 1}
    body = _body(quantized, "Loop")
    assert report.quantize_nodes == sum(n.op_type == "QuantizeLinear" for n in body.node) > 0
    assert report.bytes_by_dtype["int8"] == D * H + H * H + 2 * H  # W and U, and their per-channel zero points
    assert inspect_model(model).op_counts()["MatMul"] == {"int8": 0, "float": 2}


def test_a_quantized_body_model_is_recognized_as_quantized(tmp_path):
    quantized, _ = _convert(rnn_loop(False), tmp_path, _sequences(24, 0))
    again = onnxq.convert(quantized, tmp_path / "again.onnx", None)
    assert any("already quantized" in note for note in again.notes)


def growing_loop() -> onnx.ModelProto:
    """A Loop whose body squares a prefix of x that grows by one element per iteration."""
    body = oh.make_graph(
        [
            oh.make_node("Add", ["i", "one"], ["length"]),
            oh.make_node("Unsqueeze", ["length", "axis"], ["end"]),
            oh.make_node("Slice", ["x", "start", "end", "axis"], ["prefix"]),
            oh.make_node("Mul", ["prefix", "prefix"], ["squares"]),
            oh.make_node("ReduceSum", ["squares"], ["total"], keepdims=0),
            oh.make_node("Add", ["acc_in", "total"], ["acc_out"]),
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "step",
        [oh.make_tensor_value_info("i", INT64, []), oh.make_tensor_value_info("cond_in", BOOL, []),
         oh.make_tensor_value_info("acc_in", FLOAT, [])],
        [oh.make_tensor_value_info("cond_out", BOOL, []), oh.make_tensor_value_info("acc_out", FLOAT, [])],
    )
    initializers = [("T", np.array(5, np.int64)), ("keep_going", np.array(True)), ("acc0", np.array(0, np.float32)),
                    ("one", np.array(1, np.int64)), ("axis", np.array([0], np.int64)), ("start", np.array([0], np.int64))]
    loop = oh.make_node("Loop", ["T", "keep_going", "acc0"], ["acc"], body=body)
    return _model([loop], [("x", [5])], [("acc", [])], initializers)


def test_body_tensors_whose_size_changes_per_iteration(tmp_path):
    model = growing_loop()
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    quantized, result = _convert(model, tmp_path, {"x": x}, hold_out=False)  # minmax: two scalars per iteration, any size
    scale, _ = _quantize_params(_body(quantized, "Loop"), "prefix")
    np.testing.assert_allclose(scale, (max(x.max(), 0) - min(x.min(), 0)) / 255, rtol=1e-5)
    assert result.op_counts["Mul"].quantized == 1

    with pytest.raises(onnxq.ModelError, match="keep its size across iterations.*--method minmax") as error:
        _convert(model, tmp_path, {"x": x}, name="percentile", method="percentile")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "percentile.onnx").exists()


def test_bodies_of_other_ops_stay_float_with_a_note():
    """A custom-domain op with a graph attribute: onnxq cannot carry its body's tensors out, so
    nothing there is calibrated or quantized, and the notes say so."""
    then = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["nested"])], "then", [],
                         [oh.make_tensor_value_info("nested", FLOAT, [1, 4])])
    other = oh.make_graph([oh.make_node("Identity", ["x"], ["same"])], "else", [],
                          [oh.make_tensor_value_info("same", FLOAT, [1, D])])
    body = oh.make_graph(  # no quantizable node of its own, one inside the If it holds
        [oh.make_node("Identity", ["positive"], ["flag"]),
         oh.make_node("If", ["flag"], ["inner"], then_branch=then, else_branch=other)], "custom_body", [],
        [oh.make_tensor_value_info("inner", FLOAT, [1, 4])])
    node = oh.make_node("RunBody", ["x"], ["y"], domain="example.custom", name="custom", body=body)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", FLOAT, [1, D]),
                                        oh.make_tensor_value_info("positive", BOOL, [])],
                          [oh.make_tensor_value_info("y", FLOAT, [1, 4])],
                          [onh.from_array(np.ones((D, 4), np.float32), "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("example.custom", 1)])
    main = ir.from_proto(model).graph
    assert [v.name for v in candidate_tensors(main, "minmax")] == []
    ranges = {"x": (-1.0, 1.0), "nested": (-4.0, 4.0)}
    assert not list(plan_quantization(main, ranges, onnxq.QuantConfig()).decisions)
    (note,) = control_flow_notes(main, "minmax", set())
    assert "kept float the body of RunBody 'custom' (1 quantizable node(s), nested bodies included)" in note


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_loops_of_zero_iterations_add_nothing_to_the_ranges(tmp_path, method):
    model = rnn_loop(False)
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "T"))
    model.graph.input.append(oh.make_tensor_value_info("T", INT64, []))  # the trip count, per sample
    data = _sequences(6, 0)
    data["T"] = np.array([0, 0, 3, 0, 6, 2], np.int64)  # scalar input: one value per sample
    quantized, result = _convert(model, tmp_path, data, method=method)
    assert result.op_counts["MatMul"].quantized == 2
    pre_b = [v for x, h0, steps in zip(data["x"], data["h0"], data["T"])
             for v in _numpy_rnn(x[:steps], h0, _rnn_weights())["pre_b"]]
    low, high = min(0.0, min(v.min() for v in pre_b)), max(0.0, max(v.max() for v in pre_b))
    scale, _ = _quantize_params(_body(quantized, "Loop"), "pre_b")
    # percentile keeps the 99.99th percentile, within one histogram bin of the extremes here
    np.testing.assert_allclose(scale, (high - low) / 255, rtol=1e-5 if method == "minmax" else 2e-3)


def test_a_weight_shared_by_the_main_graph_and_a_branch_is_stored_once(tmp_path):
    rng = np.random.default_rng(4)
    then = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                         [oh.make_tensor_value_info("t", FLOAT, [1, 4])])
    other = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["e0"]), oh.make_node("Neg", ["e0"], ["e"])], "else", [],
                          [oh.make_tensor_value_info("e", FLOAT, [1, 4])])
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["y0"]),
        oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        oh.make_node("Greater", ["s", "zero"], ["positive"]),
        oh.make_node("If", ["positive"], ["yb"], then_branch=then, else_branch=other),
        oh.make_node("Add", ["y0", "yb"], ["y"]),
    ]
    model = _model(nodes, [("x", [1, D])], [("y", [1, 4])],
                   [("w", rng.normal(size=(D, 4)).astype(np.float32)), ("zero", np.array(0, np.float32))])
    data = {"x": rng.normal(size=(128, 1, D)).astype(np.float32)}
    result = onnxq.convert(model, tmp_path / "out.onnx", data, fallback=onnxq.FallbackOptions(auto=False))
    quantized = onnx.load(result.output)
    assert result.op_counts["MatMul"].quantized == 3
    graphs = [quantized.graph, _body(quantized, "If", "then_branch"), _body(quantized, "If", "else_branch")]
    int8 = [(index, init.name) for index, graph in enumerate(graphs) for init in graph.initializer
            if init.data_type == onnx.TensorProto.INT8]
    assert sorted(int8) == [(0, "w_quantized"), (0, "w_zero_point")]  # one copy, in the main graph where w was
    assert all(_matmuls_read_dequantized(graph) == [True] for graph in graphs)
    held_out = {"x": rng.normal(scale=0.8, size=(32, 1, D)).astype(np.float32)}
    assert min(_sqnr_over(model, quantized, held_out)) > 25


def test_gemm_bias_inside_a_loop_body_becomes_int32(tmp_path):
    weights = _rnn_weights()
    body = oh.make_graph(
        [oh.make_node("Gather", ["x", "i"], ["x_t"], axis=0),
         oh.make_node("Gemm", ["x_t", "W", "b"], ["xw"]),
         oh.make_node("MatMul", ["h_in", "U"], ["hu"]),
         oh.make_node("Add", ["xw", "hu"], ["pre"]),
         oh.make_node("Tanh", ["pre"], ["h_out"]),
         oh.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step",
        [oh.make_tensor_value_info("i", INT64, []), oh.make_tensor_value_info("cond_in", BOOL, []),
         oh.make_tensor_value_info("h_in", FLOAT, [1, H])],
        [oh.make_tensor_value_info("cond_out", BOOL, []), oh.make_tensor_value_info("h_out", FLOAT, [1, H])],
    )
    loop = oh.make_node("Loop", ["T", "keep_going", "h0"], ["h_last"], body=body)
    model = _model([loop], [("x", [T, 1, D]), ("h0", [1, H])], [("h_last", [1, H])],
                   [("T", np.array(T, np.int64)), ("keep_going", np.array(True)), *weights.items()])
    quantized, _ = _convert(model, tmp_path, _sequences(24, 0))
    quantized_body = _body(quantized, "Loop")
    producers = _producers(quantized_body)
    gemm = next(n for n in quantized_body.node if n.op_type == "Gemm")
    bias_dq = producers[gemm.input[2]]
    assert bias_dq.op_type == "DequantizeLinear"
    stored = {i.name: i for graph in (quantized.graph, quantized_body) for i in graph.initializer}
    assert stored[bias_dq.input[0]].data_type == onnx.TensorProto.INT32
    assert min(_sqnr_over(model, quantized, _sequences(8, 1))) > 25


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_a_loop_nested_in_a_loop(tmp_path, method):
    """An outer Loop runs the RNN Loop twice, carrying h: taps pass through two levels of loops."""
    rnn = rnn_loop(False)
    outer_body = oh.make_graph(
        [oh.make_node("Loop", ["T", "keep_going", "g_in"], ["g_out", "hs_inner"], body=_body(rnn, "Loop")),
         oh.make_node("Identity", ["c_in"], ["c_out"])],
        "outer",
        [oh.make_tensor_value_info("j", INT64, []), oh.make_tensor_value_info("c_in", BOOL, []),
         oh.make_tensor_value_info("g_in", FLOAT, [1, H])],
        [oh.make_tensor_value_info("c_out", BOOL, []), oh.make_tensor_value_info("g_out", FLOAT, [1, H])],
    )
    initializers = [(i.name, onh.to_array(i)) for i in rnn.graph.initializer] + [("twice", np.array(2, np.int64))]
    outer = oh.make_node("Loop", ["twice", "keep_going", "h0"], ["h_last"], body=outer_body)
    model = _model([outer], [("x", [T, 1, D]), ("h0", [1, H])], [("h_last", [1, H])], initializers)
    quantized, _ = _convert(model, tmp_path, _sequences(24, 0), method=method)
    assert _matmuls_read_dequantized(_body(_body(quantized, "Loop"), "Loop")) == [True, True]
    assert min(_sqnr_over(model, quantized, _sequences(8, 1))) > 25
