"""The ``onnxq`` command line: parses options, calls the Python API, renders progress and tables.

Exit codes: 0 success, 2 bad input or usage (one line saying what and how to fix), 1 a bug.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

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

from onnxq.analysis.rules import parse_rule
from onnxq.api import ConversionResult
from onnxq.tune.fallback import TuningProgress
from onnxq.api import convert as convert_model
from onnxq.api import recover as recover_model
from onnxq.calibration.images import ImageFolder, image_files
from onnxq.calibration.observers import METHODS
from onnxq.calibration.runner import ProgressCallback
from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.report.compare import Comparison
from onnxq.report.compare import compare as compare_models
from onnxq.report.inspect import Inspection, InspectionPair, inspect_model, inspect_pair
from onnxq.tune.fallback import FallbackOptions
from onnxq.tune.sensitivity import SENSITIVITY_MODES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="onnxq: ONNX float model in, int8 ONNX model out.",
)
console = Console(stderr=True)


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str enum for an option that takes one of ``values`` (typer lists them in --help)."""
    return enum.Enum(name, {value: value for value in values}, type=str)


Activations = _choices("Activations", ("uint8", "int8"))
Method = _choices("Method", METHODS)
Device = _choices("Device", ("auto", "cpu", "cuda"))
Format = _choices("Format", ("qdq", "qoperator"))
Target = _choices("Target", ("cpu", "cuda", "tensorrt"))
ReduceRange = _choices("ReduceRange", ("auto", "always", "never"))
ExternalData = _choices("ExternalData", ("auto", "always", "never"))
Resize = _choices("Resize", ("stretch", "letterbox", "crop"))
ChannelOrder = _choices("ChannelOrder", ("rgb", "bgr"))
Layout = _choices("Layout", ("auto", "nchw", "nhwc"))
FallbackDtype = _choices("FallbackDtype", ("fp32", "fp16"))
Sensitivity = _choices("Sensitivity", SENSITIVITY_MODES)


