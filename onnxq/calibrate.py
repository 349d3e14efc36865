"""Calibration: run the float model over the data and observe the ranges of chosen tensors.

Rules:
1. A copy of the model is augmented so that exactly the requested tensors are exposed. For
   ``minmax``, ReduceMin/ReduceMax nodes are added inside the graph, so only two scalars per
   tensor leave ONNX Runtime (on CUDA, only those cross to the host); histogram methods expose
   the tensors themselves, reduced into their observer at once and dropped.
2. Memory holds one batch's exposed tensors, never the data set's. When those would exceed the
   memory budget, the tensors are split into passes, each a full run over the data.
3. Observer state is keyed by topology signature, checkpointed at most every
   ``checkpoint_interval_s`` seconds and at the end of each pass; a resumed run skips the
   samples a checkpoint already covers, so its result equals the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx.shape_inference
import onnxruntime as ort

from onnxq.config import QuantConfig
from onnxq.data import BatchSource
from onnxq.errors import CalibrationDataError, DeviceError, ModelError, first_line
from onnxq.observers import MinMaxObserver, make_observer, observer_from_dict
from onnxq.subgraphs import expose_body_tensors

ProgressCallback = Callable[[int], None]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def session_options(external_folder: Path | None = None) -> ort.SessionOptions:
    """Quiet session options (failures reach the user as one-line errors, not as log lines);
    ``external_folder`` is where the external data files of a model given as bytes lie. Its
    weights are then mapped from there in place: neither copied into the bytes nor into
    prepacked buffers, so that memory stays near the size of the weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def create_session(
    model: onnx.ModelProto | bytes | Path,
    what: str,
    providers: tuple[str, ...] = (CPU,),
    external_folder: Path | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session of a model given as a proto, bytes or a file path (see
    ``session_options`` for ``external_folder``); a model it refuses is reported as ``ModelError``."""
    options = session_options(external_folder)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=list(providers))
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or ``None`` when its CUDA provider loads.

    A tiny model is loaded with the CUDA provider first in line; CUDA counts only if the
    session really uses it (ONNX Runtime otherwise falls back to the CPU quietly).
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    probe = oh.make_model(
        oh.make_graph(
            [oh.make_node("Identity", ["x"], ["y"])], "probe",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[oh.make_opsetid("", 13)],
    )
    ort.set_default_logger_severity(4)  # the failed load is expected; don't print it
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, CPU])
        loaded = session.get_providers()[0] == CUDA
    except Exception:
        loaded = False
    finally:
        ort.set_default_logger_severity(2)
    if loaded:
        return None
    return "ONNX Runtime's CUDA execution provider did not load (no GPU, or CUDA/cuDNN libraries missing)"


def calibration_providers(device: str) -> tuple[tuple[str, ...], str | None]:
    """Execution providers for calibration, and a note when ``auto`` fell back to the CPU.

    ``cuda`` raises ``DeviceError`` with the reason when CUDA cannot be used.
    """
    if device == "cpu":
        return (CPU,), None
    reason = cuda_unavailable_reason()
    if reason is None:
        return (CUDA, CPU), None
    if device == "cuda":
        raise DeviceError(f"cannot calibrate on CUDA: {reason}; use --device cpu or auto")
    return (CPU,), f"calibrating on CPU: {reason}"


@dataclasses.dataclass
class CalibrationState:
    """Observer state keyed by tensor signature, and how far calibration got."""

    observers: dict[str, MinMaxObserver]
    passes: list[list[str]]
    pass_index: int = 0
    samples_done: int = 0
    complete: bool = False
    samples_seen: int = 0  # samples in the data, as counted on the first pass

    def to_payload(self) -> dict:
        return {
            "samples_seen": self.samples_seen,
            "observers": {key: observer.to_dict() for key, observer in sorted(self.observers.items())},
            "passes": self.passes,
            "pass_index": self.pass_index,
            "samples_done": self.samples_done,
            "complete": self.complete,
        }

    @classmethod
    def from_payload(cls, payload: dict, percentile: float) -> CalibrationState:
        observers = {key: observer_from_dict(state, percentile) for key, state in payload["observers"].items()}
        return cls(
            observers, payload["passes"], payload["pass_index"], payload["samples_done"], payload["complete"],
            payload["samples_seen"],
        )

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The chosen range of every observed tensor, by signature."""
        return {key: o.range() for key, o in self.observers.items() if o.observed}


def _reduction(graph: onnx.GraphProto, name: str, op: str, rank: int | None, opset: int) -> str:
    """Append ``op`` (ReduceMin/ReduceMax) of tensor ``name`` to ``graph``; returns its output.

    Tensors of rank >= 3 are reduced over their trailing axes only, keeping batch and channels:
    ONNX Runtime runs that kernel in parallel over the kept axes, several times faster than a
    reduction to one scalar. The few values left are reduced on the host.
    """
    output = f"{name}__onnxq_{op}"
    axes = list(range(2, rank)) if rank is not None and rank >= 3 else None
    if axes is None:
        graph.node.append(oh.make_node(op, [name], [output], keepdims=0))
    elif opset >= 18:  # axes became an input
        axes_name = f"{output}_axes"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        graph.node.append(oh.make_node(op, [name, axes_name], [output], keepdims=0))
    else:
        graph.node.append(oh.make_node(op, [name], [output], keepdims=0, axes=axes))
    graph.output.append(oh.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return output


def _augmented(
    proto: onnx.ModelProto, names: list[str], reduce_in_graph: dict[str, int | None]
) -> tuple[onnx.ModelProto, dict[str, dict[str, str]]]:
    """The model with ``names`` exposed, and where each one can be read: ``{"values": output}``,
    or ``{"min": output, "max": output}`` for those in ``reduce_in_graph`` (name -> rank).
    Tensors inside If/Loop/Scan bodies are carried out by ``onnxq.subgraphs``."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    graph = augmented.graph
    opset = next(o.version for o in augmented.opset_import if o.domain in ("", "ai.onnx"))
    present = {output.name for output in graph.output}
    known = {info.name: info for info in graph.value_info}
    main = {v.name for v in [*graph.input, *graph.initializer]} | {o for node in graph.node for o in node.output}
    exposed: dict[str, dict[str, str]] = {}
    for name in names:
        if name not in main:
            continue
        if name in reduce_in_graph:
            low, high = (_reduction(graph, name, op, reduce_in_graph[name], opset) for op in ("ReduceMin", "ReduceMax"))
            exposed[name] = {"min": low, "max": high}
            continue
        if name not in present:
            info = onnx.ValueInfoProto()
            if name in known:
                info.CopyFrom(known[name])
            else:
                info.name = name
            graph.output.append(info)
        exposed[name] = {"values": name}
    in_bodies = {name: name in reduce_in_graph for name in names if name not in main}
    if in_bodies:
        exposed.update(expose_body_tensors(augmented, in_bodies))
    return augmented, exposed


def _carries_body_values(name: str, sources: dict[str, str]) -> bool:
    """Whether a tensor's values are read from an output carried out of a body (stacked over
    the iterations of any Loop or Scan on the way), rather than under its own name."""
    return "values" in sources and sources["values"] != name


def _tensor_bytes(proto: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, int]:
    """Estimated bytes of each tensor for a batch like ``feed`` (unknown sizes: the largest known)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in fixed.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feed[value.name].shape):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph
    except Exception:
        inferred = fixed.graph
    sizes = {}
    for info in [*inferred.value_info, *inferred.output, *inferred.input]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[info.name] = int(np.prod([d.dim_value for d in dims])) * 4
    largest = max(sizes.values(), default=4)
    return {name: sizes.get(name, largest) for name in names}


