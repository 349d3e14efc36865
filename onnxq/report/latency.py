"""Batch-1 latency of the int8 model against the float model on this machine, measured so that
the figures survive a re-run:

1. Both sessions are built once and run once each to warm up; the warm-up times size the runs.
2. A repeat runs each model ``runs`` times, the runs of all models shuffled together (a seeded
   random order), so that machine noise and frequency changes hit every model alike.
3. There are ``REPEATS`` repeats; the runs per repeat fit ``LATENCY_BUDGET_S`` seconds in all
   (at least ``MIN_RUNS``, so a slow model takes longer than the budget; at most ``MAX_RUNS``).
4. Each repeat gives one ratio: the int8 median over the float median of its runs. The ratio
   reported is the median of these, the spread their lowest and highest (the runs of one repeat
   share the machine's state, the repeats may not); the milliseconds are medians of all runs.
5. Int8 is called slower only when the whole spread lies above 1; then the parts that make it
   slow are named from ONNX Runtime's profiler (``onnxq.report.profile``).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.data import Batch, InputSpec
from onnxq.cpu import int8_summary, read_cpuinfo
from onnxq.report.profile import profile, slow_parts
from onnxq.runtime import CPU, CUDA, create_session, cuda_unavailable_reason

LATENCY_BUDGET_S = 2.0  # seconds of timed runs per conversion, all repeats and both models together
REPEATS = 3
MIN_RUNS = 1  # per model and repeat, however slow the model
MAX_RUNS = 20  # per model and repeat, however fast the model
MIN_PAIRS, MAX_PAIRS = 10, 200  # pairs of runs ``paired_ratios`` times

Feed = dict[str, np.ndarray]


def interleaved_ms(sessions: Mapping[str, ort.InferenceSession], feeds: Mapping[str, Feed], runs: int,
                   repeats: int = REPEATS, seed: int = 0) -> dict[str, list[list[float]]]:
    """Milliseconds per run of each named session on its feed: ``repeats`` lists of ``runs``
    times each, the runs of all sessions in one seeded random order per repeat (rule 2)."""
    order = random.Random(seed)
    times: dict[str, list[list[float]]] = {name: [] for name in sessions}
    for _ in range(repeats):
        schedule = [name for name in sessions for _ in range(runs)]
        order.shuffle(schedule)
        for name in sessions:
            times[name].append([])
        for name in schedule:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name][-1].append((time.perf_counter() - start) * 1000)
    return times


def ratio_spread(times: Mapping[str, list[list[float]]], name: str, reference: str) -> tuple[float, float, float]:
    """The median, lowest and highest over the repeats of the ratio of ``name``'s median time
    over ``reference``'s (rule 4)."""
    per_repeat = [statistics.median(mine) / statistics.median(theirs)
                  for mine, theirs in zip(times[name], times[reference])]
    return statistics.median(per_repeat), min(per_repeat), max(per_repeat)


def paired_ratios(reference: ort.InferenceSession, other: ort.InferenceSession, feed: Feed, budget_s: float,
                  seed: int = 0) -> list[float]:
    """``other``'s time over ``reference``'s in pairs of runs made one right after the other, in a
    seeded random order within each pair: what disturbs the machine for a moment disturbs one pair,
    in either direction. After a warm-up run of each, as many pairs as fit ``budget_s``
    (``MIN_PAIRS`` to ``MAX_PAIRS``)."""
    order, sessions = random.Random(seed), {"reference": reference, "other": other}
    warm_up = interleaved_ms(sessions, dict.fromkeys(sessions, feed), runs=1, repeats=1)
    pair_ms = sum(t[0][0] for t in warm_up.values())
    ratios = []
    for _ in range(max(MIN_PAIRS, min(MAX_PAIRS, int(budget_s * 1000 / max(pair_ms, 1e-3))))):
        ms = {}
        for name in order.sample(list(sessions), 2):
            start = time.perf_counter()
            sessions[name].run(None, feed)
            ms[name] = time.perf_counter() - start
        ratios.append(ms["other"] / ms["reference"])
    return ratios


def _flat(repeats: list[list[float]]) -> list[float]:
    return [t for repeat in repeats for t in repeat]


def runs_within(budget_s: float, warm_up_ms: float, repeats: int = REPEATS) -> int:
    """Runs per model and repeat that fit ``budget_s`` when one run of every model together takes
    ``warm_up_ms`` (rule 3)."""
    fitting = int(budget_s * 1000 / (repeats * max(warm_up_ms, 1e-3)))
    return max(MIN_RUNS, min(MAX_RUNS, fitting))


