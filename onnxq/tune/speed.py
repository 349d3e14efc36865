"""Leave float what int8 only slows down, measured on this machine:

1. It runs where the conversion times its output (``--latency``, the CPU provider, weights in
   memory) and the float model takes at least ``MIN_FLOAT_MS`` per batch-1 run: below that, ONNX
   Runtime's overhead per run and per kernel decides, not the arithmetic.
2. Both models are profiled (``onnxq.report.profile``) and every kernel is charged to a node of
   the float graph: a kernel named as a node, or as a node's first output (ONNX Runtime names
   some fused kernels so), to that node; a QuantizeLinear left unfused (its producer runs in float)
   to the first quantized node reading its tensor, which needs it; a DequantizeLinear left unfused
   (a reader runs in float) to the producer of its tensor, which writes int8; any other kernel
   (nodes ONNX Runtime made itself, such as the HardSigmoid and Mul of a float HardSwish between
   two int8 layers) to the node charged before it, in the order the kernels ran.
3. A quantized node whose int8 kernels take ``NOISE`` longer than its float kernels, or more, is
   slower in int8 (a kernel's median time over a few runs moves by some percent between runs).
4. The model with every such node float is built and timed against the int8 model (runs of
   both interleaved, ``onnxq.report.latency``, each repeat's time its lower quartile: runs that
   another process slowed down weigh less); it is kept only when it is faster in every
   repeat and meets the accuracy target as well as the int8 model does, where there is data to
   measure on. One round: the nodes around a new float node change their Q/DQ, so the kept
   model's own latency is what the summary reports.
5. The choice is a workspace step; a resumed run reads it back and times nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig
from onnxq.load.prepare import LoadedModel
from onnxq.report.latency import LATENCY_BUDGET_S, REPEATS, interleaved_ms, ratio_spread, timed_within
from onnxq.report.profile import Kernel, profile
from onnxq.rewrite.build import BuiltModel, build_model
from onnxq.runtime import create_session, session_proto
from onnxq.workspace.steps import LayersStep

MIN_FLOAT_MS = 1.0  # batch-1 float latency below which the pass does not run (rule 1)
PROFILE_RUNS = 6  # profiled runs of each model: a kernel's time is its median
NOISE = 0.1  # relative excess of a node's int8 time over its float time that counts (rule 3)
SLOWER_REASON = "slower in int8 on this CPU"

Feed = dict[str, np.ndarray]


def charged_ms(kernels: list[Kernel], model: onnx.ModelProto, float_graph: onnx.GraphProto) -> dict[str, float]:
    """The kernels of a profile of ``model`` (the float model or its int8 form) charged to the
    nodes of ``float_graph`` by name, in ms per run (rule 2)."""
    names = {node.name for node in float_graph.node}
    by_output = {node.output[0]: node.name for node in float_graph.node if node.output}
    producer = {output: node.name for node in float_graph.node for output in node.output}
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for node in float_graph.node:
        for name in node.input:
            readers[name].append(node.name)
    nodes = {node.name: node for node in model.graph.node}
    q_inputs = {out: node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"
                for out in node.output}
    ms: dict[str, float] = collections.defaultdict(float)
    last = None
    for kernel in kernels:
        node = nodes.get(kernel.name)
        owner = kernel.name if kernel.name in names else by_output.get(kernel.name)
        if node is not None and node.op_type == "QuantizeLinear":
            owner = next((r for r in readers.get(node.input[0], []) if r in names), last)
        elif node is not None and node.op_type == "DequantizeLinear":
            tensor = q_inputs.get(node.input[0])
            owner = producer.get(tensor, last) if tensor is not None else \
                next((r for out in node.output for r in _int8_readers(model, out)), last)
        owner = owner if owner is not None else last
        if owner is not None:
            ms[owner] += kernel.ms
            last = owner
    return dict(ms)


def _int8_readers(model: onnx.ModelProto, tensor: str) -> list[str]:
    """The nodes of ``model`` reading ``tensor`` (a dequantized weight's readers)."""
    return [node.name for node in model.graph.node if tensor in node.input]


def slower_nodes(float_ms: dict[str, float], int8_ms: dict[str, float], quantized: set[str]) -> list[str]:
    """The ``quantized`` nodes (by name) whose charged int8 time exceeds their float time by
    ``NOISE`` or more (rule 3), most slowed first."""
    excess = {name: int8_ms.get(name, 0.0) - float_ms.get(name, 0.0) for name in quantized}
    return sorted((name for name, ms in excess.items() if ms > NOISE * float_ms.get(name, 0.0) and ms > 0),
                  key=lambda name: -excess[name])


@dataclasses.dataclass(frozen=True)
class SpeedChoice:
    """The outcome of the pass: the nodes found slower in int8 (names), whether the model with them
    float was kept, and its latency over the int8 model's (median ratio and spread over repeats)."""

    slower: tuple[str, ...]
    kept: bool
    ratio: float = 1.0
    spread: tuple[float, float] = (1.0, 1.0)


def time_against(int8_session: ort.InferenceSession, trial_session: ort.InferenceSession, feed: Feed,
                 budget_s: float) -> tuple[float, float, float]:
    """The trial model's latency over the int8 model's: median ratio, lowest and highest over the
    repeats of interleaved runs (rule 4)."""
    times, _ = timed_within({"int8": int8_session, "trial": trial_session}, feed, budget_s)
    return ratio_spread(times, "trial", "int8", lower_quartile)


def lower_quartile(runs: list[float]) -> float:
    """The time a quarter of the runs beat: what a model takes when the machine lets it run
    (another process only ever adds time to a run), so that a run slowed by it weighs less."""
    return float(np.percentile(runs, 25))


def choose(slower: list[str], timed: Callable[[], tuple[float, float, float]],
           accurate_enough: Callable[[], bool]) -> SpeedChoice:
    """Rule 4: keep the model with the ``slower`` nodes float when ``timed()`` (its latency over
    the int8 model's) says faster in every repeat and ``accurate_enough()`` holds."""
    if not slower:
        return SpeedChoice((), False)
    ratio, low, high = timed()
    kept = high < 1.0 and accurate_enough()
    return SpeedChoice(tuple(slower), kept, ratio, (low, high))


def _profiled(model: onnx.ModelProto, feed: Feed, what: str, external_folder=None) -> list[Kernel]:
    return profile(lambda prefix: create_session(model, what, external_folder=external_folder, profile_prefix=prefix),
                   feed, model, PROFILE_RUNS)


def leave_slow_float(loaded: LoadedModel, state: CalibrationState, config: QuantConfig, layers: LayersStep,
                     keep_float: dict[str, str], fallback_dtype: str, built: BuiltModel, feed: Feed,
                     accurate_enough: Callable[[BuiltModel], bool]) -> tuple[BuiltModel, SpeedChoice | None]:
    """The model to write (``built`` or the one with its slower nodes float) and the choice, by
    node key; ``None`` where the float model is too fast to judge (rule 1). ``accurate_enough``
    tells whether a model meets the accuracy target as well as ``built`` does."""
    float_model = loaded.cleaned
    float_session = create_session(float_model, "the float model", external_folder=loaded.external_folder)
    float_runs = interleaved_ms({"float": float_session}, {"float": feed}, runs=3, repeats=1)["float"][0]
    if float(np.median(float_runs)) < MIN_FLOAT_MS:
        return built, None
    int8_model = session_proto(built.model)
    float_ms = charged_ms(_profiled(float_model, feed, "the float model", loaded.external_folder), float_model,
                          float_model.graph)
    int8_ms = charged_ms(_profiled(int8_model, feed, "the int8 model"), int8_model, float_model.graph)
    keys = {node.name: key for node, key in loaded.keys.nodes.items() if node.graph is loaded.model.graph}
    quantized = {name for name, key in keys.items() if any(key in unit for unit in built.units)}
    slower = [keys[name] for name in slower_nodes(float_ms, int8_ms, quantized)]
    if not slower:
        return built, SpeedChoice((), False)
    trial = build_model(loaded, state, config, layers, keep_float | dict.fromkeys(slower, SLOWER_REASON),
                        fallback_dtype)
    int8_session = create_session(int8_model, "the int8 model")
    trial_session = create_session(session_proto(trial.model), "the int8 model with its slow nodes float")
    choice = choose(slower, lambda: time_against(int8_session, trial_session, feed, LATENCY_BUDGET_S),
                    lambda: accurate_enough(trial))
    return (trial if choice.kept else built), choice


def speed_notes(choice: SpeedChoice) -> list[str]:
    """The summary's line on the pass."""
    if not choice.slower:
        return []
    timed = f"{choice.ratio:.2f}x the int8 model's batch-1 latency ({choice.spread[0]:.2f}-{choice.spread[1]:.2f}x " \
            f"over {REPEATS} repeats)"
    if choice.kept:
        return [f"kept float {len(choice.slower)} node(s) whose int8 kernels ran slower than their float ones on this "
                f"CPU (profiled): the model with them float runs at {timed}; --no-speed-fallback quantizes them"]
    return [f"{len(choice.slower)} quantized node(s) ran slower in int8 than in float on this CPU (profiled), but the "
            f"model with them float was not kept: {timed}, or less accurate"]
