"""The accuracy target every conversion is measured against, and the metric that lets the
fallback search reach it (the safety net, on unless ``--no-fallback``).

Rules:
1. Every output, or every part of an output that holds parts on different scales
   (``onnxq.report.parts``), keeps an SQNR of at least ``min_sqnr_db`` against the float model
   (23 dB by default: the error's RMS is 7 % of the signal's). Parts whose float values are all
   zero are not judged.
2. A distribution output (softmax) keeps its arg-max on at least ``min_agreement`` of its
   decisions (0.98), where there are at least ``MIN_DECISIONS`` of them to count.
3. The shortfall of a model is its worst criterion relative to its tolerance: noise over signal
   relative to ``10^(-min_sqnr_db/10)``, disagreement relative to ``1 - min_agreement``; the
   target is met when it is at most 1.
4. The search scores a model ``1 - SEARCH_DROP * shortfall`` (1 for the float model) and accepts
   a drop of at most ``SEARCH_DROP``: exactly the models that meet the target.
"""

from __future__ import annotations

import dataclasses
import math

from onnxq.config import FallbackOptions
from onnxq.report.evaluate import Fidelity, fidelity_of
from onnxq.tune.metrics import Metric, Outputs

MIN_DECISIONS = 50  # fewer arg-max decisions than this are too few to judge agreement on
SEARCH_DROP = 0.01
MAX_SHORTFALL = 1e12  # the search's scores stay finite (a model with non-finite outputs scores lowest)
METRIC_NAME = "accuracy target"  # how the search's metric is named (with its thresholds) in reports and steps


@dataclasses.dataclass(frozen=True)
class AccuracyCheck:
    """A written model measured against the target: the target, the data it was measured on,
    and what missed it (nothing: met)."""

    target: str
    measured_on: str
    misses: tuple[str, ...]

    @property
    def met(self) -> bool:
        return not self.misses


@dataclasses.dataclass(frozen=True)
class AccuracyTarget:
    """The criteria of the module docstring."""

    min_sqnr_db: float
    min_agreement: float

    @classmethod
    def of(cls, options: FallbackOptions) -> AccuracyTarget:
        return cls(options.min_sqnr_db, options.min_agreement)

    def describe(self) -> str:
        return (f"SQNR >= {self.min_sqnr_db:g} dB on every output and output part, arg-max agreement "
                f">= {self.min_agreement:g} on distribution outputs")

    def _criteria(self, fidelity: Fidelity) -> list[tuple[str, float, str]]:
        """(what, shortfall, measured) for every judged criterion."""
        criteria = []
        for output in fidelity.outputs:
            judged = [(f"{output.name}{p.label}", p.sqnr_db) for p in output.parts if p.signal] if output.parts \
                else [(output.name, output.sqnr_db)]
            for what, sqnr in judged:  # NaN: non-finite outputs, which miss any target
                shortfall = math.inf if math.isnan(sqnr) else 10 ** ((self.min_sqnr_db - sqnr) / 10)
                criteria.append((what, shortfall, f"SQNR {sqnr:.1f} dB"))
            if output.agreement is not None and output.decisions >= MIN_DECISIONS:
                criteria.append((output.name, (1 - output.agreement) / (1 - self.min_agreement),
                                 f"arg-max agreement {output.agreement:.3f}"))
        return criteria

    def shortfall(self, fidelity: Fidelity) -> float:
        """Rule 3: the worst criterion relative to its tolerance (at most 1: met)."""
        return max((shortfall for _, shortfall, _ in self._criteria(fidelity)), default=0.0)

    def misses(self, fidelity: Fidelity) -> list[str]:
        """What misses the target, worst first, e.g. ``output0[axis 1: 4:84]: SQNR 9.1 dB``."""
        missed = sorted((c for c in self._criteria(fidelity) if c[1] > 1), key=lambda c: -c[1])
        return [f"{what}: {measured}" for what, _, measured in missed]

    def check(self, fidelity: Fidelity, measured_on: str) -> AccuracyCheck:
        return AccuracyCheck(self.describe(), measured_on, tuple(self.misses(fidelity)))

    def metric(self) -> Metric:
        """Rule 4: the search's score of outputs against the float model's."""

        def accuracy_target(outputs: Outputs, reference: Outputs, labels=None) -> float:
            return 1.0 - SEARCH_DROP * min(self.shortfall(fidelity_of(outputs, reference)), MAX_SHORTFALL)

        accuracy_target.__name__ = f"{METRIC_NAME} (SQNR >= {self.min_sqnr_db:g} dB, agreement >= {self.min_agreement:g})"
        accuracy_target.flat_if_ragged = True  # outputs of varying shapes are compared as flat values
        return accuracy_target

    def search_options(self, options: FallbackOptions) -> FallbackOptions:
        """``options`` with the metric and drop that make the search reach this target, judged
        on the whole measuring set as the report is (not on each half: a few held-out samples
        split in two would judge plain int8 by a noisier figure than the one reported)."""
        return dataclasses.replace(options, metric=self.metric(), max_drop=SEARCH_DROP, check_halves=False)
