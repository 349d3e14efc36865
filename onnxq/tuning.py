"""Accuracy-driven mixed precision: metrics, per-node sensitivity, and the fallback search.

1. A metric scores a model's outputs against the float model's on the evaluation data (higher is
   better); the float model's own score is the reference, and a model passes when its score is
   at least ``reference - max_drop * |reference|``.
2. Sensitivity of a unit of nodes: the model-output error (noise power over signal power,
   averaged over outputs) with only that unit kept float, subtracted from the error of the
   plain int8 model (``only-float``), or the error with only that unit quantized, less the
   error with every unit float (``only-quantized``); measured on a few evaluation samples. Large graphs are measured in groups
   of neighbouring units first, and only the most sensitive groups unit by unit
   (``rank_units``), which keeps the number of trial models near 7 sqrt(n).
   Nodes are kept float in units: a quantized tensor is float only when its producer and all
   its quantized readers are, so a unit is a compute node with the compute nodes that read it.
3. A candidate passes when the metric meets the target on the whole evaluation set and on each
   of its halves (``check_halves``). The search keeps the most sensitive units float: it doubles a prefix of the ranking until the
   metric passes, bisects down to the shortest passing prefix, then tries to re-quantize chunks
   of its units (least sensitive first, halving the chunk size) and finally single nodes,
   keeping every change the metric allows, within ``max_trials`` evaluated models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from onnxq.data import load_callable
from onnxq.errors import ConfigError

Outputs = dict[str, np.ndarray]
Metric = Callable[[Outputs, Outputs, "np.ndarray | None"], float]
METRICS = ("auto", "sqnr", "cosine", "top1")
SENSITIVITY_MODES = ("only-float", "only-quantized")
MIN_BATCHES_TO_SPLIT = 8  # fewer evaluation batches than this are not split in halves


def relative_error(outputs: Outputs, reference: Outputs) -> float:
    """Noise power over signal power, averaged over the outputs (0 for identical outputs)."""
    errors = []
    for name, ref in reference.items():
        f = ref.astype(np.float64).ravel()
        q = outputs[name].astype(np.float64).ravel()
        errors.append(float(np.sum((f - q) ** 2)) / max(float(f @ f), 1e-30))
    return float(np.mean(errors))


def sqnr_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """``1 - noise/signal``: 1 for the float model; a drop of 0.01 is an SQNR of 20 dB."""
    return 1.0 - relative_error(outputs, reference)


def cosine_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Per-sample cosine similarity to the float outputs, averaged over samples and outputs."""
    scores = []
    for name, ref in reference.items():
        f = ref.astype(np.float64).reshape(len(ref), -1)
        q = outputs[name].astype(np.float64).reshape(len(ref), -1)
        norms = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
        dots = np.einsum("ij,ij->i", f, q)
        scores.append(np.where(norms > 0, dots / np.maximum(norms, 1e-300), 1.0).mean())
    return float(np.mean(scores))


def top1_score(outputs: Outputs, reference: Outputs, labels: np.ndarray | None = None) -> float:
    """Top-1 accuracy of the first output against ``labels``; without labels, agreement of its
    arg-max (over the last axis) with the float model's."""
    name = next(iter(reference))
    predicted = outputs[name].argmax(axis=-1).reshape(-1)
    if labels is not None and labels.size == predicted.size:
        return float((predicted == labels.reshape(-1)).mean())
    return float((predicted == reference[name].argmax(axis=-1).reshape(-1)).mean())


_BUILTIN = {"sqnr": sqnr_score, "cosine": cosine_score, "top1": top1_score}


def resolve_metric(metric: str | Metric, has_labels: bool) -> tuple[str, Metric]:
    """A metric's name and function: ``auto`` (top1 with labels, else sqnr), a builtin name, a
    loader spec ``file.py:func`` / ``pkg.mod:func``, or a callable
    ``metric(outputs, float_outputs, labels) -> float`` (higher is better)."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric == "auto":
        metric = "top1" if has_labels else "sqnr"
    if metric in _BUILTIN:
        return metric, _BUILTIN[metric]
    if ":" in metric:
        return metric, load_callable(metric, "metric", ConfigError)
    raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or file.py:func")


def rank_units(
    units: Sequence[tuple[str, ...]],
    gain_of: Callable[[frozenset[str]], float],
    individually: int = 64,
    refine: int = 6,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, ...], float]:
    """Sensitivity of each unit: ``gain_of(nodes)`` is the error removed by keeping ``nodes``
    float. Up to ``individually`` units are measured one by one; more are measured in about
    sqrt(n) contiguous groups first (neighbouring units in graph order), and only the units of
    the ``refine`` groups with the largest gains are then measured one by one; the others share
    their group's gain evenly. Returns gains in ranking order, largest first."""
    total = len(units) if len(units) <= individually else None
    done = 0

    def measure(nodes: frozenset[str]) -> float:
        nonlocal done
        gain = gain_of(nodes)
        done += 1
        if progress is not None:
            progress(done, total or done)
        return gain

    if len(units) <= individually:
        gains = {unit: measure(frozenset(unit)) for unit in units}
    else:
        size = max(1, round(len(units) ** 0.5))
        groups = [tuple(units[i : i + size]) for i in range(0, len(units), size)]
        total = len(groups) + refine * size
        group_gains = {group: measure(frozenset().union(*group)) for group in groups}
        ordered = sorted(groups, key=lambda g: -group_gains[g])
        gains = {}
        for group in ordered[:refine]:
            gains.update((unit, measure(frozenset(unit))) for unit in group)
        for group in ordered[refine:]:
            gains.update((unit, group_gains[group] / len(group)) for unit in group)
    return dict(sorted(gains.items(), key=lambda item: -item[1]))


