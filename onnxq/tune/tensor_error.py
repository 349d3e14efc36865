"""Tensors whose own 8-bit error is poor, measured on calibration data, whatever op made them.

Export styles spell the same computation many ways (a layer norm as one op, as ReduceMean
chains, as ReduceSum times 1/n with Reciprocal(Sqrt(...)); masks as Add, Where or Mul with
huge constants): rules written for one spelling miss the next. Measuring does not. Rules:
1. Every activation tensor the plan quantizes (of the main graph) is quantized and dequantized
   with its planned scale and zero point on the first ``MEASURED_BATCHES`` calibration batches,
   against its float values.
2. A tensor whose SQNR is under ``POOR_TENSOR_DB`` is left float, with the nodes that write and
   read it: its 8-bit form has lost what it carries (a variance whose range is set by one row, a
   reciprocal of a near-zero spread, a tensor with a few huge outliers).
3. Without calibration data nothing is measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import BatchSource
from onnxq.graph import is_constant, owning_graph, with_outputs
from onnxq.load.prepare import LoadedModel
from onnxq.report.evaluate import ErrorAccumulator
from onnxq.rewrite.plan import QuantPlan
from onnxq.rewrite.quant_math import QuantParams, dequantize, quantize

POOR_TENSOR_DB = 12.0  # the error's RMS is a quarter of the signal's
MEASURED_BATCHES = 4


def activation_params(graph: ir.Graph, plan: QuantPlan) -> dict[str, QuantParams]:
    """The params of the main-graph activation tensors ``plan`` quantizes, by name."""
    return {value.name: p for value, p in plan.params.items() if not is_constant(value) and owning_graph(value) is graph}


def float_values(loaded: LoadedModel, names: list[str], source: BatchSource,
                 batches: int = MEASURED_BATCHES) -> Iterator[dict[str, np.ndarray]]:
    """The float values of the tensors ``names`` on each of the first ``batches`` calibration batches."""
    session = loaded.float_session(with_outputs(loaded.cleaned, names))
    for batch in itertools.islice(source(), batches):
        yield dict(zip(names, session.run(names, batch.feed)))


def fake_quantized(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """``values`` quantized and dequantized with ``params``, as a QDQ pair computes them."""
    return dequantize(quantize(values, params), params)


def tensor_errors(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, source: BatchSource) -> dict[str, float]:
    """SQNR in dB of each main-graph activation tensor of ``plan`` (by name) under its own
    quantization, on the first calibration batches (rule 1)."""
    params = activation_params(graph, plan)
    if not params:
        return {}
    names = sorted(params)
    errors = {name: ErrorAccumulator() for name in names}
    with np.errstate(invalid="ignore"):  # NaN activations (bad weights are refused later) are not poor tensors
        for values in float_values(loaded, names, source):
            for name in names:
                errors[name].update(values[name], fake_quantized(values[name], params[name]))
    return {name: errors[name].result(name).sqnr_db for name in names}


def poor_tensors(errors: dict[str, float]) -> list[str]:
    """The tensors of rule 2, by name."""
    return sorted(name for name, sqnr in errors.items() if sqnr < POOR_TENSOR_DB)
