"""--workers N and --ray ADDRESS: the same bytes as one worker, whatever order the shards finish in."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx.helper as oh
import pytest

import onnxq
import onnxq.api
from onnxq.calibration.data import Batch
from onnxq.calibration.observers import make_observer
from onnxq.calibration.runner import calibrate
from onnxq.distribute import Executor
from onnxq.tune import fallback
from onnxq.workspace.store import Workspace
from tests.graphs import make_model
from tests.test_cli_errors import DEMO, assert_clean_failure, onnxq as run_cli
from tests.test_workspace_resume import _loader, reference  # noqa: F401 - reference is a fixture

# A small budget splits calibration into several passes, each a run over the data.
SEVERAL_PASSES = dict(memory_budget_mb=0.0001)


def _digits(samples: int = 40) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.uniform(0, 1, size=(1, 1, 8, 8)).astype(np.float32)} for _ in range(samples)]


def _convert(folder: Path, method: str, **run) -> bytes:
    output = folder / f"{method}.int8.onnx"
    result = onnxq.convert(DEMO, output, _digits(), onnxq.QuantConfig(method=method),
                           run=onnxq.RunOptions(**SEVERAL_PASSES, **run), workspace=folder / f"{method}.ws",
                           fallback=onnxq.FallbackOptions(min_sqnr_db=45.0))  # missed by plain int8, met with some nodes float
    assert any("passes" in note for note in result.notes)
    assert result.fallback is not None and result.fallback.trials > 1  # the search ran: sensitivity and trials
    return output.read_bytes()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("one")
    return {method: _convert(folder, method) for method in ("percentile", "entropy")}


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_two_local_workers_write_the_same_bytes_as_one(one_worker, tmp_path, method):
    assert _convert(tmp_path, method, workers=2) == one_worker[method]


class _FinishingBackwards(Executor):
    """Three workers whose tasks finish in the reverse order of their hand-out."""

    slots = 3

    def map(self, function, arguments):
        arguments = list(arguments)
        return [function(*args) for args in reversed(arguments)][::-1]


class _Source:
    """A re-readable batch source over ``batches`` (the protocol ``calibrate`` reads)."""

    one_shot = False

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.first = batches, batches[0]

    def __call__(self):
        return iter(self.batches)


def _calibration_state(executor: Executor | None) -> dict:
    model = make_model([oh.make_node("Relu", ["input"], ["r"]), oh.make_node("Sigmoid", ["r"], ["output"])],
                       [("input", [4, 16])], [("output", [4, 16])])
    rng = np.random.default_rng(1)
    batches = [Batch({"input": rng.normal(0, 2 ** (i % 5), (4, 16)).astype(np.float32)}, 4) for i in range(23)]

    state, _ = calibrate(model, {"input": "k_in", "r": "k_r", "output": "k_out"}, {"input": 2, "r": 2, "output": 2},
                         _Source(batches), onnxq.QuantConfig(method="entropy"),
                         onnxq.RunOptions(device="cpu", **SEVERAL_PASSES), executor=executor)
    assert len(state.passes) == 3
    return state.to_step().observers


def test_calibration_state_does_not_depend_on_the_order_shards_finish_in():
    assert _calibration_state(_FinishingBackwards()) == _calibration_state(None)


class _EarlierRoundsFinishLast(Executor):
    """In-process run-ahead (``submit`` on threads) where, of two rounds in flight, the earlier
    one finishes last."""

    def __init__(self) -> None:
        self.rounds = 0

    def submit(self, function, arguments):
        self.rounds += 1
        delay = 0.05 if self.rounds % 2 else 0.0

        def late(*args):
            time.sleep(delay)
            return function(*args)

        return super().submit(late, arguments)


def test_run_ahead_rounds_finishing_out_of_order_give_the_state_of_observing_batch_by_batch():
    model = make_model([oh.make_node("Relu", ["input"], ["r"]), oh.make_node("Neg", ["r"], ["output"])],
                       [("input", [4, 16])], [("output", [4, 16])])
    rng = np.random.default_rng(3)
    batches = [Batch({"input": rng.normal(0, 2 ** (i % 5), (4, 16)).astype(np.float32)}, 4) for i in range(9)]

    executor = _EarlierRoundsFinishLast()
    state, _ = calibrate(model, {"input": "k_in", "r": "k_r", "output": "k_out"}, {"input": 2, "r": 2, "output": 2},
                         _Source(batches), onnxq.QuantConfig(method="percentile"), onnxq.RunOptions(device="cpu"),
                         executor=executor)
    assert executor.rounds == len(batches)  # every round went through submit: run-ahead was on
    expected = {key: make_observer("percentile") for key in ("k_in", "k_r", "k_out")}
    for batch in batches:  # the same tensors in numpy (exact ops), observed in data order
        values = batch.feed["input"]
        for key, array in (("k_in", values), ("k_r", np.maximum(values, 0)), ("k_out", -np.maximum(values, 0))):
            expected[key].update(array)
    assert state.to_step().observers == {key: expected[key].to_dict() for key in sorted(expected)}


@pytest.mark.parametrize("method", ["percentile", "entropy", "minmax"])
def test_merging_shard_observers_in_any_order_equals_one_run(method):
    rng = np.random.default_rng(2)
    shards = [rng.standard_t(3, size=500).astype(np.float32) * scale for scale in (0.01, 3.0, 700.0, 0.5)]
    whole = make_observer(method)
    for shard in shards:
        whole.update(shard)
    for order in itertools.permutations(range(len(shards))):
        merged = make_observer(method)
        for index in order:
            part = make_observer(method)
            part.update(shards[index])
            merged.merge(part)
        assert merged.to_dict() == whole.to_dict(), order


def _searched(folder: Path, resume: bool = False) -> tuple[bytes, list[dict]]:
    """A conversion whose safety net runs a search of 16 trials (minmax): what it wrote, and the
    trial steps in its workspace in order."""
    output = folder / "out.onnx"
    result = onnxq.convert(DEMO, output, _digits(), onnxq.QuantConfig(method="minmax"), workspace=folder / "ws",
                           fallback=onnxq.FallbackOptions(min_sqnr_db=55.0), resume=resume)
    assert result.fallback is not None and result.fallback.met
    steps = sorted((folder / "ws" / "steps").glob("*-trial.json"))
    return output.read_bytes(), [json.loads(step.read_text())["payload"] for step in steps]


@pytest.fixture(scope="module")
def searched_once(tmp_path_factory) -> tuple[Path, bytes, list[dict]]:
    folder = tmp_path_factory.mktemp("search")
    return folder, *_searched(folder)


@pytest.fixture
def three_slots(monkeypatch) -> list[int]:
    """Conversions run on three in-process slots whose tasks finish backwards; the list gets the
    size of each batch of trials the search scores ahead."""
    batches: list[int] = []
    prefetch = fallback._Search.prefetch

    def recorded(search, keysets):
        batches.append(len(keysets))
        return prefetch(search, keysets)

    monkeypatch.setattr(fallback._Search, "prefetch", recorded)
    monkeypatch.setattr(onnxq.api, "executor_for", lambda workers, ray: _FinishingBackwards())
    return batches


def test_search_trials_scored_ahead_leave_the_bytes_and_the_workspace_of_one_worker(searched_once, three_slots,
                                                                                     tmp_path):
    _, output, trials = searched_once
    assert len(trials) >= 12
    assert _searched(tmp_path) == (output, trials)
    assert max(three_slots) == 3  # trials were scored ahead, three at a time


def test_a_search_resumed_with_another_worker_count_gives_the_same_bytes_and_trials(searched_once, three_slots,
                                                                                    tmp_path):
    folder, output, trials = searched_once
    shutil.copytree(folder / "ws", tmp_path / "ws")
    steps = sorted((tmp_path / "ws" / "steps").glob("*.json"))
    cut = [step for step in steps if step.name.endswith("-trial.json")][len(trials) // 2]
    for step in steps[steps.index(cut):]:  # as if killed after half of the trials
        step.unlink()
    assert _searched(tmp_path, resume=True) == (output, trials)
    assert max(three_slots) == 3


def test_workers_below_one_is_a_clean_usage_error(tmp_path):
    output = tmp_path / "out.onnx"
    result = run_cli("convert", DEMO, "-o", output, "--calibration-data", tmp_path / "x.npz", "--workers", "0")
    assert_clean_failure(result, output, "--workers")


def test_a_driver_killed_mid_calibration_with_two_workers_resumes_to_the_same_bytes(reference, tmp_path):  # noqa: F811
    expected, _, _ = reference  # one worker, uninterrupted (tests/test_workspace_resume.py)
    loader, workspace, out = _loader(tmp_path, delay=0.01), tmp_path / "ws", tmp_path / "out.onnx"
    args = ["convert", str(DEMO), "-o", str(out), "--calibration-data", loader, "--method", "percentile", "--equalize", "--bias-correction",
            "--checkpoint-interval", "0", "--workspace", str(workspace), "-q"]
    process = subprocess.Popen([sys.executable, "-m", "onnxq", *args, "--workers", "2"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ | {"TMPDIR": str(tmp_path)})  # its leftovers
    deadline = time.monotonic() + 120
    while len(list((workspace / "steps").glob("*.json"))) < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = Workspace.open(workspace).latest("calibration")
    assert latest is not None and not latest.payload["complete"]
    resumed = run_cli(*args, "--resume")  # with one worker: the worker count is not part of the result
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == expected


def test_ray_without_ray_installed_is_a_clean_error_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    with pytest.raises(onnxq.OnnxqError, match=r"pip install 'onnxq\[ray\]'"):
        onnxq.convert(DEMO, tmp_path / "out.onnx", _digits(4), run=onnxq.RunOptions(ray="auto"))
    assert not (tmp_path / "out.onnx").exists()


# --- Ray: an optional extra (pip install 'onnxq[ray]'); these tests skip without it ---------------


@pytest.fixture
def ray():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def test_ray_auto_writes_the_same_bytes_as_one_worker(ray, one_worker, tmp_path):
    assert _convert(tmp_path, "entropy", ray="auto") == one_worker["entropy"]


def test_ray_cluster_of_two_nodes_writes_the_same_bytes_as_one_worker(ray, one_worker, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        assert _convert(tmp_path, "percentile", ray=cluster.address) == one_worker["percentile"]
    finally:
        ray.shutdown()
        cluster.shutdown()


def _task_processes(name: str) -> list[int]:
    """Ray worker processes running task ``name`` now (Ray titles them ``ray::name``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_ray_worker_killed_during_calibration_is_retried_and_the_bytes_stay_the_same(ray, one_worker, tmp_path):
    killed: list[int] = []
    done = threading.Event()

    def kill_one_calibration_worker():
        while not done.is_set() and not killed:
            for pid in _task_processes("_observe_shard"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    ray.init(num_cpus=2)
    killer = threading.Thread(target=kill_one_calibration_worker)
    killer.start()
    try:
        output = _convert(tmp_path, "entropy", ray="auto")
    finally:
        done.set()
        killer.join()
    assert killed, "no calibration task was caught running"
    assert output == one_worker["entropy"]
