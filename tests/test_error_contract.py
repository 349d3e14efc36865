"""The error contract: bad input is exit code 2 and one line saying what and how to fix it, never
exit 1, never a traceback, nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

import onnxq
from onnxq import runtime
from onnxq.calibration.images import parse_number
from onnxq.cli import INTERRUPTED
from onnxq.files import write_with_external_data
from onnxq.load.prepare import load
from tests.test_cli_errors import DEMO, assert_clean_failure
from tests.test_cli_errors import onnxq as run_cli

CALIB = DEMO.parent / "calib.npz"
EVAL = DEMO.parent / "eval.npz"

METRICS = {
    "raises": ("def metric(outputs, reference, labels):\n    return 1 / 0\n", ["raised ZeroDivisionError"]),
    "text": ("def metric(outputs, reference, labels):\n    return 'abc'\n", ["returned 'abc'", "finite number"]),
    "nan": ("def metric(outputs, reference, labels):\n    return float('nan')\n", ["returned nan", "finite number"]),
    "array": ("import numpy as np\ndef metric(outputs, reference, labels):\n    return np.ones(3)\n",
              ["finite number"]),
}


@pytest.mark.parametrize("kind", list(METRICS))
def test_a_custom_metric_that_fails_is_a_one_line_error(tmp_path, kind):
    source, words = METRICS[kind]
    (tmp_path / "m.py").write_text(source)
    out = tmp_path / "out.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", CALIB, "--eval-data", EVAL,
                     "--max-drop", "0.01", "--metric", f"{tmp_path / 'm.py'}:metric")
    assert_clean_failure(result, out, "metric", *words)


def test_a_custom_metric_that_raises_is_an_onnxq_error_in_the_api(tmp_path):
    def broken(outputs, reference, labels):
        return 1 / 0

    with pytest.raises(onnxq.ConfigError, match="metric broken raised ZeroDivisionError") as caught:
        onnxq.convert(DEMO, tmp_path / "out.onnx", str(CALIB), eval_data=str(EVAL),
                      fallback=onnxq.FallbackOptions(max_drop=0.01, metric=broken))
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert not (tmp_path / "out.onnx").exists()


def test_a_model_without_inputs_is_refused_in_one_line(tmp_path):
    graph = oh.make_graph([oh.make_node("Relu", ["c"], ["y"])], "g", [], [oh.make_tensor_value_info("y", 1, [2, 2])],
                          [onh.from_array(np.ones((2, 2), np.float32), "c")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "empty.npz")
    out = tmp_path / "out.onnx"
    assert_clean_failure(run_cli("convert", tmp_path / "m.onnx", "-o", out, "--calibration-data", tmp_path / "empty.npz"),
                         out, "no inputs")
    assert_clean_failure(run_cli("compare", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "empty.npz"),
                         out, "no inputs")


@pytest.mark.parametrize("options, words", [
    (["--batch-size", "0"], ["batch size", "at least 1"]),
    (["--max-samples", "0"], ["max samples", "at least 1"]),
])
def test_compare_refuses_sampling_that_measures_nothing(tmp_path, options, words):
    result = run_cli("compare", DEMO, DEMO, "--data", EVAL, *options)
    assert_clean_failure(result, tmp_path / "none", *words)


@pytest.mark.parametrize("make, words", [
    (lambda: onnxq.QuantConfig(batch_size=2.5), ["batch size must be a whole number", "2.5"]),
    (lambda: onnxq.QuantConfig(batch_size=True), ["batch size must be a whole number"]),
    (lambda: onnxq.QuantConfig(per_channel="no"), ["per channel must be true or false"]),
    (lambda: onnxq.RunOptions(memory_budget_mb="1"), ["memory budget mb must be a number"]),
    (lambda: onnxq.RunOptions(memory_budget_mb=float("nan")), ["--memory-budget", "nan"]),
    (lambda: onnxq.RunOptions(checkpoint_interval_s=float("nan")), ["--checkpoint-interval", "nan"]),
    (lambda: onnxq.RunOptions(checkpoint_interval_s=float("inf")), ["--checkpoint-interval", "inf"]),
    (lambda: onnxq.FallbackOptions(keep_float="Softmax"), ["keep float must be a tuple"]),
    (lambda: onnxq.FallbackOptions(metric=5), ["metric must be text or a function"]),
    (lambda: onnxq.QuantConfig(max_shared_range_ratio=float("nan")), ["max shared range ratio"]),
], ids=["float-batch", "bool-batch", "text-bool", "text-number", "nan-budget", "nan-interval", "inf-interval",
        "string-rules", "int-metric", "nan-ratio"])
def test_options_of_the_wrong_type_or_not_a_number_are_config_errors(make, words):
    with pytest.raises(onnxq.ConfigError) as caught:
        make()
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("options, words", [
    (["--checkpoint-interval", "nan"], ["--checkpoint-interval", "nan"]),
    (["--memory-budget", "nan"], ["--memory-budget", "nan"]),
])
def test_nan_run_options_are_refused_on_the_command_line(tmp_path, options, words):
    out = tmp_path / "out.onnx"
    assert_clean_failure(run_cli("convert", DEMO, "-o", out, "--calibration-data", CALIB, *options), out, *words)


@pytest.mark.parametrize("call, error, words", [
    (lambda tmp: onnxq.convert(123, tmp / "o.onnx", str(CALIB)), onnxq.ModelError, ["model must be a path"]),
    (lambda tmp: onnxq.convert(DEMO, tmp / "o.onnx", str(CALIB), config="abc"), onnxq.ConfigError,
     ["config must be a QuantConfig", "str"]),
    (lambda tmp: onnxq.convert(DEMO, tmp / "o.onnx", str(CALIB), run={}), onnxq.ConfigError,
     ["run must be a RunOptions"]),
    (lambda tmp: onnxq.convert(DEMO, tmp / "o.onnx", str(CALIB), fallback=0.1), onnxq.ConfigError,
     ["fallback must be a FallbackOptions"]),
    (lambda tmp: onnxq.convert(DEMO, 5, str(CALIB)), onnxq.OutputError, ["output must be a path"]),
    (lambda tmp: onnxq.convert(DEMO, tmp / "o.onnx", str(CALIB), workspace=3), onnxq.WorkspaceError,
     ["workspace must be a path"]),
    (lambda tmp: onnxq.recover(DEMO, tmp, tmp / "o.onnx", index="2"), onnxq.ConfigError,
     ["index must be a whole number"]),
    (lambda tmp: onnxq.compare(DEMO, 7, str(CALIB)), onnxq.ModelError, ["model must be a path"]),
], ids=["model", "config", "run", "fallback", "output", "workspace", "index", "compare-model"])
def test_api_arguments_of_the_wrong_type_are_onnxq_errors(tmp_path, call, error, words):
    with pytest.raises(error) as caught:
        call(tmp_path)
    for word in words:
        assert word in str(caught.value)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args, words", [
    (["convert"], ["Missing argument 'model'", "onnxq convert --help"]),
    (["convert", "m.onnx", "-o", "o.onnx", "--bogus"], ["No such option: --bogus"]),
    (["convert", "m.onnx", "-o", "o.onnx", "--method", "foo"], ["'foo' is not one of"]),
    (["frobnicate"], ["No such command 'frobnicate'", "onnxq --help"]),
])
def test_usage_errors_are_one_line(tmp_path, args, words):
    assert_clean_failure(run_cli(*args, cwd=tmp_path), tmp_path / "o.onnx", *words)


SLOW_LOADER = """
import time
import numpy as np

