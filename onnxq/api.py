"""The Python API: ``convert`` and ``recover``. They orchestrate the stages and nothing else:

``load`` -> ``analysis`` (clean-up, signatures, keep-float rules) -> ``calibration`` ->
``tune.layers`` (saturation, fusion, sentinels) -> ``tune.fallback`` (with ``max_drop``) ->
``rewrite.build`` -> ``save`` -> ``report.evaluate``, each result recorded in the workspace.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from onnxq.analysis.rules import resolve_rules, save_rules
from onnxq.calibration.data import KEPT_BATCHES, Batch, BatchSource, DataSource, model_inputs, source_path
from onnxq.calibration.holdout import HOLD_OUT_SAMPLES, HeldOutSplit, first_samples
from onnxq.calibration.layer_inputs import layer_input_batches
from onnxq.calibration.runner import ProgressCallback, calibrate_model
from onnxq.calibration.state import CalibrationState
from onnxq.config import FallbackOptions, QuantConfig, RunOptions
from onnxq.distribute import Executor, executor_for
from onnxq.errors import CalibrationDataError, ConfigError, OnnxqError, WorkspaceError
from onnxq.files import (
    check_writable,
    external_data_path,
    refuse_overwriting_inputs,
    remove_stale_temporaries,
)
from onnxq.load.prepare import LoadedModel, ModelInput, load
from onnxq.report.evaluate import Fidelity, FloatRuns, compare_models, compare_runs, run_checked
from onnxq.report.inspect import inspect_model
from onnxq.report.latency import Latency, batch_one, conversion_latency, latency_providers
from onnxq.rewrite.build import BuiltModel, OpCount, build_model
from onnxq.rewrite.qoperator import NormalizeQdqPass, QOperatorPass, has_quantize_nodes
from onnxq.runtime import CPU, create_session, session_of
from onnxq.save.output import ModelSource, write_output
from onnxq.transform import TransformData, float_exact_passes, transform_steps
from onnxq.tune.fallback import (
    FallbackReport,
    TuningProgress,
    fallback_notes,
    tune_fallback,
)
from onnxq.tune.layers import measure_layers
from onnxq.tune.speed import SLOWER_REASON, SpeedChoice, SpeedRound, leave_slow_float, speed_notes, too_fast_note
from onnxq.tune.target import AccuracyCheck, AccuracyTarget
from onnxq.workspace.manifest import (
    build_manifest,
    check_tied_ranges,
    data_fingerprint,
    default_workspace,
)
from onnxq.workspace.steps import CalibrationStep, LayersStep, QuantizedStep, SmoothingStep, SpeedStep, TrialStep
from onnxq.workspace.store import Step, Workspace, locked

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` or ``recover`` produced: the output, sizes, per-op counts, notes,
    calibration samples, the workspace and its step the model was built from, fidelity, the
    fallback search's report and the accuracy check (``onnxq.tune.target``)."""

    output: Path
    float_bytes: int
    quantized_bytes: int
    op_counts: dict[str, OpCount]
    notes: tuple[str, ...]
    calibration_samples: int
    workspace: Path | None
    calibration_step: int | None
    fidelity: Fidelity | None = None
    fallback: FallbackReport | None = None
    accuracy: AccuracyCheck | None = None
    latency: Latency | None = None

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes

    @property
    def target_met(self) -> bool | None:
        """Whether the model met the accuracy target (``None``: not measured)."""
        return None if self.accuracy is None else self.accuracy.met


def _convert_quantized(loaded: LoadedModel, output_path: Path, config: QuantConfig, run: RunOptions) -> ConversionResult:
    """An already quantized model (QDQ from another tool, a QAT export, or onnxq): completed
    (int32 biases, quantized constants) and, for ``qoperator``, rewritten; no calibration."""
    notes = list(loaded.notes) + ["the model is already quantized: its scales are kept, no calibration"]
    notes += (QOperatorPass() if config.format == "qoperator" else NormalizeQdqPass())(loaded.model).notes
    written = write_output(loaded, loaded.model, output_path, run.external_data)
    counts = inspect_model(output_path, fusion=False).op_counts()
    return ConversionResult(
        output=output_path,
        float_bytes=loaded.float_bytes,
        quantized_bytes=written.size,
        op_counts={op: OpCount(c["int8"], c["float"]) for op, c in counts.items()},
        notes=tuple(notes),
        calibration_samples=0,
        workspace=None,
        calibration_step=None,
    )


