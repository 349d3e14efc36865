"""Workspace, checkpoints, resume after kill -9, recovery of any step, renamed re-exports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

import onnxq
from onnxq.workspace.steps import LayersStep
from onnxq.workspace.store import Workspace
from tests.graphs import make_model, run
from tests.test_cli_errors import DEMO, onnxq as run_cli

SAMPLES = 240
LOADER = """
import time
import numpy as np

def samples():
    rng = np.random.default_rng(3)
    for _ in range({samples}):
        time.sleep({delay})
        yield {{"input": rng.uniform(0, 1, size=(1, 1, 8, 8)).astype(np.float32)}}
"""


def _loader(tmp_path: Path, delay: float = 0.0) -> str:
    path = tmp_path / "slow_loader.py"
    path.write_text(LOADER.format(samples=SAMPLES, delay=delay))
    return f"{path}:samples"


RUN = onnxq.RunOptions(checkpoint_interval_s=0.0)


def _config(**overrides):
    """Equalization and bias correction on whatever their defaults: the shifts bias correction
    measures on data must come back from the workspace."""
    return onnxq.QuantConfig(method="percentile", **{"equalize": True, "bias_correction": True, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with a checkpoint after every batch."""
    folder = tmp_path_factory.mktemp("reference")
    output = folder / "ref.int8.onnx"
    result = onnxq.convert(DEMO, output, _loader(folder), _config(), run=RUN, workspace=folder / "ws")
    return output.read_bytes(), folder / "ws", result


def _drop_steps_after(workspace: Path, index: int) -> None:
    """Leave the workspace as a run killed right after writing step ``index`` would."""
    for file in (workspace / "steps").iterdir():
        if int(file.name[:6]) > index:
            file.unlink()


def test_every_step_is_recorded_with_its_progress(reference):
    _, workspace, result = reference
    steps = Workspace.open(workspace).steps()
    calibration = [s for s in steps if s.kind == "calibration"]
    assert [s.payload["samples_done"] for s in calibration[:3]] == [1, 2, 3]
    assert calibration[-1].payload["complete"] and steps[-1].kind == "quantized"
    assert result.calibration_samples == SAMPLES - SAMPLES // 8  # every 8th sample is held out to measure on


def test_resume_from_a_mid_calibration_checkpoint_is_byte_identical(reference, tmp_path):
    expected, workspace, _ = reference
    copy = tmp_path / "ws"
    subprocess.run(["cp", "-r", str(workspace), str(copy)], check=True)
    _drop_steps_after(copy, 100)  # killed after 101 of 240 samples
    out = tmp_path / "resumed.onnx"
    onnxq.convert(DEMO, out, _loader(tmp_path), _config(), run=RUN, workspace=copy, resume=True)
    assert out.read_bytes() == expected


def test_truncated_last_checkpoint_falls_back_to_the_last_good_step(reference, tmp_path):
    expected, workspace, _ = reference
    copy = tmp_path / "ws"
    subprocess.run(["cp", "-r", str(workspace), str(copy)], check=True)
    _drop_steps_after(copy, 50)
    last = sorted((copy / "steps").iterdir())[-1]
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # torn write
    corrupt = sorted((copy / "steps").iterdir())[-2]
    record = json.loads(corrupt.read_text())
    record["payload"]["samples_done"] += 7  # bit rot: the checksum no longer matches
    corrupt.write_text(json.dumps(record))
    assert Workspace.open(copy).latest("calibration").index == 48
    out = tmp_path / "resumed.onnx"
    onnxq.convert(DEMO, out, _loader(tmp_path), _config(), run=RUN, workspace=copy, resume=True)
    assert out.read_bytes() == expected


