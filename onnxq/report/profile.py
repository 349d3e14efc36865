"""The parts that make an int8 model slower than its float original, from ONNX Runtime's
profiler (the per-kernel durations of its JSON trace) on both models:

1. Each kernel ONNX Runtime ran (after its fusions) falls in one part: QuantizeLinear /
   DequantizeLinear it did not fuse away, layout changes (Transpose, NCHWc reorders), depthwise
   or grouped Conv layers (the model's Conv of that name has ``group`` > 1, or the kernel's
   weights have shape [C, 1, k, k]), other Conv layers, MatMul/Gemm layers, or the nodes of
   one op type (``QLinearAdd`` counts as ``Add``).
2. A kernel whose node reads a DequantizeLinear output in the model and that takes float
   inputs ran in float on dequantized values: a group ONNX Runtime did not fuse into an int8
   kernel, or a node kept float.
3. A kernel's time per run is its median over the profiled runs (the warm-up run left out), so
   that one run disturbed by the machine does not count.
4. A part is slow where its kernels take longer per run in the int8 model than in the float
   model; the slow parts are named worst first, each with its slowest kernels.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

PROFILE_RUNS = 3  # profiled runs of each model
SHOWN_PARTS = 4
SHOWN_KERNELS = 3

_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_LAYOUT = {"Transpose", "ReorderInput", "ReorderOutput"}
_CONV = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op: weight input
_MATMUL = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "QLinearMatMul", "QGemm", "MatMulInteger",
           "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_kernel_time)+$")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel ONNX Runtime ran: its node's name (without ONNX Runtime's suffixes), its op,
    its part (rule 1), whether it ran in float, and its mean time per run in ms."""

    name: str
    op: str
    part: str
    in_float: bool
    ms: float


@dataclasses.dataclass(frozen=True)
class ModelNodes:
    """What the profile cannot tell about a model's nodes, by name: its Convs with ``group`` > 1,
    and its nodes that read a DequantizeLinear output (main graph)."""

    grouped: frozenset[str] = frozenset()
    dequantized_inputs: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelNodes:
        nodes = model.graph.node
        dequantized = {out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output}
        return cls(frozenset(node.name for node in nodes if node.op_type == "Conv"
                             and any(a.name == "group" and a.i > 1 for a in node.attribute)),
                   frozenset(node.name for node in nodes if node.op_type not in _QDQ
                             and dequantized.intersection(node.input)))


def _part(op: str, inputs: list[dict], grouped: bool) -> str:
    """The part a kernel of ``op`` with these input types and shapes falls in (rule 1)."""
    if op in _QDQ:
        return "QuantizeLinear/DequantizeLinear ONNX Runtime did not fuse away"
    if op in _LAYOUT:
        return "layout changes (Transpose, NCHWc reorders)"
    if op in _CONV:
        index = _CONV[op]
        weight = next(iter(inputs[index].values())) if len(inputs) > index else []
        depthwise = grouped or len(weight) == 4 and weight[1] == 1 and weight[0] > 1
        return "depthwise or grouped Conv layers" if depthwise else "Conv layers"
    if op in _MATMUL:
        return "MatMul/Gemm layers"
    return f"{op.removeprefix('QLinear')} nodes"


def kernels(trace: list[dict], runs: int, nodes: ModelNodes = ModelNodes()) -> list[Kernel]:
    """The kernels of a profiler ``trace`` of a warm-up run and ``runs`` runs of a model with
    ``nodes``, each with its time per run (rule 3)."""
    times: dict[str, list[float]] = {}
    seen: dict[str, Kernel] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        key, args = event["name"], event.get("args", {})
        if key not in seen:  # the warm-up run's
            op, inputs, name = args.get("op_name", "?"), args.get("input_type_shape", []), _ORT_SUFFIX.sub("", key)
            in_float = name in nodes.dequantized_inputs and bool(inputs) and "float" in inputs[0]
            seen[key] = Kernel(name, op, _part(op, inputs, name in nodes.grouped), in_float, 0.0)
            times[key] = []
        else:
            times[key].append(float(event.get("dur", 0)) / 1000)
    return [dataclasses.replace(kernel, ms=float(np.median(times[key])) * len(times[key]) / runs if times[key] else 0.0)
            for key, kernel in seen.items()]


def profile(make_session: Callable[[Path], ort.InferenceSession], feed: dict[str, np.ndarray], model: onnx.ModelProto,
            runs: int = PROFILE_RUNS) -> list[Kernel]:
    """The kernels of ``model`` in the session ``make_session(profile_prefix)`` makes, over a
    warm-up run and ``runs`` runs on ``feed`` (the trace is written in a temporary folder and removed)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-profile-") as folder:
        session = make_session(Path(folder) / "trace")
        for _ in range(runs + 1):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    return kernels(trace, runs, ModelNodes.of(model))


def slow_parts(float_kernels: list[Kernel], int8_kernels: list[Kernel]) -> list[str]:
    """The parts whose kernels take longer in the int8 model than in the float model, worst
    first (rule 3), each as a line naming its slowest kernels."""
    excess = {part: _ms(int8_kernels, part) - _ms(float_kernels, part) for part in {k.part for k in int8_kernels}}
    lines = []
    for part in sorted((p for p in excess if excess[p] > 0), key=lambda p: -excess[p])[:SHOWN_PARTS]:
        mine = sorted((k for k in int8_kernels if k.part == part), key=lambda k: -k.ms)
        theirs = [k for k in float_kernels if k.part == part]
        in_float = sum(k.in_float for k in mine)
        shown = ", ".join(f"{k.name} ({k.op}{' in float' if k.in_float else ''}) {k.ms:.3f} ms"
                          for k in mine[:SHOWN_KERNELS])
        lines.append(f"{part}: {len(mine)} kernel(s), {_ms(mine):.3f} ms in the int8 model vs {_ms(theirs):.3f} ms "
                     f"in the float model ({len(theirs)} kernel(s)) per run"
                     + (f"; {in_float} ran in float on dequantized inputs (not fused into an int8 kernel, or "
                        "kept float)" if in_float else "")
                     + f"; slowest: {shown}")
    return lines or [f"no part's kernels take longer in int8 ({_ms(int8_kernels):.3f} ms of kernels per run vs "
                     f"{_ms(float_kernels):.3f} ms in float): the time goes outside them, to ONNX Runtime's "
                     "overhead per run and per kernel, which dominates tiny models"]


def _ms(kernels: list[Kernel], part: str | None = None) -> float:
    return sum(k.ms for k in kernels if part is None or k.part == part)