@dataclasses.dataclass
class _Conversion:
    """A conversion in progress: its workspace, the calibration state found there (if any),
    whether it resumes, and the notes so far."""

    space: Workspace
    state: CalibrationState | None
    resume: bool
    notes: list[str]


def _open_workspace(loaded: LoadedModel, config: QuantConfig, source: BatchSource | None, path: Path,
                    resume: bool) -> _Conversion:
    """Create the workspace, or open and check the one to resume (a new one when there is none)."""
    manifest = build_manifest(loaded.keys, loaded.model.graph, config, None if source is None else source.first)
    notes = []
    if resume and not (path / "manifest.json").is_file():
        notes.append(f"nothing to resume in {path}: started a new run")
        resume = False
    if not resume:
        return _Conversion(Workspace.create(path, manifest), None, False, notes)
    space = Workspace.open(path)
    space.check_matches(manifest)
    step = space.latest(CalibrationStep)
    state = None if step is None else CalibrationState.from_step(step.read(CalibrationStep), config.percentile)
    if state is not None:
        check_tied_ranges(space.manifest, loaded.keys, state, path)
    return _Conversion(space, state, True, notes)


def _calibrated(conversion: _Conversion, loaded: LoadedModel, config: QuantConfig, run: RunOptions,
                source: BatchSource | None, progress: ProgressCallback | None,
                executor: Executor) -> tuple[CalibrationState, Step]:
    """Finish calibration (unless the workspace holds a complete one); returns the final state
    and its workspace step."""
    state = conversion.state
    if (state is not None and state.complete and source is not None and not source.one_shot and state.data_sha256
            and data_fingerprint(source()) != state.data_sha256):
        raise CalibrationDataError(
            f"workspace {conversion.space.path} was calibrated on other data (the same first batch, other batches "
            "after it); resume with the same --calibration-data or start a new run without --resume"
        )
    if state is None or not state.complete:
        if source is None:
            raise CalibrationDataError(
                f"calibration in {conversion.space.path} is not finished; pass the same --calibration-data to resume it"
            )
        state, notes = calibrate_model(loaded, source, config, run, state,
                                       lambda s: conversion.space.append(s.to_step()), progress, executor)
        conversion.notes += notes
    step = conversion.space.latest(CalibrationStep)
    if step is None:  # pragma: no cover - calibration always records the final state
        raise WorkspaceError(f"workspace {conversion.space.path} lost its calibration state; start a new run")
    return state, step


def _layer_choices(conversion: _Conversion, loaded: LoadedModel, state: CalibrationState, config: QuantConfig,
                   source: BatchSource | None, calibration_step: int, progress: TuningProgress | None) -> LayersStep:
    """The per-layer choices of this calibration step: recorded when resuming, else measured
    (a phase ``progress`` shows, as it may take seconds)."""
    recorded = conversion.space.latest(LayersStep) if conversion.resume else None
    if recorded is not None:
        layers = recorded.read(LayersStep)
        if layers.calibration_step == calibration_step:
            return layers
    if progress is not None:
        progress("measuring layers (saturation, fusion)", 0, 1)
    layers = measure_layers(loaded, state, config, source, calibration_step)
    if progress is not None:
        progress("measuring layers (saturation, fusion)", 1, 1)
    conversion.space.append(layers)
    return layers


@dataclasses.dataclass(frozen=True)
class _Measurement:
    """The data a conversion is measured on: batches for the fallback search (``None``: no
    search), every batch to report on, and what they are."""

    search: list[Batch] | None
    report: Iterable[Batch]
    description: str


