"""Hostile and broken inputs to `onnxq convert`: each case ends in one line on stderr and exit 2,
within a time limit (no hang), with no output file and nothing written outside the workspace.

The cases run as concurrent subprocesses (`python -m onnxq`), once per module, and each test
checks one case's result. A byte-mutation fuzz of the loader runs in process with hypothesis.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from hypothesis import given, settings, strategies as st

import onnxq
from onnxq.errors import ModelError, OnnxqError
from onnxq.load.model import load_model
from tests.graphs import make_model, run
from tests.test_cli_errors import assert_clean_failure

WEIGHT = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
CALIBRATION = np.random.default_rng(1).normal(size=(4, 1, 4)).astype(np.float32)


def _model(input_shape=(1, 4)) -> onnx.ModelProto:
    """x [1, 4] -> MatMul -> Relu -> y: small enough to mutate by hand."""
    return make_model(
        [oh.make_node("MatMul", ["x", "w"], ["h"], name="mm"), oh.make_node("Relu", ["h"], ["y"], name="relu")],
        [("x", list(input_shape))], [("y", None)], [("w", WEIGHT)],
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """A broken input: ``build(folder)`` writes it and returns the arguments after ``convert``;
    the error line must contain every word of ``words``."""

    build: Callable[[Path], list]
    words: tuple[str, ...]


def _calibration(folder: Path, **arrays) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **(arrays or {"x": CALIBRATION}))
    return path


def _model_file(mutate: Callable[[onnx.ModelProto], None] | None = None, data: bytes | None = None):
    """A case builder: the base model changed by ``mutate`` (or raw ``data``), standard data."""

    def build(folder: Path) -> list:
        model = _model()
        if mutate is not None:
            mutate(model)
        path = folder / "model.onnx"
        path.write_bytes(model.SerializeToString() if data is None else data)
        return [path, "--calibration-data", _calibration(folder)]

    return build


def _data_file(**arrays):
    def build(folder: Path) -> list:
        path = folder / "model.onnx"
        path.write_bytes(_model().SerializeToString())
        return [path, "--calibration-data", _calibration(folder, **arrays)]

    return build


def _set(path: str, value) -> Callable[[onnx.ModelProto], None]:
    """A mutation that sets the attribute at dotted ``path`` (list indexes as numbers)."""

    def mutate(model: onnx.ModelProto) -> None:
        *parents, last = path.split(".")
        target = model
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        if last.isdigit():
            target[int(last)] = value
        elif isinstance(value, list):
            getattr(target, last)[:] = value
        else:
            setattr(target, last, value)

    return mutate


def _sequence_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.CopyFrom(oh.make_sequence_type_proto(oh.make_tensor_type_proto(1, [1, 4])))


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node[1].output[0] = "h"
    model.graph.output[0].name = "h"


def _nan_weight(model: onnx.ModelProto, value: float = np.nan) -> None:
    weight = WEIGHT.copy()
    weight[1, 2] = value
    model.graph.initializer[0].CopyFrom(onh.from_array(weight, "w"))


def _custom_domain(model: onnx.ModelProto) -> None:
    model.graph.node[0].domain = "com.example"
    model.opset_import.append(oh.make_opsetid("com.example", 1))


def _huge_expand(folder: Path) -> list:
    """Valid, but running it would allocate 16 TB."""
    model = make_model(
        [oh.make_node("Expand", ["x", "shape"], ["e"]), oh.make_node("MatMul", ["e", "w"], ["y"])],
        [("x", [1, 4])], [("y", [10**6, 10**6, 4])],
        [("shape", np.array([10**6, 10**6, 4], np.int64)), ("w", WEIGHT)],
    )
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return [path, "--calibration-data", _calibration(folder)]


def _external(location: str, length: int = 64, link: bool = False):
    """The model in ``folder/model/`` with its weight stored externally at ``location``; a
    secret file lies beside that folder, and with ``link`` ``model/link.bin`` points to it."""

    def build(folder: Path) -> list:
        (folder / "secret.bin").write_bytes(b"S" * 64)
        model_folder = folder / "model"
        model_folder.mkdir()
        (model_folder / "weights.bin").write_bytes(WEIGHT.tobytes())
        if link:
            (model_folder / "link.bin").symlink_to(folder / "secret.bin")
        model = _model()
        weight = model.graph.initializer[0]
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": "0", "length": str(length)}.items():
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        path = model_folder / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return [path, "--calibration-data", _calibration(folder)]

    return build


def _loader_with_inf(folder: Path) -> list:
    path = folder / "model.onnx"
    path.write_bytes(_model().SerializeToString())
    loader = folder / "loader.py"
    loader.write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    yield {'x': np.ones((1, 4), np.float32)}\n"
        "    yield {'x': np.array([[1, -np.inf, 0, 2]], np.float32)}\n"
    )
    return [path, "--calibration-data", f"{loader}:samples"]


def _loader_that_fails_midway(folder: Path) -> list:
    path = folder / "model.onnx"
    path.write_bytes(_model().SerializeToString())
    loader = folder / "loader.py"
    loader.write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    yield {'x': np.ones((1, 4), np.float32)}\n"
        "    raise OSError('disk went away')\n"
    )
    return [path, "--calibration-data", f"{loader}:samples"]


def _pickled(folder: Path) -> list:
    path = folder / "model.onnx"
    path.write_bytes(_model().SerializeToString())
    data = folder / "x.npy"
    np.save(data, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return [path, "--calibration-data", data]


def _garbage_npz(folder: Path) -> list:
    path = folder / "model.onnx"
    path.write_bytes(_model().SerializeToString())
    data = folder / "calib.npz"
    data.write_bytes(b"PK\x03\x04 not a zip archive")
    return [path, "--calibration-data", data]


def _eval_data_the_model_fails_on(folder: Path) -> list:
    """The feature dim is symbolic, so the data check passes, but MatMul needs 4 features."""
    path = folder / "model.onnx"
    path.write_bytes(_model(input_shape=(1, "K")).SerializeToString())
    np.savez(folder / "eval.npz", x=np.ones((2, 1, 5), np.float32))
    return [path, "--calibration-data", _calibration(folder), "--eval-data", folder / "eval.npz"]


GOOD = _model().SerializeToString()
CASES = {
    "truncated-half": Case(_model_file(data=GOOD[: len(GOOD) // 2]), ("not a readable ONNX model",)),
    "garbled-bytes": Case(
        _model_file(data=bytes(b ^ 0x5A if i % 7 == 3 else b for i, b in enumerate(GOOD))), ("not a readable",)
    ),
    "empty-file": Case(_model_file(data=b""), ("no graph nodes",)),
    "name-not-utf8": Case(_model_file(data=GOOD.replace(b"test", b"\xd1est", 1)), ("not valid UTF-8",)),
    "unknown-tensor-data-type": Case(_model_file(_set("graph.initializer.0.data_type", 64)), ("data type 64",)),
    "input-without-element-type": Case(
        _model_file(_set("graph.input.0.type.tensor_type.elem_type", 0)), ("'x'", "element type 0")
    ),
    "input-that-is-a-sequence": Case(_model_file(_sequence_input), ("'x'", "not a tensor")),
    "negative-input-dim": Case(
        _model_file(_set("graph.input.0.type.tensor_type.shape.dim.1.dim_value", -4)), ("'x'", "dimension -4")
    ),
    "input-dim-of-10**12": Case(
        _model_file(_set("graph.input.0.type.tensor_type.shape.dim.1.dim_value", 10**12)),
        ("per-sample shape", "1000000000000"),
    ),
    "initializer-dims-of-10**6-squared": Case(
        _model_file(_set("graph.initializer.0.dims", [10**6, 10**6])), ("tensor name: w", "too small for the declared shape")
    ),
    "negative-initializer-dims": Case(_model_file(_set("graph.initializer.0.dims", [-4, -4])), ("Negative dimension",)),
    "duplicate-tensor-names": Case(_model_file(_duplicate_output), ("single static assignment",)),
    "graph-cycle": Case(_model_file(_set("graph.node.0.input.0", "y")), ("topologically sorted", "'y'")),
    "input-nobody-produces": Case(_model_file(_set("graph.node.0.input.1", "nobody")), ("'nobody'",)),
    "unknown-op": Case(_model_file(_set("graph.node.0.op_type", "NoSuchOp")), ("NoSuchOp",)),
    "ir-version-too-new": Case(_model_file(_set("ir_version", 999)), ("ir_version 999",)),
    "opset-too-new": Case(_model_file(_set("opset_import.0.version", 999)), ("opset 999",)),
    "unregistered-custom-op": Case(_model_file(_custom_domain), ("ONNX Runtime cannot load", "com.example")),
    "16-terabyte-allocation-at-run-time": Case(_huge_expand, ("fails on the calibration data",)),
    "external-data-in-parent-folder": Case(_external("../secret.bin"), ("'../secret.bin'", "outside the model's folder")),
    "external-data-absolute-path": Case(_external("/etc/passwd"), ("'/etc/passwd'", "absolute path")),
    "external-data-symlink-out-of-folder": Case(_external("link.bin", link=True), ("outside the model's folder",)),
    "external-data-missing-file": Case(_external("missing.bin"), ("'missing.bin'", "not a file")),
    "external-data-length-past-end-of-file": Case(_external("weights.bin", length=10**9), ("external data", "length")),
    "nan-in-a-weight": Case(_model_file(_nan_weight), ("'w'", "NaN or Inf")),
    "inf-from-a-loader": Case(_loader_with_inf, ("item 1", "NaN or Inf")),
    "loader-that-fails-midway": Case(_loader_that_fails_midway, ("OSError after 1 item(s)", "disk went away")),
    "integer-calibration-data": Case(_data_file(x=np.ones((4, 1, 4), np.int64)), ("int64", "astype")),
    "pickled-object-array": Case(_pickled, ("cannot read", "x.npy")),
    "npz-that-is-not-a-zip": Case(_garbage_npz, ("cannot read", "calib.npz")),
    "evaluation-data-the-model-fails-on": Case(_eval_data_the_model_fails_on, ("evaluation data",)),
}


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


@dataclasses.dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess
    output: Path
    written: set[Path]  # paths that appeared outside the workspace


def _run_case(name: str, folder: Path) -> Outcome:
    folder.mkdir()
    args = CASES[name].build(folder)
    before = _files(folder)
    output = folder / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxq", "convert", *map(str, args), "-o", str(output), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,  # a hang fails the test
    )
    workspace = folder / "out.onnx.onnxq"
    written = {p for p in _files(folder) - before if p != workspace and workspace not in p.parents}
    return Outcome(result, output, written)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("hostile")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_case, name, root / name) for name in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_a_one_line_error_and_writes_nothing(outcomes, name):
    outcome = outcomes[name]
    assert_clean_failure(outcome.result, outcome.output, *CASES[name].words)
    assert outcome.written == set(), f"files written outside the workspace: {outcome.written}"


def test_external_data_inside_the_model_folder_still_loads(tmp_path):
    args = _external("weights.bin")(tmp_path)
    proto = load_model(args[0])  # the data stays on disk, inside the model's folder
    np.testing.assert_array_equal(onh.to_array(proto.graph.initializer[0], base_dir=str(args[0].parent)), WEIGHT)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_weight_is_never_clipped_to_a_finite_int8(tmp_path, value):
    """Its layer's outputs are infinite, so they have no range: the layer stays float, weight intact
    (a NaN weight is refused instead: see the nan-in-a-weight case)."""
    model = _model()
    _nan_weight(model, value)
    result = onnxq.convert(model, tmp_path / "out.onnx", {"x": CALIBRATION})
    assert result.op_counts["MatMul"].quantized == 0
    stored = {init.name: onh.to_array(init) for init in onnx.load(tmp_path / "out.onnx").graph.initializer}
    assert stored["w"][1, 2] == value


def test_initializer_that_is_also_a_graph_input_is_a_default_the_data_need_not_give(tmp_path):
    model = _model()
    model.graph.input.append(oh.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4]))
    onnxq.convert(model, tmp_path / "out.onnx", {"x": CALIBRATION})
    assert [i.name for i in onnx.load(tmp_path / "out.onnx").graph.input] == ["x", "w"]
    x = CALIBRATION[0]
    np.testing.assert_allclose(run(str(tmp_path / "out.onnx"), {"x": x})[0], np.maximum(x @ WEIGHT, 0), atol=0.05)


def test_weight_that_is_also_a_graph_output_is_returned_as_it_is(tmp_path):
    model = _model()
    model.graph.output.append(oh.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4]))
    onnxq.convert(model, tmp_path / "out.onnx", {"x": CALIBRATION})
    quantized = onnx.load(tmp_path / "out.onnx")
    matmul = next(node for node in quantized.graph.node if node.op_type == "MatMul")
    assert "w" not in matmul.input  # the MatMul reads the int8 weight, dequantized
    y, w = run(quantized, {"x": CALIBRATION[0]})
    np.testing.assert_array_equal(w, WEIGHT)
    np.testing.assert_allclose(y, np.maximum(CALIBRATION[0] @ WEIGHT, 0), atol=0.05)


def test_duplicate_node_names_are_not_an_error(tmp_path):
    model = _model()
    model.graph.node[1].name = "mm"
    onnxq.convert(model, tmp_path / "out.onnx", {"x": CALIBRATION})
    names = [node.name for node in onnx.load(tmp_path / "out.onnx").graph.node]
    assert len(names) == len(set(names))
    x = CALIBRATION[0]
    np.testing.assert_allclose(run(str(tmp_path / "out.onnx"), {"x": x})[0], np.maximum(x @ WEIGHT, 0), atol=0.05)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


mutated_bytes = st.builds(
    lambda mutations, keep: bytes(_mutate(mutations)[:keep]),
    st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, len(GOOD))),
)


def _mutate(mutations) -> bytearray:
    data = bytearray(GOOD)
    for position, value in mutations:
        data[position] = value
    return data


@given(data=mutated_bytes)
def test_mutated_model_bytes_load_or_raise_model_error(fuzz_folder, data):
    path = fuzz_folder / "mutated.onnx"
    path.write_bytes(data)
    try:
        proto = load_model(path)
    except ModelError as exc:
        assert "\n" not in str(exc)
        return
    assert proto.graph.node  # loaded: a model with a graph


one_byte_changed = st.builds(
    lambda position, value: GOOD[:position] + bytes([value]) + GOOD[position + 1:],
    st.integers(0, len(GOOD) - 1), st.integers(0, 255),
)


@settings(max_examples=20)  # one changed byte: about half of these still load, and are converted
@given(data=one_byte_changed)
def test_mutated_models_that_load_convert_or_raise_onnxq_error(fuzz_folder, data):
    path = fuzz_folder / "mutated.onnx"
    path.write_bytes(data)
    output = fuzz_folder / "out.onnx"
    try:
        onnxq.convert(path, output, {"x": CALIBRATION}, onnxq.QuantConfig(), run=onnxq.RunOptions(device="cpu"))
    except OnnxqError as exc:
        assert "\n" not in str(exc)
        return
    run(str(output), {"x": CALIBRATION[0]})  # what was written loads and runs
