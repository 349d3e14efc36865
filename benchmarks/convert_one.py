"""Run one quantizer on one model in a fresh process and report its time and peak RSS as JSON.

``python -m benchmarks.convert_one TOOL MODEL OUTPUT DATA [METHOD [FORMAT [ACTIVATIONS]]]``: TOOL is ``onnxq``,
``ort`` (ONNX Runtime's quantize_static), ``calibrate`` (onnxq's calibration alone, nothing written)
or ``float`` (one plain inference pass, for reference);
DATA is an .npz with one array per model input (samples on axis 0), or ``stream`` for
``benchmarks.stream.samples``. Both tools are fed one sample at a time. METHOD is minmax
(default), percentile or entropy; FORMAT is qdq (default) or qoperator; ACTIVATIONS is uint8
(default) or int8 (symmetric).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _feeds(calibration: str):
    if calibration == "stream":
        from benchmarks.stream import samples

        yield from samples()
        return
    with np.load(calibration) as data:
        arrays = {name: data[name] for name in data.files}
    count = len(next(iter(arrays.values())))
    for i in range(count):
        yield {k: v[i : i + 1] for k, v in arrays.items()}


CALIBRATION_SECONDS = [0.0]  # time spent calibrating, as opposed to loading, rewriting, saving


def _timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            CALIBRATION_SECONDS[0] += time.perf_counter() - start

    return wrapper


def _convert_onnxq(model: str, output: str, calibration: str, method: str, form: str, activations: str) -> None:
    import importlib

    import onnxq

    runner = importlib.import_module("onnxq.calibration.runner")
    runner.calibrate = _timed(runner.calibrate)
    data = "benchmarks.stream:samples" if calibration == "stream" else calibration
    config = onnxq.QuantConfig(method=method, format=form, activations=activations)
    onnxq.convert(model, output, data, config, run=onnxq.RunOptions(device="cpu"))


def _calibrate_onnxq(model: str, output: str, calibration: str, method: str, form: str, activations: str) -> None:
    """onnxq's calibration alone (``calibrate_model`` on the loaded model), nothing written."""
    import onnxq
    from onnxq.calibration.data import BatchSource, model_inputs
    from onnxq.calibration.runner import calibrate_model
    from onnxq.load.prepare import load

    loaded = load(model)
    data = "benchmarks.stream:samples" if calibration == "stream" else calibration
    source = BatchSource(data, model_inputs(loaded.proto))
    start = time.perf_counter()
    calibrate_model(loaded, source, onnxq.QuantConfig(method=method), onnxq.RunOptions(device="cpu"), None, None, None)
    CALIBRATION_SECONDS[0] = time.perf_counter() - start


def _float_pass(model: str, output: str, calibration: str, method: str, form: str, activations: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    for feed in _feeds(calibration):
        session.run(None, feed)
    CALIBRATION_SECONDS[0] = time.perf_counter() - start


def _convert_ort(model: str, output: str, calibration: str, method: str, form: str, activations: str) -> None:
    from onnxruntime.quantization import calibrate
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = _feeds(calibration)

        def get_next(self):
            return next(self._feeds, None)

    # The reference tool as a new user runs it: per-channel int8 weights, uint8 activations, MinMax.
    for calibrator in (calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater):
        for step in ("collect_data", "compute_data"):
            setattr(calibrator, step, _timed(getattr(calibrator, step)))
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    quantize_static(
        model,
        output,
        Reader(),
        quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
        per_channel=True,
        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=methods[method],
    )


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike getrusage's ru_maxrss, which on Linux keeps the
    high-water mark of the parent that forked it, VmHWM starts anew with the exec'd program."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    tool, model, output, calibration = sys.argv[1:5]
    method = sys.argv[5] if len(sys.argv) > 5 else "minmax"
    form = sys.argv[6] if len(sys.argv) > 6 else "qdq"
    activations = sys.argv[7] if len(sys.argv) > 7 else "uint8"
    convert = {"onnxq": _convert_onnxq, "ort": _convert_ort, "float": _float_pass, "calibrate": _calibrate_onnxq}[tool]
    start = time.perf_counter()
    error = None
    try:
        convert(model, output, calibration, method, form, activations)
    except Exception as exc:  # reported, not raised: a failing tool is a benchmark result
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    peak_rss_mb = _peak_rss_mb()
    print(json.dumps({"seconds": seconds, "calibration_seconds": CALIBRATION_SECONDS[0], "peak_rss_mb": peak_rss_mb,
                      "error": error}))


if __name__ == "__main__":
    main()
