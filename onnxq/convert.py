"""The conversion pipeline: load -> analyze -> calibrate -> plan -> rewrite -> check -> save."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxq.calibrate import ProgressCallback, collect_ranges, create_session
from onnxq.config import QuantConfig
from onnxq.data import Batch, DataSource, InputSpec, iter_batches, model_inputs
from onnxq.evaluate import Fidelity, compare_models
from onnxq.model_io import check_writable, load_model, upgrade_opset, write_atomically
from onnxq.ops import rule_for
from onnxq.plan import QuantPlan, is_constant, plan_quantization
from onnxq.qdq import apply_qdq


@dataclasses.dataclass(frozen=True)
class OpCount:
    """How many nodes of one op type were quantized and how many stayed float."""

    quantized: int
    float: int


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` produced: the output file, sizes, per-op counts, notes, fidelity."""

    output: Path
    float_bytes: int
    quantized_bytes: int
    op_counts: dict[str, OpCount]
    notes: tuple[str, ...]
    calibration_samples: int
    fidelity: Fidelity | None = None

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes


def _validated(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Pull the first batch now, so bad data is reported before any work starts."""
    first = next(batches)
    return itertools.chain([first], batches)


def _prepare(proto: onnx.ModelProto) -> ir.Model:
    """The graph that is calibrated and rewritten: shapes and types inferred, constants lifted."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # types then come from the calibration run instead
        pass
    model = ir.from_proto(proto)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return model


def _may_be_float(value: ir.Value | None) -> bool:
    return value is not None and not is_constant(value) and value.dtype in (None, ir.DataType.FLOAT)


def candidate_tensors(graph: ir.Graph) -> list[str]:
    """Every tensor whose range a quantization decision may need, in graph order."""
    names: dict[str, None] = {}
    for node in graph:
        rule = rule_for(node)
        if rule is None:
            continue
        slots = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
        if rule.weight_input is not None:
            slots = (*slots, rule.weight_input)
        for slot in slots:
            if slot < len(node.inputs) and _may_be_float(node.inputs[slot]):
                names[node.inputs[slot].name] = None
        for output in node.outputs:
            if _may_be_float(output):
                names[output.name] = None
    return list(names)


def _op_counts(graph: ir.Graph, plan: QuantPlan) -> dict[str, OpCount]:
    quantized, total = collections.Counter(), collections.Counter()
    for node in graph:
        total[node.op_type] += 1
        quantized[node.op_type] += node in plan.decisions
    return {op: OpCount(quantized[op], total[op] - quantized[op]) for op in sorted(total)}


def _check_output(float_proto: onnx.ModelProto, proto: onnx.ModelProto) -> bytes:
    """The serialized quantized model, after the checks every output must pass.

    Shape annotations that onnxq inferred for its own use are dropped; the model's own stay.
    """
    declared = {info.name for info in float_proto.graph.value_info}
    kept = [info for info in proto.graph.value_info if info.name in declared]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    onnx.checker.check_model(proto, full_check=True)
    for kind in ("input", "output"):
        before = [v.name for v in getattr(float_proto.graph, kind)]
        after = [v.name for v in getattr(proto.graph, kind)]
        if before != after:
            raise RuntimeError(f"graph {kind}s changed from {before} to {after}")
    data = proto.SerializeToString()
    create_session(data, "the quantized model")
    return data


def _model_bytes(model: str | os.PathLike | onnx.ModelProto, proto: onnx.ModelProto) -> int:
    return proto.ByteSize() if isinstance(model, onnx.ModelProto) else Path(model).stat().st_size


def convert(
    model: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike,
    calibration_data: DataSource,
    config: QuantConfig | None = None,
    *,
    eval_data: DataSource | None = None,
    progress: ProgressCallback | None = None,
) -> ConversionResult:
    """Quantize ``model`` to int8 QDQ form, calibrated on ``calibration_data``; write ``output``.

    ``eval_data`` (optional, same format) is used after conversion to measure fidelity (and
    top-1 accuracy when it has a ``label`` array). Raises an ``OnnxqError`` subclass for bad
    input; nothing is written then.
    """
    config = config or QuantConfig()
    float_proto = load_model(model)
    output_path = check_writable(output)
    proto, upgrade_note = upgrade_opset(float_proto)
    inputs: list[InputSpec] = model_inputs(proto)
    batches = _validated(iter_batches(calibration_data, inputs, config.batch_size, config.max_samples))
    eval_batches = None
    if eval_data is not None:
        eval_batches = _validated(iter_batches(eval_data, inputs, config.batch_size))

    ir_model = _prepare(proto)
    samples = 0

    def count(n: int) -> None:
        nonlocal samples
        samples += n
        if progress is not None:
            progress(n)

    ranges = collect_ranges(ir.to_proto(ir_model), candidate_tensors(ir_model.graph), batches, count)
    plan = plan_quantization(ir_model.graph, ranges, config)
    op_counts = _op_counts(ir_model.graph, plan)
    rewrite = apply_qdq(ir_model, plan)
    data = _check_output(float_proto, ir.to_proto(ir_model))
    write_atomically(data, output_path)

    fidelity = None
    if eval_batches is not None:
        fidelity = compare_models(
            create_session(proto, "the float model"), create_session(data, "the quantized model"), eval_batches
        )
    notes = ([upgrade_note] if upgrade_note else []) + plan.notes + rewrite.notes
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, float_proto),
        quantized_bytes=len(data),
        op_counts=op_counts,
        notes=tuple(notes),
        calibration_samples=samples,
        fidelity=fidelity,
    )