def target(reference: float, max_drop: float) -> float:
    """The lowest passing score: within ``max_drop`` (relative) of the float model's ``reference``."""
    return reference - max_drop * abs(reference)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen fallback set (node keys), its score, and whether it met the target."""

    keep_float: frozenset[str]
    score: float
    met: bool
    trials: int


def search_fallback(
    ranked: Sequence[frozenset[str]],
    base: frozenset[str],
    sensitivity: dict[str, float],
    score: Callable[[frozenset[str]], float],
    accept: Callable[[float], bool],
    max_trials: int,
) -> SearchResult:
    """A small set of nodes that, kept float beside ``base``, makes ``accept(score(...))`` true:
    the shortest passing prefix of ``ranked`` (node sets, most sensitive first), then pruned:
    chunks of its units, least sensitive first and halving in size, are re-quantized where the
    metric allows, and finally single nodes, least ``sensitivity`` first."""
    trials = 0

    def ok(nodes: frozenset[str]) -> tuple[bool, float]:
        nonlocal trials
        trials += 1
        value = score(base | nodes)
        return accept(value), value

    def union(units: Sequence[frozenset[str]]) -> frozenset[str]:
        return frozenset().union(*units)

    good, value = ok(frozenset())
    if good or not ranked:
        return SearchResult(base, value, good, trials)
    low, high = 0, 1
    while True:
        high = min(high, len(ranked))
        good, value = ok(union(ranked[:high]))
        if good or high == len(ranked):
            break
        low, high = high, high * 2
    if not good:
        return SearchResult(base | union(ranked), value, False, trials)
    best_value = value
    while high - low > 1 and trials < max_trials:
        middle = (low + high) // 2
        good, value = ok(union(ranked[:middle]))
        if good:
            high, best_value = middle, value
        else:
            low = middle
    kept = list(ranked[:high])
    chunk = len(kept) // 2
    while chunk >= 1 and trials < max_trials:
        start = len(kept) - chunk  # the least sensitive units are at the end
        while start >= 0 and len(kept) > chunk and trials < max_trials:
            trial = kept[:start] + kept[start + chunk :]
            good, value = ok(union(trial))
            if good:
                kept, best_value = trial, value
            start -= chunk
        chunk //= 2
    chosen = union(kept)
    for key in sorted(chosen, key=lambda k: (sensitivity.get(k, 0.0), k)):
        if trials >= max_trials or len(chosen) == 1:
            break
        good, value = ok(chosen - {key})
        if good:
            chosen, best_value = chosen - {key}, value
    return SearchResult(base | chosen, best_value, True, trials)


@dataclasses.dataclass(frozen=True)
class FallbackOptions:
    """Mixed-precision choices that do not change calibration.

    ``keep_float``: rules (``onnxq.rules``) for nodes that stay float. ``max_drop``: with
    evaluation data, keep the most sensitive nodes float until the metric is within this
    relative drop of the float model's (``None``: no search). ``metric``: ``auto``, ``sqnr``,
    ``cosine``, ``top1``, ``file.py:func`` or a callable (see ``resolve_metric``).
    ``check_halves``: the target must also hold on each half of the evaluation batches (with at
    least ``MIN_BATCHES_TO_SPLIT``), so that a set that barely passes on the whole set by
    chance is not chosen. ``dtype``: ``fp32`` or ``fp16`` for the nodes left float. ``sensitivity``: ``only-float``
    (the error each unit removes when it alone is float) or ``only-quantized`` (the error each
    unit adds when it alone is quantized). ``sensitivity_samples``: evaluation samples the
    per-node sensitivity is measured on. ``max_trials``: most evaluated candidates in
    the search. ``save_rules``: write the final keep-float set as a rules file there.
    """

    keep_float: tuple = ()
    max_drop: float | None = None
    metric: str | Metric = "auto"
    check_halves: bool = True
    dtype: str = "fp32"
    sensitivity: str = "only-float"
    sensitivity_samples: int = 4
    max_trials: int = 64
    save_rules: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise ConfigError(f"fallback dtype must be fp32 or fp16, not {self.dtype!r}")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ConfigError(f"sensitivity must be one of {', '.join(SENSITIVITY_MODES)}, not {self.sensitivity!r}")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop is a relative drop between 0 and 1 (0.01 = 1%), not {self.max_drop}")
        if self.sensitivity_samples < 1 or self.max_trials < 1:
            raise ConfigError("sensitivity samples and max trials must be at least 1")


@dataclasses.dataclass(frozen=True)
class KeptNode:
    """A node left float: its name, op, why, and its measured sensitivity (when measured)."""

    name: str
    op: str
    reason: str
    sensitivity: float | None = None


@dataclasses.dataclass(frozen=True)
class FallbackReport:
    """The outcome of the accuracy-driven search: metric, float and int8 scores, the final
    score, whether it met ``max_drop``, how many trials, and the nodes kept float."""

    metric: str
    max_drop: float
    float_score: float
    int8_score: float
    final_score: float
    met: bool
    trials: int
    kept: tuple[KeptNode, ...]
