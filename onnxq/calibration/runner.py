"""Calibration: run the float model over the data and observe the ranges of chosen tensors.

Rules:
1. A copy of the model exposes exactly the requested tensors (``onnxq.calibration.augment``):
   for ``minmax`` as two scalars each, for histogram methods as values, reduced into their
   observer at once and dropped.
2. Memory holds one batch's exposed tensors, never the data set's. When those would exceed the
   memory budget, the tensors are split into passes, each a full run over the data.
3. Observer state is keyed by topology signature, checkpointed at most every
   ``checkpoint_interval_s`` seconds and at the end of each pass; a resumed run skips the
   samples a checkpoint already covers, so its result equals the uninterrupted run's.
4. With several workers (``onnxq.distribute``) the batches go out in rounds, a contiguous shard
   of each round per worker; each shard is observed by fresh observers, which the driver merges
   into the state in shard order. Merging is exact, so the state equals one worker's; the
   driver alone checkpoints, after whole rounds.
5. Run-ahead: where values come back to be binned (histogram methods), the next round starts
   before the last one is merged, so that the model runs on one batch while the values of the
   other are binned; merges stay in round order. Two rounds' tensors are then in memory, and
   each pass is sized so that two batches' tensors fit the memory budget.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir

from onnxq.calibration.augment import augmented_model, carries_body_values
from onnxq.calibration.candidates import candidate_tensors
from onnxq.calibration.data import Batch, BatchSource
from onnxq.calibration.observers import MinMaxObserver, make_observer
from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig, RunOptions
from onnxq.distribute import Executor, Shared, shared_value, worker_cached
from onnxq.errors import CalibrationDataError, ModelError, first_line
from onnxq.load.prepare import LoadedModel
from onnxq.runtime import calibration_providers, create_session
from onnxq.workspace.manifest import fold_batch

ProgressCallback = Callable[[int], None]
Checkpoint = Callable[[CalibrationState], None]
BATCHES_PER_TASK = 4  # batches one of several workers observes per task


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


class _Checkpoints:
    """Records the state at most every ``interval`` seconds, and whenever asked to."""

    def __init__(self, checkpoint: Checkpoint | None, state: CalibrationState, interval: float) -> None:
        self._checkpoint, self._state, self._interval = checkpoint, state, interval
        self._last = time.monotonic()

    def record(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint(self._state)
        self._last = time.monotonic()

    def maybe_record(self) -> None:
        if time.monotonic() - self._last >= self._interval:
            self.record()


def _observe(observers: dict[str, MinMaxObserver], tensors: dict[str, str], names: list[str], inputs: set[str],
             exposed: dict[str, dict[str, str]], values: dict[str, np.ndarray], batch: Batch) -> None:
    """Update the observers of ``names`` with one batch's exposed values."""
    for name in names:
        observer = observers[tensors[name]]
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


_OTHER_DATA = (
    "the calibration data differs from the data the run being resumed consumed; resume with the same "
    "--calibration-data, or start a new run without --resume"
)


def _constant_inputs(batch: Batch) -> set[str]:
    """The float inputs of ``batch`` that hold a single value."""
    return {
        name for name, array in batch.feed.items()
        if np.issubdtype(array.dtype, np.floating) and (array.size == 0 or array.min() == array.max())
    }


def _run(session, outputs: list[str], batch: Batch, exposed: dict[str, dict[str, str]]) -> dict[str, np.ndarray]:
    try:
        return dict(zip(outputs, session.run(outputs, batch.feed)))
    except Exception as exc:
        hint = "check that the data matches what the model was exported for"
        if any(carries_body_values(name, sources) for name, sources in exposed.items()):
            hint += (
                ", and note that with histogram methods a tensor inside a Loop or Scan body "
                "must keep its size across iterations (--method minmax has no such limit)"
            )
        raise ModelError(f"the float model fails on the calibration data: {first_line(exc)}; {hint}") from exc


