"""onnxq against ONNX Runtime's quantizer on real models, side by side in one run.

``python -m benchmarks.run [--models yolov8n,ppocr_det,ppocr_rec,encoder] [--calibration N] [--eval N]
[--calibration-model yolov8n] [--no-big-model] [--output benchmarks/RESULTS.md]``. Each tool converts each model
in its own fresh process (time and peak RSS measured there) from the same calibration data; the
outputs are then compared with the float model on held-out inputs, and timed against it at
batch 1 with runs interleaved. Then ``benchmarks.calibration`` measures calibration memory and
time as the calibration set grows, and the cost of a resumed run; ``benchmarks.big_model`` the
time and memory of converting a model over 2 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.big_model import measure as measure_big, render as render_big
from benchmarks.calibration import bench_calibration
from benchmarks.corpus import corpus_section, replace_section
from benchmarks.timing import cpu_line, latencies_ms, median_ms, session, sqnr_db
from onnxq.report.latency import ratio_spread
from benchmarks.fallback import (
    FALLBACK_MAX_DROP, FALLBACK_SEARCH, FALLBACK_TEST, FALLBACK_TRIALS, bench_fallback, render_fallback,
)
from benchmarks.workloads import WORKLOADS, BundledWorkload, Workload

# (tool, output format, activations) -> name in the tables
TOOLS = {
    ("onnxq", "qdq", "uint8"): "onnxq QDQ",
    ("onnxq", "qoperator", "uint8"): "onnxq QOperator",
    ("ort", "qdq", "uint8"): "ORT QDQ u8",
    ("ort", "qdq", "int8"): "ORT QDQ s8",
    ("ort", "qoperator", "uint8"): "ORT QOperator u8",
}
BATCHES = (1, 8)


def _convert(tool: str, form: str, activations: str, model: Path, output: Path, calibration: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.convert_one", tool, str(model), str(output), str(calibration),
               "minmax", form, activations]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"seconds": float("nan"), "peak_rss_mb": float("nan"), "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(workload: Workload | BundledWorkload, folder: Path, n_calibration: int, n_eval: int, latency_runs: int) -> list[dict]:
    model = workload.model_path()
    calibration = workload.calibration_inputs(n_calibration)
    evaluation = workload.eval_inputs(n_eval)
    calibration_path = folder / f"{workload.name}.calib.npz"
    np.savez(calibration_path, **{k: np.concatenate([s[k] for s in calibration]) for k in calibration[0]})

    float_session = session(model)
    float_outputs = [float_session.run(None, feed) for feed in evaluation]
    rows, sessions = [], {"float": float_session}
    for (tool, form, activations), label in TOOLS.items():
        output = folder / f"{workload.name}.{tool}.{form}.{activations}.int8.onnx"
        row = {"model": workload.name, "tool": label,
               **_convert(tool, form, activations, model, output, calibration_path)}
        if row["error"] is None:
            try:
                quantized = session(output)
            except Exception as exc:  # the tool wrote a model ONNX Runtime refuses
                row["error"] = f"output fails to load: {str(exc).strip().splitlines()[0][:160]}"
        if row["error"] is None:
            outputs = [quantized.run(None, feed) for feed in evaluation]
            row["size_ratio"] = output.stat().st_size / model.stat().st_size
            row["sqnr_db"] = sqnr_db([o[0] for o in float_outputs], [o[0] for o in outputs])
            row["task_metric"] = workload.task_metric(float_outputs, outputs)
            row["extra"] = workload.extra_metrics(float_outputs, outputs)
            sessions[label] = quantized
        rows.append(row)
    for batch in BATCHES:
        feed = {name: np.concatenate([sample[name] for sample in evaluation[:batch]]) for name in evaluation[0]}
        times = latencies_ms(sessions, feed, latency_runs if batch == 1 else max(5, latency_runs // 3))
        for row in rows:
            if row["tool"] in times:  # median ms, ratio to float, its lowest and highest over the repeats
                row[f"b{batch}"] = (median_ms(times[row["tool"]]), *ratio_spread(times, row["tool"], "float"))
        rows[0].setdefault("float_latency", {})[batch] = median_ms(times["float"])
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def _note(row: dict) -> str:
    """The error, or else the workload's secondary metrics."""
    return row["error"] or "; ".join(f"{name} {value:.3f}" for name, value in row.get("extra", {}).items())


def _latency(row: dict, batch: int) -> str:
    value = row.get(f"b{batch}")
    return "- | -" if value is None else f"{value[0]:.1f} | {value[1]:.2f} ({value[2]:.2f}-{value[3]:.2f})"


