"""Shared measurement helpers of the benchmarks: sessions, SQNR, interleaved latencies (the
timing every conversion reports, ``onnxq.report.latency``) and the CPU's int8 features."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxq.cpu import int8_summary, read_cpuinfo
from onnxq.report.latency import REPEATS, interleaved_ms, ratio_spread


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


def latencies_ms(sessions: dict[str, ort.InferenceSession], feed: dict | None, runs: int,
                 feeds: dict[str, dict] | None = None) -> dict[str, list[list[float]]]:
    """Per-model run times on ``feed`` (or each model's own of ``feeds``) after a warm-up run
    each: ``REPEATS`` repeats of about ``runs / REPEATS`` runs per model, the runs of all models in
    a random order, so that machine noise hits all alike."""
    feeds = feeds or dict.fromkeys(sessions, feed)
    interleaved_ms(sessions, feeds, runs=1, repeats=1)
    return interleaved_ms(sessions, feeds, runs=max(1, -(-runs // REPEATS)))


def median_ms(times: list[list[float]]) -> float:
    """The median of a model's run times over all repeats."""
    return statistics.median(t for repeat in times for t in repeat)


def ratio_text(times: dict[str, list[list[float]]], name: str, reference: str = "float") -> str:
    """``name``'s median time over ``reference``'s and its spread over the repeats: ``0.54 (0.52-0.57)``."""
    ratio, low, high = ratio_spread(times, name, reference)
    return f"{ratio:.2f} ({low:.2f}-{high:.2f})"


def cpu_line() -> str:
    """This CPU's int8 features for a benchmark's header (``onnxq.cpu``)."""
    return int8_summary(read_cpuinfo())
