"""The accuracy-driven fallback: measure each unit's sensitivity, then search the smallest set
of units to keep float so that the metric meets its target (see ``onnxq.tune``). Sensitivity
and every trial are workspace steps; a resumed run reuses them. Trials scored ahead of the search
(several workers, ``onnxq.tune.search``) are recorded only when the search consumes them, so the
workspace is the same for any number of workers."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable

import numpy as np

from onnxq.calibration.data import Batch
from onnxq.calibration.holdout import first_samples
from onnxq.calibration.state import CalibrationState
from onnxq.config import MIN_BATCHES_TO_SPLIT, FallbackOptions, QuantConfig
from onnxq.distribute import Executor
from onnxq.load.prepare import LoadedModel
from onnxq.rewrite.build import BuiltModel, build_model
from onnxq.report.evaluate import FloatRuns
from onnxq.runtime import concatenate_runs
from onnxq.tune.metrics import Metric, Outputs, relative_error, resolve_metric, target
from onnxq.tune.search import Lookahead, search_fallback
from onnxq.tune.sensitivity import rank_units
from onnxq.tune.target import METRIC_NAME
from onnxq.tune.trials import TrialRunner
from onnxq.workspace.manifest import batch_fingerprint
from onnxq.workspace.steps import LayersStep, SensitivityStep, TrialStep
from onnxq.workspace.store import Workspace

TuningProgress = Callable[[str, int, int], None]  # phase, done, total


@dataclasses.dataclass(frozen=True)
class KeptNode:
    """A node left float: its name, op, why, and its measured sensitivity (when measured)."""

    name: str
    op: str
    reason: str
    sensitivity: float | None = None


@dataclasses.dataclass(frozen=True)
class FallbackReport:
    """The outcome of the accuracy-driven search: metric, float and int8 scores, the final
    score, whether it met ``max_drop``, how many trials, and the nodes kept float."""

    metric: str
    max_drop: float
    float_score: float
    int8_score: float
    final_score: float
    met: bool
    trials: int
    kept: tuple[KeptNode, ...]
    out_of_time: bool = False
    unloadable: int = 0  # trial models ONNX Runtime refused to load (they count as failed)


class _OutOfTime(Exception):
    """The search's time budget is spent."""


@dataclasses.dataclass(frozen=True)
class _EvalSet:
    """The evaluation data as the search sees it: the batches, the parts the target must hold
    on (the whole set, and with ``check_halves`` its two halves), the float model's outputs
    and score on each part, the labels, the metric, and the first batches that sensitivity
    is measured on with their float outputs."""

    batches: list[Batch]
    parts: tuple[slice, ...]
    references: list[Outputs]
    labels: list[np.ndarray | None]
    metric_name: str
    metric: Metric
    float_scores: list[float]
    eval_id: str
    subset: list[Batch]
    subset_reference: Outputs
    samples: int
    flat_if_ragged: bool

    @classmethod
    def of(cls, batches: list[Batch], float_runs: FloatRuns, options: FallbackOptions) -> _EvalSet:
        middle = len(batches) // 2 if options.check_halves and len(batches) >= MIN_BATCHES_TO_SPLIT else 0
        parts = (slice(None),) + ((slice(0, middle), slice(middle, None)) if middle else ())
        has_labels = all(batch.labels is not None for batch in batches)
        labels = [np.concatenate([b.labels.reshape(-1) for b in batches[part]]) if has_labels else None for part in parts]
        metric_name, metric = resolve_metric(options.metric, has_labels)
        flat = getattr(options.metric, "flat_if_ragged", False)
        subset = first_samples(batches, options.sensitivity_samples)
        names, outputs = float_runs.names, float_runs.outputs
        references = [concatenate_runs(names, outputs[part], flat) for part in parts]
        subset_reference = concatenate_runs(names, outputs[: len(subset)], flat)
        float_scores = [float(metric(ref, ref, lab)) for ref, lab in zip(references, labels)]
        eval_id = hashlib.sha256("".join(batch_fingerprint(b) for b in batches).encode()).hexdigest()
        return cls(batches, parts, references, labels, metric_name, metric, float_scores, eval_id, subset,
                   subset_reference, sum(batch.samples for batch in subset), flat)


