"""Without a terminal (a CI log), a long run prints a progress line now and then; never with --quiet."""

from __future__ import annotations

import pytest

from onnxq.cli import main, render
from tests.test_cli_errors import DEMO

CALIB = DEMO.parent / "calib.npz"
EVAL = DEMO.parent / "eval.npz"


def _convert(tmp_path, capsys, *extra: str) -> list[str]:
    with pytest.raises(SystemExit) as exited:
        main(["convert", str(DEMO), "-o", str(tmp_path / "out.onnx"), "--calibration-data", str(CALIB),
              "--eval-data", str(EVAL), "--max-drop", "0.001", "--max-trials", "2", *extra])
    assert exited.value.code == 0
    return capsys.readouterr().err.splitlines()


def test_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render, "PROGRESS_LINE_INTERVAL_S", 0.0)  # every update, instead of every 30 s
    assert not render.console.is_terminal
    lines = [line for line in _convert(tmp_path, capsys) if line.startswith("onnxq: ")]
    calibrating = [line for line in lines if line.startswith("onnxq: calibrating ")]
    assert calibrating and calibrating[-1].startswith("onnxq: calibrating 128 samples")
    assert any(line.startswith("onnxq: fallback search ") for line in lines)
    assert any(line.startswith("onnxq: measuring layers (saturation, fusion) 1/1") for line in lines)


def test_no_progress_lines_with_quiet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render, "PROGRESS_LINE_INTERVAL_S", 0.0)
    assert not [line for line in _convert(tmp_path, capsys, "-q") if line.startswith("onnxq: ")]
