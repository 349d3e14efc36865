"""Files onnxq writes: atomic writes (temp file, fsync, rename), models with external data, and
the temporary external data of big trial models."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import onnx_ir as ir

from onnxq.errors import OutputError, first_line

SINGLE_FILE_LIMIT = 2_000_000_000  # bytes: protobuf cannot serialize a message of 2 GiB or more
EXTERNAL_DATA_SUFFIX = ".data"  # OUTPUT.onnx -> OUTPUT.onnx.data


def check_writable(output: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``output`` cannot be written."""
    if not isinstance(output, (str, os.PathLike)):
        raise OutputError(f"output must be a path, not {type(output).__name__}")
    path = Path(output)
    if path.is_dir():
        raise OutputError(f"output path {path} is a folder; give a file name such as model.int8.onnx")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another output path")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: Mapping[str, Path | None]) -> None:
    """Refuse, before any work, an output that is one of the inputs (``inputs``: what it is ->
    its path), by any spelling of its path or a link to it."""
    for output in outputs:
        for what, path in inputs.items():
            if path is not None and _same_file(output, path):
                raise OutputError(f"{output} is {what}: onnxq would overwrite its own input; write to another path")


def os_reason(exc: OSError) -> str:
    """What went wrong in an ``OSError``: its strerror, else its first line (never "None")."""
    return exc.strerror or first_line(exc)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: sync the folder entry (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc``)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path, name: str = "*") -> None:
    """Remove the temporary files and folders a killed write of ``folder/name`` left
    (``.NAME.XXXXXXXX.tmp``, see ``write_atomically``); ``name="*"``: of any file there."""
    for entry in folder.glob(f".{name if name == '*' else glob.escape(name)}.{'?' * 8}.tmp"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename: never a partial file. The
    file gets the mode the umask gives a new file (``mkstemp`` alone would make it 0600)."""
    temp = None
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
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
            raise OutputError(f"could not write {path}: {os_reason(exc)}; check the path, permissions and free space") from exc
        raise


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
        raise OutputError(f"could not write {path}: {os_reason(exc)}; check the path, permissions and free space") from exc
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

