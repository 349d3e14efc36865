"""Nothing of the user's is lost: onnxq deletes only what it wrote, never overwrites an input,
leaves every existing file as it was when a run fails, and lets one run at a time use a workspace."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli_errors import DEMO, assert_clean_failure, onnxq

MODELS = DEMO.parent
CALIB = MODELS / "calib.npz"
EVAL = MODELS / "eval.npz"


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def demo(tmp_path) -> Path:
    """A folder with copies of the demo model and its data."""
    for source in (DEMO, CALIB, EVAL):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    return tmp_path


def test_a_folder_that_is_not_a_workspace_is_refused_and_kept(demo):
    (demo / "p" / "steps").mkdir(parents=True)
    (demo / "p" / "steps" / "notes.txt").write_text("x")
    (demo / "p" / "manifest.json").write_text('{"mine": true}')
    before = hashes(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--workspace", demo / "p",
                   "--calibration-data", demo / "calib.npz")
    assert_clean_failure(result, demo / "out.onnx", "not an onnxq workspace", "--workspace")
    assert hashes(demo) == before


def test_a_new_run_in_a_workspace_removes_only_the_step_files_onnxq_wrote(demo):
    args = ("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data", demo / "calib.npz",
            "--workspace", demo / "ws", "-q")
    assert onnxq(*args).returncode == 0
    (demo / "ws" / "steps" / "notes.txt").write_text("kept")
    assert onnxq(*args).returncode == 0
    steps = sorted(p.name for p in (demo / "ws" / "steps").iterdir())
    # the plain model's score on the held-out samples is a trial step of the safety net
    assert steps == ["000000-calibration.json", "000001-layers.json", "000002-trial.json", "000003-quantized.json",
                     "notes.txt"]
    assert (demo / "ws" / "steps" / "notes.txt").read_text() == "kept"


def test_a_refused_run_leaves_no_workspace_folder_behind(demo):
    np.savez(demo / "wrong.npz", not_an_input=np.zeros((4, 1, 8, 8), np.float32))
    before = hashes(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                   demo / "wrong.npz")
    assert_clean_failure(result, demo / "out.onnx", "not an input of the model")
    assert not (demo / "out.onnx.onnxq").exists()
    assert hashes(demo) == before


@pytest.mark.parametrize("role", ["model", "calibration", "evaluation", "rules"])
def test_an_output_that_is_an_input_is_refused_before_any_work(demo, role):
    (demo / "rules.json").write_text("[]")
    target = {"model": "digits_cnn.onnx", "calibration": "calib.npz", "evaluation": "eval.npz",
              "rules": "rules.json"}[role]
    before = hashes(demo)
    # the output is spelled through a link to the folder: the same file by another path
    (demo / "link").symlink_to(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "link" / target,
                   "--calibration-data", demo / "calib.npz", "--eval-data", demo / "eval.npz",
                   "--keep-float", demo / "rules.json")
    assert_one_line_error(result, target, "overwrite its own input")
    (demo / "link").unlink()
    assert hashes(demo) == before


def test_save_rules_over_an_input_is_refused(demo):
    before = hashes(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                   demo / "calib.npz", "--save-rules", demo / "calib.npz")
    assert_clean_failure(result, demo / "out.onnx", "calib.npz", "overwrite its own input")
    assert hashes(demo) == before


def test_recover_over_its_own_model_is_refused(demo):
    assert onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                 demo / "calib.npz", "-q").returncode == 0
    before = hashes(demo)
    result = onnxq("recover", demo / "digits_cnn.onnx", demo / "out.onnx.onnxq", "-o", demo / "digits_cnn.onnx")
    assert_one_line_error(result, "the model", "overwrite its own input")
    assert hashes(demo) == before


def _existing_output(demo: Path) -> dict[str, str]:
    (demo / "out.onnx").write_bytes(b"the user's earlier model")
    return hashes(demo)


def test_save_rules_into_a_missing_folder_leaves_the_existing_output(demo):
    before = _existing_output(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                   demo / "calib.npz", "--save-rules", demo / "nodir" / "r.json")
    assert_one_line_error(result, "nodir", "does not exist")
    assert hashes(demo) == before


def test_evaluation_data_failing_on_its_second_file_leaves_the_existing_output(demo):
    (demo / "evals").mkdir()
    with np.load(demo / "eval.npz") as data:
        np.savez(demo / "evals" / "a.npz", input=data["input"][:8])
        np.savez(demo / "evals" / "b.npz", input=data["input"][:8].astype(np.float64))
    before = _existing_output(demo)
    result = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                   demo / "calib.npz", "--eval-data", demo / "evals", "--workspace", demo / "ws")
    assert_one_line_error(result, "b.npz", "float64")
    after = {k: v for k, v in hashes(demo).items() if not k.startswith("ws/")}
    assert after == before
    assert not [p for p in demo.iterdir() if p.name.startswith(".out.onnx")]


def _hold_lock(workspace: Path) -> subprocess.Popen:
    """Another process holding the workspace's OS lock (as a running onnxq would)."""
    workspace.mkdir(exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(workspace / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_workspace_in_use_is_refused_until_the_first_dies(demo):
    args = ("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data", demo / "calib.npz",
            "--workspace", demo / "ws", "-q")
    holder = _hold_lock(demo / "ws")
    try:
        before = hashes(demo)
        assert_clean_failure(onnxq(*args), demo / "out.onnx", "in use by another onnxq run")
        assert hashes(demo) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert onnxq(*args).returncode == 0  # the OS released the dead holder's lock: no stale lock


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(demo):
    args = ("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data", demo / "calib.npz",
            "--workspace", demo / "ws", "-q")
    assert onnxq(*args).returncode == 0
    left = [demo / ".out.onnx.k9abcdef.tmp", demo / "ws" / ".manifest.json.k9abcdef.tmp",
            demo / "ws" / "steps" / ".000003-calibration.json.k9abcdef.tmp"]
    for path in left:
        path.write_bytes(b"partial")
    (demo / ".out.onnx.stage123.tmp").mkdir()
    (demo / ".out.onnx.stage123.tmp" / "out.onnx.data").write_bytes(b"partial")
    (demo / ".notes.tmp").write_text("the user's")
    assert onnxq(*args, "--resume").returncode == 0
    assert not any(p.exists() for p in [*left, demo / ".out.onnx.stage123.tmp"])
    assert (demo / ".notes.tmp").read_text() == "the user's"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_and_workspace_files_follow_the_umask(demo, umask):
    result = subprocess.run(
        [sys.executable, "-m", "onnxq", "convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx",
         "--calibration-data", demo / "calib.npz", "-q"],
        capture_output=True, text=True, preexec_fn=lambda: os.umask(umask), timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    workspace = demo / "out.onnx.onnxq"
    for path in [demo / "out.onnx", workspace / "manifest.json", *(workspace / "steps").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def _finished_workspace(demo: Path) -> Path:
    assert onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "out.onnx", "--calibration-data",
                 demo / "calib.npz", "-q").returncode == 0
    return demo / "out.onnx.onnxq"


def _reseal(path: Path, payload: dict) -> None:
    """Rewrite a step's payload with a valid checksum (as a buggy or hostile writer would)."""
    record = json.loads(path.read_text())
    record["payload"] = payload
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    record["sha256"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", ["manifest-list", "manifest-without-model", "manifest-config-list",
                                    "manifest-unknown-option", "observer-int", "observer-without-kind"])
def test_a_malformed_workspace_is_refused_in_one_line(demo, damage):
    workspace = _finished_workspace(demo)
    manifest = json.loads((workspace / "manifest.json").read_text())
    step = workspace / "steps" / "000000-calibration.json"
    payload = json.loads(step.read_text())["payload"]
    key = next(iter(payload["observers"]))
    if damage == "manifest-list":
        (workspace / "manifest.json").write_text("[1, 2]")
    elif damage == "manifest-without-model":
        del manifest["model"]
    elif damage == "manifest-config-list":
        manifest["config"] = []
    elif damage == "manifest-unknown-option":
        manifest["config"]["bogus"] = 1
    elif damage == "observer-int":
        _reseal(step, payload | {"observers": {**payload["observers"], key: 5}})
    else:
        _reseal(step, payload | {"observers": {**payload["observers"], key: {"min": 0}}})
    if damage.startswith("manifest") and damage != "manifest-list":
        (workspace / "manifest.json").write_text(json.dumps(manifest))
    recovered = onnxq("recover", demo / "digits_cnn.onnx", workspace, "-o", demo / "r.onnx", "--index", "0")
    assert_clean_failure(recovered, demo / "r.onnx", "workspace")
    if damage != "manifest-unknown-option":  # convert compares the options it knows and starts anew
        resumed = onnxq("convert", demo / "digits_cnn.onnx", "-o", demo / "o2.onnx", "--workspace", workspace,
                        "--resume")
        assert_clean_failure(resumed, demo / "o2.onnx", "workspace")
