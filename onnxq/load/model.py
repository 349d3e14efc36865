"""Reading the float model and writing the quantized one (atomically), in one protobuf file or,
for models near or over protobuf's 2 GB limit, as a model file plus an external data file."""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

import onnx
import onnx.external_data_helper
import onnx.version_converter
from google.protobuf.message import Message

from onnxq.errors import ModelError, first_line
from onnxq.files import SINGLE_FILE_LIMIT
from onnxq.runtime import installation_note


def uses_external_data(proto: onnx.ModelProto) -> bool:
    """Whether some tensor of ``proto`` (subgraphs included) keeps its data in an external file."""
    return any(
        onnx.external_data_helper.uses_external_data(tensor)
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
    )


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external data outside ``folder`` (the model's folder) before anything reads it.

    A location must be a relative path that, symbolic links resolved, names a regular file
    inside ``folder``: ``../../etc/passwd``, an absolute path or a link out of the folder would
    otherwise copy that file's bytes into the quantized model.
    """
    root = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
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
    UTF-8, tensors of unknown data types, graph inputs that are not typed tensors, dims below -1."""
    field = _non_utf8_field(proto)
    if field:
        raise ModelError(f"{where}: the text field {field} is not valid UTF-8; the file is damaged, re-export it")
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
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
            if dim.HasField("dim_value") and dim.dim_value < -1:  # -1: a dynamic size, as ONNX Runtime reads it
                raise ModelError(
                    f"{where}: tensor {value.name!r} declares dimension {dim.dim_value} on axis {axis}; a "
                    "dimension is a size >= 0, -1 or a name for a dynamic size: fix the model's shapes"
                )


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and sanity-check a float ONNX model given as a path or a ModelProto.

    Weights kept in external data files stay there: the proto references them relative to the
    model's folder (``external_data_folder``), so a model over 2 GB is never one protobuf. Their
    locations must name files inside that folder (``check_external_data``).
    """
    installation_note()  # every command reads a model first: a broken ONNX Runtime is named here
    external = False
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise ModelError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given ModelProto"
        if proto.ByteSize() > SINGLE_FILE_LIMIT:
            raise ModelError(
                "the given ModelProto is over 2 GB, more than protobuf can serialize; save it with "
                "onnx.save_model(model, path, save_as_external_data=True) and pass the path"
            )
    else:
        path = Path(model)
        where = str(path)
        if path.is_dir():
            raise ModelError(f"model path {path} is a folder; give the model's .onnx file")
        if not path.is_file():
            raise ModelError(f"model file not found: {path}; check the path")
        try:
            proto = onnx.load(path, load_external_data=False)
            external = uses_external_data(proto)
        except Exception as exc:  # protobuf raises DecodeError
            raise ModelError(
                f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                "pass a .onnx file exported by a framework"
            ) from exc
        check_external_data(proto, path.parent)
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"{where} has no graph nodes; pass a .onnx model file")
    try:
        # by path when weights lie in external files: the checker then finds them, and never
        # serializes a model over 2 GB
        onnx.checker.check_model(path if external else proto)
    except Exception as exc:  # ValidationError, or a C++ error on a malformed proto
        raise ModelError(f"{where} is not a valid ONNX model: {first_line(exc)}; re-export it") from exc
    check_well_formed(proto, where)
    return proto


def external_data_folder(model: str | os.PathLike | onnx.ModelProto, proto: onnx.ModelProto) -> Path | None:
    """The folder of the external data files ``proto`` (loaded from ``model``) references, if any."""
    if isinstance(model, onnx.ModelProto) or not uses_external_data(proto):
        return None
    return Path(model).resolve().parent


def model_bytes(path: Path, proto: onnx.ModelProto) -> int:
    """Bytes on disk of the model at ``path`` (read as ``proto``): its file and its external data files."""
    folder = path.parent
    locations = {
        info.value
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        if onnx.external_data_helper.uses_external_data(tensor)
        for info in tensor.external_data
        if info.key == "location"
    }
    return path.stat().st_size + sum((folder / location).stat().st_size for location in locations)