def _split_into_passes(keys: list[str], sizes: list[int], budget_bytes: float) -> list[list[str]]:
    passes: list[list[str]] = [[]]
    used = 0
    for key, size in zip(keys, sizes):
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(key)
        used += size
    return passes


def calibrate(
    proto: onnx.ModelProto,
    tensors: dict[str, str],
    float_tensors: dict[str, int | None],
    batches: BatchSource,
    config: QuantConfig,
    state: CalibrationState | None = None,
    checkpoint: Callable[[CalibrationState], None] | None = None,
    progress: ProgressCallback | None = None,
    external_folder: Path | None = None,
) -> tuple[CalibrationState, list[str]]:
    """Observe the ranges of ``tensors`` (name -> signature) over the data; returns the final
    state and notes. ``float_tensors`` maps the names known to be float32 to their rank (others
    are checked on each batch). ``batches`` gives a fresh pass over the data each time it is called.
    ``state`` resumes an earlier run; ``checkpoint`` is called with the state to record.
    ``external_folder`` holds the external data files ``proto`` references, if any.
    """
    providers, device_note = calibration_providers(config.device)
    names_of = {key: name for name, key in tensors.items()}
    # the fed inputs: an initializer listed as a graph input is a default the data need not give
    inputs = {value.name for value in proto.graph.input} - {init.name for init in proto.graph.initializer}
    reduce_in_graph = {}
    if config.method == "minmax":
        reduce_in_graph = {name: rank for name, rank in float_tensors.items() if name not in inputs}
    if state is None:
        first = batches.first
        keys = list(tensors.values())
        sizes = _tensor_bytes(proto, first.feed, list(tensors))
        per_batch = [0 if names_of[k] in reduce_in_graph else sizes[names_of[k]] for k in keys]
        passes = _split_into_passes(keys, per_batch, config.memory_budget_mb * 2**20)
        state = CalibrationState({k: make_observer(config.method, config.percentile) for k in keys}, passes)
    notes: list[str] = [device_note] if device_note else []
    if len(state.passes) > 1:
        notes.append(f"calibrated in {len(state.passes)} passes to stay within {config.memory_budget_mb:g} MB")
    last_checkpoint = time.monotonic()

    def record() -> None:
        nonlocal last_checkpoint
        if checkpoint is not None:
            checkpoint(state)
        last_checkpoint = time.monotonic()

    while state.pass_index < len(state.passes):
        names = [names_of[key] for key in state.passes[state.pass_index]]
        model, exposed = _augmented(proto, [n for n in names if n not in inputs], reduce_in_graph)
        outputs = list(dict.fromkeys(output for sources in exposed.values() for output in sources.values()))
        session = create_session(model, "the float model", providers, external_folder)
        skip, seen = state.samples_done, 0
        for batch in batches():
            seen += batch.samples
            if seen <= skip:
                continue
            if seen - batch.samples < skip:
                raise CalibrationDataError(
                    "the calibration data is batched differently from the run being resumed; "
                    "resume with the same data and --batch-size"
                )
            try:
                values = dict(zip(outputs, session.run(outputs, batch.feed)))
            except Exception as exc:
                hint = "check that the data matches what the model was exported for"
                if any(_carries_body_values(name, sources) for name, sources in exposed.items()):
                    hint += (
                        ", and note that with histogram methods a tensor inside a Loop or Scan body "
                        "must keep its size across iterations (--method minmax has no such limit)"
                    )
                raise ModelError(f"the float model fails on the calibration data: {first_line(exc)}; {hint}") from exc
            for name in names:
                observer = state.observers[tensors[name]]
                sources = {"values": None} if name in inputs else exposed.get(name, {})
                if "min" in sources:
                    low, high = values[sources["min"]], values[sources["max"]]
                    if low.size:
                        observer.update_bounds(float(low.min()), float(high.max()))
                    continue
                if "values" not in sources:
                    continue  # not reachable from the main graph: never observed, stays float
                array = batch.feed[name] if name in inputs else values[sources["values"]]
                if isinstance(array, np.ndarray) and array.dtype == np.float32:
                    observer.update(array)
            state.samples_done = seen
            if state.pass_index == 0:
                state.samples_seen = seen
            if progress is not None:
                progress(batch.samples)
            if time.monotonic() - last_checkpoint >= config.checkpoint_interval_s:
                record()
        if seen == 0:
            raise CalibrationDataError(
                "the calibration data gave no samples on a later pass; pass a path, a loader or a "
                "list rather than a one-shot iterator when calibrating in several passes"
            )
        state.pass_index += 1
        state.samples_done = 0
        state.complete = state.pass_index == len(state.passes)
        record()
    return state, notes