ModelArgument = Annotated[Path, typer.Argument(help="Float ONNX model.")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Where to write the int8 model.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ExternalDataOption = Annotated[ExternalData, typer.Option(
    help="Weights in OUTPUT.data beside the output: auto = when the model had external data or is over 2 GB.")]


@app.callback()
def main() -> None:
    """onnxq: ONNX float model in, int8 ONNX model out."""


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int | None) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on a terminal; nothing when quiet or not on a terminal."""
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(samples: int) -> None:
            progress.advance(task, samples)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} samples/s" if speed else "")

        yield advance


@contextlib.contextmanager
def _phases(enabled: bool) -> Iterator[TuningProgress | None]:
    """One rich progress bar per named phase (sensitivity, fallback search) on a terminal."""
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=max(total, done))

        yield update


def _summary(result: ConversionResult) -> Table:
    table = Table(title=f"onnxq: {result.output}")
    table.add_column("op type")
    table.add_column("int8", justify="right")
    table.add_column("float", justify="right")
    for op, count in result.op_counts.items():
        table.add_row(op, str(count.quantized), str(count.float))
    table.add_section()
    table.add_row("size", f"{result.quantized_bytes / 1e6:.2f} MB",
                  f"{result.float_bytes / 1e6:.2f} MB  ({result.size_ratio:.2f}x)")
    if result.fallback is not None:
        report = result.fallback
        table.add_row(f"{report.metric} (fallback)", f"{report.final_score:.4f}", f"{report.float_score:.4f}")
    fidelity = result.fidelity
    if fidelity is not None:
        if fidelity.float_top1 is not None:
            table.add_row("top-1 accuracy", f"{fidelity.quantized_top1:.2%}", f"{fidelity.float_top1:.2%}")
        for output in fidelity.outputs:
            table.add_row(f"{output.name} vs float", f"SQNR {output.sqnr_db:.1f} dB", f"cosine {output.cosine:.5f}")
    return table


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fail(exc: Exception) -> None:
    if isinstance(exc, OnnxqError):
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"internal error ({type(exc).__name__}): {exc}; please report this as a bug", err=True)
    raise typer.Exit(1)


def _report(result: ConversionResult, quiet: bool, as_json: bool) -> None:
    if as_json:
        payload = dataclasses.asdict(result) | {"size_ratio": result.size_ratio}
        sys.stdout.write(json.dumps(_json_safe(payload), indent=2) + "\n")
    if not quiet:
        if not as_json:
            Console().print(_summary(result))
        for note in result.notes:
            typer.echo(f"note: {note}", err=True)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise OnnxqError(f"{option} takes comma-separated numbers such as 0.485,0.456,0.406, not {text!r}") from None


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise OnnxqError(f"--image-size takes HEIGHTxWIDTH such as 224x224, not {text!r}") from None
    return height, width


@dataclasses.dataclass(frozen=True)
class _ImageOptions:
    size: str | None
    resize: Resize
    pixel_scale: float
    mean: str
    std: str
    channel_order: ChannelOrder
    layout: Layout

    def source(self, data: str | None):
        """An ``ImageFolder`` when ``data`` is a folder of images, else ``data`` as it is."""
        if data is None or not Path(data).is_dir() or not image_files(Path(data)):
            return data
        return ImageFolder(
            Path(data), size=_image_size(self.size), resize=self.resize.value, scale=self.pixel_scale,
            mean=_floats(self.mean, "--mean"), std=_floats(self.std, "--std"),
            channel_order=self.channel_order.value, layout=self.layout.value,
        )


@app.command()
def convert(
    model: ModelArgument,
    output: OutputOption,
    calibration_data: Annotated[Optional[str], typer.Option(
        "--calibration-data",
        help="An .npz file, a folder of .npz files, or a loader file.py:func / pkg.mod:func. "
        "Required unless --resume finds finished calibration.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        "--eval-data", help="Data to measure float vs int8 fidelity on (top-1 when it has a 'label' array).")] = None,
    format: Annotated[Format, typer.Option(
        "--format", help="qdq (Quantize/DequantizeLinear pairs) or qoperator (QLinearConv, QGemm, ...).")] = Format.qdq,
    target: Annotated[Target, typer.Option(
        help="Where the model will run; sets defaults (tensorrt: int8 symmetric activations).")] = Target.cpu,
    force_format: Annotated[bool, typer.Option(
        "--force-format", help="Write QOperator form even for a cuda or tensorrt target.")] = False,
    activations: Annotated[Optional[Activations], typer.Option(
        help="uint8 asymmetric (CPU) or int8 symmetric (TensorRT-style) activations [default: from --target].",
        show_default=False)] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scale granularity.")] = True,
    quantize_unfused: Annotated[bool, typer.Option(
        "--quantize-unfused", help="Also quantize nodes ONNX Runtime's CPU provider would not fuse.")] = False,
    reduce_range: Annotated[ReduceRange, typer.Option(
        help="7-bit weights: auto = only on layers this CPU's int8 kernels would saturate.")] = ReduceRange.auto,
    method: Annotated[Method, typer.Option(help="How activation ranges are chosen.")] = Method.minmax,
    percentile: Annotated[float, typer.Option(help="Percentile kept by --method percentile.")] = 99.99,
    device: Annotated[Device, typer.Option(help="Where calibration runs (cuda only if ORT's CUDA provider loads).")] = Device.auto,
    batch_size: Annotated[int, typer.Option(help="Samples per calibration run (dynamic-batch models).")] = 1,
    max_samples: Annotated[Optional[int], typer.Option(help="Use at most this many calibration samples.")] = None,
    memory_budget: Annotated[float, typer.Option(
        help="MB of exposed tensors per calibration batch; more are calibrated in several passes.")] = 2048.0,
    workspace: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: OUTPUT.onnxq).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run recorded in the workspace.")] = False,
    checkpoint_interval: Annotated[float, typer.Option(help="Seconds between calibration checkpoints.")] = 30.0,
    external_data: ExternalDataOption = ExternalData.auto,
    image_size: Annotated[Optional[str], typer.Option(
        help="Image folders: HEIGHTxWIDTH (default: the model input's fixed size).")] = None,
    resize: Annotated[Resize, typer.Option(help="Image folders: how images reach that size.")] = Resize.stretch,
    pixel_scale: Annotated[float, typer.Option(help="Image folders: pixels (0-255) are multiplied by this.")] = 1 / 255,
    mean: Annotated[str, typer.Option(help="Image folders: per-channel mean subtracted after scaling.")] = "0",
    std: Annotated[str, typer.Option(help="Image folders: per-channel std divided by after the mean.")] = "1",
    channel_order: Annotated[ChannelOrder, typer.Option(help="Image folders: channel order.")] = ChannelOrder.rgb,
    layout: Annotated[Layout, typer.Option(help="Image folders: tensor layout (auto: from the model input).")] = Layout.auto,
    keep_float: Annotated[Optional[list[str]], typer.Option(
        "--keep-float", help="Keep matching nodes float (repeatable): an op type, a name glob, first:OP, last:OP, "
        "pattern:attention-softmax|mask-add|residual-add|normalization, or a rules .json file.")] = None,
    max_drop: Annotated[Optional[float], typer.Option(
        "--max-drop", help="With --eval-data: keep the most sensitive nodes float until the metric is within "
        "this relative drop of float (0.01 = 1%).")] = None,
    metric: Annotated[str, typer.Option(
        help="Metric for --max-drop: auto (top1 with labels, else sqnr), sqnr, cosine, top1, or file.py:func.")] = "auto",
    check_halves: Annotated[bool, typer.Option(
        help="--max-drop must also hold on each half of the evaluation batches (with 8 or more).")] = True,
    fallback_dtype: Annotated[FallbackDtype, typer.Option(
        help="Precision of the nodes left float: fp32, or fp16 (GPU targets).")] = FallbackDtype.fp32,
    save_rules: Annotated[Optional[Path], typer.Option(
        "--save-rules", help="Write the final keep-float set as a rules file (reusable on re-exports).")] = None,
    max_trials: Annotated[int, typer.Option(help="Most models evaluated by the --max-drop search.")] = 64,
    sensitivity: Annotated[Sensitivity, typer.Option(
        help="Per-node sensitivity: the error removed with only that node float, or added with only it quantized.")]
        = Sensitivity["only-float"],
    sensitivity_samples: Annotated[int, typer.Option(
        help="Evaluation samples per-node sensitivity is measured on.")] = 4,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Quantize MODEL to int8, calibrated on --calibration-data (an already quantized MODEL needs none)."""
    images = _ImageOptions(image_size, resize, pixel_scale, mean, std, channel_order, layout)
    try:
        calibration_data, eval_data = images.source(calibration_data), images.source(eval_data)
        config = QuantConfig(
            activations=None if activations is None else activations.value, target=target.value,
            format=format.value, force_format=force_format, per_channel=per_channel, reduce_range=reduce_range.value,
            quantize_unfused=quantize_unfused, batch_size=batch_size, max_samples=max_samples,
            method=method.value, percentile=percentile, device=device.value, memory_budget_mb=memory_budget,
            checkpoint_interval_s=checkpoint_interval, external_data=external_data.value,
        )
        fallback = FallbackOptions(
            keep_float=tuple(parse_rule(rule) for rule in keep_float or ()), max_drop=max_drop, metric=metric,
            check_halves=check_halves, dtype=fallback_dtype.value, sensitivity=sensitivity.value,
            sensitivity_samples=sensitivity_samples, max_trials=max_trials,
            save_rules=None if save_rules is None else str(save_rules),
        )
        with _progress(not quiet, "calibrating", max_samples) as progress, _phases(not quiet) as phases:
            result = convert_model(
                model, output, calibration_data, config, eval_data=eval_data, fallback=fallback,
                workspace=workspace, resume=resume, progress=progress, tuning_progress=phases,
            )
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        _fail(exc)
    _report(result, quiet, as_json)