def timed_within(sessions: Mapping[str, ort.InferenceSession], feed: Feed,
                 budget_s: float) -> tuple[dict[str, list[list[float]]], int]:
    """The times of the named sessions on ``feed``, warmed up and interleaved in ``REPEATS``
    repeats of runs that fit ``budget_s`` (rules 1-3), and the runs per repeat."""
    warm_up = interleaved_ms(sessions, dict.fromkeys(sessions, feed), runs=1, repeats=1)
    runs = runs_within(budget_s, sum(t[0][0] for t in warm_up.values()))
    return interleaved_ms(sessions, dict.fromkeys(sessions, feed), runs), runs


@dataclasses.dataclass(frozen=True)
class Latency:
    """Batch-1 latency of the int8 model against the float model: medians in ms, their ratio
    and spread (rule 4), the runs per model (all repeats), the provider, the times of every run
    per repeat, and the parts that make int8 slow (where it is, rule 5)."""

    float_ms: float
    int8_ms: float
    ratio: float
    spread: tuple[float, float]
    runs: int
    provider: str
    float_times: tuple[tuple[float, ...], ...]
    int8_times: tuple[tuple[float, ...], ...]
    slow_parts: tuple[str, ...] = ()

    @property
    def slower(self) -> bool:
        """Int8 is slower than float beyond the measured spread."""
        return self.spread[0] > 1


def measure_latency(float_session: ort.InferenceSession, int8_session: ort.InferenceSession, feed: Feed,
                    budget_s: float = LATENCY_BUDGET_S) -> Latency:
    """Time both sessions on ``feed`` (rules 1-4); ``conversion_latency`` also names the slow parts."""
    times, runs = timed_within({"float": float_session, "int8": int8_session}, feed, budget_s)
    ratio, low, high = ratio_spread(times, "int8", "float")
    return Latency(
        float_ms=statistics.median(_flat(times["float"])),
        int8_ms=statistics.median(_flat(times["int8"])),
        ratio=ratio,
        spread=(low, high),
        runs=runs * REPEATS,
        provider=int8_session.get_providers()[0],
        float_times=tuple(tuple(r) for r in times["float"]),
        int8_times=tuple(tuple(r) for r in times["int8"]),
    )


def batch_one(batch: Batch, inputs: list[InputSpec]) -> Feed:
    """The first sample of ``batch`` as a feed (inputs whose batch axis is fixed are fed whole)."""
    dynamic = {spec.name for spec in inputs if spec.dims and spec.dims[0] is None}
    return {name: array[:1] if name in dynamic else array for name, array in batch.feed.items()}


def latency_providers(target: str) -> tuple[str, ...]:
    """Where a model for ``target`` is timed: the CPU provider for ``cpu``, CUDA's for ``cuda``
    and ``tensorrt`` when it loads here (else the CPU's; ``Latency.provider`` says which ran)."""
    return (CUDA, CPU) if target != "cpu" and cuda_unavailable_reason() is None else (CPU,)


def conversion_latency(float_session: ort.InferenceSession, int8_session: ort.InferenceSession, feed: Feed,
                       float_model: onnx.ModelProto, int8_model: Path, external_folder: Path | None = None) -> Latency:
    """``measure_latency`` of the two sessions; where int8 is slower, the parts that make it
    slow, profiled on new sessions of ``float_model`` and ``int8_model`` (with the sessions'
    providers; ``external_folder``: the float model's external weights, as in ``create_session``)."""
    latency = measure_latency(float_session, int8_session, feed)
    if not latency.slower:
        return latency
    providers = tuple(int8_session.get_providers())
    float_kernels = profile(lambda prefix: create_session(float_model, "the float model", providers, external_folder,
                                                          profile_prefix=prefix), feed, float_model)
    int8_kernels = profile(lambda prefix: create_session(int8_model, "the int8 model", providers,
                                                         profile_prefix=prefix), feed,
                           onnx.load(int8_model, load_external_data=False))
    return dataclasses.replace(latency, slow_parts=tuple(slow_parts(float_kernels, int8_kernels)))


def latency_lines(latency: Latency | None) -> list[str]:
    """The warning on stderr when int8 is slower than float (rule 5), with the parts that make it slow."""
    if latency is None or not latency.slower:
        return []
    lines = [f"warning: the int8 model is slower than float on this machine: {latency.ratio:.2f}x float's batch-1 "
             f"latency ({latency.int8_ms:.3f} ms vs {latency.float_ms:.3f} ms, {latency.spread[0]:.2f}-"
             f"{latency.spread[1]:.2f}x over {REPEATS} repeats); keep the slow parts float (--keep-float); "
             f"{int8_summary(read_cpuinfo())}"]
    return lines + [f"warning:   slow: {part}" for part in latency.slow_parts]
