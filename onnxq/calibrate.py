"""Calibration: run the float model on the data and observe the ranges of chosen tensors.

The model is copied and augmented so that exactly the requested tensors are graph outputs;
batches stream through an ONNX Runtime session and each output is reduced into its observer at
once, so memory holds one batch's tensors, never the whole data set's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.data import Batch
from onnxq.errors import ModelError
from onnxq.observers import MinMaxObserver

ProgressCallback = Callable[[int], None]


def _augmented(proto: onnx.ModelProto, tensor_names: list[str]) -> onnx.ModelProto:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    present = {output.name for output in augmented.graph.output}
    known = {info.name: info for info in augmented.graph.value_info}
    for name in tensor_names:
        if name in present:
            continue
        info = onnx.ValueInfoProto()
        if name in known:
            info.CopyFrom(known[name])
        else:
            info.name = name
        augmented.graph.output.append(info)
    return augmented


def create_session(model: onnx.ModelProto | bytes, what: str) -> ort.InferenceSession:
    """A CPU ONNX Runtime session; a model it refuses is reported as ``ModelError``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"ONNX Runtime cannot load {what}: {message}") from exc


def collect_ranges(
    proto: onnx.ModelProto,
    tensor_names: list[str],
    batches: Iterable[Batch],
    progress: ProgressCallback | None = None,
) -> dict[str, tuple[float, float]]:
    """Min/max of each named tensor over all batches; tensors that are not float are left out."""
    session = create_session(_augmented(proto, tensor_names), "the float model")
    observers = {name: MinMaxObserver() for name in tensor_names}
    not_float: set[str] = set()
    for batch in batches:
        try:
            outputs = session.run(tensor_names, batch.feed)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0]
            raise ModelError(
                f"the float model fails on the calibration data: {message}; check that the "
                "data matches what the model was exported for"
            ) from exc
        for name, array in zip(tensor_names, outputs):
            if isinstance(array, np.ndarray) and array.dtype == np.float32:
                observers[name].update(array)
            else:
                not_float.add(name)
        if progress is not None:
            progress(batch.samples)
    return {
        name: observer.range()
        for name, observer in observers.items()
        if name not in not_float and observer.observed
    }
