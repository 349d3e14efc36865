"""Run one quantizer on one model in a fresh process and report its time and peak RSS as JSON.

``python -m benchmarks.convert_one {onnxq|ort} MODEL OUTPUT CALIBRATION.npz``; the .npz holds one
array per model input with samples on axis 0, fed one sample at a time to both tools.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np


def _convert_onnxq(model: str, output: str, calibration: str) -> None:
    import onnxq

    onnxq.convert(model, output, calibration)


def _convert_ort(model: str, output: str, calibration: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class NpzReader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(calibration) as data:
                arrays = {name: data[name] for name in data.files}
            count = len(next(iter(arrays.values())))
            self._feeds = iter([{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)])

        def get_next(self):
            return next(self._feeds, None)

    # The reference tool as a new user runs it: QDQ, per-channel int8 weights, uint8 activations, MinMax.
    quantize_static(
        model,
        output,
        NpzReader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def main() -> None:
    tool, model, output, calibration = sys.argv[1:5]
    convert = {"onnxq": _convert_onnxq, "ort": _convert_ort}[tool]
    start = time.perf_counter()
    error = None
    try:
        convert(model, output, calibration)
    except Exception as exc:  # reported, not raised: a failing tool is a benchmark result
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb, "error": error}))


if __name__ == "__main__":
    main()
