"""What the commands print: progress bars on a terminal, summary tables, JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

if TYPE_CHECKING:  # annotations only: ``onnxq --help`` does not import the pipeline
    from onnxq.api import ConversionResult
    from onnxq.calibration.runner import ProgressCallback
    from onnxq.report.compare import Comparison
    from onnxq.report.inspect import Inspection, InspectionPair
    from onnxq.tune.fallback import TuningProgress

console = Console(stderr=True)


PROGRESS_LINE_INTERVAL_S = 30.0  # without a terminal (CI logs): a progress line at most this often


class _ProgressLines:
    """Progress as a plain line on stderr at most every ``PROGRESS_LINE_INTERVAL_S`` seconds, for
    runs whose stderr is not a terminal (a log), where a bar would not show."""

    def __init__(self) -> None:
        self._start = self._last = time.monotonic()

    def report(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_LINE_INTERVAL_S:
            self._last = now
            print(f"onnxq: {text}, {now - self._start:.0f} s", file=sys.stderr, flush=True)


def _sample_lines(description: str, total: int | None) -> ProgressCallback:
    lines, done = _ProgressLines(), 0

    def advance(samples: int) -> None:
        nonlocal done
        done += samples
        lines.report(f"{description} {done}{'' if total is None else f'/{total}'} samples")

    return advance


def _phase_lines() -> TuningProgress:
    lines = _ProgressLines()
    return lambda phase, done, total: lines.report(f"{phase} {done}/{max(total, done)}")


@contextlib.contextmanager
def sample_progress(enabled: bool, description: str, total: int | None) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on a terminal; a line now and then without one (a log); nothing when quiet."""
    if not enabled or not console.is_terminal:
        yield _sample_lines(description, total) if enabled else None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(samples: int) -> None:
            bar.advance(task, samples)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f} samples/s" if speed else "")

        yield advance


@contextlib.contextmanager
def phase_progress(enabled: bool) -> Iterator[TuningProgress | None]:
    """One rich progress bar per named phase (sensitivity, fallback search) on a terminal; a line
    now and then without one; nothing when quiet."""
    if not enabled or not console.is_terminal:
        yield _phase_lines() if enabled else None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done, total=max(total, done))

        yield update


def summary(result: ConversionResult) -> Table:
    table = Table(title=f"onnxq: {result.output}")
    table.add_column("op type")
    table.add_column("int8", justify="right")
    table.add_column("float", justify="right")
    for op, count in result.op_counts.items():
        table.add_row(op, str(count.quantized), str(count.float))
    table.add_section()
    table.add_row("size", f"{result.quantized_bytes / 1e6:.2f} MB",
                  f"{result.float_bytes / 1e6:.2f} MB  ({result.size_ratio:.2f}x)")
    from onnxq.tune.target import METRIC_NAME  # deferred, as every pipeline import here

    if result.fallback is not None and not result.fallback.metric.startswith(METRIC_NAME):
        report = result.fallback
        table.add_row(f"{report.metric} (fallback)", f"{report.final_score:.4f}", f"{report.float_score:.4f}")
    fidelity = result.fidelity
    if fidelity is not None:
        if fidelity.float_top1 is not None:
            table.add_row(f"top-1 accuracy ({fidelity.top1_output})", f"{fidelity.quantized_top1:.2%}",
                          f"{fidelity.float_top1:.2%}")
        for output in fidelity.outputs:
            table.add_row(f"{output.name} vs float", f"SQNR {output.sqnr_db:.1f} dB", f"cosine {output.cosine:.5f}")
            for part in output.parts:
                table.add_row(f"  part {part.label}", f"SQNR {part.sqnr_db:.1f} dB", f"cosine {part.cosine:.5f}")
            if output.agreement is not None:
                table.add_row("  arg-max agreement", f"{output.agreement:.2%}", f"of {output.decisions}")
    if result.accuracy is not None:
        table.add_section()
        table.add_row("accuracy target", "met" if result.accuracy.met else "[bold red]NOT MET[/]",
                      f"on {result.accuracy.measured_on}")
    latency = result.latency
    if latency is not None:
        table.add_section()
        ratio = f"{latency.ratio:.2f}x ({latency.spread[0]:.2f}-{latency.spread[1]:.2f}x)"
        table.add_row("batch-1 latency", f"{latency.int8_ms:.3f} ms", f"{latency.float_ms:.3f} ms  "
                      + (f"[bold red]{ratio} SLOWER[/]" if latency.slower else ratio))
    return table


def accuracy_lines(result: ConversionResult) -> list[str]:
    """The lines on stderr about the accuracy target: loud when it is missed."""
    check = result.accuracy
    if check is None or check.met:
        return []
    return [f"warning: the model misses the accuracy target ({check.target}), measured on "
            f"{check.measured_on}: {'; '.join(check.misses[:4])}" + (f" and {len(check.misses) - 4} more"
                                                                     if len(check.misses) > 4 else "")]