SAFETY_NET_SAMPLES = 2 * HOLD_OUT_SAMPLES  # at most this many samples of --eval-data are measured twice
SEARCH_SAMPLES = 16  # calibration samples the safety net's search scores its trial models on


def _measurement(eval_source: BatchSource | None, source: BatchSource | None, config: QuantConfig,
                 fallback: FallbackOptions) -> _Measurement | None:
    """The data a conversion is measured on: held-out data reports (``--eval-data``, else the
    held-out calibration batches); ``--max-drop`` searches on all of ``--eval-data`` (its metric
    and labels), the safety net on ``SEARCH_SAMPLES`` calibration samples that are not reported
    on, so that the set it chose on does not judge its choice. Without held-out batches the
    calibration samples do both. ``None`` without data to measure on."""
    if eval_source is not None:
        kept = fallback.max_drop is not None or eval_source.one_shot  # read once: kept for the report (and search)
        batches = list(eval_source()) if kept else None
        what = f"{sum(b.samples for b in batches)} samples of --eval-data" if kept else "--eval-data"
        if fallback.max_drop is not None:
            return _Measurement(batches, batches, what)
        search = _search_batches(source) if fallback.auto else None
        return _Measurement(search, batches if kept else eval_source(), what)
    if source is None:
        return None
    held_out = source.held_out() if isinstance(source, HeldOutSplit) else []
    batches = held_out or first_samples(source(), HOLD_OUT_SAMPLES)
    if not batches:
        return None
    samples = sum(b.samples for b in batches)
    what = f"{samples} held-out calibration samples" if held_out else \
        f"{samples} calibration samples (not held out: {'too few batches' if config.hold_out else '--no-hold-out'})"
    search = None if not fallback.auto else _search_batches(source) if held_out else batches
    return _Measurement(search, batches, what)


def _search_batches(source: BatchSource | None) -> list[Batch] | None:
    """The first ``SEARCH_SAMPLES`` calibration samples (of those a one-shot source kept)."""
    if source is None:
        return None
    batches = source.first_batches(KEPT_BATCHES) if source.one_shot else source()
    return first_samples(batches, SEARCH_SAMPLES) or None


def _fidelity(loaded: LoadedModel, session: ort.InferenceSession, batches: Iterable[Batch],
              float_runs: FloatRuns | None) -> Fidelity:
    """Fidelity of the written model's ``session`` on the measuring data, against ``float_runs``
    (the float model's outputs, computed before) or streaming through both models."""
    if float_runs is None:
        return compare_models(loaded.float_session(), session, batches)
    return compare_runs(float_runs.names, ((batch, reference, run_checked(session, float_runs.names, batch))
                                           for batch, reference in zip(batches, float_runs.outputs)))


def _save_rules(path: str, loaded: LoadedModel, built: BuiltModel) -> None:
    by_key = {key: node for node, key in loaded.keys.nodes.items()}
    kept = {by_key[k]: reason for k, reason in built.kept_float.items() if k in by_key}
    save_rules(path, kept, loaded.keys.nodes)


