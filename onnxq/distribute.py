"""Independent work spread over workers: the calling process, local worker processes, or Ray tasks.

Rules:
1. A stage gives an ``Executor`` a module-level function and the argument tuples to call it
   with (``map``); the results come back in the order of the arguments, whatever order the
   workers finish in, so a stage that merges them in that order gets one worker's result.
2. What several tasks read (a model, a shard of data) is handed over once with ``share``: for
   local processes a file that each process reads once, for Ray the object store (once per
   node); a task reads it with ``shared_value``, and keeps what it builds from it (a session)
   with ``worker_cached``.
3. One worker (``--workers 1``) runs the tasks in the calling process with ONNX Runtime's own
   threads; N local processes get cores // N ONNX Runtime threads each; a Ray task asks for one
   CPU and runs ONNX Runtime on one thread, so Ray places as many tasks on a node as it has cores.
4. A Ray task whose worker dies is retried by Ray (``max_retries``); a local worker process that
   dies ends the run with an error, and ``--resume`` continues it from the driver's workspace.
5. ``submit`` starts a few tasks and returns at once, so that a stage can prepare (and start) the
   next ones while they run: local processes and Ray queue them; the calling process runs them on
   a thread of its own, where ONNX Runtime and numpy's loops release the GIL.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxq.errors import ConfigError, OnnxqError

RAY_RETRIES = 3  # times Ray reruns a task whose worker process died
_CACHED = 4  # values and sessions a worker keeps (``worker_cached``)
_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
_cache_lock = threading.RLock()


class WorkerLost(Exception):
    """A worker process died and was not replaced (a bug or the machine, not the user's input)."""


@dataclass(frozen=True)
class Shared:
    """A value handed to the workers once: in memory (the calling process), in a file (local
    processes) or in Ray's object store."""

    key: str
    value: Any = None
    path: str | None = None
    ref: Any = None


def worker_cached(key: str, make: Callable[[], Any]) -> Any:
    """``make()``, kept in this process under ``key`` among the last few (rule 2)."""
    with _cache_lock:  # tasks on threads of one process (rule 5) make a value once
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        value = make()
        _cache[key] = value
        while len(_cache) > _CACHED:
            _cache.popitem(last=False)
        return value


def shared_value(shared: Shared) -> Any:
    """The value behind ``shared``, read at most once per process."""
    if shared.path is not None:
        return worker_cached(shared.key, lambda: pickle.loads(Path(shared.path).read_bytes()))
    if shared.ref is not None:
        import ray

        return worker_cached(shared.key, lambda: ray.get(shared.ref))
    return shared.value


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Executor:
    """Runs tasks in the calling process, one at a time (``--workers 1``). ``slots``: tasks that
    run at once; ``threads``: ONNX Runtime threads per task (0: its default)."""

    slots = 1
    threads = 0

    def share(self, value: Any) -> Shared:
        return Shared(uuid.uuid4().hex, value=value)

    def map(self, function: Callable, arguments: Iterable[tuple]) -> list:
        """``[function(*args) for args in arguments]``, computed by the workers; ``arguments`` is
        consumed as tasks are handed out, at most twice as many waiting as there are slots."""
        return [function(*args) for args in arguments]

    def submit(self, function: Callable, arguments: list[tuple]) -> Callable[[], list]:
        """Start ``function`` on each of ``arguments`` (a few: all are handed out at once) and return
        a function that waits for the results, in the order of the arguments. Here they run on a
        thread of this process, so that the caller can go on (rule 5)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(self.map(function, arguments))
            except BaseException as exc:  # handed to whoever waits for the results
                future.set_exception(exc)

        threading.Thread(target=work, daemon=True).start()
        return future.result

    def release(self, shared: Shared) -> None:
        """Forget ``shared`` and what was cached under its key, once no task needs it."""
        with _cache_lock:
            for key in [key for key in _cache if key.startswith(shared.key)]:
                del _cache[key]

    def close(self) -> None:
        _cache.clear()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _bounded(submit: Callable[[tuple], Any], wait: Callable[[list], list], arguments: Iterable[tuple],
             window: int) -> Iterator[Any]:
    """Submit each argument tuple, waiting (``wait(pending) -> still pending``) while ``window``
    are pending; yields the handles in order."""
    pending: list = []
    for args in arguments:
        while len(pending) >= window:
            pending = wait(pending)
        handle = submit(args)
        pending.append(handle)
        yield handle


class LocalExecutor(Executor):
    """``workers`` local processes (started on first use), each with cores // workers ONNX Runtime threads."""

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self.threads = max(1, cores() // workers)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._folder: str | None = None

    def share(self, value: Any) -> Shared:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="onnxq-shared-")
        key = uuid.uuid4().hex
        path = Path(self._folder) / key
        path.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        return Shared(key, path=str(path))

    def release(self, shared: Shared) -> None:
        if shared.path is not None:
            Path(shared.path).unlink(missing_ok=True)

    def _started(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    @contextlib.contextmanager
    def _watching(self, futures: list[concurrent.futures.Future]) -> Iterator[None]:
        """On any failure the tasks not started yet are cancelled; a dead worker is ``WorkerLost``."""
        try:
            yield
        except BaseException as exc:
            for future in futures:
                future.cancel()
            if not isinstance(exc, BrokenProcessPool):
                raise
            self._pool = None
            raise WorkerLost(
                "a local worker process died (a script that calls onnxq with workers > 1 must do so under "
                "if __name__ == '__main__':, as multiprocessing requires); rerun with --resume to continue"
            ) from exc

    def map(self, function: Callable, arguments: Iterable[tuple]) -> list:
        pool = self._started()

        def wait(pending: list) -> list:
            return list(concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED).not_done)

        futures: list[concurrent.futures.Future] = []
        with self._watching(futures):
            futures.extend(_bounded(lambda args: pool.submit(function, *args), wait, arguments, 2 * self.slots))
            return [future.result() for future in futures]

    def submit(self, function: Callable, arguments: list[tuple]) -> Callable[[], list]:
        pool = self._started()
        futures: list[concurrent.futures.Future] = []
        with self._watching(futures):
            futures.extend(pool.submit(function, *args) for args in arguments)

        def results() -> list:
            with self._watching(futures):
                return [future.result() for future in futures]

        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class RayExecutor(Executor):
    """Ray tasks of one CPU and one ONNX Runtime thread each, on the cluster at ``address``
    (``auto``: a Ray already started in this process or named by ``RAY_ADDRESS``, else a local one)."""

    threads = 1

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--ray needs Ray, which is not installed; pip install 'onnxq[ray]'") from exc
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "auto" else address, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot reach a Ray cluster at {address!r}: {exc}; give its address "
                                  "(host:port or ray://host:port), or auto for a local Ray") from exc
            self._started = True
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable, Any] = {}

    def share(self, value: Any) -> Shared:
        return Shared(uuid.uuid4().hex, ref=self._ray.put(value))

    def map(self, function: Callable, arguments: Iterable[tuple]) -> list:
        def wait(pending: list) -> list:
            return self._ray.wait(pending, num_returns=1)[1]

        return self._results(list(_bounded(lambda args: self._remote_of(function).remote(*args), wait, arguments,
                                           2 * self.slots)))

    def submit(self, function: Callable, arguments: list[tuple]) -> Callable[[], list]:
        refs = [self._remote_of(function).remote(*args) for args in arguments]
        return lambda: self._results(refs)

    def _remote_of(self, function: Callable) -> Any:
        if function not in self._remote:
            self._remote[function] = self._ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(function)
        return self._remote[function]

    def _results(self, refs: list) -> list:
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, OnnxqError):
                raise exc.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            raise WorkerLost(f"a Ray worker was lost {RAY_RETRIES + 1} times: {exc}; rerun with --resume") from exc

    def close(self) -> None:
        super().close()
        if self._started:
            self._ray.shutdown()


def executor_for(workers: int, ray_address: str | None) -> Executor:
    """The executor of ``--workers`` / ``--ray``: the calling process, local processes, or Ray."""
    if ray_address is not None:
        return RayExecutor(ray_address)
    return Executor() if workers == 1 else LocalExecutor(workers)
