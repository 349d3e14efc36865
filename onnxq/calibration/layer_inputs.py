"""Statistics of the inputs of weighted layers on the first calibration batches, for the passes
that move or round weights by what the layer really reads (``onnxq.transform.smoothing``,
``onnxq.tune.rounding``). Rules:
1. A layer is a Conv (2-D or 1-D), a Gemm or a MatMul with a constant weight; its input is its
   first input, seen as rows of ``K`` columns: MatMul's and Gemm's last axis (Gemm's first with
   ``transA``), and a Conv's patches (im2col, one row per output position and group: the
   columns in the order of the weight's ``[C/group, kernel...]``).
2. The float model runs on ``LAYER_INPUT_SAMPLES`` samples with the inputs exposed; per input
   channel (a Conv's: per input feature map) the largest ``|x|`` is kept and, when asked, the
   Hessian ``X^T X`` of the rows (per group for a Conv), summed in float64, and, when asked, a
   sample of the rows of a MatMul or Gemm (evenly spaced, up to a number per batch).
3. Time and memory are bounded: a layer with more than ``MAX_HESSIAN_COLUMNS`` columns gets no
   Hessian, and a Hessian takes at most ``MAX_ROWS_PER_BATCH`` rows of a batch, evenly spaced.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.calibration.data import Batch, BatchSource
from onnxq.calibration.holdout import first_samples
from onnxq.graph import is_constant, with_outputs
from onnxq.runtime import create_session

LAYER_INPUT_SAMPLES = 16
MAX_HESSIAN_COLUMNS = 4608  # 4608^2 float64 = 170 MB: 512 channels of 3x3 patches
MAX_ROWS_PER_BATCH = 4096  # rows of one batch a Hessian takes, evenly spaced (a Conv's output positions)
_ROWS_PER_PRODUCT = 1 << 16  # rows multiplied at once into a Hessian


def layer_input_batches(source: BatchSource) -> list[Batch]:
    """The first calibration batches (``LAYER_INPUT_SAMPLES`` samples), read so that
    calibration still sees every batch: a one-shot source gives only its first batch."""
    return [source.first] if source.one_shot else first_samples(source(), LAYER_INPUT_SAMPLES)


@dataclasses.dataclass
class LayerInput:
    """What one layer read: per input channel ``max|x|``, the Hessian ``X^T X`` of its rows
    (``[groups, K, K]``, ``None`` when not asked or too big), the number of rows, and the
    sampled rows (``[rows, K]``, ``None`` when not asked)."""

    channel_max: np.ndarray
    hessian: np.ndarray | None
    rows: int = 0
    sample: np.ndarray | None = None


def is_weighted_layer(node: ir.Node) -> bool:
    """A Conv (2-D or 1-D), Gemm or MatMul whose weight (second input) is a constant (rule 1)."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return False
    rank = len(node.inputs[1].const_value.shape)
    return rank == 2 if node.op_type != "Conv" else rank in (3, 4)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _conv_pads(node: ir.Node, spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dilations) -> list[int]:
    """Begin and end pads per spatial axis (ONNX order), ``auto_pad`` resolved."""
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(_attr(node, "pads", [0] * 2 * len(spatial)))
        return [0] * 2 * len(spatial) if auto_pad == "VALID" else pads
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def conv_patches(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """A Conv's input as rows of patches, ``[rows, groups, C/group * prod(kernel)]`` (rule 1)."""
    weight_shape = tuple(node.inputs[1].const_value.shape)
    if x.ndim == 3:  # 1-D: a 2-D convolution of height 1
        x = x[:, :, None, :]
    kernel = weight_shape[2:] if len(weight_shape) == 4 else (1, weight_shape[2])
    one_d = len(weight_shape) == 3
    strides = ([1] if one_d else []) + list(_attr(node, "strides", [1] * (len(weight_shape) - 2)))
    dilations = ([1] if one_d else []) + list(_attr(node, "dilations", [1] * (len(weight_shape) - 2)))
    pads = _conv_pads(node, x.shape[2 + one_d:], kernel[one_d:], strides[one_d:], dilations[one_d:])
    if one_d:
        pads = [0, pads[0], 0, pads[1]]
    groups = int(_attr(node, "group", 1))
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # [N, C, OH, OW, kh, kw]
    n, _, out_h, out_w = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * out_h * out_w, groups, -1)


