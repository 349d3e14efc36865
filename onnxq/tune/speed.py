"""Leave float what int8 only slows down, measured on this machine:

1. It runs where the conversion times its output (``--latency``), for ``--target cpu``, with the
   weights in memory, and the float model takes at least ``MIN_FLOAT_MS`` per batch-1 run: below that, ONNX
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
4. The model with every such node float is built and timed against the int8 model in pairs of
   runs, one right after the other (``onnxq.report.latency.paired_ratios``): a moment of another
   process's work disturbs one pair, either way. It is kept only when it is faster in so many
   of the pairs that chance would give that less than once in a hundred (a sign test:
   ``faster_needed``), and meets the accuracy target as well as the int8 model does, where there
   is data to measure on.
5. Keeping nodes float moves Q/DQ to new places, so rules 2-4 run again on the kept model (its
   own profile, judged against it), up to ``MAX_ROUNDS`` rounds, until a round finds nothing
   slower or its model is not kept. The rounds are a workspace step; a resumed run reads them
   back and times nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig
from onnxq.errors import WorkspaceError
from onnxq.load.prepare import LoadedModel
from onnxq.report.latency import interleaved_ms, paired_ratios
from onnxq.report.profile import Kernel, profile
from onnxq.rewrite.build import BuiltModel, build_model
from onnxq.runtime import create_session, session_proto
from onnxq.workspace.steps import LayersStep

MIN_FLOAT_MS = 1.0  # batch-1 float latency below which the pass does not run (rule 1)
PROFILE_RUNS = 6  # profiled runs of each model: a kernel's time is its median
TIMING_BUDGET_S = 3.0  # seconds of paired runs that judge the trial (rule 4)
MAX_ROUNDS = 3  # rounds of rules 2-4 (rule 5)
NOISE = 0.1  # relative excess of a node's int8 time over its float time that counts (rule 3)
SLOWER_REASON = "slower in int8 on this CPU"

Feed = dict[str, np.ndarray]


def charged_ms(kernels: list[Kernel], model: onnx.ModelProto, float_graph: onnx.GraphProto) -> dict[str, float]:
    """The kernels of a profile of ``model`` (the float model or its int8 form) charged to the
    nodes of ``float_graph`` by name, in ms per run (rule 2)."""
    names = {node.name for node in float_graph.node}
    by_output = {node.output[0]: node.name for node in float_graph.node if node.output}
    producer = {output: node.name for node in float_graph.node for output in node.output}
    readers, int8_readers = _readers(float_graph), _readers(model.graph)
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
                next((r for out in node.output for r in int8_readers.get(out, [])), last)
        owner = owner if owner is not None else last
        if owner is not None:
            ms[owner] += kernel.ms
            last = owner
    return dict(ms)


def _readers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """The names of the nodes of ``graph`` reading each tensor, in graph order."""
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node.name)
    return readers


def slower_nodes(float_ms: dict[str, float], int8_ms: dict[str, float], quantized: set[str]) -> list[str]:
    """The ``quantized`` nodes (by name) whose charged int8 time exceeds their float time by
    ``NOISE`` or more (rule 3), most slowed first."""
    excess = {name: int8_ms.get(name, 0.0) - float_ms.get(name, 0.0) for name in quantized}
    return sorted((name for name, ms in excess.items() if ms > NOISE * float_ms.get(name, 0.0) and ms > 0),
                  key=lambda name: -excess[name])


CHANCE = 0.01  # the sign test's level: chance alone passes it less often than this (rule 4)


def faster_needed(pairs: int) -> int:
    """The fewest pairs (of ``pairs``) in which the trial must be faster: the smallest count that
    a fair coin reaches with probability under ``CHANCE`` (exact binomial tail; rule 4)."""
    tail = 0
    for count in range(pairs, -1, -1):
        tail += math.comb(pairs, count)
        if tail / 2**pairs >= CHANCE:
            return count + 1
    return 0


@dataclasses.dataclass(frozen=True)
class SpeedRound:
    """One round of the pass: the nodes found slower in int8 (keys), whether the model with them
    float was kept, the median of its paired time ratios to the model before, and in how many of
    how many pairs it was faster."""

    slower: tuple[str, ...]
    kept: bool
    ratio: float = 1.0
    faster_pairs: int = 0
    pairs: int = 0

    def record(self) -> dict:
        """The round as ``SpeedStep`` records it."""
        return dataclasses.asdict(self) | {"slower": list(self.slower)}

    @classmethod
    def of_record(cls, recorded: dict) -> SpeedRound:
        """A round read back from a ``SpeedStep``; a damaged one is a ``WorkspaceError``."""
        try:
            return cls(tuple(str(key) for key in recorded["slower"]), bool(recorded["kept"]),
                       float(recorded["ratio"]), int(recorded["faster_pairs"]), int(recorded["pairs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkspaceError(f"a speed step's round is damaged ({exc}); start a new run") from exc


@dataclasses.dataclass(frozen=True)
class SpeedChoice:
    """The rounds of the pass (rule 5); the nodes it keeps float are those of its kept rounds."""

    rounds: tuple[SpeedRound, ...]

    @property
    def kept_float(self) -> tuple[str, ...]:
        return tuple(key for round_ in self.rounds if round_.kept for key in round_.slower)


def choose(slower: list[str], timed: Callable[[], list[float]], accurate_enough: Callable[[], bool]) -> SpeedRound:
    """Rule 4: keep the model with the ``slower`` nodes float when ``timed()`` (its paired time
    ratios to the model before) passes the sign test and ``accurate_enough()`` holds."""
    ratios = timed()
    faster = sum(ratio < 1 for ratio in ratios)
    kept = faster >= faster_needed(len(ratios)) and accurate_enough()
    return SpeedRound(tuple(slower), kept, float(np.median(ratios)), faster, len(ratios))


def _profiled(model: onnx.ModelProto, feed: Feed, what: str, external_folder=None) -> list[Kernel]:
    return profile(lambda prefix: create_session(model, what, external_folder=external_folder, profile_prefix=prefix),
                   feed, model, PROFILE_RUNS)


def leave_slow_float(loaded: LoadedModel, state: CalibrationState, config: QuantConfig, layers: LayersStep,
                     keep_float: dict[str, str], fallback_dtype: str, built: BuiltModel, feed: Feed,
                     accurate_enough: Callable[[BuiltModel], bool]) -> tuple[BuiltModel, SpeedChoice | None]:
    """The model to write (``built`` or one with nodes int8 slows down float) and the rounds that
    chose it (rule 5); ``None`` where the float model is too fast to judge (rule 1).
    ``accurate_enough`` tells whether a model meets the accuracy target as well as ``built`` does."""
    float_model = loaded.cleaned
    float_session = create_session(float_model, "the float model", external_folder=loaded.external_folder)
    float_runs = interleaved_ms({"float": float_session}, {"float": feed}, runs=3, repeats=1)["float"][0]
    if float(np.median(float_runs)) < MIN_FLOAT_MS:
        return built, None
    float_ms = charged_ms(_profiled(float_model, feed, "the float model", loaded.external_folder), float_model,
                          float_model.graph)
    keys = {node.name: key for node, key in loaded.keys.nodes.items() if node.graph is loaded.model.graph}
    rounds: list[SpeedRound] = []
    current, kept = built, dict(keep_float)
    int8_model, before = session_proto(built.model), None
    for _ in range(MAX_ROUNDS):
        int8_ms = charged_ms(_profiled(int8_model, feed, "the int8 model"), int8_model, float_model.graph)
        quantized = {name for name, key in keys.items() if any(key in unit for unit in current.units)}
        slower = [keys[name] for name in slower_nodes(float_ms, int8_ms, quantized)]
        if not slower:
            break
        trial = build_model(loaded, state, config, layers, kept | dict.fromkeys(slower, SLOWER_REASON), fallback_dtype)
        trial_model = session_proto(trial.model)
        before = before or create_session(int8_model, "the int8 model")
        after = create_session(trial_model, "the int8 model with its slow nodes float")
        rounds.append(choose(slower, lambda: paired_ratios(before, after, feed, TIMING_BUDGET_S),
                             lambda: accurate_enough(trial)))
        if not rounds[-1].kept:
            break
        current, kept = trial, kept | dict.fromkeys(slower, SLOWER_REASON)
        int8_model, before = trial_model, after  # the kept model is the next round's int8 model
    return current, SpeedChoice(tuple(rounds))


def too_fast_note() -> str:
    """The summary's line where rule 1 stops the pass."""
    return (f"speed fallback: not run: the float model takes under {MIN_FLOAT_MS:g} ms a batch-1 run, where ONNX "
            "Runtime's per-run overhead, not the kernels, sets the time")


def speed_notes(choice: SpeedChoice) -> list[str]:
    """The summary's line on the pass: each round, and what it kept float."""
    if not choice.rounds:
        return []
    rounds = "; ".join(
        f"round {i}: {len(r.slower)} node(s) {'kept float' if r.kept else 'left int8'}, {r.ratio:.2f}x the time of the "
        f"model before (median of {r.pairs} paired runs, faster in {r.faster_pairs}, {faster_needed(r.pairs)} needed"
        f"{'' if r.kept or r.faster_pairs < faster_needed(r.pairs) else ', but less accurate'})"
        for i, r in enumerate(choice.rounds, 1))
    if not choice.kept_float:
        return [f"speed fallback: {len(choice.rounds[0].slower)} quantized node(s) ran slower in int8 than in float on "
                f"this CPU (profiled), but the model with them float was not faster or not as accurate, so they stay "
                f"int8: {rounds}"]
    return [f"speed fallback: kept float {len(choice.kept_float)} node(s) whose int8 kernels ran slower than their float "
            f"ones on this CPU (profiled; --no-speed-fallback quantizes them): {rounds}"]
