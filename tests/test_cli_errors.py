"""Bad input: one line on stderr saying what is wrong and how to fix it, exit code 2, no output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx.helper as oh
import pytest

from tests.graphs import make_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "digits_cnn.onnx"


def onnxq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_clean_failure(result: subprocess.CompletedProcess, output: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")], "temp file left behind"


@pytest.fixture
def demo_input(tmp_path) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32)


def _save(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_missing_model_file(tmp_path, demo_input):
    out = tmp_path / "out.onnx"
    result = onnxq("convert", tmp_path / "nope.onnx", "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert_clean_failure(result, out, "not found", "nope.onnx")


def test_file_that_is_not_onnx(tmp_path, demo_input):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    out = tmp_path / "out.onnx"
    result = onnxq("convert", bogus, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert_clean_failure(result, out, "not a readable ONNX model")


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"image": np.zeros((4, 1, 8, 8), np.float32)}, ["'image' is not an input", "input"]),
        ({"input": np.zeros((4, 8, 8), np.float32)}, ["rank 3", "rank 4"]),
        ({"input": np.zeros((4, 1, 8, 8), np.float64)}, ["float64", "astype"]),
        ({"input": np.zeros((4, 1, 9, 8), np.float32)}, ["per-sample shape", "[?, 1, 8, 8]"]),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, ["no samples"]),
    ],
    ids=["wrong-name", "wrong-rank", "wrong-dtype", "wrong-fixed-dim", "empty"],
)
def test_calibration_data_that_does_not_match_the_model(tmp_path, arrays, words):
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", **arrays))
    assert_clean_failure(result, out, *words)


def test_nan_in_calibration_data_names_input_and_sample(tmp_path, demo_input):
    demo_input[2, 0, 3, 3] = np.nan
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert_clean_failure(result, out, "'input'", "sample 2", "NaN")


def test_inf_in_a_later_file_of_a_folder_is_caught_before_output(tmp_path, demo_input):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", input=demo_input)
    bad = demo_input.copy()
    bad[1, 0, 0, 0] = np.inf
    np.savez(folder / "b.npz", input=bad)
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", folder)
    assert_clean_failure(result, out, "b.npz", "sample 1", "Inf")


def test_missing_calibration_data(tmp_path):
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", tmp_path / "missing.npz")
    assert_clean_failure(result, out, "not found")


def test_output_folder_that_does_not_exist(tmp_path, demo_input):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not out.parent.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(tmp_path, demo_input):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    out = folder / "out.onnx"
    try:
        result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
        assert_clean_failure(result, out, "not writable")
    finally:
        folder.chmod(0o700)


def test_output_path_that_is_a_folder(tmp_path, demo_input):
    result = onnxq("convert", DEMO, "-o", tmp_path, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert result.returncode == 2 and "is a folder" in result.stderr


def test_bad_option_value_is_a_usage_error(tmp_path, demo_input):
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input),
                   "--activations", "int4")
    assert result.returncode == 2 and not out.exists()


def test_model_without_nodes(tmp_path, demo_input):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(oh.make_model(oh.make_graph([], "g", [], [])).SerializeToString())
    out = tmp_path / "out.onnx"
    result = onnxq("convert", empty, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert_clean_failure(result, out, "no graph nodes")


def test_loader_that_raises(tmp_path):
    loader = tmp_path / "loader.py"
    loader.write_text("def samples():\n    raise RuntimeError('dataset offline')\n")
    out = tmp_path / "out.onnx"
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", f"{loader}:samples")
    assert_clean_failure(result, out, "dataset offline")


def test_existing_output_is_left_untouched_on_failure(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=np.zeros((0, 1, 8, 8), np.float32)))
    assert result.returncode == 2
    assert out.read_bytes() == b"previous result"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no file can be created")
def test_write_that_fails_at_the_end_is_a_clean_error(tmp_path, demo_input):
    out = Path("/proc/onnxq-out.onnx")
    result = onnxq("convert", DEMO, "-o", out, "--calibration-data", _save(tmp_path, "c.npz", input=demo_input))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "onnxq-out.onnx" in result.stderr
