"""Nothing silently wrong: a broken model is never reported as perfect, a resume never continues
onto other data, and data that cannot give a meaningful answer is refused or named."""

from __future__ import annotations

import shutil

import numpy as np
import onnx.helper as oh
import pytest

import onnxq
from onnxq.report.evaluate import ErrorAccumulator
from onnxq.tune.metrics import cosine_score, cosine_similarity
from tests.graphs import make_model
from tests.test_cli_errors import DEMO, onnxq as run_cli
from tests.test_data_safety import assert_one_line_error

CALIB = DEMO.parent / "calib.npz"
RUN = onnxq.RunOptions(checkpoint_interval_s=0.0)


def numpy_cosine(f: np.ndarray, q: np.ndarray) -> float:
    return float(f @ q / (np.linalg.norm(f) * np.linalg.norm(q)))


@pytest.mark.parametrize("float_zero, quant_zero, expected", [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)])
def test_cosine_of_an_all_zero_output_is_one_only_when_both_are_zero(float_zero, quant_zero, expected):
    rng = np.random.default_rng(0)
    f = np.zeros((3, 5)) if float_zero else rng.normal(size=(3, 5))
    q = np.zeros((3, 5)) if quant_zero else rng.normal(size=(3, 5))
    accumulator = ErrorAccumulator()
    accumulator.update(f, q)
    assert accumulator.result("y").cosine == expected
    assert cosine_score({"y": q}, {"y": f}) == expected


def test_cosine_of_nonzero_outputs_is_numpys():
    rng = np.random.default_rng(1)
    f, q = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    accumulator = ErrorAccumulator()
    accumulator.update(f, q)
    assert accumulator.result("y").cosine == pytest.approx(numpy_cosine(f.ravel(), q.ravel()), rel=1e-12)
    per_sample = np.mean([numpy_cosine(a, b) for a, b in zip(f, q)])
    assert cosine_score({"y": q}, {"y": f}) == pytest.approx(per_sample, rel=1e-12)
    assert float(cosine_similarity(0.0, 4.0, 9.0)) == 0.0  # orthogonal, not degenerate


def test_compare_reports_a_model_whose_output_is_all_zero_as_unrelated(tmp_path):
    x, y = ("x", [None, 4]), ("y", [None, 4])
    good = make_model([oh.make_node("Relu", ["x"], ["y"])], [x], [y])
    broken = make_model([oh.make_node("Mul", ["x", "zero"], ["y"])], [x], [y],
                        initializers=[("zero", np.zeros(4, np.float32))])
    data = {"x": np.random.default_rng(2).uniform(0.5, 1, size=(6, 4)).astype(np.float32)}
    result = onnxq.compare(good, broken, data)
    assert result.fidelity.outputs[0].cosine == 0.0
    assert result.fidelity.outputs[0].sqnr_db == pytest.approx(0.0)  # noise power equals signal power


def _resume_data(tmp_path, kind: str) -> dict:
    """Calibration data for a resume: the original, or one with the same first sample."""
    with np.load(CALIB) as original:
        inputs = original["input"].copy()
    if kind == "other-rest":
        inputs[1:] = np.random.default_rng(5).uniform(0, 1, size=inputs[1:].shape)
    return {"input": inputs}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run with a checkpoint after every sample, and its output."""
    folder = tmp_path_factory.mktemp("checkpointed")
    onnxq.convert(DEMO, folder / "ref.onnx", str(CALIB), run=RUN, workspace=folder / "ws")
    return folder


@pytest.mark.parametrize("cut", [40, None], ids=["mid-calibration", "calibration-done"])
def test_resume_on_data_that_differs_after_the_first_batch_is_refused(checkpointed, tmp_path, cut):
    workspace = tmp_path / "ws"
    shutil.copytree(checkpointed / "ws", workspace)
    for file in (workspace / "steps").iterdir():
        if cut is not None and int(file.name[:6]) > cut:
            file.unlink()
    with pytest.raises(onnxq.CalibrationDataError, match="other batches|differs from the data"):
        onnxq.convert(DEMO, tmp_path / "out.onnx", _resume_data(tmp_path, "other-rest"), run=RUN,
                      workspace=workspace, resume=True)
    assert not (tmp_path / "out.onnx").exists()
    onnxq.convert(DEMO, tmp_path / "out.onnx", _resume_data(tmp_path, "same"), run=RUN, workspace=workspace,
                  resume=True)
    assert (tmp_path / "out.onnx").read_bytes() == (checkpointed / "ref.onnx").read_bytes()


def test_resume_on_other_data_is_a_one_line_cli_error(checkpointed, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(checkpointed / "ws", workspace)
    for file in (workspace / "steps").iterdir():
        if int(file.name[:6]) > 40:
            file.unlink()
    np.savez(tmp_path / "other.npz", **_resume_data(tmp_path, "other-rest"))
    result = run_cli("convert", DEMO, "-o", tmp_path / "out.onnx", "--calibration-data", tmp_path / "other.npz",
                     "--workspace", workspace, "--resume")
    assert_one_line_error(result, "--calibration-data")
    assert not (tmp_path / "out.onnx").exists()


def test_calibrating_on_constant_data_is_named_in_the_notes(tmp_path):
    zeros = {"input": np.zeros((8, 1, 8, 8), np.float32)}
    result = onnxq.convert(DEMO, tmp_path / "out.onnx", zeros)
    assert any("['input'] hold a single value" in note for note in result.notes), result.notes
    real = onnxq.convert(DEMO, tmp_path / "real.onnx", str(CALIB))
    assert not any("single value" in note for note in real.notes)
