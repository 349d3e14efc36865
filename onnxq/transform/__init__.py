"""Float-exact rewrites that make the float model easier to quantize (cross-layer equalization,
outlier migration, ...). They run after clean-up and before calibration, on a copy of the
cleaned-up graph (``LoadedModel.with_passes``): calibration, the rewrite and the float reference
the output is measured against all work from the transformed graph, whose outputs equal the
user's model's to float rounding. Each is chosen by an option of ``QuantConfig``.

A pass that measures something on data (outlier migration's factors) is given the first
calibration batches (``TransformData``), or what an earlier run recorded in the workspace;
``transform_steps`` are the records of what the passes measured, to append to the workspace so
that ``recover`` and ``--resume`` apply the same."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxq.calibration.data import Batch
from onnxq.calibration.layer_inputs import LayerInput, layer_inputs
from onnxq.config import QuantConfig
from onnxq.passes import GraphPass
from onnxq.transform.equalize import EqualizePass
from onnxq.transform.smoothing import OutlierMigrationPass
from onnxq.workspace.steps import SmoothingStep, StepRecord


@dataclasses.dataclass(frozen=True)
class TransformData:
    """The first calibration batches the data-driven passes measure on, read by ``read`` when a
    pass first needs them (not at all otherwise), and where the model's external weights lie."""

    read: Callable[[], Sequence[Batch]]
    external_folder: Path | None = None

    @functools.cached_property
    def batches(self) -> Sequence[Batch]:
        return self.read()

    def layer_inputs(self, model: ir.Model, nodes: list[ir.Node], sample_rows: int = 0) -> dict[ir.Node, LayerInput]:
        return layer_inputs(model, nodes, self.batches, external_folder=self.external_folder, sample_rows=sample_rows)


def float_exact_passes(config: QuantConfig, data: TransformData | None = None,
                       recorded: SmoothingStep | None = None) -> tuple[GraphPass, ...]:
    """The float-exact passes ``config`` asks for, in the order they run; those that measure use
    ``recorded`` when given, else ``data``."""
    passes: list[GraphPass] = [EqualizePass()] if config.equalize else []
    if config.smooth:
        factors = None if recorded is None else recorded.arrays()
        passes.append(OutlierMigrationPass(None if data is None else data.layer_inputs, factors, config.activations,
                                           config.per_channel))
    return tuple(passes)


def transform_steps(passes: tuple[GraphPass, ...]) -> list[StepRecord]:
    """What ``passes`` measured (once they ran), as workspace steps."""
    return [SmoothingStep.of(p.factors) for p in passes
            if isinstance(p, OutlierMigrationPass) and p.factors is not None]