def convert(
    model: ModelInput,
    output: str | os.PathLike,
    calibration_data: DataSource | None,
    config: QuantConfig | None = None,
    *,
    run: RunOptions | None = None,
    eval_data: DataSource | None = None,
    fallback: FallbackOptions | None = None,
    workspace: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    tuning_progress: TuningProgress | None = None,
) -> ConversionResult:
    """Quantize ``model`` to int8 (QDQ or QOperator form, per ``config.format``), calibrated on
    ``calibration_data``; write ``output``. A model that is already quantized is converted
    without calibration. ``run`` says how it runs: calibration device, memory budget,
    checkpoint interval, the output's file layout.

    Calibration is checkpointed in ``workspace`` (default ``OUTPUT.onnxq/``); ``resume=True``
    continues a run that was killed, and gives the same model as an uninterrupted run
    (``calibration_data`` may then be ``None`` if calibration had finished). ``eval_data``
    (same formats) measures fidelity after conversion, with top-1 accuracy when it has a
    ``label`` array. Without it, every 8th calibration batch (up to 32 samples) is held out to
    measure on (``onnxq.calibration.holdout``). ``fallback`` keeps nodes float by rules; by
    measured sensitivity until the accuracy target is met (``fallback.auto``, the safety net:
    ``onnxq.tune.target``); or, with ``max_drop`` and ``eval_data``, until the metric is within
    ``max_drop`` of float. Bad input raises an ``OnnxqError`` subclass, and nothing is written then.
    """
    config = _argument("config", QuantConfig() if config is None else config, QuantConfig, ConfigError)
    run = _argument("run", RunOptions() if run is None else run, RunOptions, ConfigError)
    fallback = _argument("fallback", FallbackOptions() if fallback is None else fallback, FallbackOptions, ConfigError)
    _argument("workspace", workspace, (*_PATH, type(None)), WorkspaceError)
    if fallback.max_drop is not None and eval_data is None:
        raise ConfigError("--max-drop needs --eval-data: the metric is measured on it")
    output_path = check_writable(output)
    rules_path = None if fallback.save_rules is None else check_writable(fallback.save_rules)
    inputs = {"the model": _model_path(model), "the calibration data": source_path(calibration_data),
              "the evaluation data": source_path(eval_data)}
    inputs |= {f"the rules file {rule.value}": Path(rule.value) for rule in fallback.keep_float if rule.kind == "file"}
    refuse_overwriting_inputs([output_path, external_data_path(output_path)], inputs)
    if rules_path is not None:
        refuse_overwriting_inputs([rules_path], inputs | {"the output": output_path})
    workspace_path = Path(workspace) if workspace is not None else default_workspace(output_path)
    loaded = load(model)
    if has_quantize_nodes(loaded.model):
        return _convert_quantized(loaded, output_path, config, run)
    with locked(workspace_path), executor_for(run.workers, run.ray) as executor:
        remove_stale_temporaries(output_path.parent, output_path.name)
        return _convert(loaded, output_path, calibration_data, config, run, eval_data, fallback, workspace_path,
                        resume, progress, tuning_progress, executor)


