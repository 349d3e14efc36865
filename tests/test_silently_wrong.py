"""Nothing silently wrong: a broken model is never reported as perfect, a resume never continues
onto other data, and data that cannot give a meaningful answer is refused or named."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from onnxq.report.evaluate import ErrorAccumulator
from onnxq.tune.metrics import cosine_score, cosine_similarity
from tests.graphs import make_model, run, sqnr_db
from tests.test_cli_errors import DEMO
from tests.test_cli_errors import onnxq as run_cli
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


@pytest.mark.parametrize("labels", [10, 60], ids=["fewer", "more"])
def test_labels_that_do_not_match_the_samples_are_refused(tmp_path, labels):
    with np.load(DEMO.parent / "eval.npz") as data:
        inputs, label = data["input"][:50], np.resize(data["label"], labels)
    np.savez(tmp_path / "eval.npz", input=inputs, label=label)
    out = tmp_path / "out.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", CALIB, "--eval-data", tmp_path / "eval.npz")
    assert_one_line_error(result, f"'label' has shape ({labels},) for 50 sample(s)")
    assert not out.exists()
    compared = run_cli("compare", DEMO, DEMO, "--data", tmp_path / "eval.npz")
    assert_one_line_error(compared, f"'label' has shape ({labels},) for 50 sample(s)")


def _two_heads(order: tuple[int, ...], prefix: str) -> onnx.ModelProto:
    """Two Gemm+Relu heads of one structure on the same input, with weights 1x and 40x apart,
    listed in ``order``; node and tensor names carry ``prefix`` (as a re-export renames them)."""
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(16, 8)).astype(np.float32)
    heads = []
    for head, scale in enumerate((1.0, 40.0)):
        heads.append([
            oh.make_node("Gemm", ["x", f"w{head}", f"b{head}"], [f"{prefix}g{head}"], name=f"{prefix}gemm{head}"),
            oh.make_node("Relu", [f"{prefix}g{head}"], [f"y{head}"], name=f"{prefix}relu{head}"),
        ])
    initializers = [(f"w{h}", weights * s) for h, s in enumerate((1.0, 40.0))]
    initializers += [(f"b{h}", np.full(8, 0.1 * s, np.float32)) for h, s in enumerate((1.0, 40.0))]
    return make_model([n for head in order for n in heads[head]], [("x", [None, 16])],
                      [("y0", [None, 8]), ("y1", [None, 8])], initializers)


def test_recover_on_a_reordered_export_keeps_each_branch_its_own_ranges(tmp_path):
    data = {"x": np.random.default_rng(8).normal(size=(64, 16)).astype(np.float32)}
    original, reordered = _two_heads((0, 1), "a_"), _two_heads((1, 0), "b_")
    onnxq.convert(original, tmp_path / "a.onnx", data, workspace=tmp_path / "ws")
    onnxq.recover(reordered, tmp_path / "ws", tmp_path / "b.onnx")
    for model, path in ((original, tmp_path / "a.onnx"), (reordered, tmp_path / "b.onnx")):
        for reference, quantized in zip(run(model, data), run(str(path), data)):
            assert sqnr_db(reference, quantized) > 30


def _symmetric_chains(order: tuple[int, ...]) -> onnx.ModelProto:
    """Two chains Mul -> 6x Relu -> Gemm of one structure and one weight, scaled 1x and 10x by
    their Mul, summed into one output: the Relus far from the sum are told apart by nothing but
    their order in the graph."""
    chains = []
    for chain in range(2):
        nodes = [oh.make_node("Mul", ["x", f"c{chain}"], [f"m{chain}_0"])]
        nodes += [oh.make_node("Relu", [f"m{chain}_{i}"], [f"m{chain}_{i + 1}"]) for i in range(6)]
        nodes.append(oh.make_node("Gemm", [f"m{chain}_6", "w"], [f"g{chain}"]))
        chains.append(nodes)
    nodes = [n for chain in order for n in chains[chain]] + [oh.make_node("Add", ["g0", "g1"], ["y"])]
    initializers = [("c0", np.full(16, 1.0, np.float32)), ("c1", np.full(16, 10.0, np.float32)),
                    ("w", np.random.default_rng(9).normal(size=(16, 8)).astype(np.float32))]
    return make_model(nodes, [("x", [None, 16])], [("y", [None, 8])], initializers)


def test_resume_or_recover_is_refused_when_ties_cannot_be_broken_and_their_ranges_differ(tmp_path):
    data = {"x": np.random.default_rng(10).normal(size=(16, 16)).astype(np.float32)}
    onnxq.convert(_symmetric_chains((0, 1)), tmp_path / "a.onnx", data, workspace=tmp_path / "ws")
    onnxq.recover(_symmetric_chains((0, 1)), tmp_path / "ws", tmp_path / "same.onnx")  # same order: fine
    assert (tmp_path / "same.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    with pytest.raises(onnxq.WorkspaceError, match="cannot tell which is which"):
        onnxq.recover(_symmetric_chains((1, 0)), tmp_path / "ws", tmp_path / "b.onnx")
    with pytest.raises(onnxq.WorkspaceError, match="cannot tell which is which"):
        onnxq.convert(_symmetric_chains((1, 0)), tmp_path / "b.onnx", data, workspace=tmp_path / "ws", resume=True)
    assert not (tmp_path / "b.onnx").exists()


def test_resuming_a_finished_accuracy_search_writes_the_same_bytes(tmp_path):
    # no int8 model keeps the outputs' cosine within 1e-7 of float's, so a search runs, whatever the CPU
    args = ["convert", DEMO, "-o", tmp_path / "out.onnx", "--calibration-data", CALIB, "--eval-data",
            DEMO.parent / "eval.npz", "--metric", "cosine", "--max-drop", "0.0000001", "--max-trials", "3",
            "--workspace", tmp_path / "ws", "-q"]
    assert run_cli(*args).returncode == 0
    first = (tmp_path / "out.onnx").read_bytes()
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "out.onnx").read_bytes() == first
    assert len(list((tmp_path / "ws" / "steps").glob("*-sensitivity.json"))) == 1  # read back, not measured again
