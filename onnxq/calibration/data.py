"""Calibration and evaluation data: where it comes from, checks against the model, batching.

Data contract (shared/DESIGN.md section 2): a *chunk* is a dict ``{input_name: array}`` whose
arrays hold samples on axis 0. An array with the input's rank is batched along axis 0; one with
a rank more holds complete inputs, fed one by one. Keys starting with ``__`` and the key
``label`` (class indices, or one-hot rows) are metadata, never inputs. Chunks come from an
``.npz`` file, a folder of ``.npz`` (or, for single-input models, ``.npy``) files, read a batch
at a time (``onnxq.calibration.npz``), a folder of images (``onnxq.calibration.images``), a loader
``file.py:func`` / ``pkg.mod:func`` returning an iterable of chunks, or, in the Python API, a
dict, any iterable of dicts, or a ``get_next()`` reader (ONNX Runtime's ``CalibrationDataReader``
protocol).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.helper

from onnxq.calibration.images import LABEL_KEY, ImageFolder, is_image_folder
from onnxq.calibration.npz import OnDiskArray, open_npy, open_npz
from onnxq.errors import CalibrationDataError, OnnxqError, first_line


class DataReader(Protocol):
    """ONNX Runtime's ``CalibrationDataReader`` protocol: ``get_next()`` returns a
    ``{input_name: array}`` dict, or ``None`` at the end; an optional ``rewind()`` starts it over."""

    def get_next(self) -> Mapping[str, Any] | None: ...


DataSource = str | os.PathLike | ImageFolder | Mapping[str, Any] | Iterable[Mapping[str, Any]] | DataReader


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, element dtype and dims (``None`` for a symbolic dim)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def model_inputs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that must be fed (initializers listed as inputs are not)."""
    initializers = {init.name for init in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def source_path(source: DataSource | None) -> Path | None:
    """The file or folder a data source reads (a loader's ``.py`` file), if it is one."""
    if isinstance(source, ImageFolder):
        return Path(source.path)
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if ":" in text and not Path(text).exists():
        target = text.rpartition(":")[0]
        return Path(target) if target.endswith(".py") else None
    return Path(text)


def _data_file(path: Path, inputs: list[InputSpec]) -> contextlib.AbstractContextManager[dict]:
    """The arrays of an ``.npz`` or ``.npy`` file, read on demand while the context is open."""
    if path.suffix == ".npz":
        return _opened(path, open_npz(path), ".npz", "numpy.savez")
    if len(inputs) != 1:
        raise CalibrationDataError(
            f"{path}: .npy files only work for single-input models; this model has inputs "
            f"{[spec.name for spec in inputs]}, so save .npz files keyed by input name"
        )
    return _opened(path, open_npy(path, inputs[0].name), ".npy", "numpy.save")


@contextlib.contextmanager
def _opened(path: Path, opener: contextlib.AbstractContextManager[dict], kind: str, fix: str) -> Iterator[dict]:
    with contextlib.ExitStack() as stack:
        try:
            arrays = stack.enter_context(opener)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationDataError(
                f"cannot read {path} as {kind} ({type(exc).__name__}: {exc}); save it with {fix}"
            ) from exc
        yield arrays


def load_callable(spec: str, what: str, error: type[OnnxqError] = CalibrationDataError) -> Callable:
    """The function named by ``file.py:func`` or ``pkg.mod:func``; ``what`` names it in errors."""
    target, _, func_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise error(f"{what} file not found: {path}; check the path")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except OnnxqError:
        raise
    except Exception as exc:
        raise error(f"cannot import {what} {target} ({type(exc).__name__}: {exc}); fix the module") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise error(f"{target} has no function {func_name!r}; name the {what} function as file.py:func")
    return func


def _call_loader(spec: str) -> Any:
    func = load_callable(spec, "calibration loader")
    try:
        return func()
    except Exception as exc:
        raise CalibrationDataError(
            f"calibration loader {spec} raised {type(exc).__name__}: {exc}; fix the loader"
        ) from exc


def is_reader(source: Any) -> bool:
    """Whether ``source`` is a ``DataReader`` (it has ``get_next()``)."""
    return not isinstance(source, (str, os.PathLike, Mapping)) and callable(getattr(source, "get_next", None))


def _read_all(reader: DataReader) -> Iterator[Mapping[str, Any]]:
    """The dicts ``reader.get_next()`` returns until it returns ``None``."""
    while (item := reader.get_next()) is not None:
        yield item


def _guarded(items: Iterable) -> Iterator:
    """The items of a user's iterable; an exception it raises midway (a loader's generator
    failing) becomes a ``CalibrationDataError`` saying after how many items."""
    iterator = iter(items)
    count = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except OnnxqError:
            raise
        except Exception as exc:
            raise CalibrationDataError(
                f"the data source raised {type(exc).__name__} after {count} item(s): {first_line(exc)}; fix the loader"
            ) from exc
        count += 1
        yield item


def _chunks(source: DataSource, inputs: list[InputSpec]) -> Iterator[tuple[str, Mapping]]:
    """Yield ``(origin, chunk)`` pairs; ``origin`` names where a chunk came from in errors."""
    if isinstance(source, Mapping):
        yield "data", source
        return
    if isinstance(source, (str, os.PathLike)) and is_image_folder(Path(source)):
        source = ImageFolder(Path(source))
    if isinstance(source, ImageFolder):
        if len(inputs) != 1:
            raise CalibrationDataError(
                f"image folders feed single-input models; this model has inputs {[s.name for s in inputs]}, "
                "so give .npz files or a loader"
            )
        yield from source.chunks(inputs[0].name, inputs[0].dims, inputs[0].dtype)
        return
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.is_file() and path.suffix in (".npz", ".npy"):
            with _data_file(path, inputs) as arrays:
                yield str(path), arrays
            return
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
            if not files:
                raise CalibrationDataError(
                    f"folder {path} holds no .npz or .npy files; put calibration samples there"
                )
            for file in files:
                with _data_file(file, inputs) as arrays:
                    yield str(file), arrays
            return
        if ":" in text and not path.exists():
            source = _call_loader(text)
            if isinstance(source, Mapping):
                yield text, source
                return
        elif path.exists():
            raise CalibrationDataError(
                f"{text} is neither an .npz/.npy file nor a folder; save the data with numpy.savez as an .npz "
                "file (keys: input names), or give a loader as file.py:function"
            )
        else:
            raise CalibrationDataError(
                f"calibration data not found: {text}; give an .npz file, a folder of .npz "
                "files, or a loader as file.py:function"
            )
    if is_reader(source):
        source = _read_all(source)
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise CalibrationDataError(
            f"calibration data must be an iterable of {{input_name: array}} dicts, not "
            f"{type(source).__name__}"
        )
    for index, chunk in enumerate(_guarded(source)):
        if not isinstance(chunk, Mapping):
            raise CalibrationDataError(
                f"calibration item {index} is a {type(chunk).__name__}, not a dict of "
                "{input_name: array}; make the loader yield dicts"
            )
        yield f"item {index}", chunk


def _array(value: Any) -> OnDiskArray | np.ndarray:
    """An array of a chunk: an ``OnDiskArray`` stays on disk until its rows are fed."""
    return value if isinstance(value, OnDiskArray) else np.asarray(value)


def _check_finite(origin: str, feed: dict[str, np.ndarray], first_sample: int, samples: int) -> None:
    """Refuse NaN or Inf in a batch, naming the input and the sample's index in its chunk."""
    for name, array in feed.items():
        if np.issubdtype(array.dtype, np.floating) and array.size:
            finite = np.isfinite(array.reshape(samples, -1)).all(axis=1)
            if not finite.all():
                bad = first_sample + int(np.flatnonzero(~finite)[0])
                raise CalibrationDataError(
                    f"{origin}: input {name!r} sample {bad} contains NaN or Inf; clean or drop that sample"
                )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one chunk's arrays feed the model: samples per run and which arrays are stacked."""

    samples: int
    step: int
    stacked: frozenset[str]


def _class_indices(labels: np.ndarray) -> np.ndarray:
    """A batch's labels as class indices: ``[n]`` or ``[n, 1]`` as they are, one-hot (or
    per-class score) rows ``[n, classes]`` by their argmax."""
    if labels.ndim == 2:
        return labels[:, 0] if labels.shape[1] == 1 else labels.argmax(axis=1)
    return labels


def _check_labels(origin: str, labels: Any, samples: int) -> OnDiskArray | np.ndarray:
    labels = _array(labels)
    if labels.ndim == 0 and samples == 1:
        labels = labels.reshape(1)
    if labels.ndim not in (1, 2) or labels.shape[0] != samples:
        raise CalibrationDataError(
            f"{origin}: 'label' has shape {tuple(labels.shape)} for {samples} sample(s); give class indices "
            f"[{samples}] or one-hot rows [{samples}, classes]"
        )
    return labels


def _shape_fix(got: tuple[int, ...], expected: tuple[int | None, ...]) -> str:
    """How to fix per-sample dims ``got`` that do not fit ``expected``: a transpose when they are
    the expected dims in another order (NHWC data for an NCHW model), else a resize."""
    unused = list(range(len(got)))
    order = []
    for want in expected:
        match = next((axis for axis in unused if want is None or got[axis] == want), None)
        if match is None:
            return "resize the data to match"
        unused.remove(match)
        order.append(match + 1)
    return f"its axes are in another order (NHWC for NCHW?): transpose it, array.transpose(0, {', '.join(map(str, order))})"


def _check_chunk(
    origin: str, chunk: Mapping, inputs: list[InputSpec], batch_size: int
) -> tuple[dict, OnDiskArray | np.ndarray | None, _Layout]:
    if not inputs:
        raise CalibrationDataError(
            "the model has no inputs to feed: its outputs come from constants alone, so there is nothing to "
            "calibrate or compare on data; fold it to constants or give a model with inputs"
        )
    names = {spec.name for spec in inputs}
    arrays = {}
    for key, value in chunk.items():
        if key.startswith("__") or key == LABEL_KEY:
            continue
        if key not in names:
            raise CalibrationDataError(
                f"{origin}: {key!r} is not an input of the model (inputs: {sorted(names)}); "
                "rename it, or prefix it with __ to mark it as metadata"
            )
        arrays[key] = _array(value)
    missing = sorted(names - arrays.keys())
    if missing:
        raise CalibrationDataError(
            f"{origin}: no data for model input(s) {missing}; add an array for each input"
        )
    stacked, counts, fixed_batches = set(), {}, set()
    for spec in inputs:
        array = arrays[spec.name]
        if spec.dtype == np.dtype(object) and array.dtype.kind not in "USO":
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} is {array.dtype} but the model expects strings; "
                "give an array of str (numpy dtype <U)"
            )
        if spec.dtype != np.dtype(object) and array.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} is {array.dtype} but the model expects "
                f"{spec.dtype}; convert it with .astype(numpy.{spec.dtype})"
            )
        rank = len(spec.dims)
        if array.ndim == rank + 1:
            stacked.add(spec.name)
            per_sample, expected = array.shape[1:], spec.dims
        elif array.ndim == rank and rank > 0:
            per_sample, expected = array.shape[1:], spec.dims[1:]
            if spec.dims[0] is not None:
                fixed_batches.add(spec.dims[0])
        else:
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} has rank {array.ndim} but the model input "
                f"{spec.shape_text()} has rank {rank}; give rank {rank} (samples on axis 0) or "
                f"{rank + 1} (a stack of complete inputs)"
            )
        if any(want is not None and got != want for got, want in zip(per_sample, expected)):
            raise CalibrationDataError(
                f"{origin}: input {spec.name!r} has per-sample shape {tuple(per_sample)} but "
                f"the model expects {spec.shape_text()}; {_shape_fix(tuple(per_sample), expected)}"
            )
        counts[spec.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(
            f"{origin}: inputs hold different numbers of samples {counts}; give the same number for each"
        )
    if len(fixed_batches) > 1 or (stacked and fixed_batches - {1}):
        raise CalibrationDataError(
            f"{origin}: the model's inputs have fixed batch sizes {sorted(fixed_batches)} that "
            "cannot be fed together; store those inputs as stacks of complete inputs (one more axis)"
        )
    samples = next(iter(counts.values()))
    fixed_step = not stacked and bool(fixed_batches)
    step = 1 if stacked else (fixed_batches.pop() if fixed_step else batch_size)
    if fixed_step and samples % step:
        raise CalibrationDataError(
            f"{origin}: {samples} samples do not fill batches of the model's fixed batch size "
            f"{step}; give a multiple of {step}"
        )
    labels = chunk.get(LABEL_KEY)
    labels = None if labels is None else _check_labels(origin, labels, samples)
    return arrays, labels, _Layout(samples, step, frozenset(stacked))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One model run's feed ``{input_name: array}``, its sample count and its labels (class indices), if any."""

    feed: dict[str, np.ndarray]
    samples: int
    labels: np.ndarray | None = None


KEPT_BATCHES = 4  # the first batches a one-shot source keeps for measurements after calibration


class BatchSource:
    """Batches that can be read again for another pass; the first batch is read, and so
    checked, when the source is made. A one-shot iterator, or a ``get_next()`` reader without
    ``rewind()``, gives its batches only once (keeping its first ``KEPT_BATCHES`` for
    ``first_batches``); a reader with ``rewind()`` is rewound before every pass, the first included."""

    def __init__(self, data: DataSource, inputs: list[InputSpec], batch_size: int = 1, max_samples: int | None = None):
        rewind = getattr(data, "rewind", None) if is_reader(data) else None
        rewind = rewind if callable(rewind) else None
        self._one_shot = rewind is None if is_reader(data) else isinstance(data, Iterator)
        self._restart = lambda: iter_batches(_rewound(data, rewind), inputs, batch_size, max_samples)
        stream = self._restart()
        self.first = next(stream)
        self._kept: list[Batch] = []
        self._pending: Iterator[Batch] | None = self._keeping(itertools.chain([self.first], stream))

    def _keeping(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if self._one_shot and len(self._kept) < KEPT_BATCHES:
                self._kept.append(batch)
            yield batch

    def first_batches(self, count: int) -> list[Batch]:
        """The first ``count`` batches (at most ``KEPT_BATCHES`` of a one-shot source, those its
        first read has passed)."""
        return self._kept[:count] if self._one_shot else list(itertools.islice(self(), count))

    @property
    def one_shot(self) -> bool:
        """Whether the batches can be read only once."""
        return self._one_shot

    def __call__(self) -> Iterator[Batch]:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        return iter(()) if self._one_shot else self._restart()


def _rewound(reader: Any, rewind: Callable[[], Any] | None) -> Any:
    """``reader`` after calling its ``rewind()``, if it has one."""
    if rewind is not None:
        try:
            rewind()
        except Exception as exc:
            raise CalibrationDataError(
                f"the data reader's rewind() raised {type(exc).__name__}: {first_line(exc)}; fix the reader"
            ) from exc
    return reader


def iter_batches(
    source: DataSource,
    inputs: list[InputSpec],
    batch_size: int = 1,
    max_samples: int | None = None,
) -> Iterator[Batch]:
    """Yield the batches to run, with the matching slice of the chunk's ``label`` array as class
    indices (one-hot rows by their argmax).

    Every chunk's names, dtypes and shapes are checked before it is fed, and each batch's values
    (NaN, Inf) before it is yielded; the first problem raises ``CalibrationDataError`` naming the
    chunk, input and sample. ``.npy`` files and ``.npz`` members are read a batch at a time
    (``onnxq.calibration.npz``).
    """
    fed = 0
    for origin, chunk in _chunks(source, inputs):
        arrays, labels, layout = _check_chunk(origin, chunk, inputs, batch_size)
        for start in range(0, layout.samples, layout.step):
            stop = min(start + layout.step, layout.samples)
            if max_samples is not None:
                stop = min(stop, start + max_samples - fed)
            feed = {
                name: np.asarray(array[start]) if name in layout.stacked else array[start:stop]  # 0-d stays an array
                for name, array in arrays.items()
            }
            _check_finite(origin, feed, start, stop - start)
            yield Batch(feed, stop - start, None if labels is None else _class_indices(np.asarray(labels[start:stop])))
            fed += stop - start
            if max_samples is not None and fed >= max_samples:
                return
    if fed == 0:
        raise CalibrationDataError(
            "the data holds no samples; give at least one sample per input"
        )
