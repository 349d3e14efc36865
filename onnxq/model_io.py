"""Reading the float model and writing the quantized one (atomically)."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

import onnx
import onnx.external_data_helper
import onnx.version_converter
import onnxruntime as ort
from google.protobuf.message import Message

from onnxq.errors import ModelError, OutputError, first_line

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph`` and its subgraphs: initializers and tensor attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _tensors(subgraph)


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external data outside ``folder`` (the model's folder) before anything reads it.

    A location must be a relative path that, symbolic links resolved, names a regular file
    inside ``folder``: ``../../etc/passwd``, an absolute path or a link out of the folder would
    otherwise copy that file's bytes into the quantized model.
    """
    root = folder.resolve()
    for tensor in _tensors(proto.graph):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        what = f"tensor {tensor.name!r} stores its data in {location!r}"
        if not location:
            raise ModelError(f"tensor {tensor.name!r} has external data without a location; re-export the model")
        if Path(location).is_absolute() or PureWindowsPath(location).is_absolute():
            raise ModelError(f"{what}, an absolute path; external data must be a relative path inside {folder}")
        target = (root / location).resolve()
        if not target.is_relative_to(root):
            raise ModelError(f"{what}, outside the model's folder {folder}; move the data next to the model")
        if not target.is_file():
            raise ModelError(f"{what}, which is not a file in {folder}; copy the model's data files with it")


def _non_utf8_field(message: Message) -> str | None:
    """The name of a text field of ``message`` (or of a message inside it) that holds bytes that
    are not UTF-8, which protobuf parses without complaint and serializers then refuse."""
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        for item in value if repeated else [value]:
            if field.type == field.TYPE_MESSAGE:
                found = _non_utf8_field(item)
                if found:
                    return f"{field.name}.{found}"
            elif isinstance(item, bytes):
                return field.name
    return None


def check_well_formed(proto: onnx.ModelProto, where: str) -> None:
    """What ``onnx.checker`` lets through but later stages cannot handle: text that is not
    UTF-8, tensors of unknown data types, graph inputs that are not typed tensors, negative dims."""
    field = _non_utf8_field(proto)
    if field:
        raise ModelError(f"{where}: the text field {field} is not valid UTF-8; the file is damaged, re-export it")
    for tensor in _tensors(proto.graph):
        if tensor.data_type not in onnx.helper.get_all_tensor_dtypes():
            raise ModelError(
                f"{where}: tensor {tensor.name!r} has data type {tensor.data_type}, which ONNX does not define; "
                "the file is damaged, re-export it"
            )
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            kind = value.type.WhichOneof("value") or "untyped value"
            raise ModelError(
                f"{where}: input {value.name!r} is a {kind}, not a tensor; onnxq calibrates tensor inputs only"
            )
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in onnx.helper.get_all_tensor_dtypes():
            raise ModelError(
                f"{where}: input {value.name!r} has element type {elem_type}, which is not a data type; re-export it"
            )
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ()
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise ModelError(
                    f"{where}: tensor {value.name!r} declares dimension {dim.dim_value} on axis {axis}; a "
                    "dimension is a size >= 0 or a name for a dynamic size: fix the model's shapes"
                )


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and sanity-check a float ONNX model given as a path or a ModelProto.

    External data is read only from files inside the model's folder (``check_external_data``).
    """
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given ModelProto"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}; check the path")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError
            raise ModelError(
                f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                "pass a .onnx file exported by a framework"
            ) from exc
        check_external_data(proto, path.parent)
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:  # a bad offset or length, an unreadable file
            raise ModelError(f"cannot read the external data of {path}: {first_line(exc)}; re-export the model") from exc
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"{where} has no graph nodes; pass a .onnx model file")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError, or a C++ error on a malformed proto
        raise ModelError(f"{where} is not a valid ONNX model: {first_line(exc)}; re-export it") from exc
    check_well_formed(proto, where)
    return proto


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no ai.onnx opset; it is not a standard ONNX model")


@functools.cache
def runtime_opset() -> int:
    """The newest ``ai.onnx`` opset the installed ONNX Runtime loads, probed with one-node models
    (it may be older than the newest opset the installed onnx package defines)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals are expected
    for version in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1):
        probe = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
            ),
            opset_imports=[onnx.helper.make_opsetid("", version)],
        )
        probe.ir_version = onnx.helper.find_min_ir_version_for(probe.opset_import)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:
            continue
        return version
    return MIN_OPSET


def fit_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Bring a model below opset 13 up to 13 (per-channel Q/DQ), and one above the newest
    opset ONNX Runtime loads (``runtime_opset``) down to it; returns the model and a note
    when it converted."""
    version = default_opset(proto)
    newest = runtime_opset()
    if version < MIN_OPSET:
        target, why = MIN_OPSET, "which per-channel quantization needs"
    elif version > newest:
        target, why = newest, f"the newest the installed ONNX Runtime {ort.__version__} runs"
    else:
        return proto, None
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {version} and could not be converted to opset {target}, {why} "
            f"({type(exc).__name__}: {first_line(exc)}); re-export it with opset {target}"
        ) from exc
    return converted, f"model converted from opset {version} to {target}, {why}"


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
