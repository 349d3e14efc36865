"""The ``onnxq`` commands: each parses its options (declared once, ``onnxq.cli.options``), calls
the Python API and renders the result (``onnxq.cli.render``). The API is imported by the command
that runs (it brings ONNX, ONNX Runtime and their dependencies), so that ``--help`` and usage
errors answer at once.

Exit codes: 0 success, 2 bad input or usage (one line saying what and how to fix), 1 a bug.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from onnxq.calibration.images import ImageFolder, is_image_folder
from onnxq.cli import render
from onnxq.cli.options import (
    JsonOption,
    ModelArgument,
    OptionGroup,
    OutputOption,
    QuietOption,
    fail,
    with_options,
)
from onnxq.config import FallbackOptions, QuantConfig, RunOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="onnxq: ONNX float model in, int8 ONNX model out.",
)

QUANTIZATION = OptionGroup(QuantConfig, "Quantization")
RUN = OptionGroup(RunOptions, "Run")
FALLBACK = OptionGroup(FallbackOptions, "Mixed precision")
IMAGES = OptionGroup(ImageFolder, "Image folders")
SAMPLING = OptionGroup(QuantConfig, "Data", only=("batch_size", "max_samples"))


def _data(path: str | None, images: dict[str, Any]) -> str | ImageFolder | None:
    """An ``ImageFolder`` with the image options when ``path`` is a folder of images, else ``path``."""
    if path is None or not is_image_folder(Path(path)):
        return path
    return ImageFolder(Path(path), **images)


@app.callback()
def main() -> None:
    """onnxq: ONNX float model in, int8 ONNX model out."""


@app.command()
@with_options(config=QUANTIZATION, run=RUN, fallback=FALLBACK, images=IMAGES)
def convert(
    model: ModelArgument,
    output: OutputOption,
    config: dict,
    run: dict,
    fallback: dict,
    images: dict,
    calibration_data: Annotated[Optional[str], typer.Option(
        "--calibration-data",
        help="An .npz file, a folder of .npz files or images, or a loader file.py:func / pkg.mod:func. "
        "Required unless --resume finds finished calibration.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        "--eval-data", help="Data to measure float vs int8 fidelity on (top-1 when it has a 'label' array).")] = None,
    workspace: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: OUTPUT.onnxq).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run recorded in the workspace.")] = False,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Quantize MODEL to int8, calibrated on --calibration-data (an already quantized MODEL needs none)."""
    from onnxq.api import convert as convert_model

    try:
        options = QuantConfig(**config)
        with render.sample_progress(not quiet, "calibrating", options.max_samples) as progress, \
                render.phase_progress(not quiet) as phases:
            result = convert_model(
                model, output, _data(calibration_data, images), options, run=RunOptions(**run),
                eval_data=_data(eval_data, images), fallback=FallbackOptions(**fallback), workspace=workspace,
                resume=resume, progress=progress, tuning_progress=phases,
            )
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        fail(exc)
    render.report_conversion(result, quiet, as_json)


@app.command()
@with_options(run=OptionGroup(RunOptions, "Run", only=("external_data",)))
def recover(
    model: ModelArgument,
    workspace: Annotated[Path, typer.Argument(help="Workspace of an earlier (possibly killed) run.")],
    output: OutputOption,
    run: dict,
    index: Annotated[Optional[int], typer.Option(
        help="Step to rebuild: a calibration, fallback trial or quantized step (default: the last model written).")] = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Rebuild the int8 model of a recorded workspace step, without calibrating."""
    from onnxq.api import recover as recover_model

    try:
        result = recover_model(model, workspace, output, index, RunOptions(**run))
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        fail(exc)
    render.report_conversion(result, quiet, as_json)


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
    from onnxq.report.inspect import InspectionPair, inspect_model, inspect_pair

    try:
        report = inspect_model(model) if quantized is None else inspect_pair(model, quantized)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        fail(exc)
    if isinstance(report, InspectionPair):
        if as_json:
            render.print_json({
                "before": render.inspection_payload(report.before), "after": render.inspection_payload(report.after),
                "bytes_by_dtype": {d: {"before": b, "after": a} for d, (b, a) in report.bytes_by_dtype().items()},
            })
            return
        tables, unfused = render.pair_tables(report), report.after.unfused
    else:
        if as_json:
            render.print_json(render.inspection_payload(report))
            return
        tables, unfused = render.inspection_tables(report), report.unfused
    out = Console()
    for table in tables:
        out.print(table)
    if unfused:
        out.print(f"{len(unfused)} quantized node(s) ONNX Runtime's CPU provider would not fuse "
                  f"(they run dequantize -> float -> quantize): {', '.join(unfused[:10])}")


@app.command()
@with_options(sampling=SAMPLING, images=IMAGES)
def compare(
    float_model: Annotated[Path, typer.Argument(help="The float ONNX model.")],
    quantized_model: Annotated[Path, typer.Argument(help="Its quantized version (QDQ for the per-layer table).")],
    data: Annotated[str, typer.Option(
        "--data", help="Inputs to run: .npz, a folder of .npz files or images, or a loader file.py:func.")],
    sampling: dict,
    images: dict,
    rows: Annotated[int, typer.Option(help="Rows of the per-layer table to print.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Per-output SQNR, cosine, max error (and top-1) of QUANTIZED_MODEL vs FLOAT_MODEL, and each
    quantized tensor's SQNR vs float, matched by topology, worst first."""
    from onnxq.report.compare import compare as compare_models

    try:
        options = QuantConfig(**sampling)
        result = compare_models(float_model, quantized_model, _data(data, images), options.batch_size,
                                options.max_samples)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes 2 / 1
        fail(exc)
    if as_json:
        render.print_json(dataclasses.asdict(result))
        return
    out = Console()
    for table in render.comparison_tables(result, rows):
        out.print(table)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