def json_safe(value):
    """``value`` with what JSON cannot hold made printable: non-finite floats, paths."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def report_conversion(result: ConversionResult, quiet: bool, as_json: bool) -> None:
    """The result of ``convert`` or ``recover``: JSON on stdout, or the table, then notes on stderr."""
    if as_json:
        payload = dataclasses.asdict(result) | {"size_ratio": result.size_ratio, "target_met": result.target_met}
        print_json(payload)
    if not quiet:
        if not as_json:
            Console().print(summary(result))
        for note in result.notes:
            typer.echo(f"note: {note}", err=True)
    from onnxq.report.latency import latency_lines  # deferred, as every pipeline import here

    for line in accuracy_lines(result) + latency_lines(result.latency):  # said even with --quiet
        typer.echo(line, err=True)


def inspection_tables(report: Inspection) -> list[Table]:
    ops = Table(title="nodes by precision")
    for column in ("op type", "int8", "float"):
        ops.add_column(column, justify="left" if column == "op type" else "right")
    for op, counts in report.op_counts().items():
        ops.add_row(op, str(counts["int8"]), str(counts["float"]))
    ops.add_section()
    ops.add_row(f"QuantizeLinear nodes: {report.quantize_nodes}, DequantizeLinear nodes: {report.dequantize_nodes}", "", "")
    sizes = Table(title="initializer bytes by dtype")
    sizes.add_column("dtype")
    sizes.add_column("MB", justify="right")
    sizes.add_column("share", justify="right")
    total = sum(report.bytes_by_dtype.values()) or 1
    for dtype, size in report.bytes_by_dtype.items():
        sizes.add_row(dtype, f"{size / 1e6:.3f}", f"{size / total:.1%}")
    tables = [ops, sizes]
    sparse = [w for w in report.weights if w.zero_fraction > 0]
    if sparse:
        sparsity = Table(title="weights with exact zeros")
        for column in ("weight", "dtype", "zeros", "2:4", "along axis"):
            sparsity.add_column(column)
        for weight in sorted(sparse, key=lambda w: -w.zero_fraction)[:20]:
            sparsity.add_row(weight.name, weight.dtype, f"{weight.zero_fraction:.1%}", "yes" if weight.two_four_sparse else "",
                             ", ".join(map(str, weight.two_four_axes)))
        tables.append(sparsity)
    return tables


def inspection_payload(report: Inspection) -> dict:
    return dataclasses.asdict(report) | {"op_counts": report.op_counts(), "weight_zero_fraction": report.weight_zero_fraction}


def pair_tables(pair: InspectionPair) -> list[Table]:
    before, after = pair.before, pair.after
    sizes = Table(title="initializer bytes by precision, before and after")
    for column in ("dtype", "float model MB", "quantized model MB"):
        sizes.add_column(column, justify="left" if column == "dtype" else "right")
    for dtype, (old, new) in pair.bytes_by_dtype().items():
        sizes.add_row(dtype, f"{old / 1e6:.3f}", f"{new / 1e6:.3f}")
    sizes.add_section()
    sizes.add_row("all initializers", f"{sum(before.bytes_by_dtype.values()) / 1e6:.3f}",
                  f"{sum(after.bytes_by_dtype.values()) / 1e6:.3f}")
    sizes.add_row("file", f"{before.model_bytes / 1e6:.3f}",
                  f"{after.model_bytes / 1e6:.3f} ({after.model_bytes / max(before.model_bytes, 1):.2f}x)")
    sparsity = Table(title="weight sparsity, before and after")
    for column in ("", "float model", "quantized model"):
        sparsity.add_column(column, justify="left" if not column else "right")
    sparsity.add_row("exact zeros", f"{before.weight_zero_fraction:.2%}", f"{after.weight_zero_fraction:.2%}")
    sparsity.add_row("2:4 sparse, of initializers with 2+ dims",
                     *(f"{sum(w.two_four_sparse for w in r.weights)} of {len(r.weights)}" for r in (before, after)))
    return [sizes, sparsity, inspection_tables(after)[0]]


def comparison_tables(result: Comparison, rows: int) -> list[Table]:
    outputs = Table(title=f"outputs, {result.fidelity.samples} samples")
    for column in ("output", "SQNR dB", "cosine", "max abs error"):
        outputs.add_column(column, justify="left" if column == "output" else "right")
    for output in result.fidelity.outputs:
        outputs.add_row(output.name, f"{output.sqnr_db:.2f}", f"{output.cosine:.5f}", f"{output.max_abs_error:.4g}")
    tables = [outputs]
    if result.fidelity.float_top1 is not None:
        top1 = Table(title=f"top-1 accuracy of {result.fidelity.top1_output}")
        top1.add_column("float", justify="right")
        top1.add_column("int8", justify="right")
        top1.add_row(f"{result.fidelity.float_top1:.2%}", f"{result.fidelity.quantized_top1:.2%}")
        tables.append(top1)
    if result.layers:
        layers = Table(title=f"quantized tensors vs float, worst first ({min(rows, len(result.layers))} of {len(result.layers)})")
        for column in ("tensor", "producer", "SQNR dB", "cosine", "max abs error"):
            layers.add_column(column, justify="left" if column in ("tensor", "producer") else "right")
        for layer in result.layers[:rows]:
            layers.add_row(layer.tensor, layer.op, f"{layer.sqnr_db:.2f}", f"{layer.cosine:.5f}", f"{layer.max_abs_error:.4g}")
        tables.append(layers)
    return tables


def print_json(payload: object) -> None:
    """``payload`` as indented JSON on stdout (non-finite floats as strings)."""
    sys.stdout.write(json.dumps(json_safe(payload), indent=2) + "\n")
