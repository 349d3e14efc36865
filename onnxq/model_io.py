"""Reading the float model and writing the quantized one (atomically), in one protobuf file or,
for models near or over protobuf's 2 GB limit, as a model file plus an external data file."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath

import onnx
import onnx.external_data_helper
import onnx.version_converter
import onnx_ir as ir
import onnxruntime as ort
from google.protobuf.message import Message

from onnxq.errors import ModelError, OutputError, first_line

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
SINGLE_FILE_LIMIT = 2_000_000_000  # bytes: protobuf cannot serialize a message of 2 GiB or more
EXTERNAL_DATA_SUFFIX = ".data"  # OUTPUT.onnx -> OUTPUT.onnx.data


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
    UTF-8, tensors of unknown data types, graph inputs that are not typed tensors, negative dims."""
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
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise ModelError(
                    f"{where}: tensor {value.name!r} declares dimension {dim.dim_value} on axis {axis}; a "
                    "dimension is a size >= 0 or a name for a dynamic size: fix the model's shapes"
                )


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and sanity-check a float ONNX model given as a path or a ModelProto.

    Weights kept in external data files stay there: the proto references them relative to the
    model's folder (``external_data_folder``), so a model over 2 GB is never one protobuf. Their
    locations must name files inside that folder (``check_external_data``).
    """
    external = False
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
        if not uses_external_data(converted):  # else the output's check covers it, by path
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


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the tensors of ``model`` (initializers, subgraphs included): near its serialized size."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def release_mapped(tensor: ir.TensorProtocol | None) -> None:
    """Unmap ``tensor``'s external data file if it is mapped (it is mapped again when next read),
    so that a weight already used stops counting in memory."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still views it: it stays mapped
            tensor.release()


@contextlib.contextmanager
def offloaded(model: ir.Model) -> Iterator[Path]:
    """Within the block, the tensors of ``model`` live in an external data file in a temporary
    folder (yielded), so that its protobuf stays small; for ONNX Runtime sessions of big models."""
    with tempfile.TemporaryDirectory(prefix="onnxq-") as folder:
        ir.external_data.unload_from_model(model, folder, "model.data", size_threshold_bytes=1024)
        yield Path(folder)


def external_data_path(path: Path) -> Path:
    """Where the external data of a model written to ``path`` goes: ``OUTPUT.data`` beside it."""
    return path.with_name(path.name + EXTERNAL_DATA_SUFFIX)


def write_with_external_data(model: ir.Model, path: Path, finish: Callable[[Path], None]) -> tuple[int, str]:
    """Write ``model`` to ``path`` with its tensors in ``external_data_path(path)``. ``finish``
    gets the written model file, still under a temporary name, and may rewrite it (the data file
    stays) or raise to abandon the write. Returns (bytes written, sha256 of the model file
    followed by the data file).

    Both files are written in a temporary folder beside ``path``, then renamed, the data file
    first: a failure leaves neither file partial.
    """
    data_path = external_data_path(path)
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        staged = folder / path.name
        ir.save(model, staged, external_data=data_path.name, size_threshold_bytes=1024, alignment=65536)
        (folder / data_path.name).touch()  # a model with only tiny tensors still gets its pair
        finish(staged)
        digest = hashlib.sha256()
        for file in (staged, folder / data_path.name):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        size = staged.stat().st_size + (folder / data_path.name).stat().st_size
        os.replace(folder / data_path.name, data_path)
        os.replace(staged, path)
        _fsync_folder(path.parent)
        return size, digest.hexdigest()
    except OSError as exc:
        raise OutputError(
            f"could not write {path}: {exc.strerror}; check the path, permissions and free space"
        ) from exc
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
