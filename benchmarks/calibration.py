"""Calibration cost: peak RSS as the calibration set grows, time against a plain float pass,
and what a killed-and-resumed run costs. Part of ``python -m benchmarks.run``.

Every measurement runs in a fresh process reading the same samples from disk one at a time
(``benchmarks.stream``); a watchdog ends a process whose RSS passes the limit, so a calibrator
that keeps every intermediate tensor cannot take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.stream import write_npz, write_samples
from benchmarks.workloads import WORKLOADS, Workload

ROOT = Path(__file__).resolve().parents[1]
CASES = [("float pass", "float", "minmax"), ("onnxq minmax", "onnxq", "minmax"),
         ("onnxq percentile", "onnxq", "percentile"), ("onnxq entropy", "onnxq", "entropy"),
         ("ORT minmax", "ort", "minmax"), ("ORT percentile", "ort", "percentile"), ("ORT entropy", "ort", "entropy")]
NPZ_CASE = ("onnxq percentile, one .npz", "onnxq", "percentile")  # onnxq reads the .npz itself


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run(command: list[str], env: dict, limit_mb: float) -> dict:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    highest = 0.0
    while process.poll() is None:
        highest = max(highest, _rss_mb(process.pid))
        if highest > limit_mb:
            process.kill()
            process.wait()
            return {"seconds": float("nan"), "peak_rss_mb": highest, "error": f"killed: RSS above {limit_mb:.0f} MB"}
        time.sleep(0.1)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        return {"seconds": float("nan"), "peak_rss_mb": highest, "error": (stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(stdout.strip().splitlines()[-1])


def _env(data: Path, workload: Workload, count: int) -> dict:
    return {**os.environ, "ONNXQ_BENCH_DATA": str(data), "ONNXQ_BENCH_INPUT": workload.input_name,
            "ONNXQ_BENCH_COUNT": str(count), "PYTHONPATH": str(ROOT)}


def _resume_cost(model: Path, folder: Path, env: dict, uninterrupted: float) -> tuple[float, float]:
    """(seconds of a run killed halfway plus its resumed run, seconds of the resumed run alone)."""
    workspace, output = folder / "resume.ws", folder / "resume.onnx"
    command = [sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(output), "--calibration-data",
               "benchmarks.stream:samples", "--device", "cpu", "--workspace", str(workspace),
               "--checkpoint-interval", "1", "-q"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    while time.perf_counter() - start < uninterrupted / 2 or not list(workspace.glob("steps/*.json")):
        time.sleep(0.05)  # halfway, and after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*command, "--resume"], cwd=ROOT, env=env, check=True)
    resumed = time.perf_counter() - start
    return killed_at + resumed, resumed


def _measure(workload: Workload, folder: Path, counts: tuple[int, int], limit_mb: float, cases: list) -> dict:
    """``{(label, count): result}`` for each case at each count; the streamed cases read
    ``benchmarks.stream.samples``, ``NPZ_CASE`` one uncompressed .npz per count."""
    model = workload.model_path()
    data = folder / f"{workload.name}.calibration.npy"
    first = next(workload.calibration_stream(1))
    if any(case != NPZ_CASE for case in cases):
        write_samples(data, workload.calibration_stream(max(counts)), max(counts), first.shape)
    results: dict[tuple[str, int], dict] = {}
    for count in counts:
        for label, tool, method in cases:
            source = "stream"
            if (label, tool, method) == NPZ_CASE:
                source = str(folder / f"{workload.name}.{count}.npz")
                write_npz(Path(source), workload.input_name, workload.calibration_stream(count), count, first.shape)
            command = [sys.executable, "-m", "benchmarks.convert_one", tool, str(model),
                       str(folder / f"{label}.onnx".replace(" ", "_").replace(",", "")), source, method]
            results[label, count] = _run(command, _env(data, workload, count), limit_mb)
            print(f"{workload.name} {label} {count}: {results[label, count]}", flush=True)
    return results


def _row(label: str, small: dict, large: dict, float_pass_seconds: float) -> str:
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"] if small["peak_rss_mb"] else float("nan")
    calibration = large.get("calibration_seconds", float("nan"))
    return (f"| {label} | {small['peak_rss_mb']:.0f} | {large['peak_rss_mb']:.0f} | {ratio:.2f} | {large['seconds']:.1f} "
            f"| {calibration:.1f} | {calibration / float_pass_seconds:.2f} | {large['error'] or small['error'] or ''} |")


def bench_calibration(workload: Workload, folder: Path, counts: tuple[int, int], limit_mb: float) -> str:
    """A markdown section with the calibration measurements for ``workload``."""
    model = workload.model_path()
    data = folder / f"{workload.name}.calibration.npy"
    results = _measure(workload, folder, counts, limit_mb, [*CASES, NPZ_CASE])
    small, large = counts
    base = results["float pass", large].get("calibration_seconds", float("nan"))
    lines = [
        f"## Calibration cost: {workload.name}, {small} vs {large} samples",
        "",
        "Each row is a fresh process streaming the same samples from disk (the last row: onnxq reading",
        "one uncompressed .npz of all the samples itself). *total s* includes starting",
        "Python, loading the model and, for the quantizers, rewriting and writing the int8 model;",
        "*calibration s* is the calibration alone (onnxq's `calibrate`, ORT's `collect_data` +",
        "`compute_data`; for the float pass, the inference loop), and the last ratio divides it by the",
        f"float pass's. Watchdog limit {limit_mb:.0f} MB.",
        "",
        (f"| run | peak RSS MB at {small} | peak RSS MB at {large} | RSS ratio {large}/{small} | total s at {large} "
         f"| calibration s at {large} | calibration / float pass | note |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *(_row(label, results[label, small], results[label, large], base) for label, _, _ in [*CASES, NPZ_CASE]),
    ]
    total, resumed = _resume_cost(model, folder, _env(data, workload, large), results["onnxq minmax", large]["seconds"])
    extra = total - results["onnxq minmax", large]["seconds"]
    lines += [
        "",
        f"Resume: an `onnxq convert` (minmax, {large} samples, checkpoint every 1 s) killed with SIGKILL halfway",
        f"and then resumed took {total:.1f} s in all ({resumed:.1f} s for the resumed part), {extra:+.1f} s against",
        f"the uninterrupted {results['onnxq minmax', large]['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """``python -m benchmarks.calibration [--model yolov8n] [--counts 64,512]``: the .npz row alone
    (``NPZ_CASE``), printed as a table row; its float-pass ratio is left out (no float pass is run)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--counts", default="64,512")
    parser.add_argument("--rss-limit-mb", type=float, default=12000)
    args = parser.parse_args()
    small, large = (int(n) for n in args.counts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        results = _measure(WORKLOADS[args.model], Path(tmp), (small, large), args.rss_limit_mb, [NPZ_CASE])
    label = NPZ_CASE[0]
    print(_row(label, results[label, small], results[label, large], float("nan")).replace("| nan |", "| - |"))


if __name__ == "__main__":
    main()