def samples():
    for index in range(400):
        time.sleep(0.02)
        yield {"input": np.full((1, 1, 8, 8), index / 400, np.float32)}
"""


def test_ctrl_c_is_one_line_saying_the_run_can_be_resumed(tmp_path):
    (tmp_path / "loader.py").write_text(SLOW_LOADER)
    args = [sys.executable, "-m", "onnxq", "convert", str(DEMO), "-o", str(tmp_path / "out.onnx"),
            "--calibration-data", f"{tmp_path / 'loader.py'}:samples", "--checkpoint-interval", "0", "-q"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    steps = tmp_path / "out.onnx.onnxq" / "steps"
    deadline = time.monotonic() + 120
    while not (steps.is_dir() and len(list(steps.glob("*-calibration.json"))) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [f"error: {INTERRUPTED}"]
    assert not (tmp_path / "out.onnx").exists()
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "onnxq", "compare", str(DEMO), str(DEMO), "--data", str(EVAL)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # importing ONNX and ONNX Runtime, or already running the models
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == [f"error: {INTERRUPTED}"]


def test_messages_name_the_real_problem(tmp_path):
    out = tmp_path / "out.onnx"
    (tmp_path / "model.bin").write_bytes(DEMO.read_bytes())
    (tmp_path / "data.bin").write_bytes(CALIB.read_bytes())
    (tmp_path / "folder").mkdir()
    result = run_cli("convert", tmp_path / "model.bin", "-o", out, "--calibration-data", tmp_path / "data.bin")
    assert_clean_failure(result, out, "data.bin is neither an .npz/.npy file nor a folder", "numpy.savez")
    assert run_cli("convert", tmp_path / "model.bin", "-o", out, "--calibration-data", CALIB, "-q").returncode == 0
    out.unlink()
    result = run_cli("convert", tmp_path / "folder", "-o", out, "--calibration-data", CALIB)
    assert_clean_failure(result, out, "is a folder", ".onnx file")
    result = run_cli("recover", DEMO, tmp_path / "folder", "-o", out)
    assert_clean_failure(result, out, "no workspace at", "--workspace")
    assert "--resume" not in result.stderr


def test_a_write_error_without_an_errno_is_named_not_none(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("write of 65536 bytes failed: no space left")  # as a library re-raises it: no strerror

    monkeypatch.setattr(ir, "save", full_disk)
    with pytest.raises(onnxq.OutputError) as caught:
        write_with_external_data(ir.load(DEMO), tmp_path / "out.onnx", lambda staged: None)
    assert "no space left" in str(caught.value) and "None" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_broken_onnx_runtime_is_named_with_its_repair(tmp_path, command):
    """What removing one of onnxruntime and onnxruntime-gpu leaves: a module without its API."""
    (tmp_path / "left" / "onnxruntime").mkdir(parents=True)
    (tmp_path / "left" / "onnxruntime" / "__init__.py").write_text('"""left behind by an uninstall"""\n')
    out = tmp_path / "out.onnx"
    args = {"convert": ["convert", DEMO, "-o", out, "--calibration-data", CALIB], "inspect": ["inspect", DEMO]}[command]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "left"), *sys.path]))
    result = subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                            env=environment, timeout=300, check=False)
    assert_clean_failure(result, out, "ONNX Runtime is broken", "pip uninstall -y", "pip install onnxruntime")


def test_nhwc_data_for_an_nchw_model_is_told_to_transpose(tmp_path):
    with np.load(CALIB) as data:
        np.savez(tmp_path / "nhwc.npz", input=data["input"][:4].transpose(0, 2, 3, 1))
    out = tmp_path / "out.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", tmp_path / "nhwc.npz")
    assert_clean_failure(result, out, "transpose", "array.transpose(0, 3, 1, 2)")
    with np.load(CALIB) as data:  # the transpose it names fixes the data
        fixed = {"input": np.load(tmp_path / "nhwc.npz")["input"].transpose(0, 3, 1, 2)}
        assert np.array_equal(fixed["input"], data["input"][:4])


def test_pixel_scale_takes_a_fraction():
    assert parse_number("1/255", "--pixel-scale") == 1 / 255
    assert parse_number("0.5", "--pixel-scale") == 0.5
    with pytest.raises(onnxq.ConfigError, match="a number or a fraction"):
        parse_number("1/0", "--pixel-scale")


def test_two_onnx_runtime_distributions_sharing_one_module_are_named_in_a_note(monkeypatch):
    """onnxruntime and onnxruntime-gpu both installed: it works until either is removed."""
    monkeypatch.setattr(runtime, "_runtime_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    runtime.installation_note.cache_clear()
    try:
        notes = load(DEMO).notes
    finally:
        runtime.installation_note.cache_clear()
    assert any("onnxruntime and onnxruntime-gpu are all installed" in note and "pip uninstall -y" in note
               for note in notes), notes
