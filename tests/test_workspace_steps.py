"""Typed workspace steps: what is written reads back as written, and a damaged payload is refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from onnxq.errors import WorkspaceError
from onnxq.workspace.steps import LayersStep, QuantizedStep, TrialStep
from onnxq.workspace.store import Workspace


def _workspace(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "ws", {"model": {"structure": "s", "weights": "w"}, "config": {}, "data": None})


def _write_raw(space: Workspace, index: int, kind: str, payload: dict) -> None:
    """A step file with a valid checksum, written by hand (as another program or version might)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    record = {"format": "onnxq-workspace", "version": 1, "index": index, "kind": kind, "sha256": digest,
              "payload": payload}
    (space.path / "steps" / f"{index:06d}-{kind}.json").write_text(json.dumps(record))


def test_typed_steps_read_back_as_written(tmp_path):
    space = _workspace(tmp_path)
    layers = LayersStep(3, reduced=("Conv:a:0",), unfused=(), sentinel=("Add:b:0/0",), ranges={"Conv:a:0/0": [-1.5, 2.25]},
                        bias_shifts={"Conv:a:0": [0.5, -0.25]})
    trial = TrialStep(3, "e", "sqnr", "fp32", ["Conv:a:0"], 0.98, 1.0, True, {"Conv:a:0": "accuracy fallback"}, [0.97, 0.99])
    for step in (layers, trial, QuantizedStep(3, "f" * 64, {"Conv:a:0": "accuracy fallback"})):
        space.append(step)
    assert space.latest(LayersStep).read(LayersStep) == layers
    assert space.latest("trial").read(TrialStep) == trial
    assert json.loads((space.path / "steps" / "000000-layers.json").read_text())["payload"] == {
        "calibration_step": 3, "reduced": ["Conv:a:0"], "unfused": [], "sentinel": ["Add:b:0/0"], "poor": [],
        "ranges": {"Conv:a:0/0": [-1.5, 2.25]}, "bias_shifts": {"Conv:a:0": [0.5, -0.25]}, "rounded": {}}


def test_a_payload_of_an_earlier_version_gets_the_defaults(tmp_path):
    space = _workspace(tmp_path)
    _write_raw(space, 0, "layers", {"calibration_step": 1, "reduced": [], "unfused": ["Conv:a:0"]})  # no sentinel
    assert space.latest(LayersStep).read(LayersStep) == LayersStep(1, (), ("Conv:a:0",), ())


@pytest.mark.parametrize("payload, problem", [
    ({"calibration_step": 1, "reduced": []}, "lacks 'unfused'"),
    ({"calibration_step": "1", "reduced": [], "unfused": []}, "'calibration_step' is a str"),
    ({"calibration_step": True, "reduced": [], "unfused": []}, "'calibration_step' is a bool"),
    ({"calibration_step": 1, "reduced": "Conv", "unfused": []}, "'reduced' is a str"),
])
def test_a_payload_that_does_not_match_its_schema_is_refused(tmp_path, payload, problem):
    space = _workspace(tmp_path)
    _write_raw(space, 0, "layers", payload)
    with pytest.raises(WorkspaceError, match=problem):
        space.latest(LayersStep).read(LayersStep)


def test_reading_a_step_as_another_kind_is_refused(tmp_path):
    space = _workspace(tmp_path)
    space.append(LayersStep(0, (), ()))
    with pytest.raises(WorkspaceError, match="is a layers step, not a trial step"):
        space.step(0).read(TrialStep)
