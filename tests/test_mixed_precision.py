"""Keep-float rules (by topology, transferable to a renamed re-export), sentinel-dominated ranges
(attention masks), fp16 islands and ``onnxq compare`` on small models built in the tests."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq.load.prepare import load
from onnxq.report.inspect import inspect_model
from onnxq.analysis.rules import parse_rule, resolve_rules
from onnxq.analysis.signatures import node_signatures
from tests.graphs import attention_block, attention_data, make_model, run, sqnr_db

CALIBRATION = attention_data(24)
EVALUATION = attention_data(12, seed=1)


def _outputs(model, data) -> np.ndarray:
    return np.concatenate([run(model, sample)[0] for sample in data])


def _matched(rule: str, model: onnx.ModelProto) -> set[str]:
    prepared = load(model).model
    matched, _ = resolve_rules([rule], prepared.graph, node_signatures(prepared.graph))
    return {node.name for node in matched}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("pattern:attention-softmax", {"attn_softmax", "attn_mask_add", "attn_scale"}),
        ("pattern:mask-add", {"attn_mask_add"}),
        ("pattern:residual-add", {"residual_add"}),
        ("pattern:normalization", {"ln_mean", "ln_sub", "ln_pow", "ln_var", "ln_eps", "ln_sqrt", "ln_div",
                                   "ln_gamma", "ln_beta"}),
        ("first:MatMul", {"attn_q"}),
        ("last:MatMul", {"attn_out"}),
        ("Softmax", {"attn_softmax"}),
        ("op:Div", {"attn_scale", "ln_div"}),
        ("attn_[qk]", {"attn_q", "attn_k"}),
        ("name:ln_*", {"ln_mean", "ln_sub", "ln_pow", "ln_var", "ln_eps", "ln_sqrt", "ln_div", "ln_gamma", "ln_beta"}),
    ],
)
def test_rules_resolve_to_the_intended_nodes(rule, expected):
    assert _matched(rule, attention_block()) == expected


@pytest.mark.parametrize("bad", ["pattern:bogus", "first:NotAnOp", "op:", "file:/no/such/rules.json"])
def test_malformed_rules_are_config_errors(bad):
    with pytest.raises(onnxq.ConfigError):
        parse_rule(bad)


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with every node, internal tensor and initializer renamed (and the node
    list in another valid order), as a different exporter version would write it."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    keep = {v.name for v in (*model.graph.input, *model.graph.output)}
    names = {}
    for node in renamed.graph.node:
        names.update((t, f"t{len(names)}") for t in node.output if t not in keep)
    names.update((init.name, f"w{i}") for i, init in enumerate(renamed.graph.initializer))
    for index, node in enumerate(renamed.graph.node):
        node.name = f"node_{index}"
        node.input[:] = [names.get(t, t) for t in node.input]
        node.output[:] = [names.get(t, t) for t in node.output]
    for init in renamed.graph.initializer:
        init.name = names[init.name]
    nodes = list(renamed.graph.node)  # move the V projection before the K projection
    nodes[1], nodes[2] = nodes[2], nodes[1]
    del renamed.graph.node[:]
    renamed.graph.node.extend(nodes)
    onnx.checker.check_model(renamed, full_check=True)
    return renamed


def _precisions(path) -> list[tuple[str, str]]:
    """(op type, precision) of the model's nodes other than Q/DQ, in order of their outputs' role."""
    report = inspect_model(str(path), fusion=False)
    return sorted((n.op_type, n.precision) for n in report.nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear"))


def _float_weight_matmuls(path) -> int:
    model = onnx.load(path)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    return sum(n.op_type == "MatMul" and n.input[1] in floats for n in model.graph.node)


def test_rules_file_transfers_to_a_renamed_reexport(tmp_path):
    original = attention_block()
    rules = ["last:MatMul", "attn_[qk]", "pattern:normalization"]
    first = onnxq.convert(original, tmp_path / "a.onnx", CALIBRATION, workspace=tmp_path / "wa",
                          fallback=onnxq.FallbackOptions(keep_float=tuple(rules), save_rules=str(tmp_path / "r.json")))
    plain = onnxq.convert(original, tmp_path / "p.onnx", CALIBRATION, workspace=tmp_path / "wp")
    assert _float_weight_matmuls(first.output) == 3 and _float_weight_matmuls(plain.output) == 0
    saved = json.loads((tmp_path / "r.json").read_text())["keep_float"]
    assert {e["name"] for e in saved} >= {"attn_q", "attn_k", "attn_out", "ln_gamma"}

    copy = _renamed(original)
    assert _matched("name:attn_*", copy) == set()  # names are of no help on the re-export
    second = onnxq.convert(copy, tmp_path / "b.onnx", CALIBRATION, workspace=tmp_path / "wb",
                           fallback=onnxq.FallbackOptions(keep_float=(str(tmp_path / "r.json"),)))
    assert not any("match no node" in note for note in second.notes)
    assert _precisions(second.output) == _precisions(first.output) != _precisions(plain.output)
    assert _float_weight_matmuls(second.output) == 3
    np.testing.assert_allclose(_outputs(str(second.output), EVALUATION), _outputs(str(first.output), EVALUATION),
                               atol=1e-5)


@pytest.mark.parametrize(("mask_style", "mask_value"), [
    ("add", float(np.finfo(np.float32).min)), ("add", -1e9), ("add", -10000.0),
    ("where", float(np.finfo(np.float32).min)), ("where", -np.inf),
])
def test_sentinel_mask_is_kept_float_and_the_block_stays_accurate(tmp_path, mask_style, mask_value):
    """Masks found by their values, however they are applied: an additive mask of -1e4, -1e9 or the
    float minimum, or ``Where`` with the float minimum or -inf."""
    model = attention_block(mask_value, mask_style=mask_style)
    # the additive mask really does reach the sentinel value in the calibration data
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name="masked")])
    assert min(run(probe, s)[1].min() for s in CALIBRATION) <= mask_value / 2

    result = onnxq.convert(model, tmp_path / "m.onnx", CALIBRATION, workspace=tmp_path / "ws")
    if mask_style == "add":  # Where's output feeds only float ops (Softmax): no range of it is ever used
        assert any("sentinel values" in note and "masked" in note for note in result.notes)
    quantized = onnx.load(result.output)
    quantize_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantize_inputs & {"masked", "mask_add", "mask_3d"}
    assert result.op_counts["MatMul"].quantized == 6  # all the compute stays int8
    assert sqnr_db(_outputs(model, EVALUATION), _outputs(str(result.output), EVALUATION)) > 25


def test_large_but_dense_activations_are_not_sentinels(tmp_path):
    """Audio-like inputs in +-30000 are data, not masks: they are quantized."""
    rng = np.random.default_rng(0)
    model = make_model(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g")], [("x", [None, 64])], [("y", [None, 8])],
        [("w", rng.normal(0, 0.01, (64, 8)).astype(np.float32)), ("b", np.zeros(8, np.float32))],
    )
    data = {"x": rng.uniform(-30000, 30000, (32, 64)).astype(np.float32)}
    result = onnxq.convert(model, tmp_path / "m.onnx", data, workspace=tmp_path / "ws")
    assert not any("sentinel" in note for note in result.notes)
    assert result.op_counts["Gemm"].quantized == 1


def test_fp16_islands_run_and_match_fp32_islands(tmp_path):
    model = attention_block()
    rules = ("pattern:normalization", "pattern:attention-softmax", "last:MatMul")
    outputs = {}
    for dtype in ("fp32", "fp16"):
        result = onnxq.convert(model, tmp_path / f"{dtype}.onnx", CALIBRATION, workspace=tmp_path / f"ws_{dtype}",
                               fallback=onnxq.FallbackOptions(keep_float=rules, dtype=dtype))
        outputs[dtype] = _outputs(str(result.output), EVALUATION)
    half = onnx.load(tmp_path / "fp16.onnx")
    graph = ir.from_proto(onnx.shape_inference.infer_shapes(half))
    by_name = {node.name: node for node in graph.graph}
    assert by_name["attn_out"].outputs[0].dtype == ir.DataType.FLOAT16
    assert by_name["attn_scale"].outputs[0].dtype == ir.DataType.FLOAT16
    assert by_name["ln_div"].outputs[0].dtype == ir.DataType.FLOAT  # normalizations stay fp32
    assert by_name["attn_mask_add"].outputs[0].dtype == ir.DataType.FLOAT  # the sentinel region stays fp32
    assert [i.type.tensor_type.elem_type for i in half.graph.output] == [onnx.TensorProto.FLOAT]
    assert any(n.op_type == "Cast" for n in half.graph.node)
    reference = _outputs(model, EVALUATION)
    assert np.abs(outputs["fp16"] - outputs["fp32"]).max() < 0.02 * np.abs(reference).max()
    assert sqnr_db(reference, outputs["fp16"]) > 25


def test_compare_locates_tensors_by_topology_and_measures_them(tmp_path):
    model = attention_block()
    result = onnxq.convert(model, tmp_path / "q.onnx", CALIBRATION, workspace=tmp_path / "ws")
    comparison = onnxq.compare(model, result.output, EVALUATION)
    by_tensor = {layer.tensor: layer for layer in comparison.layers}
    assert {"x", "q", "k", "v", "context", "residual"} <= set(by_tensor)
    assert [layer.sqnr_db for layer in comparison.layers] == sorted(layer.sqnr_db for layer in comparison.layers)
    # recompute one tensor's SQNR here: float tensor vs the quantized model's dequantized copy
    quantized = onnx.load(result.output)
    dq = next(n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"
              and any(p.output[0] == n.input[0] and p.input[0] == "context" for p in quantized.graph.node))
    quantized.graph.output.extend([onnx.ValueInfoProto(name=dq)])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name="context")])
    reference = np.concatenate([run(probe, s)[1] for s in EVALUATION])
    values = np.concatenate([run(quantized, s, fused=False)[1] for s in EVALUATION])
    assert by_tensor["context"].sqnr_db == pytest.approx(sqnr_db(reference, values), abs=0.05)
    # the output row matches the numpy SQNR of the whole model
    assert comparison.fidelity.outputs[0].sqnr_db == pytest.approx(
        sqnr_db(_outputs(model, EVALUATION), _outputs(str(result.output), EVALUATION)), abs=0.05)

    # a renamed float model still finds its counterparts (by structure)
    renamed = onnxq.compare(_renamed(model), result.output, EVALUATION)
    assert len(renamed.layers) == len(comparison.layers)
    assert sorted(round(l.sqnr_db, 3) for l in renamed.layers) == sorted(round(l.sqnr_db, 3) for l in comparison.layers)


def test_compare_cli_json_and_errors(tmp_path):
    model = attention_block()
    onnx.save(model, tmp_path / "f.onnx")
    onnxq.convert(model, tmp_path / "q.onnx", CALIBRATION, workspace=tmp_path / "ws")
    np.savez(tmp_path / "eval.npz", x=np.concatenate([s["x"] for s in EVALUATION]),
             attention_mask=np.concatenate([s["attention_mask"] for s in EVALUATION]))
    command = [sys.executable, "-m", "onnxq", "compare", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")]
    done = subprocess.run([*command, "--data", str(tmp_path / "eval.npz"), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["fidelity"]["samples"] == len(EVALUATION) and len(payload["layers"]) >= 6
    missing = subprocess.run([*command, "--data", str(tmp_path / "nope.npz")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--keep-float", "pattern:bogus"], "unknown keep-float pattern"),
        (["--max-drop", "0.01"], "--max-drop needs --eval-data"),
        (["--max-drop", "2", "--eval-data", "EVAL"], "relative drop between 0 and 1"),
        (["--metric", "nonsense", "--max-drop", "0.01", "--eval-data", "EVAL"], "unknown metric"),
    ],
)
def test_fallback_cli_errors(tmp_path, arguments, message):
    model = make_model([onnx.helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    arguments = [str(tmp_path / "d.npz") if a == "EVAL" else a for a in arguments]
    done = subprocess.run(
        [sys.executable, "-m", "onnxq", "convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
         "--calibration-data", str(tmp_path / "d.npz"), *arguments],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
