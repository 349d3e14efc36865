"""Reading the float model and writing the quantized one (atomically)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx.version_converter

from onnxq.errors import ModelError, OutputError

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and sanity-check a float ONNX model given as a path or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given ModelProto"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}; check the path")
        try:
            proto = onnx.load(path)
        except Exception as exc:  # protobuf raises DecodeError, external data raises OSError
            raise ModelError(
                f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                "pass a .onnx file exported by a framework"
            ) from exc
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"{where} has no graph nodes; pass a .onnx model file")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"{where} is not a valid ONNX model: {first_line}; re-export it"
        ) from exc
    return proto


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no ai.onnx opset; it is not a standard ONNX model")


def upgrade_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Bring a model below opset 13 up to 13; returns the model and a note when it upgraded."""
    version = default_opset(proto)
    if version >= MIN_OPSET:
        return proto, None
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {version} and could not be upgraded to opset {MIN_OPSET}, "
            f"which per-channel quantization needs ({type(exc).__name__}: {exc}); re-export it "
            f"with opset {MIN_OPSET} or newer"
        ) from exc
    return upgraded, f"model upgraded from opset {version} to {MIN_OPSET} (per-channel Q/DQ)"


def check_writable(output: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``output`` cannot be written."""
    path = Path(output)
    if path.is_dir():
        raise OutputError(f"output path {path} is a folder; give a file name such as model.int8.onnx")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another output path")
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: sync the folder entry (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename: never a partial file."""
    temp = None
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        if isinstance(exc, OSError):
            raise OutputError(
                f"could not write {path}: {exc.strerror}; check the path, permissions and free space"
            ) from exc
        raise
