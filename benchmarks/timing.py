"""Shared measurement helpers of the benchmarks: sessions, SQNR, interleaved latencies."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path) -> ort.InferenceSession:
    """A CPU session of the model at ``path`` with ONNX Runtime's default optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sqnr_db(reference: list[np.ndarray], approximation: list[np.ndarray]) -> float:
    """SQNR in dB of ``approximation`` against ``reference`` over all the arrays."""
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - a) ** 2)) for r, a in zip(reference, approximation))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def latencies_ms(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int) -> dict[str, list[float]]:
    """Per-model run times on ``feed``, interleaved so that machine noise hits all alike."""
    for item in sessions.values():
        item.run(None, feed)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, item in sessions.items():
            start = time.perf_counter()
            item.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return times
