"""The options of a conversion, declared once (``onnxq.options``) and shared by the Python API,
the checks below and the command line:

- ``QuantConfig``: what the model becomes (format, activations, granularity, calibration method,
  7-bit layers...); the options that change the model are recorded in the workspace manifest;
- ``RunOptions``: how the run goes (calibration device, memory budget, checkpoint interval, how
  the output file is laid out), none of which changes the quantized values;
- ``FallbackOptions``: mixed precision, by rules and by the accuracy-driven search.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onnxq.errors import ConfigError
from onnxq.options import check_choices, model_options, option

if TYPE_CHECKING:
    from onnxq.analysis.rules import Rule

METHODS = ("minmax", "percentile", "entropy", "mse")  # one calibration method (observer) for every tensor
TARGETS = ("cpu", "cuda", "tensorrt")
SENSITIVITY_MODES = ("only-float", "only-quantized")
ROUNDINGS = ("nearest", "gptq")
MIN_BATCHES_TO_SPLIT = 8  # fewer evaluation batches than this are not split in halves


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What the quantized model becomes; each field's help is its documentation. ``activations``
    defaults from the ``target`` (``tensorrt``: int8 symmetric, which TensorRT requires)."""

    activations: str | None = option(
        None, choices=("uint8", "int8"), changes_model=True,
        help="uint8 asymmetric (CPU) or int8 symmetric (TensorRT-style) activations (default: from --target).")
    target: str = option(
        "cpu", choices=TARGETS, help="Where the model will run; sets defaults (tensorrt: int8 symmetric activations).")
    format: str = option(
        "qdq", choices=("qdq", "qoperator"), changes_model=True,
        help="qdq (Quantize/DequantizeLinear pairs) or qoperator (QLinearConv, QGemm, ...).")
    force_format: bool = option(False, help="Write QOperator form even for a cuda or tensorrt target.")
    per_channel: bool = option(True, flag="--per-channel/--per-tensor", changes_model=True,
                               help="Weight scale granularity.")
    batch_size: int = option(1, changes_model=True, help="Samples per run of the model (models with a dynamic batch axis).")
    max_samples: int | None = option(None, changes_model=True, help="Use at most this many samples of the data.")
    hold_out: bool = option(
        True, flag="--hold-out/--no-hold-out", changes_model=True,
        help="Without --eval-data, hold back every 8th calibration batch (up to 32 samples) to measure the written "
        "model on; --no-hold-out calibrates on every sample and measures on calibration samples.")
    max_shared_range_ratio: float = option(
        16.0, cli=False, changes_model=True,
        help="A Concat whose inputs' ranges differ by more than this factor is kept float.")
    method: str = option(
        "auto", choices=("auto", *METHODS), changes_model=True,
        help="How activation ranges are chosen: auto = per tensor, among min/max, percentile and MSE-optimal clips, "
        "the one whose error in the layers reading it is least on calibration data; the others: one method for "
        "every tensor.")
    percentile: float = option(99.99, help="Percentile kept by --method percentile.")
    reduce_range: str = option(
        "auto", choices=("auto", "always", "never"), changes_model=True,
        help="7-bit weights: auto = only on layers this CPU's int8 kernels would saturate.")
    quantize_unfused: bool = option(
        False, changes_model=True, help="Also quantize nodes ONNX Runtime's CPU provider would not fuse.")
    equalize: bool = option(
        False, flag="--equalize/--no-equalize", changes_model=True,
        help="Cross-layer equalization: balance the per-channel weight ranges of Conv/Gemm/MatMul pairs joined by "
        "Relu, LeakyRelu, PRelu or nothing, exactly in float; helps --per-tensor weights, not per-channel ones "
        "(docs/int8-accuracy.md).")
    bias_correction: bool = option(
        True, flag="--bias-correction/--no-bias-correction", changes_model=True,
        help="Remove the mean shift int8 causes in each weighted layer's output, measured on the first "
        "calibration batches, through the layer's bias (docs/int8-accuracy.md).")
    smooth: bool = option(
        False, flag="--smooth/--no-smooth", changes_model=True,
        help="Outlier migration (SmoothQuant): divide MatMul/Gemm input channels by factors measured on the first "
        "calibration batches, absorbed exactly into the op that makes the input, and multiply the weights by them "
        "(per layer, only where it lowers the layer's measured output error).")
    rounding: str = option(
        "nearest", choices=ROUNDINGS, changes_model=True,
        help="How weights are rounded to int8: nearest, or gptq (each layer's rounding errors compensated through "
        "the Hessian of its input on the first calibration batches, GPTQ-style).")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.format == "qoperator" and self.target != "cpu" and not self.force_format:
            raise ConfigError(
                f"QOperator form for a {self.target} target would run on the CPU or not at all: ONNX "
                "Runtime's CUDA and TensorRT providers have no QLinear kernels; use --format qdq, or "
                "--force-format to write it anyway"
            )
        if self.activations is None:
            object.__setattr__(self, "activations", "int8" if self.target == "tensorrt" else "uint8")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max samples must be at least 1 (or unset for all), not {self.max_samples}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], not {self.percentile}")
        if not self.max_shared_range_ratio > 1:  # NaN too
            raise ConfigError(f"max shared range ratio must be above 1, not {self.max_shared_range_ratio}")

    @property
    def observer_method(self) -> str:
        """The calibration observers' method: ``auto`` calibrates min/max and chooses the ranges
        after calibration (``onnxq.tune.range_choice``)."""
        return "minmax" if self.method == "auto" else self.method

    def result_options(self) -> dict:
        """The options that determine the quantized model (not where or how fast it is made);
        the percentile only matters to ``--method percentile``."""
        options = model_options(self)
        if self.method == "percentile":
            options["percentile"] = self.percentile
        return options


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a conversion runs: none of these change the quantized values."""

    device: str = option(
        "auto", choices=("auto", "cpu", "cuda"),
        help="Where calibration runs: cuda only if ONNX Runtime's CUDA provider really loads (auto falls back "
        "to the CPU, and says why on a machine with an NVIDIA GPU).")
    memory_budget_mb: float = option(
        2048.0, flag="--memory-budget",
        help="MB of exposed tensors at once (two batches with histogram methods); more are calibrated in several passes.")
    checkpoint_interval_s: float = option(
        30.0, flag="--checkpoint-interval", help="Seconds between calibration checkpoints.")
    external_data: str = option(
        "auto", choices=("auto", "always", "never"),
        help="Weights in OUTPUT.data beside the output: auto = when the model had external data or is over 2 GB.")
    workers: int = option(
        1, help="Local worker processes for calibration and the fallback search (each gets cores / N ONNX Runtime "
        "threads); the result is the same for any N. 1: ONNX Runtime alone already uses every core.")
    latency: bool = option(
        True, flag="--latency/--no-latency",
        help="Time the written int8 model against the float model at batch 1 on this machine (about 2 s, runs "
        "interleaved in random order, 3 repeats) and, where int8 is slower, name the parts that make it slow.")
    ray: str | None = option(
        None, help="Run calibration and the fallback search as Ray tasks on the cluster at this address "
        "(auto: a local Ray); needs pip install 'onnxq[ray]'. The result is the same as with one worker.")

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 < self.memory_budget_mb < math.inf:
            raise ConfigError(f"--memory-budget must be a positive number of MB, not {self.memory_budget_mb}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be 1 or more, not {self.workers}")
        if self.ray is not None and self.workers != 1:
            raise ConfigError("--ray and --workers exclude each other: Ray runs one task per CPU of its cluster")
        if not 0 <= self.checkpoint_interval_s < math.inf:
            raise ConfigError(
                f"--checkpoint-interval must be a number of seconds, 0 or more, not {self.checkpoint_interval_s}"
            )


def _rules(rules: Any) -> tuple[Rule, ...]:
    """Rule strings parsed (``onnxq.analysis.rules`` needs ONNX: imported here, not for ``--help``)."""
    from onnxq.analysis.rules import Rule, parse_rule

    return tuple(rule if isinstance(rule, Rule) else parse_rule(rule) for rule in rules or ())


@dataclasses.dataclass(frozen=True)
class FallbackOptions:
    """Mixed-precision choices that do not change calibration. ``keep_float`` takes rule strings
    or parsed rules (``onnxq.analysis.rules``); ``metric`` also takes a callable
    ``metric(outputs, float_outputs, labels) -> float`` (higher is better)."""

    auto: bool = option(
        True, flag="--fallback/--no-fallback",
        help="Measure every conversion against the accuracy target (--min-sqnr, --min-agreement) on held-out "
        "calibration samples (or --eval-data) and, where it is missed, keep the most sensitive nodes float "
        "until it is met.")
    speed: bool = option(
        True, flag="--speed-fallback/--no-speed-fallback",
        help="With --latency and --target cpu: profile both models, and keep float the quantized "
        "nodes whose int8 kernels (with the Q/DQ they need) take longer than their float ones, when the model that "
        "results is faster (a sign test over paired timed runs) and as accurate; up to 3 rounds.")
    min_sqnr_db: float = option(
        23.0, flag="--min-sqnr", help="Accuracy target: SQNR in dB of every output, and every part of an output "
        "whose values differ in scale (box coordinates vs class scores), against the float model.")
    min_agreement: float = option(
        0.98, help="Accuracy target: share of arg-max decisions of softmax outputs that agree with the float model.")
    budget_s: float = option(
        300.0, flag="--fallback-budget",
        help="Seconds the fallback search (safety net or --max-drop) may take; then the best model found is "
        "written. 0: no limit.")
    keep_float: tuple = option(
        (), flag="--keep-float",
        help="Keep matching nodes float (repeatable): an op type, a name glob, first:OP, last:OP, "
        "pattern:attention-softmax|mask-add|residual-add|normalization, or a rules .json file.")
    max_drop: float | None = option(
        None, help="With --eval-data: keep the most sensitive nodes float until the metric is within this "
        "relative drop of float (0.01 = 1%).")
    metric: str | Callable = option(
        "auto", help="Metric for --max-drop: auto (top1 with labels, else sqnr), sqnr, cosine, top1, or file.py:func.")
    check_halves: bool = option(
        True, help=f"--max-drop must also hold on each half of the evaluation batches (with {MIN_BATCHES_TO_SPLIT} "
        "or more), so that a set that passes by a chance margin is not chosen.")
    dtype: str = option("fp32", choices=("fp32", "fp16"), flag="--fallback-dtype",
                        help="Precision of the nodes left float: fp32, or fp16 (GPU targets).")
    sensitivity: str = option(
        "only-float", choices=SENSITIVITY_MODES,
        help="Per-node sensitivity: the error removed with only that node float, or added with only it quantized.")
    sensitivity_samples: int = option(4, help="Evaluation samples per-node sensitivity is measured on.")
    max_trials: int = option(64, help="Most models evaluated by the --max-drop search.")
    save_rules: str | None = option(
        None, help="Write the final keep-float set as a rules file (reusable on re-exports).")

    def __post_init__(self) -> None:
        check_choices(self)
        object.__setattr__(self, "keep_float", _rules(self.keep_float))
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop is a relative drop between 0 and 1 (0.01 = 1%), not {self.max_drop}")
        if not (math.isfinite(self.min_sqnr_db) and 0 <= self.min_agreement < 1
                and math.isfinite(self.budget_s) and self.budget_s >= 0):
            raise ConfigError("--min-sqnr must be finite, --min-agreement in [0, 1), --fallback-budget >= 0 seconds")
        if self.sensitivity_samples < 1 or self.max_trials < 1:
            raise ConfigError("sensitivity samples and max trials must be at least 1")
