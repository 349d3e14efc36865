"""Metrics that score a model's outputs against the float model's (higher is better)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from onnxq.calibration.data import load_callable
from onnxq.errors import ConfigError, first_line
from onnxq.report.parts import is_distribution, labelled_output

Outputs = dict[str, np.ndarray]


Metric = Callable[[Outputs, Outputs, "np.ndarray | None"], float]


METRICS = ("auto", "sqnr", "cosine", "top1")


def relative_error(outputs: Outputs, reference: Outputs) -> float:
    """Noise power over signal power, averaged over the outputs (0 for identical outputs)."""
    errors = []
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs give NaN, said by the result
        for name, ref in reference.items():
            f = ref.astype(np.float64).ravel()
            q = outputs[name].astype(np.float64).ravel()
            errors.append(float(np.sum((f - q) ** 2)) / max(float(f @ f), 1e-30))
    return float(np.mean(errors))


def cosine_similarity(dot: np.ndarray | float, reference_energy: np.ndarray | float,
                      energy: np.ndarray | float) -> np.ndarray:
    """Cosine of the angle between a float output and its quantized version, from their dot
    product and energies (elementwise for arrays). Degenerate cases: both all zero are identical
    (1.0); one all zero and the other not share nothing (0.0), never a perfect 1.0."""
    dot, reference_energy, energy = (np.asarray(x, dtype=np.float64) for x in (dot, reference_energy, energy))
    norms = np.sqrt(reference_energy) * np.sqrt(energy)
    degenerate = np.where((reference_energy == 0) & (energy == 0), 1.0, 0.0)
    with np.errstate(invalid="ignore"):  # infinite energies give NaN, not a warning
        return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), degenerate)


def sqnr_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """``1 - noise/signal``: 1 for the float model; a drop of 0.01 is an SQNR of 20 dB."""
    return 1.0 - relative_error(outputs, reference)


def cosine_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Per-sample cosine similarity to the float outputs, averaged over samples and outputs."""
    scores = []
    for name, ref in reference.items():
        f = ref.astype(np.float64).reshape(len(ref), -1)
        q = outputs[name].astype(np.float64).reshape(len(ref), -1)
        dots, f_energy, q_energy = (np.einsum("ij,ij->i", a, b) for a, b in ((f, q), (f, f), (q, q)))
        scores.append(cosine_similarity(dots, f_energy, q_energy).mean())
    return float(np.mean(scores))


def top1_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Top-1 accuracy against ``labels`` of the output they are classes of (``labelled_output``);
    without labels (or no such output), arg-max agreement (over the last axis) with the float
    model of its first distribution output, else of its first output."""
    names = list(reference)
    if labels is not None:
        chosen = labelled_output([reference[name] for name in names], labels.reshape(-1))
        if chosen is not None:
            return float((outputs[names[chosen]].argmax(axis=-1) == labels.reshape(-1)).mean())
    name = next((name for name in names if is_distribution(reference[name])), names[0])
    predicted = outputs[name].argmax(axis=-1).reshape(-1)
    return float((predicted == reference[name].argmax(axis=-1).reshape(-1)).mean())


_BUILTIN = {"sqnr": sqnr_score, "cosine": cosine_score, "top1": top1_score}


def _checked(name: str, metric: Metric) -> Metric:
    """The user's ``metric``, whose exceptions and non-numbers (NaN, inf, text, arrays of more
    than one value) are ``ConfigError``s naming it."""

    def score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None) -> float:
        try:
            value = metric(outputs, reference, labels)
        except Exception as exc:
            raise ConfigError(f"metric {name} raised {type(exc).__name__}: {first_line(exc)}; fix the metric") from exc
        try:
            number = float(np.asarray(value, dtype=np.float64).item())
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"metric {name} returned {value!r:.60}; a metric returns one finite number, higher "
                              "is better")
        return number

    return score


def resolve_metric(metric: str | Metric, has_labels: bool) -> tuple[str, Metric]:
    """A metric's name and function: ``auto`` (top1 with labels, else sqnr), a builtin name, a
    loader spec ``file.py:func`` / ``pkg.mod:func``, or a callable
    ``metric(outputs, float_outputs, labels) -> float`` (higher is better); the user's metrics
    are checked (``_checked``)."""
    if callable(metric):
        name = getattr(metric, "__name__", "custom")
        return name, _checked(name, metric)
    if metric == "auto":
        metric = "top1" if has_labels else "sqnr"
    if metric in _BUILTIN:
        return metric, _BUILTIN[metric]
    if ":" in metric:
        return metric, _checked(metric, load_callable(metric, "metric", ConfigError))
    raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or file.py:func")


def target(reference: float, max_drop: float) -> float:
    """The lowest passing score: within ``max_drop`` (relative) of the float model's ``reference``."""
    return reference - max_drop * abs(reference)
