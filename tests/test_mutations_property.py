"""Property: whatever is wrong with the model, the data or the workspace, onnxq either succeeds
with an output ONNX Runtime loads (exit 0), or refuses with one line (exit 2); it never fails as
a bug (exit 1) and never changes a file that existed before the run.

Hypothesis mutates valid inputs at random: bytes of the model file, its graph (op types, nodes,
input types and shapes, opset, IR version, weights), the calibration arrays (dtype, shape, NaN,
sample count, keys, labels, bytes), and the manifest and steps of a finished workspace (bytes,
fields of any JSON type, with valid checksums), then runs the command line in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnxq.cli import main
from tests.test_cli_errors import DEMO

CALIB = DEMO.parent / "calib.npz"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(folder: Path, *args: str) -> tuple[int, str]:
    """``onnxq ARGS`` in this process: its exit code and stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as exited:
        main([*args])
    return exited.value.code, stderr.getvalue()


def check_contract(folder: Path, *args: str, output: Path) -> int:
    """Run ``onnxq ARGS`` in ``folder`` and assert the contract; returns the exit code."""
    before = _hashes(folder)
    code, stderr = _run(folder, *args)
    after = _hashes(folder)
    assert code in (0, 2), stderr
    event(f"exit {code}")
    if code == 0:
        ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # loads and is a valid model
        changed = {output.name}
    else:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        changed = set()
    for name, digest in before.items():
        if name not in changed:
            assert after.get(name) == digest, f"{name} changed (exit {code}: {stderr.strip()})"
    return code


def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="onnxq-property-"))
    (folder / "out.onnx").write_bytes(b"the user's earlier output")
    return folder


# --- the model -----------------------------------------------------------------------------------

def _mutate_graph(model: onnx.ModelProto, kind: str, data: st.DataObject) -> None:
    graph = model.graph
    if kind == "op_type":
        node = data.draw(st.sampled_from(list(graph.node)))
        node.op_type = data.draw(st.sampled_from(["Foo", "Relu", "Conv", "Identity", "Softmax", ""]))
    elif kind == "drop_node":
        del graph.node[data.draw(st.integers(0, len(graph.node) - 1))]
    elif kind == "input_type":
        graph.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from([2, 6, 7, 10, 11, 16]))
    elif kind == "input_shape":
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[data.draw(st.integers(0, len(dims) - 1))]
        if data.draw(st.booleans()):
            dim.dim_value = data.draw(st.integers(0, 9))
        else:
            dim.dim_param = data.draw(st.sampled_from(["N", "?", ""]))
    elif kind == "opset":
        model.opset_import[0].version = data.draw(st.integers(1, 25))
    elif kind == "ir_version":
        model.ir_version = data.draw(st.integers(1, 12))
    elif kind == "weights":
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        array = onnx.numpy_helper.to_array(tensor).copy()
        choice = data.draw(st.sampled_from(["nan", "huge", "zero", "reshape"]))
        if choice == "reshape":
            array = array.reshape(-1)
        else:
            array.flat[data.draw(st.integers(0, array.size - 1))] = {"nan": np.nan, "huge": 3e38, "zero": 0}[choice]
            if choice == "zero":
                array[...] = 0
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))


@SETTINGS
@given(st.data())
def test_a_mutated_model_is_converted_or_refused_in_one_line(data):
    folder = _folder()
    model = onnx.load(DEMO)
    kind = data.draw(st.sampled_from(["bytes", "truncate", "op_type", "drop_node", "input_type", "input_shape",
                                      "opset", "ir_version", "weights"]))
    if kind in ("bytes", "truncate"):
        raw = bytearray(model.SerializeToString())
        if kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (folder / "model.onnx").write_bytes(bytes(raw))
    else:
        _mutate_graph(model, kind, data)
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    shutil.copy(CALIB, folder / "calib.npz")
    check_contract(folder, "convert", str(folder / "model.onnx"), "-o", str(folder / "out.onnx"),
                   "--calibration-data", str(folder / "calib.npz"), "-q", output=folder / "out.onnx")
    shutil.rmtree(folder)