class _Search:
    """One fallback search: trial models built from the calibrated state, scored on the
    evaluation set, each recorded as a workspace step."""

    def __init__(self, loaded: LoadedModel, state: CalibrationState, config: QuantConfig, layers: LayersStep,
                 base: dict[str, str], options: FallbackOptions, data: _EvalSet, space: Workspace,
                 progress: TuningProgress | None, executor: Executor) -> None:
        self.loaded, self.state, self.config, self.layers = loaded, state, config, layers
        self.trials = TrialRunner(executor, loaded.offload)
        self.base, self.options, self.data, self.space, self.progress = base, options, data, space, progress
        self.calibration_step = layers.calibration_step
        self.deadline = math.inf  # set once the plain model is scored (``tune_fallback``)
        self.unloadable = 0  # trial models ONNX Runtime refused
        self.plain: BuiltModel = self.build(base)  # its units and what it keeps float
        self.scores: dict[frozenset[str], list[float]] = self._recorded_scores()  # whole set, then halves
        self.ahead: dict[frozenset[str], list[float] | None] = {}  # scored ahead, not consumed (None: refused)

    def build(self, keep_float: dict[str, str]) -> BuiltModel:
        return build_model(self.loaded, self.state, self.config, self.layers, keep_float, self.options.dtype)

    def keep_of(self, keys: frozenset[str]) -> dict[str, str]:
        return {k: self.base.get(k, "accuracy fallback") for k in keys}

    def outputs_of(self, keysets: list[frozenset[str]], batches: list[Batch],
                   parts=(slice(None),)) -> list[list[Outputs] | None]:
        """The outputs of the trial model of each of ``keysets`` (run in parallel where the
        executor has workers), ``None`` where ONNX Runtime refused the model (an optimizer
        limit, e.g. with weights shared by subgraphs: the trial counts as failed)."""
        def models():
            for keys in keysets:
                if time.monotonic() > self.deadline:
                    raise _OutOfTime
                yield self.build(self.keep_of(keys)).model

        return self.trials.outputs(models(), len(keysets), batches, parts, self.data.flat_if_ragged)

    def _recorded_scores(self) -> dict[frozenset[str], list[float]]:
        scores = {}
        for step in self.space.steps():
            if step.kind != TrialStep.KIND:
                continue
            trial = step.read(TrialStep)
            if trial.calibration_step == self.calibration_step and trial.eval == self.data.eval_id \
                    and trial.metric == self.data.metric_name and trial.fallback_dtype == self.options.dtype \
                    and len(trial.half_scores) == len(self.data.parts) - 1:
                scores[frozenset(trial.keep_float)] = [trial.score, *trial.half_scores]
        return scores

    def worst_margin(self, values: list[float]) -> float:
        return min(value - target(reference, self.options.max_drop)
                   for value, reference in zip(values, self.data.float_scores))

    def known(self, keys: frozenset[str]) -> bool:
        """Whether the trial of ``keys`` has a result at hand: recorded, or scored ahead."""
        return keys in self.scores or keys in self.ahead

    def prefetch(self, keysets: list[frozenset[str]]) -> None:
        """Score the trials of ``keysets`` together (in parallel where the executor has workers),
        ahead of the search: kept unrecorded until it consumes them (``margin``)."""
        data = self.data
        for keys, outputs in zip(keysets, self.outputs_of(keysets, data.batches, data.parts)):
            self.ahead[keys] = None if outputs is None else \
                [float(data.metric(out, ref, lab)) for out, ref, lab in zip(outputs, data.references, data.labels)]

    def margin(self, keys: frozenset[str]) -> float:
        """How far the worst part's score is above its target (the search accepts >= 0); a trial
        not yet recorded is scored (or taken from those scored ahead) and recorded."""
        data = self.data
        if keys not in self.scores:
            if keys not in self.ahead:
                self.prefetch([keys])
            scores = self.ahead.pop(keys)
            self.unloadable += scores is None
            self.scores[keys] = [-math.inf] * len(data.parts) if scores is None else scores
            self.space.append(TrialStep(
                calibration_step=self.calibration_step, eval=data.eval_id, metric=data.metric_name,
                fallback_dtype=self.options.dtype, keep_float=sorted(keys),
                reasons=self.plain.kept_float | self.keep_of(keys), score=self.scores[keys][0],
                half_scores=self.scores[keys][1:], float_score=data.float_scores[0],
                passes=accept(self.worst_margin(self.scores[keys])),
            ))
        if self.progress is not None:
            self.progress("fallback search", len(self.scores), self.options.max_trials)
        return self.worst_margin(self.scores[keys])

    def sensitivity(self) -> dict[tuple[str, ...], float]:
        """Each unit's gain (error removed with it float, or added with it quantized), most
        sensitive first: read back from the workspace, or measured and recorded."""
        base, options, data = frozenset(self.base), self.options, self.data
        for step in reversed(self.space.steps()):
            if step.kind != SensitivityStep.KIND:
                continue
            recorded = step.read(SensitivityStep)
            if recorded.calibration_step == self.calibration_step and recorded.eval == data.eval_id \
                    and recorded.base == sorted(base) and recorded.samples == data.samples \
                    and recorded.mode == options.sensitivity and sorted(recorded.ranking) == sorted(recorded.gains):
                return {tuple(key.split("|")): recorded.gains[key] for key in recorded.ranking}  # JSON sorts keys

        def errors_of(keysets: list[frozenset[str]]) -> list[float]:
            runs = self.outputs_of(keysets, data.subset)
            self.unloadable += sum(outputs is None for outputs in runs)
            return [math.nan if outputs is None else relative_error(outputs[0], data.subset_reference)
                    for outputs in runs]  # nan: no gain known, it counts as none

        if options.sensitivity == "only-float":
            baseline = errors_of([base])[0]

            def gains_of(units: list[frozenset[str]]) -> list[float]:
                return [_known(baseline - error) for error in errors_of([base | nodes for nodes in units])]
        else:  # only-quantized: the error one unit adds to the model with every unit float
            all_float = base.union(*self.plain.units)
            baseline = errors_of([all_float])[0]

            def gains_of(units: list[frozenset[str]]) -> list[float]:
                return [_known(error - baseline) for error in errors_of([all_float - nodes for nodes in units])]

        report = None if self.progress is None else (lambda done, total: self.progress("sensitivity", done, total))
        slots = self.trials.slots  # models measured at once: a few per worker, so that progress shows
        gains = rank_units(self.plain.units, gains_of, progress=report, step=1 if slots == 1 else 4 * slots)
        self.space.append(SensitivityStep(
            calibration_step=self.calibration_step, eval=data.eval_id, base=sorted(base), samples=data.samples,
            mode=options.sensitivity, baseline=baseline, gains={"|".join(unit): gain for unit, gain in gains.items()},
            ranking=["|".join(unit) for unit in gains],
        ))
        return gains

    def best_so_far(self) -> frozenset[str]:
        """The set to keep when time runs out: the smallest that passed, else the closest to passing."""
        margins = {keys: self.worst_margin(scores) for keys, scores in self.scores.items()}
        passing = [keys for keys, margin in margins.items() if accept(margin)]
        if passing:
            return min(passing, key=lambda keys: (len(keys), -margins[keys], sorted(keys)))
        return max(margins, key=lambda keys: (margins[keys], -len(keys)))

    def report(self, keep_float: frozenset[str], gains: dict[str, float], out_of_time: bool = False) -> FallbackReport:
        data = self.data
        kept = _kept_nodes(self.loaded, self.plain.kept_float | self.keep_of(keep_float), gains)
        return FallbackReport(data.metric_name, self.options.max_drop, data.float_scores[0],
                              self.scores[frozenset(self.base)][0], self.scores[keep_float][0],
                              accept(self.worst_margin(self.scores[keep_float])), len(self.scores), kept, out_of_time,
                              self.unloadable)


