"""Learned weight rounding (GPTQ, Frantar et al. 2022): each weight rounded up or down so that
the layer's output on calibration data, not each weight alone, stays close to float. Rules:
1. The layers are the Conv (2-D or 1-D), Gemm and MatMul of the main graph whose constant
   weight nothing else reads (``onnxq.calibration.layer_inputs``, rule 1).
2. A layer's weight is seen as rows (output channels, per group) of ``K`` columns, the inputs
   of its dot products. It is quantized with the scale the rewrite computes for it
   (``weight_scale``: per output channel or per tensor, 7 bits on the layers that get them),
   one column at a time, in order of decreasing input energy; the rounding error of each column
   is spread over the columns not rounded yet through the inverse of the Hessian ``X^T X`` of
   the layer's input on the first calibration batches (damped by ``DAMPING`` of its mean
   diagonal), which greedily minimises ``||X W - X Q||^2``. Numpy only.
3. Time and memory are bounded: a layer with more than ``MAX_HESSIAN_COLUMNS`` columns keeps
   round-to-nearest; Hessians are gathered for at most ``HESSIAN_BUDGET_BYTES`` at a time.
4. The integers and the scale they were rounded for are recorded by node key
   (``LayersStep.rounded``), so recover and resume write the same bytes; the rewrite uses them
   only where it computes that very scale (not on a scale widened for an int32 bias).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import BatchSource
from onnxq.calibration.layer_inputs import (
    MAX_HESSIAN_COLUMNS,
    hessian_columns,
    is_weighted_layer,
    layer_input_batches,
    layer_inputs,
)
from onnxq.config import QuantConfig
from onnxq.graph import constant_array
from onnxq.load.prepare import LoadedModel
from onnxq.ops import weight_axis
from onnxq.rewrite.quant_math import REDUCED_WEIGHT_QMAX, WEIGHT_QMAX, weight_scale
from onnxq.workspace.steps import encode_array

DAMPING = 0.01
HESSIAN_BUDGET_BYTES = 256 << 20
_BLOCK = 128  # columns rounded between two updates of the rest (the lazy batch update)


def weight_rows(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """A layer's weight as ``[groups, outputs per group, K]`` (rule 2), columns in the order of
    its input rows (``layer_inputs.layer_rows``)."""
    if node.op_type == "Conv":
        groups = node.attributes["group"].as_int() if "group" in node.attributes else 1
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    transposed = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
    return (weight if transposed else weight.T)[None]


def _from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``weight_rows`` undone."""
    if node.op_type == "Conv":
        return rows.reshape(shape)
    transposed = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
    return rows[0] if transposed else rows[0].T


def gptq_round(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Integers for ``weight`` (``[outputs, K]``) with ``scale`` (``[outputs, 1]`` or scalar)
    that keep ``X weight^T`` close on inputs whose ``X^T X`` is ``hessian`` (rule 2)."""
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    scale = np.broadcast_to(np.asarray(scale, np.float64), (w.shape[0], 1))
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += np.eye(len(h)) * DAMPING * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    # the inverse Hessian's Cholesky factor; float32 halves the time of these O(K^3) steps, and
    # the damping keeps them well conditioned
    upper = np.linalg.cholesky(np.linalg.inv(h.astype(np.float32))).T.astype(np.float64)
    q = np.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, _BLOCK):
        end = min(start + _BLOCK, columns)
        block, errors = w[:, start:end].copy(), np.zeros((w.shape[0], end - start))
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            q[:, start + i] = np.clip(np.rint(block[:, i] / scale[:, 0]), -qmax, qmax)
            error = (block[:, i] - q[:, start + i] * scale[:, 0]) / inverse[i, i]
            block[:, i:] -= np.outer(error, inverse[i, i:])
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    rounded = np.empty_like(q)
    rounded[:, order] = q
    return rounded.astype(np.int8)


def _layers(graph: ir.Graph) -> list[ir.Node]:
    """The layers of rule 1 (rule 3: those small enough for a Hessian)."""
    return [node for node in graph if is_weighted_layer(node) and len(node.inputs[1].uses()) == 1
            and hessian_columns(node) <= MAX_HESSIAN_COLUMNS]


def _chunks(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """``nodes`` in groups whose Hessians fit in ``HESSIAN_BUDGET_BYTES`` together (rule 3)."""
    chunks: list[list[ir.Node]] = [[]]
    used = 0
    for node in nodes:
        groups = weight_rows(node, constant_array(node.inputs[1])).shape[0]
        size = groups * hessian_columns(node) ** 2 * 8
        if chunks[-1] and used + size > HESSIAN_BUDGET_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(node)
        used += size
    return [chunk for chunk in chunks if chunk]


def round_weights(loaded: LoadedModel, config: QuantConfig, reduced: set[str], source: BatchSource) -> dict[str, dict]:
    """The learned integers of every layer of rule 1 and their scales (``encode_array``), by
    node key; ``reduced``: the keys of the layers that get 7-bit weights."""
    model = loaded.fresh()
    keys = loaded.keys.for_copy(model.graph)
    batches = layer_input_batches(source)
    rounded: dict[str, dict] = {}
    for chunk in _chunks(_layers(model.graph)):
        stats = layer_inputs(model, chunk, batches, hessian=True, external_folder=loaded.external_folder)
        for node in chunk:
            seen = stats.get(node)
            if seen is None or seen.hessian is None:
                continue
            weight = constant_array(node.inputs[1])
            qmax = REDUCED_WEIGHT_QMAX if config.reduce_range == "always" or keys[node] in reduced else WEIGHT_QMAX
            axis = weight_axis(node, weight.ndim) if config.per_channel else None
            scale = weight_scale(weight, axis, qmax)
            rows = weight_rows(node, weight)
            row_scale = scale if scale.ndim == 0 else scale.reshape(rows.shape[0], rows.shape[1], 1)
            values = np.stack([gptq_round(rows[g], seen.hessian[g], row_scale if scale.ndim == 0 else row_scale[g], qmax)
                               for g in range(rows.shape[0])])
            rounded[keys[node]] = {"values": encode_array(_from_rows(node, values, weight.shape)),
                                   "scale": encode_array(scale)}
    return rounded
