"""Graph passes: one job each, one protocol, composed in plain lists.

A pass is an ``onnx_ir`` in-place pass (``GraphPass``) whose ``call(model)`` rewrites the model
and returns a ``PassResult``: whether it changed the model and notes a user should read.
``run_passes`` applies a list of passes in order and gathers their notes. The pipelines:
``onnxq.analysis.cleanup.CLEANUP`` (before calibration) and the rewrite of one quantized model
in ``onnxq.rewrite.build`` (QDQ, then fp16 islands, then QOperator form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """``onnx_ir``'s pass result (the model, whether it was modified) with notes for the user."""

    notes: list[str] = dataclasses.field(default_factory=list)


class GraphPass(ir.passes.InPlacePass):
    """A rewrite of a model in place, with one job; its ``call(model)`` returns a ``PassResult``."""


def run_passes(model: ir.Model, passes: Iterable[GraphPass]) -> list[str]:
    """Apply ``passes`` to ``model`` in order; returns their notes."""
    notes: list[str] = []
    for graph_pass in passes:
        notes += graph_pass(model).notes
    return notes
