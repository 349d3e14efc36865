"""Ablation of the int8 accuracy techniques (issue 17) on the real-model corpus.

``python -m benchmarks.ablation [--models yolov8n,ppocr_det,...] [--calibration 32] [--eval 32]
[--latency-runs 20] [--json PATH] [--results PATH]``

Every model of the corpus (``benchmarks.corpus_models``) is converted by ``onnxq convert`` in a
fresh process once per variant, on the same calibration data, and scored on the same held-out
inputs (``benchmarks.corpus.bench_model``):
1. ``none``: every technique of ``TECHNIQUES`` off, no float fallback (``--no-fallback``);
2. one row per technique: ``none`` with only that technique on;
3. ``all``: every technique on, no float fallback: what the int8 graph itself reaches;
4. ``defaults``: no option at all, the safety net included: what a user gets.
Columns: task metric against float, SQNR over the float outputs, share of
Conv/ConvTranspose/Gemm/MatMul in int8, batch-1 latency as a ratio to float (runs interleaved),
conversion wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.corpus import _fmt as fmt
from benchmarks.corpus import latency_cell, replace_section, run_models
from benchmarks.corpus_models import CORPUS

SECTION = "## Ablation: int8 accuracy techniques"
MODELS = ("yolov8n", "ppocr_det", "ppocr_rec", "orientation", "minilm")
# technique -> (options that turn it on, options that turn it off)
TECHNIQUES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "range choice": (("--method", "auto"), ("--method", "minmax")),
    "equalization": (("--equalize",), ("--no-equalize",)),
    "bias correction": (("--bias-correction",), ("--no-bias-correction",)),
    "outlier migration": (("--smooth",), ("--no-smooth",)),
    "learned rounding": (("--rounding", "gptq"), ("--rounding", "nearest")),
}
NO_FALLBACK = ("--no-fallback",)


def variants() -> dict[str, list[str]]:
    """Row name -> options of ``onnxq convert`` (rules 1-4 of the module docstring)."""
    off = [option for _, (_, disable) in TECHNIQUES.items() for option in disable]
    rows = {"none": [*NO_FALLBACK, *off]}
    for name, (enable, _) in TECHNIQUES.items():
        rows[name] = [*NO_FALLBACK, *(option for other, (_, disable) in TECHNIQUES.items() if other != name
                                      for option in disable), *enable]
    rows["all"] = [*NO_FALLBACK, *(option for enable, _ in TECHNIQUES.values() for option in enable)]
    rows["defaults"] = []
    return rows


def render(rows: list[dict], facts: dict) -> str:
    """The ablation section of RESULTS.md."""
    techniques = ", ".join(f"{name} (`{' '.join(enable)}`)" for name, (enable, _) in TECHNIQUES.items())
    lines = [
        SECTION,
        "",
        f"Produced by `python -m benchmarks.ablation {facts['settings']}` on {facts['date']}, {facts['machine']}, "
        f"onnxruntime {facts['onnxruntime']}, CPU execution provider; onnxq from `{facts['onnxq']}`"
        + (f"; {facts['minutes']:.0f} minutes." if "minutes" in facts else "."),
        f"Techniques: {techniques}. `none`: all off and `--no-fallback`; a technique's row: only it on, "
        "`--no-fallback`; `all`: all on, `--no-fallback`; `defaults`: no option (the safety net may keep nodes float).",
        "Task metric and SQNR on held-out inputs against the float model; int8 compute: share of",
        "Conv/ConvTranspose/Gemm/MatMul nodes in int8; x float: batch-1 median latency over float's, runs interleaved in",
        "random order (the lowest-highest ratio of three repeats in brackets).",
        "",
        "| model | variant | task metric | SQNR dB | int8 compute | x float | convert s | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if row["tool"] == "float":
            continue
        compute = row.get("int8_compute")
        share = "-" if not compute else f"{compute[0]}/{compute[1]}" + (
            f" ({compute[0] / compute[1]:.0%})" if compute[1] else "")
        note = row["message"] if row["status"] == "ok" else f"{row['status']}: {row['message']}"
        lines.append(
            f"| {row['model']} | {row['tool']} | {fmt(row.get('task_metric'), '.3f')} | {fmt(row.get('sqnr_db'), '.1f')} "
            f"| {share} | {latency_cell(row)} | {fmt(row.get('seconds'), '.1f')} | "
            f"{note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated corpus models")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples per model")
    parser.add_argument("--latency-runs", type=int, default=20, help="interleaved batch-1 runs per model")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("ablation-results.json"),
                        help="where to write all figures")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the table into this RESULTS.md's ablation section")
    args = parser.parse_args()
    names = args.models.split(",")
    for name in names:
        if name not in CORPUS:
            parser.error(f"unknown model {name!r}; known: {', '.join(CORPUS)}")
    settings = f"--models {args.models} --calibration {args.calibration} --eval {args.eval} " \
               f"--latency-runs {args.latency_runs}"
    section = run_models(names, args, ["onnxq"], variants(), settings, render)
    if args.results is not None:
        document = args.results.read_text() if args.results.exists() else ""
        args.results.write_text(replace_section(document, section, SECTION))


if __name__ == "__main__":
    main()
