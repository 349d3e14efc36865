"""Scale-out: the wall time of calibration and of the fallback search on one worker, on N local
worker processes (``--workers``) and as Ray tasks on a ``ray.cluster_utils.Cluster`` of simulated
nodes (``--ray``), on one corpus model, and whether every setting writes the same bytes.

``python -m benchmarks.scale [--model yolov8n] [--calibration 32] [--workers 1,2] [--ray-nodes 2]
[--json PATH]``: run outside the repository with onnxq on ``PYTHONPATH``. The calibration and
search times are those of ``onnxq.calibration.runner.calibrate_model`` and
``onnxq.tune.fallback.tune_fallback`` inside ``onnxq.convert`` (timed by wrapping them, nothing
else changed), and so are the search's sensitivity step (``rank_units``) and its rounds of trial
scoring (``_Search.prefetch``: one per trial with one worker; with more, several trials scored at
once, ahead of the search); the search runs without a time budget (``--fallback-budget 0``) so that
every setting does the same trials. Models built beyond one worker's were scored ahead and not used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

import onnxq
import onnxq.api
import onnxq.tune.fallback
import onnxq.tune.trials
from benchmarks.corpus_models import CORPUS


# (module, function): what is timed inside onnxq.convert, by wrapping it (calls and seconds)
TIMED = {
    "calibration": (onnxq.api, "calibrate_model"),
    "search": (onnxq.api, "tune_fallback"),
    "sensitivity": (onnxq.tune.fallback, "rank_units"),  # the sensitivity step inside the search
    "rounds": (onnxq.tune.fallback._Search, "prefetch"),  # search trials scored at once (with workers: ahead)
    "build": (onnxq.tune.fallback, "build_model"),  # trial models, built on the driver
    "run": (onnxq.tune.trials, "run_all"),  # trial models run in the driver's process (one worker)
}


def _timed(original, name: str, timings: dict[str, list[float]]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings.setdefault(name, []).append(time.perf_counter() - start)

    wrapper.__wrapped_original__ = original
    return wrapper


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished child processes (local workers; not Ray's)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def convert(model: Path, feeds: list, folder: Path, label: str, **run) -> dict:
    """One conversion with ``run`` options: seconds and calls of each timed part, the output's hash."""
    timings: dict[str, list[float]] = {}
    for name, (module, function) in TIMED.items():
        setattr(module, function, _timed(getattr(module, function), name, timings))
    output = folder / f"{label}.onnx"
    start, cpu = time.perf_counter(), _cpu_s()
    try:
        result = onnxq.convert(model, output, feeds, run=onnxq.RunOptions(device="cpu", **run),
                               fallback=onnxq.FallbackOptions(budget_s=0), workspace=folder / f"{label}.ws")
    finally:
        for module, function in TIMED.values():
            setattr(module, function, getattr(module, function).__wrapped_original__)
    report = result.fallback
    row = {"setting": label, "total_s": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu,
           "trials": report.trials if report else 1,
           "kept_float": len([k for k in report.kept if k.reason == "accuracy fallback"]) if report else 0,
           "sha256": hashlib.sha256(output.read_bytes()).hexdigest()}
    for name in TIMED:
        row[f"{name}_s"], row[f"{name}_calls"] = sum(timings.get(name, [])), len(timings.get(name, []))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples (every 8th held out)")
    parser.add_argument("--workers", default="1,2", help="local worker counts to time")
    parser.add_argument("--ray-nodes", type=int, default=2, help="simulated Ray nodes of one CPU each (0: no Ray)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    entry = CORPUS[args.model]
    model, feeds = entry.model_path(), entry.inputs(args.calibration, held_out=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-scale-") as tmp:
        folder = Path(tmp)
        for workers in [int(w) for w in args.workers.split(",")]:
            rows.append(convert(model, feeds, folder, f"workers={workers}", workers=workers))
            print(json.dumps(rows[-1]), flush=True)
        if args.ray_nodes:
            import ray
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            try:
                for _ in range(args.ray_nodes - 1):
                    cluster.add_node(num_cpus=1)
                ray.init(address=cluster.address, logging_level="WARNING")
                cluster.wait_for_nodes()
                rows.append(convert(model, feeds, folder, f"ray, {args.ray_nodes} nodes x 1 CPU", ray=cluster.address))
                print(json.dumps(rows[-1]), flush=True)
            finally:
                ray.shutdown()
                cluster.shutdown()
    base = next((row for row in rows if row["setting"] == "workers=1"), rows[0])  # whatever order they ran in
    print("\n| setting | calibration s | search s | search vs 1 worker | of it sensitivity s | models built (s on the "
          "driver) | search trials (rounds) | kept float | same bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['setting']} | {row['calibration_s']:.1f} | {row['search_s']:.1f} | "
              f"{row['search_s'] / base['search_s']:.2f}x | {row['sensitivity_s']:.1f} | "
              f"{row['build_calls']} ({row['build_s']:.1f}) | "
              f"{row['trials']} ({row['rounds_calls']}) | {row['kept_float']} | {'yes' if row['sha256'] == base['sha256'] else 'NO'} |")
    print("\nCPU s of each conversion (driver and local workers): "
          + ", ".join(f"{row['setting']} {row['cpu_s']:.1f}" for row in rows))
    print(f"one worker: {base['run_calls']} trial-model runs took {base['run_s']:.1f} s in all")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