def test_kill_9_at_random_moments_then_resume_reproduces_the_output(reference, tmp_path):
    expected, _, _ = reference
    loader = _loader(tmp_path, delay=0.01)
    rng = np.random.default_rng(11)
    interrupted_mid_calibration = 0
    for attempt in range(3):
        workspace, out = tmp_path / f"ws{attempt}", tmp_path / f"out{attempt}.onnx"
        args = [sys.executable, "-m", "onnxq", "convert", str(DEMO), "-o", str(out), "--calibration-data", loader,
                "--method", "percentile", "--equalize", "--bias-correction", "--checkpoint-interval", "0.05",
                "--workspace", str(workspace), "-q"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list((workspace / "steps").glob("*.json")) if (workspace / "steps").is_dir() else True:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = Workspace.open(workspace).latest("calibration")
        interrupted_mid_calibration += latest is not None and not latest.payload["complete"]
        resumed = run_cli("convert", DEMO, "-o", out, "--calibration-data", loader, "--method", "percentile",
                          "--equalize", "--bias-correction", "--checkpoint-interval", "0.05", "--workspace", workspace,
                          "--resume", "-q")
        assert resumed.returncode == 0, resumed.stderr
        assert out.read_bytes() == expected
    assert interrupted_mid_calibration >= 2


def test_recover_rebuilds_any_recorded_step(reference, tmp_path):
    expected, workspace, _ = reference
    assert Workspace.open(workspace).latest(LayersStep).read(LayersStep).bias_shifts  # measured, so recorded
    final = onnxq.recover(DEMO, workspace, tmp_path / "final.onnx")
    assert (tmp_path / "final.onnx").read_bytes() == expected
    quantized_step = Workspace.open(workspace).latest("quantized").index
    onnxq.recover(DEMO, workspace, tmp_path / "again.onnx", index=quantized_step)
    assert (tmp_path / "again.onnx").read_bytes() == expected
    partial = onnxq.recover(DEMO, workspace, tmp_path / "partial.onnx", index=5)
    assert any("partial calibration" in note for note in partial.notes)
    assert partial.calibration_step == 5 and final.calibration_step > 5
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    assert run(str(tmp_path / "partial.onnx"), {"input": x})[0].shape == (4, 10)


def test_recover_cli_with_a_missing_step_is_a_clean_error(reference, tmp_path):
    _, workspace, _ = reference
    result = run_cli("recover", DEMO, workspace, "-o", tmp_path / "x.onnx", "--index", "99999")
    assert result.returncode == 2 and "no intact step 99999" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with every node and intermediate tensor and initializer renamed."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    graph = renamed.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names = {}
    for node in graph.node:
        names.update((o, f"t{len(names)}") for o in node.output if o not in keep)
    names.update((init.name, f"w{i}") for i, init in enumerate(graph.initializer))
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    for init in graph.initializer:
        init.name = names[init.name]
    return renamed


def test_renamed_reexport_resumes_and_recovers_from_the_same_workspace(reference, tmp_path):
    expected, workspace, _ = reference
    renamed = _renamed(onnx.load(DEMO))
    assert not {n.name for n in renamed.graph.node} & {n.name for n in onnx.load(DEMO).graph.node}
    x = np.random.default_rng(1).uniform(0, 1, (8, 1, 8, 8)).astype(np.float32)
    reference_output = run(expected, {"input": x})[0]

    onnxq.recover(renamed, workspace, tmp_path / "recovered.onnx")
    np.testing.assert_array_equal(run(str(tmp_path / "recovered.onnx"), {"input": x})[0], reference_output)

    copy = tmp_path / "ws"
    subprocess.run(["cp", "-r", str(workspace), str(copy)], check=True)
    _drop_steps_after(copy, 120)
    onnxq.convert(renamed, tmp_path / "resumed.onnx", _loader(tmp_path), _config(), run=RUN, workspace=copy, resume=True)
    np.testing.assert_array_equal(run(str(tmp_path / "resumed.onnx"), {"input": x})[0], reference_output)


def test_workspace_of_another_model_is_refused(reference, tmp_path):
    _, workspace, _ = reference
    conv = onnx.helper.make_node("Conv", ["input", "w"], ["logits"])
    other = make_model([conv], [("input", ["batch", 1, 8, 8])], [("logits", None)],
                       [("w", np.ones((10, 1, 8, 8), np.float32))])
    with pytest.raises(onnxq.OnnxqError, match="different model"):
        onnxq.recover(other, workspace, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def _with_other_weights(tmp_path: Path) -> Path:
    """The demo with slightly different weights: same structure, another model."""
    model = onnx.load(DEMO)
    init = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(init) * 1.01
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    path = tmp_path / "other.onnx"
    onnx.save(model, path)
    return path


def test_other_weights_or_other_options_are_refused_saying_what_differs(reference, tmp_path):
    _, workspace, _ = reference
    with pytest.raises(onnxq.OnnxqError, match="other weights"):
        onnxq.recover(_with_other_weights(tmp_path), workspace, tmp_path / "x.onnx")
    result = run_cli("convert", DEMO, "-o", tmp_path / "y.onnx", "--calibration-data", _loader(tmp_path),
                     "--method", "entropy", "--equalize", "--workspace", workspace, "--resume")
    assert result.returncode == 2
    assert "method: 'percentile' there, 'entropy' now" in result.stderr