@dataclasses.dataclass(frozen=True)
class _PassJob:
    """What a worker needs to observe batches in one pass: the calibration model and where its
    external data lies, the providers, the observed names and how their values are exposed."""

    model: onnx.ModelProto
    external_folder: Path | None
    providers: tuple[str, ...]
    tensors: dict[str, str]
    names: list[str]
    inputs: set[str]
    exposed: dict[str, dict[str, str]]
    outputs: list[str]
    method: str
    percentile: float


def _observe_shard(job: Shared, batches: list[Batch], threads: int) -> dict[str, MinMaxObserver]:
    """A worker's task: fresh observers of the pass's tensors, updated with ``batches``."""
    spec: _PassJob = shared_value(job)
    session = worker_cached(f"{job.key}:session", lambda: create_session(
        spec.model, "the float model", spec.providers, spec.external_folder, threads))
    observers = {spec.tensors[name]: make_observer(spec.method, spec.percentile) for name in spec.names}
    for batch in batches:
        _observe(observers, spec.tensors, spec.names, spec.inputs, spec.exposed,
                 _run(session, spec.outputs, batch, spec.exposed), batch)
    return observers


def _start_round(executor: Executor, job: Shared, batches: list[Batch],
                 ahead: bool) -> Callable[[], list[dict[str, MinMaxObserver]]]:
    """Observe a round of batches, a contiguous shard per worker; returns the wait for the
    shards' observers, in shard order. Only ``ahead`` (rule 5) returns before they are done."""
    size = -(-len(batches) // executor.slots)
    shards = [(job, batches[i : i + size], executor.threads) for i in range(0, len(batches), size)]
    if ahead:
        return executor.submit(_observe_shard, shards)
    results = executor.map(_observe_shard, shards)
    return lambda: results


def calibrate(
    proto: onnx.ModelProto,
    tensors: dict[str, str],
    float_tensors: dict[str, int | None],
    batches: BatchSource,
    config: QuantConfig,
    run: RunOptions,
    state: CalibrationState | None = None,
    checkpoint: Checkpoint | None = None,
    progress: ProgressCallback | None = None,
    external_folder: Path | None = None,
    executor: Executor | None = None,
) -> tuple[CalibrationState, list[str]]:
    """Observe the ranges of ``tensors`` (name -> signature) over the data; returns the final
    state and notes. ``float_tensors`` maps the names known to be float32 to their rank (others
    are checked on each batch). ``batches`` gives a fresh pass over the data each time it is called.
    ``state`` resumes an earlier run; ``checkpoint`` is called with the state to record.
    ``external_folder`` holds the external data files ``proto`` references, if any. ``executor``
    runs the model over the batches (default: in this process).
    """
    executor = Executor() if executor is None else executor
    round_size = 1 if executor.slots == 1 else executor.slots * BATCHES_PER_TASK
    providers, device_note = calibration_providers(run.device)
    names_of = {key: name for name, key in tensors.items()}
    # the fed inputs: an initializer listed as a graph input is a default the data need not give
    inputs = {value.name for value in proto.graph.input} - {init.name for init in proto.graph.initializer}
    reduce_in_graph = {}
    if config.observer_method == "minmax":
        reduce_in_graph = {name: rank for name, rank in float_tensors.items() if name not in inputs}
    if state is None:
        keys = list(tensors.values())
        sizes = _tensor_bytes(proto, batches.first.feed, list(tensors))
        # two batches' values may be in memory at once (rule 5)
        per_batch = [0 if names_of[k] in reduce_in_graph else 2 * sizes[names_of[k]] for k in keys]
        passes = _split_into_passes(keys, per_batch, run.memory_budget_mb * 2**20)
        state = CalibrationState({k: make_observer(config.observer_method, config.percentile) for k in keys}, passes)
    notes: list[str] = [device_note] if device_note else []
    if len(state.passes) > 1:
        notes.append(f"calibrated in {len(state.passes)} passes to stay within {run.memory_budget_mb:g} MB")
    checkpoints = _Checkpoints(checkpoint, state, run.checkpoint_interval_s)
    constant = set(_constant_inputs(batches.first))
    while state.pass_index < len(state.passes):
        names = [names_of[key] for key in state.passes[state.pass_index]]
        model, exposed = augmented_model(proto, [n for n in names if n not in inputs], reduce_in_graph)
        outputs = list(dict.fromkeys(output for sources in exposed.values() for output in sources.values()))
        job = executor.share(_PassJob(model, external_folder, providers, tensors, names, inputs, exposed, outputs,
                                      config.observer_method, config.percentile))
        skip, seen, digest = state.samples_done, 0, ""
        waiting: list[Batch] = []
        # (wait for its observers, samples seen and data digest after it, its samples), oldest first
        started: collections.deque[tuple[Callable[[], list], int, str, int]] = collections.deque()
        ahead = 1 if any("values" in sources for sources in exposed.values()) else 0  # rule 5

        def merge_oldest() -> None:
            results, seen_after, digest_after, samples = started.popleft()
            for observers in results():
                for key, observer in observers.items():
                    state.observers[key].merge(observer)
            state.samples_done, state.data_done_sha256 = seen_after, digest_after
            if state.pass_index == 0:
                state.samples_seen = seen_after
            if progress is not None:
                progress(samples)
            checkpoints.maybe_record()

        def observe_waiting() -> None:
            started.append((_start_round(executor, job, waiting, ahead > 0), seen, digest,
                            sum(b.samples for b in waiting)))
            waiting.clear()
            while len(started) > ahead:
                merge_oldest()

        try:
            for batch in batches():
                seen += batch.samples
                digest = fold_batch(digest, batch)
                if state.pass_index == 0:
                    constant.intersection_update(_constant_inputs(batch))
                if seen <= skip:
                    if seen == skip and state.data_done_sha256 and digest != state.data_done_sha256:
                        raise CalibrationDataError(_OTHER_DATA)
                    continue
                if seen - batch.samples < skip:
                    raise CalibrationDataError(
                        "the calibration data is batched differently from the run being resumed; "
                        "resume with the same data and --batch-size"
                    )
                waiting.append(batch)
                if len(waiting) == round_size:
                    observe_waiting()
            if waiting:
                observe_waiting()
            while started:
                merge_oldest()
        except BaseException:
            for results, *_ in started:  # rounds still running finish first: a thread left inside
                with contextlib.suppress(BaseException):  # ONNX Runtime when the process exits aborts it
                    results()
            raise
        executor.release(job)
        if seen == 0:
            raise CalibrationDataError(
                "the calibration data gave no samples on a later pass; pass a path, a loader, a list "
                "or a reader with rewind() rather than a one-shot iterator when calibrating in several passes"
            )
        if seen < skip or (state.pass_index > 0 and state.data_sha256 and digest != state.data_sha256):
            raise CalibrationDataError(_OTHER_DATA)
        if state.pass_index == 0:
            state.data_sha256 = digest
            if constant:
                notes.append(
                    f"calibration input(s) {sorted(constant)} hold a single value (such as all zeros) in every "
                    "sample: ranges taken on such data do not fit real inputs; calibrate on real samples"
                )
        state.data_done_sha256 = ""
        state.pass_index += 1
        state.samples_done = 0
        state.complete = state.pass_index == len(state.passes)
        checkpoints.record()
    return state, notes


def calibrate_model(
    loaded: LoadedModel,
    source: BatchSource,
    config: QuantConfig,
    run: RunOptions,
    state: CalibrationState | None,
    checkpoint: Checkpoint | None,
    progress: ProgressCallback | None,
    executor: Executor | None = None,
) -> tuple[CalibrationState, list[str]]:
    """Calibrate the cleaned-up graph of ``loaded`` (see ``calibrate``) on the tensors whose
    ranges a quantization decision may need (``candidate_tensors``)."""
    graph = loaded.model.graph
    candidates = candidate_tensors(graph, config.observer_method)
    float_ranks = {
        v.name: None if v.shape is None else len(v.shape) for v in candidates if v.dtype == ir.DataType.FLOAT
    }
    tensors = {v.name: loaded.keys.tensors[v.name] for v in candidates}
    return calibrate(loaded.cleaned, tensors, float_ranks, source, config, run, state, checkpoint, progress,
                     loaded.external_folder, executor)