def _verdicts(rows: list[dict]) -> list[str]:
    """Plain-language lines: is onnxq's int8 faster than float here, and than ORT's fastest?"""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = next(r for r in rows if r["model"] == model and r["tool"] == "onnxq QDQ")
        others = [r for r in rows if r["model"] == model and r["tool"].startswith("ORT") and "b1" in r]
        parts = []
        for batch in BATCHES:
            if f"b{batch}" not in mine:
                continue
            _, ratio, low, high = mine[f"b{batch}"]
            fastest = min((r[f"b{batch}"][0] for r in others), default=float("nan"))
            verdict = "faster than" if high < 1 else "slower than" if low > 1 else "within the spread of"
            parts.append(
                f"batch {batch}: {verdict} float ({ratio:.2f}x, {low:.2f}-{high:.2f}x over the repeats), "
                f"{mine[f'b{batch}'][0] / fastest:.2f}x the time of ORT's fastest int8 output"
            )
        best_ort = max((r["task_metric"] for r in others if r.get("task_metric") is not None), default=float("nan"))
        metric = mine.get("task_metric")
        fidelity = "-" if metric is None else f"task metric {metric:.3f} vs ORT's best {best_ort:.3f}"
        lines.append(f"- **{model}**: " + "; ".join(parts) + f"; {fidelity}.")
    return lines


def render(rows: list[dict], settings: str) -> str:
    lines = [
        "# Benchmark: onnxq vs ONNX Runtime's quantize_static",
        "",
        f"Produced by `python -m benchmarks.run {settings}` on {datetime.date.today()}, "
        f"{platform.machine()} with {os.cpu_count()} cores ({cpu_line()}), onnxruntime {ort.__version__}, "
        "CPU execution provider.",
        "ORT is run as a new user would: per-channel int8 weights, MinMax, the same calibration samples, as QDQ",
        "with uint8 (u8) and int8 (s8) activations and as QOperator. SQNR is of the first output vs float on",
        "the held-out inputs; the task metric compares int8 with float outputs (1.0 = identical).",
        "",
        "## Conversion and fidelity",
        "",
        "| model | tool | convert s | peak RSS MB | size ratio | SQNR dB | task metric | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        metric = WORKLOADS[row["model"]].metric_name
        lines.append(
            f"| {row['model']} | {row['tool']} | {_fmt(row['seconds'], '.1f')} | {_fmt(row['peak_rss_mb'], '.0f')} "
            f"| {_fmt(row.get('size_ratio'), '.3f')} | {_fmt(row.get('sqnr_db'), '.1f')} "
            f"| {_fmt(row.get('task_metric'), '.3f')} ({metric}) | {_note(row)} |"
        )
    lines += [
        "",
        "## CPU latency",
        "",
        "Median ms over the runs of float and every int8 model in one process, interleaved in random order in",
        "three repeats, and the ratio int8/float with the lowest and highest ratio of one repeat in brackets (a",
        "difference within that spread is noise), at batch 1 and batch 8.",
        "",
        "| model | tool | batch 1 ms | b1 int8/float | batch 8 ms | b8 int8/float | task metric |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        float_latency = row.get("float_latency")
        if float_latency:
            b1, b8 = float_latency.get(1), float_latency.get(8)
            lines.append(
                f"| {row['model']} | float | {b1:.1f} | 1.00 | {'-' if b8 is None else f'{b8:.1f}'} | 1.00 | 1.000 |"
            )
        lines.append(
            f"| {row['model']} | {row['tool']} | {_latency(row, 1)} | {_latency(row, 8)} "
            f"| {_fmt(row.get('task_metric'), '.3f')} |"
        )
    lines += ["", "What this says:", "", *_verdicts(rows)]
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
    parser.add_argument("--big-model", action=argparse.BooleanOptionalAction, default=True,
                        help="also convert a generated 2.47 GB model (needs about 6 GB of free disk)")
    parser.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the mixed-precision section (benchmarks.fallback) on every model")
    parser.add_argument("--max-drop", type=float, default=FALLBACK_MAX_DROP,
                        help="search target of the mixed-precision section (its goal is 98%% of float on held-out inputs)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench_model(WORKLOADS[name], Path(tmp), args.calibration, args.eval, args.latency_runs))
            print(render(rows, ""), flush=True)
        section = ""
        if args.fallback:
            fallback_rows = []
            for name in args.models.split(","):
                fallback_rows.append(bench_fallback(WORKLOADS[name], Path(tmp), args.calibration, FALLBACK_SEARCH,
                                                    FALLBACK_TEST, args.max_drop, FALLBACK_TRIALS, args.latency_runs))
                print(render_fallback(fallback_rows, args.max_drop, FALLBACK_TRIALS), flush=True)
            section += render_fallback(fallback_rows, args.max_drop, FALLBACK_TRIALS) + "\n"
        if args.calibration_model:
            small, large = (int(n) for n in args.calibration_counts.split(","))
            section += bench_calibration(WORKLOADS[args.calibration_model], Path(tmp), (small, large), args.rss_limit_mb)
        if args.big_model:
            folder = Path(tmp) / "big"
            folder.mkdir()
            section += "\n" + render_big(measure_big(folder))
    settings = (f"--models {args.models} --calibration {args.calibration} --eval {args.eval} "
                f"--calibration-model {args.calibration_model} --calibration-counts {args.calibration_counts}"
                f"{'' if args.big_model else ' --no-big-model'}{'' if args.fallback else ' --no-fallback'} "
                f"--max-drop {args.max_drop}")
    report = render(rows, settings) + "\n" + section
    corpus = corpus_section(args.output.read_text()) if args.output.exists() else None
    if corpus is not None:  # written by benchmarks.corpus, kept
        report = replace_section(report, corpus)
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
