"""``.npy`` files and ``.npz`` members read a few samples at a time, so that memory stays flat in
the number of samples a file holds.

1. An ``.npy`` file, or an ``.npz`` member stored uncompressed (``numpy.savez``), is read from
   its byte range with a seek per batch: only the rows asked for are read.
2. A compressed ``.npz`` member (``numpy.savez_compressed``) is decompressed forward as rows are
   asked for; asking for earlier rows starts its decompression again.
3. A whole-file ``numpy.memmap`` is not used: every page it touches counts in the process's
   resident memory until the mapping closes, so peak RSS would still grow with the file.
4. A Fortran-ordered array (rows not contiguous on disk), an ``.npy`` format version other than
   1.0 and 2.0, or a member that is not an ``.npy`` is loaded whole, as ``numpy.load`` does.
"""

from __future__ import annotations

import contextlib
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from onnxq.errors import CalibrationDataError

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class OnDiskArray:
    """An array whose rows (axis 0) are read from an open ``.npy`` stream when indexed.

    Indexing takes an int or a slice of step 1 along axis 0 and returns a new ndarray."""

    def __init__(self, handle: BinaryIO, shape: tuple[int, ...], dtype: np.dtype, origin: str) -> None:
        self.shape, self.dtype, self.origin = shape, dtype, origin
        self._handle = handle
        self._data_start = handle.tell()
        self._row_bytes = dtype.itemsize * math.prod(shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("an OnDiskArray is read in contiguous rows only")
            return self._rows(start, max(start, stop))
        position = index + self.shape[0] if index < 0 else index
        if not 0 <= position < self.shape[0]:
            raise IndexError(f"row {index} is outside the {self.shape[0]} rows of {self.origin}")
        return self._rows(position, position + 1)[0]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        rows = np.empty((stop - start, *self.shape[1:]), self.dtype)
        buffer = memoryview(rows.reshape(-1).view(np.uint8))
        try:
            self._handle.seek(self._data_start + start * self._row_bytes)
            filled = 0
            while filled < len(buffer):
                count = self._handle.readinto(buffer[filled:])
                if not count:
                    raise EOFError(f"it ends after {start + filled // max(self._row_bytes, 1)} of {self.shape[0]} rows")
                filled += count
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationDataError(
                f"cannot read {self.origin} ({type(exc).__name__}: {exc}); save the file again"
            ) from exc
        return rows


def _array(handle: BinaryIO, origin: str) -> OnDiskArray | None:
    """The array of the ``.npy`` stream ``handle``, or ``None`` when it must be loaded whole."""
    version = np.lib.format.read_magic(handle)
    if version not in _HEADER_READERS:
        return None
    shape, fortran_order, dtype = _HEADER_READERS[version](handle)
    if fortran_order or dtype.hasobject or not shape:
        return None
    return OnDiskArray(handle, shape, dtype, origin)


@contextlib.contextmanager
def open_npy(path: Path, key: str) -> Iterator[dict[str, OnDiskArray | np.ndarray]]:
    """``{key: array}`` for the array of an ``.npy`` file, read on demand while the context is open."""
    with open(path, "rb") as handle:
        try:
            array = _array(handle, str(path))
        except ValueError:
            array = None  # not an .npy: numpy.load says why
        yield {key: array if array is not None else np.load(path, allow_pickle=False)}


@contextlib.contextmanager
def open_npz(path: Path) -> Iterator[dict[str, OnDiskArray | np.ndarray]]:
    """``{key: array}`` for each member of an ``.npz`` file, read on demand while the context is
    open; keys are the member names without ``.npy``, as ``numpy.load`` gives them."""
    with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as members:
        arrays: dict[str, OnDiskArray | np.ndarray] = {}
        for name in archive.namelist():
            key = name.removesuffix(".npy")
            handle = members.enter_context(archive.open(name))
            try:
                array = _array(handle, f"{path} member {key!r}")
            except ValueError:
                array = None
            if array is None:
                with archive.open(name) as whole:
                    array = np.lib.format.read_array(whole, allow_pickle=False)
            arrays[key] = array
        yield arrays
