"""Histogram calibration against a float pass, and peak memory against ONNX Runtime's quantizer,
in one run (issue 16, items 3 and 4).

``python -m benchmarks.speed [--model yolov8n] [--samples 512] [--repeats 3] [--fallback-budget 60]``:
each measurement is a fresh process streaming the same samples from disk one at a time
(``benchmarks.stream``). Timing: a float pass, then onnxq's percentile and entropy calibration
alone (``benchmarks.convert_one calibrate``), interleaved and repeated, each calibration divided
by the float pass of its own repeat. Memory: the peak RSS (``/usr/bin/time -v``) of
``onnxq convert`` with its defaults (the search's time capped by ``--fallback-budget``) and of
ONNX Runtime's ``quantize_static`` (MinMax, per-channel, QDQ) on the same samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.calibration import _env
from benchmarks.stream import write_samples
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parents[1]
TIMED = [("float pass", "float", "minmax"), ("percentile", "calibrate", "percentile"),
         ("entropy", "calibrate", "entropy")]


def _timed(tool: str, model: Path, output: Path, method: str, env: dict) -> float:
    """Seconds of the calibration (or float pass) alone, in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.convert_one", tool, str(model), str(output), "stream",
                           method], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["error"]:
        raise RuntimeError(f"{tool} {method}: {result['error']}")
    return result["calibration_seconds"]


def _peak_rss_mb(command: list[str], env: dict) -> float:
    """Peak RSS of ``command`` (``/usr/bin/time -v``'s maximum resident set size)."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    line = next(line for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return int(line.split(":")[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fallback-budget", type=float, default=60.0)
    args = parser.parse_args()
    workload = WORKLOADS[args.model]
    model = workload.model_path()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "samples.npy"
        first = next(workload.calibration_stream(1))
        write_samples(data, workload.calibration_stream(args.samples), args.samples, first.shape)
        env = _env(data, workload, args.samples)
        seconds: dict[str, list[float]] = {label: [] for label, _, _ in TIMED}
        for repeat in range(args.repeats):
            for label, tool, method in TIMED:
                seconds[label].append(_timed(tool, model, folder / "out.onnx", method, env))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)
        onnxq_mb = _peak_rss_mb([sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(folder / "q.onnx"),
                                 "--calibration-data", "benchmarks.stream:samples", "--device", "cpu", "-q",
                                 "--fallback-budget", str(args.fallback_budget)], env)
        ort_mb = _peak_rss_mb([sys.executable, "-m", "benchmarks.convert_one", "ort", str(model),
                               str(folder / "ort.onnx"), "stream", "minmax"], env)
    floats = seconds["float pass"]
    print(f"\n{args.model}, {args.samples} samples, {args.repeats} repeats (min / median / max)")
    print("| measurement | min | median | max |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| float pass s | {min(floats):.1f} | {statistics.median(floats):.1f} | {max(floats):.1f} |")
    for label in ("percentile", "entropy"):
        ratios = [s / f for s, f in zip(seconds[label], floats)]
        print(f"| {label} calibration s | {min(seconds[label]):.1f} | {statistics.median(seconds[label]):.1f} "
              f"| {max(seconds[label]):.1f} |")
        print(f"| {label} / float pass (same repeat) | {min(ratios):.2f} | {statistics.median(ratios):.2f} "
              f"| {max(ratios):.2f} |")
    print(f"\npeak RSS MB: onnxq convert {onnxq_mb:.0f}, ONNX Runtime quantize_static {ort_mb:.0f}, "
          f"ratio {onnxq_mb / ort_mb:.2f}")


if __name__ == "__main__":
    main()