def _known(gain: float) -> float:
    return gain if math.isfinite(gain) else 0.0


def accept(margin: float) -> bool:
    """Whether a candidate passes: its worst part meets the target."""
    return margin >= 0


def tune_fallback(
    loaded: LoadedModel,
    state: CalibrationState,
    config: QuantConfig,
    layers: LayersStep,
    base: dict[str, str],
    options: FallbackOptions,
    batches: list[Batch],
    float_runs: FloatRuns,
    space: Workspace,
    progress: TuningProgress | None,
    executor: Executor | None = None,
) -> tuple[dict[str, str], FallbackReport]:
    """Accuracy-driven fallback: rank the quantized units by sensitivity, then search the
    smallest set to keep float (``float_runs``: the float model's outputs on ``batches``); returns
    it (key: why) and the report. When ``options.budget_s`` runs out, the best set scored so far
    is returned. ``executor`` runs the trial models (default: in this process)."""
    search = _Search(loaded, state, config, layers, base, options, _EvalSet.of(batches, float_runs, options), space,
                     progress, Executor() if executor is None else executor)
    if accept(search.margin(frozenset(base))):
        return base, search.report(frozenset(base), {})
    search.deadline = time.monotonic() + options.budget_s if options.budget_s else math.inf
    gains: dict[str, float] = {}
    try:
        gains_by_unit = search.sensitivity()
        for unit, gain in gains_by_unit.items():  # a node is as sensitive as its most sensitive unit
            for key in unit:
                gains[key] = max(gain, gains.get(key, -math.inf))
        ranked = [frozenset(unit) for unit in gains_by_unit]
        lookahead = Lookahead(search.trials.slots, search.known, search.prefetch)
        result = search_fallback(ranked, frozenset(base), gains, search.margin, accept, options.max_trials, lookahead)
    except _OutOfTime:
        best = search.best_so_far()
        return search.keep_of(best), search.report(best, gains, out_of_time=True)
    return search.keep_of(result.keep_float), search.report(result.keep_float, gains)