def _argument(name: str, value: T, kind: type[T] | tuple[type, ...], error: type[OnnxqError]) -> T:
    """``value`` if it is a ``kind``, else ``error`` naming the argument and the type expected."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        wanted = "a path" if isinstance(kind, tuple) else "a whole number" if kind is int else f"a {kind.__name__}"
        raise error(f"{name} must be {wanted}, not {type(value).__name__}")
    return value


_PATH = (str, os.PathLike)


def _model_path(model: ModelInput) -> Path | None:
    return Path(model) if isinstance(model, _PATH) else None  # anything else: load() says what it must be


def _recorded(workspace_path: Path, step_type: type[T]) -> T | None:
    """The last ``step_type`` step of the workspace at ``workspace_path``, if there is one."""
    if not (workspace_path / "manifest.json").is_file():
        return None
    step = Workspace.open(workspace_path).latest(step_type)
    return None if step is None else step.read(step_type)


def _convert(loaded: LoadedModel, output_path: Path, calibration_data: DataSource | None, config: QuantConfig,
             run: RunOptions, eval_data: DataSource | None, fallback: FallbackOptions, workspace_path: Path,
             resume: bool, progress: ProgressCallback | None, tuning_progress: TuningProgress | None,
             executor: Executor) -> ConversionResult:
    """``convert`` of a float model once its paths are checked and its workspace is held."""
    ruled, rule_notes = resolve_rules(fallback.keep_float, loaded.model.graph, loaded.keys.nodes)
    base = {loaded.keys.nodes[node]: reason for node, reason in ruled.items()}
    inputs = model_inputs(loaded.proto)
    source = None
    if calibration_data is not None:
        source = BatchSource(calibration_data, inputs, config.batch_size, config.max_samples)
    elif not resume:
        raise CalibrationDataError("no calibration data; pass --calibration-data (an .npz file, a folder or a loader)")
    eval_source = None if eval_data is None else BatchSource(eval_data, inputs, config.batch_size)
    if source is not None and eval_source is None and config.hold_out:
        source = HeldOutSplit(source)

    recorded = _recorded(workspace_path, SmoothingStep) if resume else None
    data = None if source is None or recorded is not None else \
        TransformData(lambda: layer_input_batches(source), loaded.external_folder)
    passes = float_exact_passes(config, data, recorded)
    loaded = loaded.with_passes(passes)
    conversion = _open_workspace(loaded, config, source, workspace_path, resume)
    for step in transform_steps(passes):
        if not conversion.resume or conversion.space.latest(type(step)) is None:
            conversion.space.append(step)
    conversion.notes[:0] = list(loaded.notes) + rule_notes
    state, calibration_step = _calibrated(conversion, loaded, config, run, source, progress, executor)
    layers = _layer_choices(conversion, loaded, state, config, source, calibration_step.index, tuning_progress)
    measurement = _measurement(eval_source, source, config, fallback)
    report_runs = None  # the float model's outputs, computed before any int8 model runs
    if measurement is not None and isinstance(measurement.report, list):
        report_runs = FloatRuns.of(loaded.float_session(), measurement.report)
    elif eval_source is not None:  # streamed: data the model fails on is said so before anything times or runs it
        FloatRuns.of(loaded.float_session(), [eval_source.first])
    target = AccuracyTarget.of(fallback)
    report, keep = None, base
    if measurement is not None and measurement.search:
        search_runs = report_runs if measurement.search is measurement.report else \
            FloatRuns.of(loaded.float_session(), measurement.search)
        search_options = fallback if fallback.max_drop is not None else target.search_options(fallback)
        keep, report = tune_fallback(loaded, state, config, layers, base, search_options, measurement.search,
                                     search_runs, conversion.space, tuning_progress, executor)
        if fallback.max_drop is None and report.met and report.trials == 1:
            report = None  # the safety net's plain model met the target: nothing was searched
        else:
            conversion.notes += fallback_notes(report)
            if measurement.search is not measurement.report:
                conversion.notes.append(
                    f"the search scored its trials on {sum(b.samples for b in measurement.search)} calibration "
                    f"samples; the accuracy check below is on {measurement.description}, which it did not see")
    if base:
        conversion.notes.append(f"kept float {len(base)} node(s) by --keep-float rules")
    built = build_model(loaded, state, config, layers, keep, fallback.dtype)
    latency_wanted = run.latency and not loaded.offload
    timing_data = eval_source if eval_source is not None else source
    if latency_wanted and fallback.speed and timing_data is not None and config.target == "cpu":
        built = _leave_slow_float(conversion, loaded, state, config, layers, keep, fallback.dtype, built,
                                  batch_one(timing_data.first, inputs), calibration_step.index,
                                  _as_accurate(loaded, measurement, report_runs, eval_source, target, built))
    fidelity, int8_session = None, None

    def evaluate(written: ModelSource) -> None:
        nonlocal fidelity, int8_session
        if measurement is not None or latency_wanted:
            int8_session = create_session(written, "the quantized model")
        if measurement is not None:
            fidelity = _fidelity(loaded, int8_session, measurement.report, report_runs)

    written = write_output(loaded, built.model, output_path, run.external_data, before_commit=evaluate)
    conversion.space.append(QuantizedStep(calibration_step.index, written.sha256, built.kept_float, fallback.dtype))
    if fallback.save_rules is not None:
        _save_rules(fallback.save_rules, loaded, built)
    accuracy = None
    if measurement is None:
        conversion.notes.append("accuracy not measured: no calibration data to hold out (pass --eval-data)")
    else:
        accuracy = target.check(fidelity, measurement.description)
    latency, data = None, timing_data
    if run.latency and loaded.offload:
        conversion.notes.append("latency not measured: the weights are in external data (a big model), and timing "
                                "both models would hold both in memory")
    elif run.latency and data is None:
        conversion.notes.append("latency not measured: no input to time the models on (pass --eval-data)")
    elif run.latency:
        latency = _latency(loaded, int8_session, output_path, batch_one(data.first, inputs), config)
    return ConversionResult(
        output=output_path,
        float_bytes=loaded.float_bytes,
        quantized_bytes=written.size,
        op_counts=built.op_counts,
        notes=tuple(conversion.notes + built.notes),
        calibration_samples=state.samples_seen,
        workspace=workspace_path,
        calibration_step=calibration_step.index,
        fidelity=fidelity,
        fallback=report,
        accuracy=accuracy,
        latency=latency,
    )


def _as_accurate(loaded: LoadedModel, measurement: _Measurement | None, report_runs: FloatRuns | None,
                 eval_source: BatchSource | None, target: AccuracyTarget, built: BuiltModel) -> Callable[[BuiltModel], bool]:
    """Whether a model misses the accuracy target by no more than ``built`` does, on the data the
    conversion is measured on: the report's batches where they are kept in memory, else those of
    the search, else the first ``SAFETY_NET_SAMPLES`` of ``--eval-data`` read again (a streamed
    report must stay whole for the written model). Always true without such data."""
    if measurement is None:
        return lambda _: True
    batches, float_runs = measurement.report, report_runs
    if not isinstance(batches, list):
        batches, float_runs = measurement.search, None
        if batches is None and eval_source is not None and not eval_source.one_shot:
            batches = first_samples(eval_source(), SAFETY_NET_SAMPLES)
    if not batches:
        return lambda _: True

    def shortfall(model: BuiltModel) -> float:
        with session_of(model.model, loaded.offload, "the int8 model") as session:
            return target.shortfall(_fidelity(loaded, session, batches, float_runs))

    baseline = functools.cache(lambda: shortfall(built))
    return lambda trial: shortfall(trial) <= baseline()


def _leave_slow_float(conversion: _Conversion, loaded: LoadedModel, state: CalibrationState, config: QuantConfig,
                      layers: LayersStep, keep: dict[str, str], dtype: str, built: BuiltModel, feed: dict[str, np.ndarray],
                      calibration_step: int, accurate_enough: Callable[[BuiltModel], bool]) -> BuiltModel:
    """``built``, or the model with the nodes that int8 only slows down float (``onnxq.tune.speed``):
    read back from the workspace when resuming, else measured and recorded; adds the note."""
    recorded = conversion.space.latest(SpeedStep) if conversion.resume else None
    step = None if recorded is None else recorded.read(SpeedStep)
    if step is not None and step.calibration_step == calibration_step and step.base == sorted(keep):
        choice = SpeedChoice(tuple(SpeedRound.of_record(r) for r in step.rounds))
        if choice.kept_float:
            built = build_model(loaded, state, config, layers, keep | dict.fromkeys(choice.kept_float, SLOWER_REASON),
                                dtype)
    else:
        built, choice = leave_slow_float(loaded, state, config, layers, keep, dtype, built, feed, accurate_enough)
        if choice is None:
            conversion.notes.append(too_fast_note())
            return built
        conversion.space.append(SpeedStep(calibration_step, sorted(keep),
                                          [r.record() for r in choice.rounds]))
    conversion.notes += speed_notes(choice)
    return built


def _latency(loaded: LoadedModel, int8_session: ort.InferenceSession, output_path: Path, feed: dict[str, np.ndarray],
             config: QuantConfig) -> Latency:
    """Batch-1 latency of the written model against the float model (``onnxq.report.latency``) on
    the CPU, with the written model's session the accuracy check built, or on the
    ``config.target``'s provider."""
    providers = latency_providers(config.target)
    if providers != (CPU,):
        int8_session = create_session(output_path, "the quantized model", providers)
    float_session = create_session(loaded.cleaned, "the float model", providers, loaded.external_folder)
    return conversion_latency(float_session, int8_session, feed, loaded.cleaned, output_path, loaded.external_folder)


