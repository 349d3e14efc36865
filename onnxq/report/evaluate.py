"""Fidelity of a quantized model against its float original on the same inputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnxruntime as ort

from onnxq.calibration.data import Batch
from onnxq.errors import CalibrationDataError, first_line
from onnxq.tune.metrics import cosine_similarity


@dataclasses.dataclass(frozen=True)
class OutputFidelity:
    """How close one quantized output is to the float one over all evaluated samples."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Per-output closeness and, when the data has labels, top-1 accuracy of both models."""

    samples: int
    outputs: tuple[OutputFidelity, ...]
    float_top1: float | None = None
    quantized_top1: float | None = None


class ErrorAccumulator:
    """Running signal, noise and cross energies of a float tensor vs its quantized version."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quant_energy = 0.0
        self.max_abs_error = 0.0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        f, q = reference.astype(np.float64).ravel(), quantized.astype(np.float64).ravel()
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


def compare_models(
    float_session: ort.InferenceSession,
    quantized_session: ort.InferenceSession,
    batches: Iterable[Batch],
) -> Fidelity:
    """Run both sessions on every batch; top-1 uses the first output's last axis and the labels."""
    names = [output.name for output in float_session.get_outputs()]
    accumulators = {name: ErrorAccumulator() for name in names}
    samples = labelled = float_correct = quantized_correct = 0
    for batch in batches:
        try:
            reference = float_session.run(names, batch.feed)
            quantized = quantized_session.run(names, batch.feed)
        except Exception as exc:
            raise CalibrationDataError(
                f"the models fail on the evaluation data ({first_line(exc)}); check that it matches the model's inputs"
            ) from exc
        for name, f, q in zip(names, reference, quantized):
            accumulators[name].update(f, q)
        samples += batch.samples
        labels = None if batch.labels is None else batch.labels.reshape(-1)
        if labels is not None and reference[0].ndim == 2 and reference[0].shape[0] == labels.size:
            f_pred = reference[0].argmax(axis=1)
            q_pred = quantized[0].argmax(axis=1)
            float_correct += int((f_pred == labels).sum())
            quantized_correct += int((q_pred == labels).sum())
            labelled += len(labels)
    return Fidelity(
        samples=samples,
        outputs=tuple(accumulators[name].result(name) for name in names),
        float_top1=float_correct / labelled if labelled else None,
        quantized_top1=quantized_correct / labelled if labelled else None,
    )