def _kept_nodes(loaded: LoadedModel, kept_float: dict[str, str], gains: dict[str, float]) -> tuple[KeptNode, ...]:
    """The nodes kept float (key: why), most sensitive first, with names from the float model."""
    by_key = {key: node for node, key in loaded.keys.nodes.items()}
    ordered = sorted(kept_float.items(), key=lambda item: -gains.get(item[0], math.inf))
    return tuple(
        KeptNode(by_key[key].name or key, by_key[key].op_type, reason, gains.get(key))
        for key, reason in ordered if key in by_key
    )


def fallback_notes(report: FallbackReport) -> list[str]:
    """The summary's lines on the search: scores (or, for the safety net, what it did), verdict,
    trials, the nodes kept float."""
    chosen = [k for k in report.kept if k.reason == "accuracy fallback"]
    listed = ", ".join(f"{k.name} ({k.op})" for k in chosen[:8]) + (f" and {len(chosen) - 8} more" if len(chosen) > 8 else "")
    if report.met:
        verdict = "met"
    elif report.out_of_time:
        verdict = "NOT met (the time budget, --fallback-budget, ran out; the closest model was written)"
    else:
        verdict = "NOT met (every candidate was tried; the closest model was written)"
    if report.metric.startswith(METRIC_NAME):
        headline = (f"safety net: plain int8 missed the {report.metric}; fallback search: target {verdict}, "
                    f"{report.trials} model(s) evaluated")
    else:
        headline = (f"accuracy-driven fallback, metric {report.metric}: float {report.float_score:.4f}, plain int8 "
                    f"{report.int8_score:.4f}, final {report.final_score:.4f}; target (drop <= {report.max_drop:g}) "
                    f"{verdict}; {report.trials} model(s) evaluated")
    refused = [f"{report.unloadable} trial model(s) ONNX Runtime refused to load counted as failed"] \
        if report.unloadable else []
    return [headline, f"kept float for accuracy: {len(chosen)} node(s){': ' + listed if chosen else ''}", *refused]