def _recorded_model(space: Workspace, index: int | None) -> tuple[Step, dict[str, str], str]:
    """The calibration step of the recorded model to rebuild (step ``index``, else the last
    model written, else the last calibration step), its keep-float set and fallback dtype."""
    step = space.step(index) if index is not None else space.latest(QuantizedStep) or space.latest(CalibrationStep)
    if step is None:
        raise WorkspaceError(f"workspace {space.path} has no intact calibration step to recover from")
    keep_float, fallback_dtype = {}, "fp32"
    if step.kind == QuantizedStep.KIND:
        quantized = step.read(QuantizedStep)
        keep_float, fallback_dtype, step = quantized.keep_float, quantized.fallback_dtype, space.step(quantized.calibration_step)
    elif step.kind == TrialStep.KIND:
        trial = step.read(TrialStep)
        keep_float = trial.reasons or {key: "recorded" for key in trial.keep_float}
        fallback_dtype, step = trial.fallback_dtype, space.step(trial.calibration_step)
    if step.kind != CalibrationStep.KIND:
        raise WorkspaceError(f"step {step.index} of {space.path} is a {step.kind} step; give a calibration, "
                             "trial or quantized step")
    return step, keep_float, fallback_dtype


def recover(
    model: ModelInput,
    workspace: str | os.PathLike,
    output: str | os.PathLike,
    index: int | None = None,
    run: RunOptions | None = None,
) -> ConversionResult:
    """Rebuild a recorded model from the float model and the workspace alone, without
    calibrating: by default the last one written (else the last calibration step); with
    ``index``, that step (a calibration step, a fallback trial, or a written model).
    ``run`` as in ``convert`` (only its ``external_data`` matters here)."""
    _argument("workspace", workspace, _PATH, WorkspaceError)
    if index is not None:
        _argument("index", index, int, ConfigError)
    run = _argument("run", RunOptions() if run is None else run, RunOptions, ConfigError)
    output_path = check_writable(output)
    refuse_overwriting_inputs([output_path, external_data_path(output_path)],
                              {"the model": _model_path(model), "the workspace manifest": Path(workspace) / "manifest.json"})
    loaded = load(model)
    space = Workspace.open(workspace)
    try:
        config = QuantConfig(**space.manifest["config"])
    except (TypeError, ConfigError) as exc:
        raise WorkspaceError(f"workspace {space.path} records options onnxq cannot read ({exc}); the workspace is "
                             "damaged, start a new run") from exc
    smoothing = space.latest(SmoothingStep)
    loaded = loaded.with_passes(float_exact_passes(config, None, None if smoothing is None else
                                                   smoothing.read(SmoothingStep)))
    space.check_matches(build_manifest(loaded.keys, loaded.model.graph, config, None)
                        | {"data": space.manifest.get("data")})
    step, keep_float, fallback_dtype = _recorded_model(space, index)
    state = CalibrationState.from_step(step.read(CalibrationStep), config.percentile)
    check_tied_ranges(space.manifest, loaded.keys, state, space.path)
    recorded = space.latest(LayersStep)
    layers = measure_layers(loaded, state, config, None, step.index) if recorded is None else recorded.read(LayersStep)
    built = build_model(loaded, state, config, layers, keep_float, fallback_dtype)
    written = write_output(loaded, built.model, output_path, run.external_data)
    partial = [] if state.complete else [f"step {step.index} holds partial calibration (pass {state.pass_index + 1} "
                                         f"of {len(state.passes)}, {state.samples_done} samples in)"]
    return ConversionResult(
        output=output_path,
        float_bytes=loaded.float_bytes,
        quantized_bytes=written.size,
        op_counts=built.op_counts,
        notes=tuple(list(loaded.notes) + partial + built.notes),
        calibration_samples=state.samples_seen,
        workspace=Path(workspace),
        calibration_step=step.index,
    )
