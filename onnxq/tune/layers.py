"""Per-layer choices measured once after calibration: sentinel tensors, tensors whose own 8-bit
error is poor, layers that need 7-bit weights on this CPU, quantized nodes ONNX Runtime
would not fuse, and (``--rounding gptq``) learned integer weights."""

from __future__ import annotations

import contextlib
import dataclasses

import onnx_ir as ir

from onnxq.analysis.sentinels import sentinel_tensors
from onnxq.calibration.data import BatchSource
from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig
from onnxq.files import offloaded
from onnxq.load.prepare import LoadedModel
from onnxq.ops import FUSION_CHECKED
from onnxq.rewrite.build import plan_for_state
from onnxq.rewrite.qdq import QdqPass
from onnxq.tune.fusion import unfused_nodes
from onnxq.tune.rounding import round_weights
from onnxq.tune.saturation import saturating_layers
from onnxq.tune.tensor_error import poor_tensors, tensor_errors
from onnxq.workspace.steps import LayersStep


def measure_layers(
    loaded: LoadedModel, state: CalibrationState, config: QuantConfig, source: BatchSource | None,
    calibration_step: int,
) -> LayersStep:
    """Find sentinel-dominated tensors (looking at calibration batches when ``source`` is given)
    and, with data, the tensors whose own 8-bit error is poor (``onnxq.tune.tensor_error``);
    then rewrite a fresh copy of the graph to QDQ (8-bit weights) and measure on it which layers
    saturate this CPU's kernels (on the first batch; skipped without data) and which would not fuse."""
    sentinel = tuple(sentinel_tensors(loaded, state, source))
    model = loaded.fresh()
    plan = plan_for_state(model.graph, loaded.keys.tensors, state, config, sentinel)
    poor: tuple[str, ...] = ()
    if source is not None:
        errors = tensor_errors(loaded, model.graph, plan, source)
        poor = tuple(sorted(loaded.keys.tensors[name] for name in poor_tensors(errors)))
        if poor:
            plan = plan_for_state(model.graph, loaded.keys.tensors, state, config, sentinel + poor)
    feed = None if source is None else source.first.feed
    if (config.reduce_range != "auto" or feed is None) and config.quantize_unfused:
        return _with_rounding(LayersStep(calibration_step, (), (), sentinel, poor), loaded, config, source)
    keys = loaded.keys.for_copy(model.graph)
    QdqPass(plan)(model)
    with contextlib.ExitStack() as stack:
        folder = None
        if loaded.offload:  # a big model goes to ONNX Runtime with its weights in a file
            folder = stack.enter_context(offloaded(model))
        reduced = []
        if config.reduce_range == "auto" and feed is not None:
            reduced = sorted(keys[node] for node in saturating_layers(model, plan, feed, folder))
        unfused = []
        if not config.quantize_unfused:
            by_name = {node.name: node for node in plan.decisions if node.op_type in FUSION_CHECKED}
            names = unfused_nodes(ir.to_proto(model), folder)
            unfused = sorted(keys[by_name[name]] for name in names if name in by_name)
    return _with_rounding(LayersStep(calibration_step, tuple(reduced), tuple(unfused), sentinel, poor),
                          loaded, config, source)


def _with_rounding(layers: LayersStep, loaded: LoadedModel, config: QuantConfig, source: BatchSource | None) -> LayersStep:
    """``layers`` with the learned weight rounding of ``--rounding gptq`` (``onnxq.tune.rounding``;
    it needs data: none without)."""
    if config.rounding != "gptq" or source is None:
        return layers
    return dataclasses.replace(layers, rounded=round_weights(loaded, config, set(layers.reduced), source))
