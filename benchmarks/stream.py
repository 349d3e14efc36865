"""Calibration samples streamed from a raw ``.npy`` file, one sample at a time, and the same
samples written as one ``.npz`` (``write_npz``) for onnxq to read itself.

Both quantizers read the data through ``samples()`` in the calibration benchmark, so that the
peak RSS they show is theirs, not the data set's: each sample is read from the file with a seek,
without memory-mapping the whole file. Set ``ONNXQ_BENCH_DATA`` (the .npy), ``ONNXQ_BENCH_INPUT``
(the model input name) and ``ONNXQ_BENCH_COUNT`` (how many samples).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def write_samples(path: Path, samples: Iterator[np.ndarray], count: int, shape: tuple[int, ...]) -> None:
    """Write ``count`` samples of ``shape`` (batch 1 each) into one .npy without holding them all."""
    temp = path.with_suffix(".tmp.npy")
    array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(count, *shape[1:]))
    for index, sample in zip(range(count), samples):
        array[index] = sample[0]
    array.flush()
    del array
    os.replace(temp, path)


def write_npz(path: Path, name: str, samples: Iterator[np.ndarray], count: int, shape: tuple[int, ...]) -> None:
    """Write ``count`` samples of ``shape`` (batch 1 each) as the array ``name`` of one uncompressed
    .npz (what ``numpy.savez`` writes) without holding them all."""
    temp = path.with_suffix(".tmp.npz")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (count, *shape[1:])}
    with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED) as archive, archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(member, header)
        for _, sample in zip(range(count), samples):
            member.write(np.ascontiguousarray(sample[0], dtype=np.float32).tobytes())
    os.replace(temp, path)


def samples() -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{input: array[1, ...]}`` for the first ``ONNXQ_BENCH_COUNT`` samples of the file."""
    path, name = os.environ["ONNXQ_BENCH_DATA"], os.environ["ONNXQ_BENCH_INPUT"]
    count = int(os.environ["ONNXQ_BENCH_COUNT"])
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(handle)
        offset = handle.tell()
        sample_shape = (1, *shape[1:])
        size = int(np.prod(sample_shape)) * np.dtype(dtype).itemsize
        for index in range(min(count, shape[0])):
            handle.seek(offset + index * size)
            yield {name: np.frombuffer(handle.read(size), dtype=dtype).reshape(sample_shape).copy()}