@app.command()
def recover(
    model: ModelArgument,
    workspace: Annotated[Path, typer.Argument(help="Workspace of an earlier (possibly killed) run.")],
    output: OutputOption,
    index: Annotated[Optional[int], typer.Option(
        help="Step to rebuild: a calibration, fallback trial or quantized step (default: the last model written).")] = None,
    external_data: ExternalDataOption = ExternalData.auto,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Rebuild the int8 model of a recorded workspace step, without calibrating."""
    try:
        result = recover_model(model, workspace, output, index, external_data.value)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        _fail(exc)
    _report(result, quiet, as_json)


def _inspection_tables(report: Inspection) -> list[Table]:
    ops = Table(title="nodes by precision")
    for column in ("op type", "int8", "float"):
        ops.add_column(column, justify="left" if column == "op type" else "right")
    for op, counts in report.op_counts().items():
        ops.add_row(op, str(counts["int8"]), str(counts["float"]))
    ops.add_section()
    ops.add_row("QuantizeLinear / DequantizeLinear", str(report.quantize_nodes), str(report.dequantize_nodes))
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
        for column in ("weight", "dtype", "zeros", "2:4"):
            sparsity.add_column(column)
        for weight in sorted(sparse, key=lambda w: -w.zero_fraction)[:20]:
            sparsity.add_row(weight.name, weight.dtype, f"{weight.zero_fraction:.1%}", "yes" if weight.two_four_sparse else "")
        tables.append(sparsity)
    return tables


def _inspection_payload(report: Inspection) -> dict:
    return dataclasses.asdict(report) | {"op_counts": report.op_counts(), "weight_zero_fraction": report.weight_zero_fraction}


def _pair_tables(pair: InspectionPair) -> list[Table]:
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
    sparsity.add_row("2:4 sparse weights", *(f"{sum(w.two_four_sparse for w in r.weights)} of {len(r.weights)}"
                                             for r in (before, after)))
    return [sizes, sparsity, _inspection_tables(after)[0]]


@app.command()
def inspect(
    model: ModelArgument,
    quantized: Annotated[Optional[Path], typer.Argument(
        help="The quantized form of MODEL: print both, sizes by precision and sparsity before and after.",
        show_default=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Per-node precision, sizes by dtype, weight sparsity and unfused quantized groups of MODEL;
    with QUANTIZED, MODEL and QUANTIZED side by side."""
    try:
        report = inspect_model(model) if quantized is None else inspect_pair(model, quantized)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        _fail(exc)
    if isinstance(report, InspectionPair):
        if as_json:
            payload = {
                "before": _inspection_payload(report.before), "after": _inspection_payload(report.after),
                "bytes_by_dtype": {d: {"before": b, "after": a} for d, (b, a) in report.bytes_by_dtype().items()},
            }
            sys.stdout.write(json.dumps(_json_safe(payload), indent=2) + "\n")
            return
        tables, unfused = _pair_tables(report), report.after.unfused
    else:
        if as_json:
            sys.stdout.write(json.dumps(_json_safe(_inspection_payload(report)), indent=2) + "\n")
            return
        tables, unfused = _inspection_tables(report), report.unfused
    out = Console()
    for table in tables:
        out.print(table)
    if unfused:
        out.print(f"{len(unfused)} quantized node(s) ONNX Runtime's CPU provider would not fuse "
                  f"(they run dequantize -> float -> quantize): {', '.join(unfused[:10])}")


def _comparison_tables(result: Comparison, rows: int) -> list[Table]:
    outputs = Table(title=f"outputs, {result.fidelity.samples} samples")
    for column in ("output", "SQNR dB", "cosine", "max abs error"):
        outputs.add_column(column, justify="left" if column == "output" else "right")
    for output in result.fidelity.outputs:
        outputs.add_row(output.name, f"{output.sqnr_db:.2f}", f"{output.cosine:.5f}", f"{output.max_abs_error:.4g}")
    tables = [outputs]
    if result.fidelity.float_top1 is not None:
        top1 = Table(title="top-1 accuracy")
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


@app.command()
def compare(
    float_model: Annotated[Path, typer.Argument(help="The float ONNX model.")],
    quantized_model: Annotated[Path, typer.Argument(help="Its quantized version (QDQ for the per-layer table).")],
    data: Annotated[str, typer.Option("--data", help="Inputs to run: .npz, folder, or loader file.py:func.")],
    batch_size: Annotated[int, typer.Option(help="Samples per run (dynamic-batch models).")] = 1,
    max_samples: Annotated[Optional[int], typer.Option(help="Use at most this many samples.")] = None,
    rows: Annotated[int, typer.Option(help="Rows of the per-layer table to print.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Per-output SQNR, cosine, max error (and top-1) of QUANTIZED_MODEL vs FLOAT_MODEL, and each
    quantized tensor's SQNR vs float, matched by topology, worst first."""
    try:
        result = compare_models(float_model, quantized_model, data, batch_size, max_samples)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(_json_safe(dataclasses.asdict(result)), indent=2) + "\n")
        return
    out = Console()
    for table in _comparison_tables(result, rows):
        out.print(table)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
