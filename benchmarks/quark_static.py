"""AMD Quark's ONNX quantizer with cross-layer equalization and AdaRound, in a process of its own.

``PYTHON benchmarks/quark_static.py MODEL OUTPUT DATA`` where ``PYTHON`` has ``amd-quark`` and
PyTorch installed (Quark's ONNX fine-tuning runs on PyTorch; they are not dependencies of onnxq,
so the corpus finds that interpreter in ``ONNXQ_QUARK_PYTHON``). Quark is configured as its
documentation's AdaRound example does (``CLEConfig()`` and ``AdaRoundConfig(learning_rate=0.1,
num_iterations=1000)``), with onnxq's defaults where the two differ in kind: QDQ, per-channel
int8 weights, uint8 asymmetric activations, MinMax calibration. DATA is an ``.npz`` whose arrays
hold one complete feed per index of axis 0 (``benchmarks.corpus`` writes it). Prints one JSON
line: ``seconds``, ``notes``, ``error``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script, this folder leads sys.path, and its float16.py would shadow the module of that
# name which Quark imports.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"


def quantize(model: str, output: str, data: str) -> list[str]:
    """Quantize ``model`` into ``output`` with Quark (CLE + AdaRound); returns notes."""
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import ModelQuantizer
    from quark.onnx.quantization.config.algorithm import AdaRoundConfig, CLEConfig
    from quark.onnx.quantization.config.config import QConfig
    from quark.onnx.quantization.config.spec import (
        CalibMethod,
        Int8Spec,
        QLayerConfig,
        QuantGranularity,
        UInt8Spec,
    )

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

        def rewind(self) -> None:
            self._index = 0

    config = QConfig(
        global_config=QLayerConfig(
            activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
            weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel),
        ),
        algo_config=[CLEConfig(), AdaRoundConfig(learning_rate=0.1, num_iterations=1000)],
    )
    ModelQuantizer(config).quantize_model(model, output, Reader())
    return []


def main() -> None:
    model, output, data = sys.argv[1:4]
    start = time.perf_counter()
    error, notes = None, []
    try:
        notes = quantize(model, output, data)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: a failing tool is a benchmark result
        error = _first_line(exc)
    print(json.dumps({"seconds": time.perf_counter() - start, "notes": notes, "error": error}))


if __name__ == "__main__":
    main()
