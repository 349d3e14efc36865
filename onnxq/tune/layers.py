"""Per-layer choices measured once after calibration: sentinel tensors, the ranges chosen by
their downstream error (``--method auto``), tensors whose 8-bit error is poor, the mean int8
shift of each layer's output (bias correction), layers that need 7-bit weights on this CPU,
quantized nodes ONNX Runtime would not fuse, and (``--rounding gptq``) learned integer weights."""

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
from onnxq.rewrite.build import plan_for_state, reduced_layers
from onnxq.rewrite.plan import QuantPlan
from onnxq.rewrite.qdq import QdqPass
from onnxq.tune.bias_correction import measure_bias_shifts
from onnxq.tune.fusion import unfused_nodes
from onnxq.tune.range_choice import choose_ranges
from onnxq.tune.rounding import round_weights
from onnxq.tune.saturation import MEASURED_BATCHES, saturating_layers
from onnxq.tune.tensor_error import poor_tensors, tensor_errors
from onnxq.workspace.steps import LayersStep


def measure_layers(
    loaded: LoadedModel, state: CalibrationState, config: QuantConfig, source: BatchSource | None,
    calibration_step: int,
) -> LayersStep:
    """Find sentinel-dominated tensors (looking at calibration batches when ``source`` is given)
    and, with data, the ranges chosen by their downstream error (``--method auto``,
    ``onnxq.tune.range_choice``) and the tensors whose 8-bit error is poor (``onnxq.tune.tensor_error``);
    then rewrite a fresh copy of the graph to QDQ (8-bit weights) and measure on it which layers
    saturate this CPU's kernels (on the first batches; skipped without data) and which would not
    fuse; last, with data and ``config.bias_correction``, each layer's int8 shift with the weights
    it will have (``onnxq.tune.bias_correction``)."""
    sentinel = tuple(sentinel_tensors(loaded, state, source))
    model = loaded.fresh()
    plan = plan_for_state(model.graph, loaded.keys.tensors, state, config, sentinel)
    poor: tuple[str, ...] = ()
    ranges: dict[str, list[float]] = {}
    if source is not None:
        if config.method == "auto":
            ranges = _chosen_ranges(loaded, model.graph, plan, state, config, source)
            plan = plan_for_state(model.graph, loaded.keys.tensors, state, config, sentinel, chosen=ranges)
        errors = tensor_errors(loaded, model.graph, plan, source)
        poor = tuple(sorted(loaded.keys.tensors[name] for name in poor_tensors(errors)))
        if poor:
            plan = plan_for_state(model.graph, loaded.keys.tensors, state, config, sentinel + poor, chosen=ranges)
    saturation_measured = config.reduce_range == "auto" and source is not None
    feeds = [batch.feed for batch in source.first_batches(MEASURED_BATCHES)] if saturation_measured else None
    reduced, unfused = (), ()
    if feeds is not None or not config.quantize_unfused:
        reduced, unfused = _saturation_and_fusion(loaded, model, plan, config, feeds)
    shifts = {}
    if source is not None and config.bias_correction:
        measured = loaded.fresh()
        keys = loaded.keys.for_copy(measured.graph)
        measured_plan = plan_for_state(measured.graph, loaded.keys.tensors, state, config, sentinel + poor,
                                       chosen=ranges)
        shifts = measure_bias_shifts(loaded, measured, measured_plan, source, keys,
                                     reduced_layers(measured_plan, keys, config, reduced))
    return _with_rounding(LayersStep(calibration_step, reduced, unfused, sentinel, poor, ranges, shifts),
                          loaded, config, source)


def _saturation_and_fusion(loaded: LoadedModel, model: ir.Model, plan: QuantPlan, config: QuantConfig,
                           feeds: list[dict] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The layers that need 7-bit weights and the quantized nodes ONNX Runtime would not fuse,
    by key, measured on ``model`` rewritten to QDQ by ``plan``."""
    keys = loaded.keys.for_copy(model.graph)
    QdqPass(plan)(model)
    with contextlib.ExitStack() as stack:
        folder = None
        if loaded.offload:  # a big model goes to ONNX Runtime with its weights in a file
            folder = stack.enter_context(offloaded(model))
        reduced = []
        if feeds is not None:
            reduced = sorted(keys[node] for node in saturating_layers(model, plan, feeds, folder))
        unfused = []
        if not config.quantize_unfused:
            by_name = {node.name: node for node in plan.decisions if node.op_type in FUSION_CHECKED}
            names = unfused_nodes(ir.to_proto(model), folder)
            unfused = sorted(keys[by_name[name]] for name in names if name in by_name)
    return tuple(reduced), tuple(unfused)


def _chosen_ranges(loaded: LoadedModel, graph: ir.Graph, plan: QuantPlan, state: CalibrationState,
                   config: QuantConfig, source: BatchSource) -> dict[str, list[float]]:
    """The ranges ``onnxq.tune.range_choice`` chooses, by tensor key (as ``LayersStep.ranges`` holds them)."""
    by_key = state.ranges()
    calibrated = {name: by_key[key] for name, key in loaded.keys.tensors.items() if key in by_key}
    chosen = choose_ranges(loaded, graph, plan, calibrated, config, source)
    return {loaded.keys.tensors[name]: [float(low), float(high)] for name, (low, high) in sorted(chosen.items())}


def _with_rounding(layers: LayersStep, loaded: LoadedModel, config: QuantConfig, source: BatchSource | None) -> LayersStep:
    """``layers`` with the learned weight rounding of ``--rounding gptq`` (``onnxq.tune.rounding``;
    it needs data: none without)."""
    if config.rounding != "gptq" or source is None:
        return layers
    return dataclasses.replace(layers, rounded=round_weights(loaded, config, set(layers.reduced), source))
