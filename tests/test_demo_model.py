"""End to end on the shipped demo model: accuracy, size, structure, CLI and API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from tests.graphs import initializers, run
from tests.test_cli_errors import DEMO, ROOT, onnxq as run_cli

CALIB = ROOT / "models" / "calib.npz"
EVAL = ROOT / "models" / "eval.npz"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "digits.int8.onnx"
    result = onnxq.convert(DEMO, out, CALIB, eval_data=EVAL)
    return result, out


def _top1(model, images, labels):
    logits = run(model, {"input": images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def test_int8_top1_is_within_one_point_of_float(converted):
    _, out = converted
    with np.load(EVAL) as data:
        images, labels = data["input"], data["label"]
    float_top1 = _top1(str(DEMO), images, labels)
    int8_top1 = _top1(str(out), images, labels)
    assert float_top1 > 0.95
    assert int8_top1 >= float_top1 - 0.01


def test_reported_fidelity_matches_an_independent_run(converted):
    result, out = converted
    with np.load(EVAL) as data:
        images, labels = data["input"], data["label"]
    assert result.fidelity.samples == len(labels)
    assert result.fidelity.float_top1 == pytest.approx(_top1(str(DEMO), images, labels))
    assert result.fidelity.quantized_top1 == pytest.approx(_top1(str(out), images, labels))


def test_every_compute_op_of_the_demo_is_quantized(converted):
    result, _ = converted
    for op in ("Conv", "Gemm", "Add", "Concat", "MaxPool", "Relu", "Flatten"):
        assert result.op_counts[op].float == 0 and result.op_counts[op].quantized > 0


def test_output_is_about_a_quarter_of_the_float_size_with_no_float_weight_copies(converted):
    result, out = converted
    assert result.quantized_bytes == out.stat().st_size
    assert result.size_ratio < 0.32
    float_weights = initializers(onnx.load(DEMO))
    stored = initializers(onnx.load(out))
    for name, array in stored.items():
        if array.dtype == np.float32:
            assert array.size < 100, f"large float initializer {name} left in the int8 model"
    assert not set(float_weights) & {n for n, a in stored.items() if a.dtype == np.float32}


def test_output_keeps_the_float_interface_and_opsets(converted):
    _, out = converted
    original, quantized = onnx.load(DEMO), onnx.load(out)
    assert quantized.graph.input == original.graph.input
    assert quantized.graph.output == original.graph.output
    opsets = lambda model: {o.domain: o.version for o in model.opset_import}  # noqa: E731
    assert opsets(quantized) == opsets(original)
    onnx.checker.check_model(quantized, full_check=True)


def test_api_accepts_a_model_proto_and_an_iterable_of_dicts(tmp_path):
    with np.load(CALIB) as data:
        chunks = [{"input": data["input"][:64]}, {"input": data["input"][64:]}]
    result = onnxq.convert(onnx.load(DEMO), tmp_path / "m.onnx", iter(chunks), onnxq.QuantConfig(batch_size=16))
    assert result.calibration_samples == 128 - 16  # the 8th batch of 16 is held out (read once, from an iterator)
    assert result.accuracy.measured_on == "16 held-out calibration samples"
    assert (tmp_path / "m.onnx").is_file()


def test_cli_converts_prints_a_summary_and_json(tmp_path):
    out = tmp_path / "digits.int8.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", CALIB, "--eval-data", EVAL, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["output"] == str(out) and payload["quantized_bytes"] == out.stat().st_size
    assert payload["op_counts"]["Conv"] == {"quantized": 4, "float": 0}
    assert payload["fidelity"]["quantized_top1"] > 0.95


def test_cli_table_shows_accuracy_and_size(tmp_path):
    result = run_cli("convert", DEMO, "-o", tmp_path / "m.onnx", "--calibration-data", CALIB, "--eval-data", EVAL)
    assert result.returncode == 0, result.stderr
    assert "top-1 accuracy" in result.stdout and "size" in result.stdout and "Conv" in result.stdout


def test_quiet_cli_prints_nothing(tmp_path):
    # --no-latency: a warning that int8 runs slower than float here is said even with --quiet,
    # and whether the demo model's int8 form is slower depends on the machine
    result = run_cli("convert", DEMO, "-o", tmp_path / "m.onnx", "--calibration-data", CALIB, "--quiet", "--no-latency")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
