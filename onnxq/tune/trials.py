"""Trial models run over evaluation batches: in this process, or on the workers of an executor.

Rules:
1. A trial model that ONNX Runtime refuses gives ``None`` (the search counts it as failed).
2. With one worker, or a model offloaded with its weights in a file (a big one), each model
   runs here, one at a time.
3. With several workers, the driver builds the models one after another while the workers run
   them; several models are run one per task, a single model on a contiguous shard of the
   batches per worker. The outputs come back in batch order, so they are those of one worker.
4. The batches are handed to the workers once per list (``onnxq.distribute.Executor.share``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import Batch
from onnxq.distribute import Executor, Shared, shared_value, worker_cached
from onnxq.errors import ModelError
from onnxq.runtime import concatenate_runs, create_session, run_all, run_batches, session_of, session_proto

Outputs = dict[str, np.ndarray]


def _run_shard(model: Shared, batches: Shared, threads: int) -> tuple[list[str], list[list[np.ndarray]]] | None:
    """A worker's task: the outputs of a trial model on a shard of batches (``None``: refused)."""
    try:
        session = worker_cached(f"{model.key}:session", lambda: create_session(
            shared_value(model), "a trial model", threads=threads))
    except ModelError:
        return None
    return run_batches(session, shared_value(batches))


class TrialRunner:
    """Runs trial models on ``executor`` (see the rules above); ``offload``: the float model is big."""

    def __init__(self, executor: Executor, offload: bool) -> None:
        self.executor, self.offload = executor, offload
        self._shards: dict[tuple[int, int], tuple[Sequence[Batch], list[Shared]]] = {}

    @property
    def slots(self) -> int:
        """Models that run at once: one where they run here (rule 2), else the executor's slots."""
        return 1 if self.offload else self.executor.slots

    def outputs(self, models: Iterable[ir.Model], count: int, batches: Sequence[Batch],
                parts: tuple[slice, ...], flat_if_ragged: bool) -> list[list[Outputs] | None]:
        """The outputs of each of ``count`` ``models`` (built as they are consumed) on ``batches``,
        once per slice in ``parts``; ``None`` for a model ONNX Runtime refused."""
        if self.slots == 1:
            return [self._outputs_here(model, batches, parts, flat_if_ragged) for model in models]
        shards = self._shared(batches, 1 if count >= self.executor.slots else self.executor.slots)
        shared: list[Shared] = []

        def tasks() -> Iterable[tuple]:
            for model in models:
                shared.append(self.executor.share(session_proto(model).SerializeToString()))
                yield from ((shared[-1], shard, self.executor.threads) for shard in shards)

        try:
            results = self.executor.map(_run_shard, tasks())
        finally:
            for model in shared:
                self.executor.release(model)
        outputs: list[list[Outputs] | None] = []
        for start in range(0, len(results), len(shards)):
            pieces = results[start : start + len(shards)]
            if any(piece is None for piece in pieces):
                outputs.append(None)
                continue
            names, runs = pieces[0][0], [run for _, shard_runs in pieces for run in shard_runs]
            outputs.append([concatenate_runs(names, runs[part], flat_if_ragged) for part in parts])
        return outputs

    def _outputs_here(self, model: ir.Model, batches: Sequence[Batch], parts: tuple[slice, ...],
                      flat_if_ragged: bool) -> list[Outputs] | None:
        try:
            with session_of(model, self.offload) as session:
                return run_all(session, batches, parts, flat_if_ragged)
        except ModelError:
            return None
        finally:
            if self.offload:
                gc.collect()  # a trial graph is a cycle of objects: a big model's int8 weights go now

    def _shared(self, batches: Sequence[Batch], count: int) -> list[Shared]:
        """``batches`` in ``count`` contiguous shards, handed to the workers once."""
        key = (id(batches), count)
        if key not in self._shards:
            size = -(-len(batches) // count)
            self._shards[key] = (batches, [self.executor.share(list(batches[i : i + size]))
                                           for i in range(0, len(batches), size)])
        return self._shards[key][1]
