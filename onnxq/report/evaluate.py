"""Fidelity of a quantized model against its float original on the same inputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnxruntime as ort

from onnxq.calibration.data import Batch
from onnxq.errors import CalibrationDataError, first_line
from onnxq.report.parts import is_distribution, labelled_output, output_parts
from onnxq.tune.metrics import cosine_similarity


@dataclasses.dataclass(frozen=True)
class PartFidelity:
    """How close one part of an output (``onnxq.report.parts``) is to the float one; ``signal``
    is false when the float part is all zeros (no SQNR to judge)."""

    label: str
    sqnr_db: float
    cosine: float
    signal: bool


@dataclasses.dataclass(frozen=True)
class OutputFidelity:
    """How close one quantized output is to the float one over all evaluated samples: SQNR,
    cosine, largest error, each part's SQNR where the output holds parts on different scales,
    and for a distribution output the share of its ``decisions`` (arg-max) that agree."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    parts: tuple[PartFidelity, ...] = ()
    agreement: float | None = None
    decisions: int = 0


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Per-output closeness and, when the data has labels, top-1 accuracy of both models."""

    samples: int
    outputs: tuple[OutputFidelity, ...]
    float_top1: float | None = None
    quantized_top1: float | None = None
    top1_output: str | None = None  # the output top-1 is read from (``labelled_output``)


class ErrorAccumulator:
    """Running signal, noise and cross energies of a float tensor vs its quantized version."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quant_energy = 0.0
        self.max_abs_error = 0.0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        f, q = reference.astype(np.float64).ravel(), quantized.astype(np.float64).ravel()
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs give NaN figures, not warnings
            error = f - q
            self.signal += float(f @ f)
            self.noise += float(error @ error)
            self.dot += float(f @ q)
            self.quant_energy += float(q @ q)
            if error.size:
                self.max_abs_error = max(self.max_abs_error, float(np.abs(error).max()))

    def result(self, name: str) -> OutputFidelity:
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        cosine = float(cosine_similarity(self.dot, self.signal, self.quant_energy))
        return OutputFidelity(name, sqnr, cosine, self.max_abs_error)


class OutputAccumulator:
    """Everything ``OutputFidelity`` holds for one output, accumulated batch by batch; the parts
    and whether it is a distribution are read off the first float batch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.whole = ErrorAccumulator()
        self.parts: tuple = ()
        self.part_errors: list[ErrorAccumulator] = []
        self.distribution: bool | None = None
        self.agreeing = self.decisions = 0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        if self.distribution is None:
            self.parts = output_parts(reference)
            self.part_errors = [ErrorAccumulator() for _ in self.parts]
            self.distribution = is_distribution(reference)
        self.whole.update(reference, quantized)
        same_shape = np.shape(reference) == np.shape(quantized)
        for part, errors in zip(self.parts, self.part_errors):
            if same_shape:
                errors.update(part.take(reference), part.take(quantized))
        if self.distribution and same_shape:
            agree = np.argmax(reference, axis=-1) == np.argmax(quantized, axis=-1)
            self.agreeing += int(agree.sum())
            self.decisions += agree.size

    def result(self) -> OutputFidelity:
        parts = []
        for part, errors in zip(self.parts, self.part_errors):
            measured = errors.result(part.label())
            parts.append(PartFidelity(part.label(), measured.sqnr_db, measured.cosine, errors.signal > 0))
        agreement = self.agreeing / self.decisions if self.decisions else None
        return dataclasses.replace(self.whole.result(self.name), parts=tuple(parts), agreement=agreement,
                                   decisions=self.decisions)


def fidelity_of(outputs: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> Fidelity:
    """``Fidelity`` of whole outputs (each concatenated over the samples) against the float ones."""
    accumulators = {name: OutputAccumulator(name) for name in references}
    for name, reference in references.items():
        accumulators[name].update(reference, outputs[name])
    samples = len(next(iter(references.values()))) if references else 0
    return Fidelity(samples, tuple(accumulator.result() for accumulator in accumulators.values()))


def run_checked(session: ort.InferenceSession, names: list[str], batch: Batch) -> list[np.ndarray]:
    """``session``'s outputs ``names`` on ``batch``; a failure is the data's (``CalibrationDataError``)."""
    try:
        return session.run(names, batch.feed)
    except Exception as exc:
        raise CalibrationDataError(
            f"the models fail on the evaluation data ({first_line(exc)}); check that it matches the model's inputs"
        ) from exc


@dataclasses.dataclass(frozen=True)
class FloatRuns:
    """The float model's outputs (``names``) on each of a list of batches, computed once, before
    any quantized model runs: one model in memory at a time."""

    names: list[str]
    outputs: list[list[np.ndarray]]

    @classmethod
    def of(cls, session: ort.InferenceSession, batches: list[Batch]) -> FloatRuns:
        names = [output.name for output in session.get_outputs()]
        return cls(names, [run_checked(session, names, batch) for batch in batches])


def compare_runs(names: list[str], runs: Iterable[tuple[Batch, list[np.ndarray], list[np.ndarray]]]) -> Fidelity:
    """Fidelity from ``(batch, float outputs, quantized outputs)`` per batch; top-1 is read from
    the output ``labelled_output`` picks on the first labelled batch that has one."""
    accumulators = {name: OutputAccumulator(name) for name in names}
    samples = labelled = float_correct = quantized_correct = 0
    chosen: int | None = None
    for batch, reference, quantized in runs:
        for name, f, q in zip(names, reference, quantized):
            accumulators[name].update(f, q)
        samples += batch.samples
        labels = None if batch.labels is None else batch.labels.reshape(-1)
        if labels is None:
            continue
        if chosen is None:
            chosen = labelled_output(reference, labels)
        if chosen is not None and reference[chosen].shape[0] == labels.size:
            float_correct += int((reference[chosen].argmax(axis=1) == labels).sum())
            quantized_correct += int((quantized[chosen].argmax(axis=1) == labels).sum())
            labelled += len(labels)
    return Fidelity(
        samples=samples,
        outputs=tuple(accumulators[name].result() for name in names),
        float_top1=float_correct / labelled if labelled else None,
        quantized_top1=quantized_correct / labelled if labelled else None,
        top1_output=names[chosen] if labelled else None,
    )


def compare_models(
    float_session: ort.InferenceSession,
    quantized_session: ort.InferenceSession,
    batches: Iterable[Batch],
) -> Fidelity:
    """Run both sessions on every batch, streaming (see ``compare_runs``)."""
    names = [output.name for output in float_session.get_outputs()]
    return compare_runs(names, ((batch, run_checked(float_session, names, batch), run_checked(quantized_session, names, batch))
                                for batch in batches))