# --- the data --------------------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_mutated_calibration_data_is_used_or_refused_in_one_line(data):
    folder = _folder()
    with np.load(CALIB) as original:
        arrays = {"input": original["input"][: data.draw(st.integers(0, 16))].copy()}
    kind = data.draw(st.sampled_from(["dtype", "shape", "nan", "keys", "label", "constant", "bytes", "none"]))
    x = arrays["input"]
    if kind == "dtype":
        arrays["input"] = x.astype(data.draw(st.sampled_from(["float64", "float16", "int32", "uint8", "bool"])))
    elif kind == "shape":
        axis = data.draw(st.integers(0, x.ndim - 1))
        arrays["input"] = data.draw(st.sampled_from([x.reshape(x.shape[0], 64), x[..., None], np.repeat(x, 2, axis)]))
    elif kind == "nan" and x.size:
        x.flat[data.draw(st.integers(0, x.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "keys":
        arrays[data.draw(st.sampled_from(["__meta", "other", "INPUT"]))] = arrays.pop("input") \
            if data.draw(st.booleans()) else np.zeros(3)
    elif kind == "label":
        arrays["label"] = np.zeros(data.draw(st.integers(0, 20)), np.int64)
    elif kind == "constant":
        x[...] = data.draw(st.sampled_from([0.0, 1.0, -5.0]))
    np.savez(folder / "calib.npz", **arrays)
    if kind == "bytes":
        raw = bytearray((folder / "calib.npz").read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (folder / "calib.npz").write_bytes(bytes(raw))
    shutil.copy(DEMO, folder / "model.onnx")
    check_contract(folder, "convert", str(folder / "model.onnx"), "-o", str(folder / "out.onnx"),
                   "--calibration-data", str(folder / "calib.npz"), "--eval-data", str(folder / "calib.npz"), "-q",
                   output=folder / "out.onnx")
    shutil.rmtree(folder)


# --- the workspace ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    code, stderr = _run(folder, "convert", str(DEMO), "-o", str(folder / "out.onnx"), "--calibration-data",
                        str(CALIB), "--workspace", str(folder / "ws"), "--checkpoint-interval", "0", "-q")
    assert code == 0, stderr
    return folder / "ws"


def _mutate_json(path: Path, data: st.DataObject, reseal: bool) -> None:
    record = json.loads(path.read_text())
    target = record["payload"] if reseal else record
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        del target[key]
    else:
        target[key] = data.draw(JSON_VALUES)
    if reseal:
        canonical = json.dumps(record["payload"], sort_keys=True, separators=(",", ":")).encode()
        record["sha256"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(record))


@SETTINGS
@given(st.data())
def test_a_mutated_workspace_is_resumed_or_refused_in_one_line(finished_workspace, data):
    folder = _folder()
    workspace = folder / "ws"
    shutil.copytree(finished_workspace, workspace)
    steps = sorted((workspace / "steps").iterdir())
    kind = data.draw(st.sampled_from(["manifest-bytes", "manifest-field", "step-bytes", "step-field", "drop-step",
                                      "drop-after"]))
    if kind == "manifest-bytes" or kind == "step-bytes":
        path = workspace / "manifest.json" if kind == "manifest-bytes" else data.draw(st.sampled_from(steps))
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(32, 126))
        path.write_bytes(bytes(raw))
    elif kind == "manifest-field":
        manifest = json.loads((workspace / "manifest.json").read_text())
        manifest[data.draw(st.sampled_from(sorted(manifest)))] = data.draw(JSON_VALUES)
        (workspace / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "step-field":
        _mutate_json(data.draw(st.sampled_from(steps)), data, reseal=True)
    elif kind == "drop-step":
        data.draw(st.sampled_from(steps)).unlink()
    else:
        cut = data.draw(st.integers(0, len(steps) - 1))
        for path in steps[cut:]:
            path.unlink()
    command = data.draw(st.sampled_from(["resume", "recover"]))
    if command == "resume":
        args = ["convert", str(DEMO), "-o", str(folder / "out.onnx"), "--workspace", str(workspace), "--resume",
                "-q"] + (["--calibration-data", str(CALIB)] if data.draw(st.booleans()) else [])
    else:
        args = ["recover", str(DEMO), str(workspace), "-o", str(folder / "out.onnx"), "-q"]
        if data.draw(st.booleans()):
            args += ["--index", str(data.draw(st.integers(-1, len(steps))))]
    check_contract(folder, *args, output=folder / "out.onnx")
    shutil.rmtree(folder)
