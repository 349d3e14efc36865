"""ONNX Runtime's static quantization run as its documentation advises, in a process of its own.

``python benchmarks/ort_static.py MODEL OUTPUT DATA [uint8|int8]`` runs ``quant_pre_process``
(shape inference and graph optimization before quantizing; when its symbolic shape inference
fails, again with ``skip_symbolic_shape=True``, as the documentation says) and then
``quantize_static`` on its result: QDQ format, per-channel int8 weights, MinMax calibration,
activations int8 (S8S8, the documentation's first choice; the default) or uint8 (U8S8). DATA is
an ``.npz`` whose arrays hold one complete feed per index of axis 0 (``benchmarks.corpus`` writes
it). A model that ``quant_pre_process`` cannot handle either way is quantized as it is; failures
are reported; so is a ``quantize_static`` that fails on the preprocessed model or writes a model
ONNX Runtime cannot load, after which the model is quantized as it is. Prints one JSON line:
``seconds``, ``notes``, ``error``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


def quantize(model: str, output: str, data: str, activations: str) -> list[str]:
    """Quantize ``model`` into ``output``; returns notes on what did not go as documented.

    When ``quantize_static`` fails on the preprocessed model, or writes a model ONNX Runtime
    cannot load, the model is quantized again as it is (what a user would try next).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(data) as arrays:
        feeds = {name: arrays[name] for name in arrays.files}
    count = len(next(iter(feeds.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._index = 0

        def get_next(self):
            if self._index == count:
                return None
            self._index += 1
            return {name: np.asarray(array[self._index - 1]) for name, array in feeds.items()}

    def quantize_and_load(source: str) -> None:
        quantize_static(
            source,
            output,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        ort.InferenceSession(output, providers=["CPUExecutionProvider"])

    notes = []
    with tempfile.TemporaryDirectory() as folder:
        source = str(Path(folder) / "preprocessed.onnx")
        try:
            quant_pre_process(model, source)
        except Exception as exc:  # noqa: BLE001 - reported: ORT's own preprocessing failing is a result
            try:  # what the documentation says to do when symbolic shape inference fails
                quant_pre_process(model, source, skip_symbolic_shape=True)
                notes.append(f"quant_pre_process: {_first_line(exc)}; reran with skip_symbolic_shape=True")
            except Exception as retry:  # noqa: BLE001 - reported
                notes.append(f"quant_pre_process: {_first_line(exc)}; {_first_line(retry)}; not preprocessed")
                source = model
        try:
            quantize_and_load(source)
        except Exception as exc:
            if source == model:
                raise
            notes.append(f"on the preprocessed model: {_first_line(exc)}; quantized the model as it is")
            quantize_and_load(model)
    return notes


def main() -> None:
    model, output, data = sys.argv[1:4]
    activations = sys.argv[4] if len(sys.argv) > 4 else "int8"
    start = time.perf_counter()
    error, notes = None, []
    try:
        notes = quantize(model, output, data, activations)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: a failing tool is a benchmark result
        error = _first_line(exc)
    print(json.dumps({"seconds": time.perf_counter() - start, "notes": notes, "error": error}))


if __name__ == "__main__":
    main()