def layer_rows(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The input of a weighted layer as ``[rows, groups, K]`` (one group but for grouped Convs)."""
    if node.op_type == "Conv":
        return conv_patches(node, x)
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        x = x.T
    return x.reshape(-1, 1, x.shape[-1])


def _channel_max(node: ir.Node, x: np.ndarray) -> np.ndarray:
    axis = 1 if node.op_type == "Conv" else 0 if node.op_type == "Gemm" and _attr(node, "transA", 0) else x.ndim - 1
    others = tuple(i for i in range(x.ndim) if i != axis)
    return np.abs(x).max(axis=others).astype(np.float64)


def hessian_columns(node: ir.Node) -> int:
    """Columns ``K`` of a weighted layer's rows (per group for a Conv)."""
    shape = tuple(node.inputs[1].const_value.shape)
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    transposed = node.op_type == "Gemm" and _attr(node, "transB", 0)
    return shape[1] if transposed else shape[0]


def layer_inputs(model: ir.Model, nodes: Iterable[ir.Node], batches: Iterable[Batch], hessian: bool = False,
                 external_folder: Path | None = None, sample_rows: int = 0) -> dict[ir.Node, LayerInput]:
    """Statistics of the inputs of ``nodes`` (weighted layers of ``model``'s main graph) on
    ``batches``, run through the float ``model`` (rules 2-3), with up to ``sample_rows`` rows
    of each batch kept; nodes whose input never arrived are left out."""
    nodes = list(nodes)
    names = sorted({node.inputs[0].name for node in nodes})
    if not names:
        return {}
    proto = with_outputs(ir.to_proto(model), names)
    session = create_session(proto, "the float model", external_folder=external_folder)
    stats: dict[ir.Node, LayerInput] = {}
    for batch in batches:
        values = dict(zip(names, session.run(names, batch.feed)))
        for node in nodes:
            x = values[node.inputs[0].name].astype(np.float32, copy=False)
            _update(stats, node, x, hessian and hessian_columns(node) <= MAX_HESSIAN_COLUMNS, sample_rows)
    return stats


def _evenly(rows: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``rows``, evenly spaced."""
    return rows[::max(1, -(-len(rows) // count))]


def _update(stats: dict[ir.Node, LayerInput], node: ir.Node, x: np.ndarray, hessian: bool, sample_rows: int) -> None:
    current = stats.get(node)
    channel_max = _channel_max(node, x)
    if current is None:
        current = stats[node] = LayerInput(channel_max, None)
    else:
        np.maximum(current.channel_max, channel_max, out=current.channel_max)
    if sample_rows and node.op_type != "Conv":
        sample = _evenly(layer_rows(node, x)[:, 0], sample_rows)
        current.sample = sample.copy() if current.sample is None else np.concatenate([current.sample, sample])
    if not hessian:
        return
    rows = _evenly(layer_rows(node, x), MAX_ROWS_PER_BATCH)
    if current.hessian is None:
        current.hessian = np.zeros((rows.shape[1], rows.shape[2], rows.shape[2]), np.float64)
    for start in itertools.count(0, _ROWS_PER_PRODUCT):
        block = np.ascontiguousarray(rows[start:start + _ROWS_PER_PRODUCT].transpose(1, 0, 2), dtype=np.float32)
        if not block.shape[1]:
            break
        current.hessian += np.matmul(block.transpose(0, 2, 1), block).astype(np.float64)
    current.rows += rows.shape[0]
