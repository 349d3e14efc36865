"""onnxq against ONNX Runtime's quantizer on real models, side by side in one run.

``python -m benchmarks.run [--models yolov8n,ppocr_det,ppocr_rec] [--calibration N] [--eval N]
[--calibration-model yolov8n] [--output benchmarks/RESULTS.md]``. Each tool converts each model
in its own fresh process (time and peak RSS measured there) from the same calibration data; the
outputs are then compared with the float model on held-out inputs, and timed against it at
batch 1 with runs interleaved. Then ``benchmarks.calibration`` measures calibration memory and
time as the calibration set grows, and the cost of a resumed run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.calibration import bench_calibration
from benchmarks.workloads import WORKLOADS, Workload

# (tool, output format) -> name in the table
TOOLS = {
    ("onnxq", "qdq"): "onnxq QDQ",
    ("ort", "qdq"): "ORT quantize_static QDQ",
    ("onnxq", "qoperator"): "onnxq QOperator",
    ("ort", "qoperator"): "ORT quantize_static QOperator",
}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _sqnr_db(reference: list[np.ndarray], approximation: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - a) ** 2)) for r, a in zip(reference, approximation))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def _latencies_ms(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int) -> dict[str, list[float]]:
    """Per-model run times at batch 1, interleaved so that machine noise hits all alike."""
    for session in sessions.values():
        session.run(None, feed)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def _convert(tool: str, form: str, model: Path, output: Path, calibration: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.convert_one", tool, str(model), str(output), str(calibration),
               "minmax", form]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"seconds": float("nan"), "peak_rss_mb": float("nan"), "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(workload: Workload, folder: Path, n_calibration: int, n_eval: int, latency_runs: int) -> list[dict]:
    model = workload.model_path()
    calibration = workload.calibration_inputs(n_calibration)
    evaluation = workload.eval_inputs(n_eval)
    calibration_path = folder / f"{workload.name}.calib.npz"
    np.savez(calibration_path, **{k: np.concatenate([s[k] for s in calibration]) for k in calibration[0]})

    float_session = _session(model)
    float_outputs = [float_session.run(None, feed) for feed in evaluation]
    rows, sessions = [], {"float": float_session}
    for (tool, form), label in TOOLS.items():
        output = folder / f"{workload.name}.{tool}.{form}.int8.onnx"
        row = {"model": workload.name, "tool": label, **_convert(tool, form, model, output, calibration_path)}
        if row["error"] is None:
            try:
                session = _session(output)
            except Exception as exc:  # the tool wrote a model ONNX Runtime refuses
                row["error"] = f"output fails to load: {str(exc).strip().splitlines()[0][:160]}"
        if row["error"] is None:
            outputs = [session.run(None, feed) for feed in evaluation]
            row["size_ratio"] = output.stat().st_size / model.stat().st_size
            row["sqnr_db"] = _sqnr_db([o[0] for o in float_outputs], [o[0] for o in outputs])
            row["task_metric"] = workload.task_metric(float_outputs, outputs)
            sessions[label] = session
        rows.append(row)
    times = _latencies_ms(sessions, evaluation[0], latency_runs)
    float_ms = statistics.median(times["float"])
    for row in rows:
        if row["tool"] in times:
            row["latency_ms"] = statistics.median(times[row["tool"]])
            row["latency_ratio"] = row["latency_ms"] / float_ms
            row["float_latency_ms"] = float_ms
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def render(rows: list[dict], settings: str) -> str:
    lines = [
        "# Benchmark: onnxq vs ONNX Runtime's quantize_static",
        "",
        f"Produced by `python -m benchmarks.run {settings}` on {datetime.date.today()}, "
        f"{platform.machine()} with {os.cpu_count()} cores, onnxruntime {ort.__version__}, CPU execution provider.",
        "ORT is run as a new user would: per-channel int8 weights, uint8 activations, MinMax, the same",
        "calibration samples, in QDQ and in QOperator format. SQNR is of the first output vs float on the",
        "held-out inputs; latency is the median at batch 1, runs of float and all int8 models interleaved.",
        "",
        "| model | tool | convert s | peak RSS MB | size ratio | SQNR dB | task metric | latency ms | latency int8/float | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        metric = WORKLOADS[row["model"]].metric_name
        lines.append(
            f"| {row['model']} | {row['tool']} | {_fmt(row['seconds'], '.1f')} | {_fmt(row['peak_rss_mb'], '.0f')} "
            f"| {_fmt(row.get('size_ratio'), '.3f')} | {_fmt(row.get('sqnr_db'), '.1f')} "
            f"| {_fmt(row.get('task_metric'), '.3f')} ({metric}) | {_fmt(row.get('latency_ms'), '.1f')} "
            f"| {_fmt(row.get('latency_ratio'), '.2f')} "
            f"| {row['error'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WORKLOADS))
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples per model")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--calibration-model", default="yolov8n", help="model for the calibration cost section ('' skips it)")
    parser.add_argument("--calibration-counts", default="64,512")
    parser.add_argument("--rss-limit-mb", type=float, default=12_000)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench_model(WORKLOADS[name], Path(tmp), args.calibration, args.eval, args.latency_runs))
            print(render(rows, ""), flush=True)
        section = ""
        if args.calibration_model:
            small, large = (int(n) for n in args.calibration_counts.split(","))
            section = bench_calibration(WORKLOADS[args.calibration_model], Path(tmp), (small, large), args.rss_limit_mb)
    settings = (f"--models {args.models} --calibration {args.calibration} --eval {args.eval} "
                f"--calibration-model {args.calibration_model} --calibration-counts {args.calibration_counts}")
    report = render(rows, settings) + "\n" + section
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
