"""The conversion pipeline: load -> analyze -> calibrate -> plan -> rewrite -> check -> save,
with a workspace that makes it resumable, and ``recover`` to rebuild any recorded step."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import os
import types
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx_ir as ir

from onnxq._version import __version__
from onnxq.cleanup import clean_up
from onnxq.calibrate import CalibrationState, ProgressCallback, calibrate, create_session
from onnxq.config import QuantConfig
from onnxq.data import Batch, BatchSource, DataSource, model_inputs
from onnxq.errors import CalibrationDataError, ModelError, OutputError, WorkspaceError
from onnxq.evaluate import Fidelity, compare_models
from onnxq.model_io import (
    SINGLE_FILE_LIMIT,
    check_writable,
    external_data_folder,
    load_model,
    model_bytes,
    offloaded,
    tensor_bytes,
    upgrade_opset,
    write_atomically,
    write_with_external_data,
)
from onnxq.ops import rule_for
from onnxq.plan import QuantPlan, is_constant, plan_quantization
from onnxq.qdq import apply_qdq
from onnxq.inspect import inspect_model
from onnxq.qoperator import has_quantize_nodes, normalize_qdq, to_qoperator
from onnxq.fusion import COMPUTE_OPS, unfused_nodes
from onnxq.saturation import saturating_layers
from onnxq.signatures import graph_fingerprint, node_signatures, tensor_keys
from onnxq.workspace import Workspace

ModelInput = str | os.PathLike | onnx.ModelProto


@dataclasses.dataclass(frozen=True)
class OpCount:
    """How many nodes of one op type were quantized and how many stayed float."""

    quantized: int
    float: int


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` or ``recover`` produced: the output, sizes, per-op counts, notes,
    calibration samples, the workspace and its step the model was built from, fidelity."""

    output: Path
    float_bytes: int
    quantized_bytes: int
    op_counts: dict[str, OpCount]
    notes: tuple[str, ...]
    calibration_samples: int
    workspace: Path | None
    calibration_step: int | None
    fidelity: Fidelity | None = None

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes


def _prepare(proto: onnx.ModelProto, external_folder: Path | None = None) -> tuple[ir.Model, list[str]]:
    """The graph that is calibrated and rewritten: shapes and types inferred, then cleaned up
    as runtimes would (``onnxq.cleanup``). Tensors in external data files (in
    ``external_folder``) stay there, mapped into memory only when read."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # types then come from the calibration run instead
        pass
    model = ir.from_proto(proto)
    if external_folder is not None:
        ir.external_data.set_base_dir(model.graph, external_folder)
    return model, clean_up(model)


def _may_be_float(value: ir.Value | None) -> bool:
    return value is not None and not is_constant(value) and value.dtype in (None, ir.DataType.FLOAT)


def candidate_tensors(graph: ir.Graph) -> list[ir.Value]:
    """Every tensor whose range a quantization decision may need, in graph order."""
    values: dict[str, ir.Value] = {}
    for node in graph:
        rule = rule_for(node)
        if rule is None:
            continue
        slots = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
        if rule.weight_input is not None:
            slots = (*slots, rule.weight_input)
        for slot in slots:
            if slot < len(node.inputs) and _may_be_float(node.inputs[slot]):
                values[node.inputs[slot].name] = node.inputs[slot]
        for output in node.outputs:
            if _may_be_float(output):
                values[output.name] = output
    return list(values.values())


def _op_counts(graph: ir.Graph, plan: QuantPlan) -> dict[str, OpCount]:
    quantized, total = collections.Counter(), collections.Counter()
    for node in graph:
        total[node.op_type] += 1
        quantized[node.op_type] += node in plan.decisions
    return {op: OpCount(quantized[op], total[op] - quantized[op]) for op in sorted(total)}


def _check_interface(float_proto: onnx.ModelProto, proto: onnx.ModelProto) -> None:
    """Drop the shape annotations onnxq inferred for its own use (the model's own stay) and
    check that the graph inputs and outputs are the float model's."""
    declared = {info.name for info in float_proto.graph.value_info}
    kept = [info for info in proto.graph.value_info if info.name in declared]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    for kind in ("input", "output"):
        before = [v.name for v in getattr(float_proto.graph, kind)]
        after = [v.name for v in getattr(proto.graph, kind)]
        if before != after:
            raise RuntimeError(f"graph {kind}s changed from {before} to {after}")


def _check_output(float_proto: onnx.ModelProto, proto: onnx.ModelProto) -> bytes:
    """The serialized quantized model, after the checks every output must pass."""
    _check_interface(float_proto, proto)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    create_session(data, "the quantized model")
    return data


def _check_output_file(float_proto: onnx.ModelProto, path: Path) -> None:
    """``_check_output`` for a model written with external data: done by path, where the model
    file is rewritten without onnxq's own shape annotations."""
    proto = onnx.load(path, load_external_data=False)
    _check_interface(float_proto, proto)
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
    onnx.checker.check_model(path, full_check=True)
    create_session(path, "the quantized model")


@dataclasses.dataclass(frozen=True)
class _Written:
    """The quantized model as written: its size on disk, sha256, and bytes when held in memory."""

    size: int
    sha256: str
    data: bytes | None


def _write_output(loaded: _Loaded, model: ir.Model, path: Path, config: QuantConfig) -> _Written:
    """Check and write the quantized ``model``: one protobuf file, or with its tensors in
    ``OUTPUT.data`` per ``config.external_data`` (``auto``: when the float model had external
    data or the output would pass protobuf's 2 GB limit)."""
    size = tensor_bytes(model)
    if config.external_data == "never" and size > SINGLE_FILE_LIMIT:
        raise OutputError(
            f"the quantized model holds {size / 1e9:.1f} GB of tensors, over protobuf's 2 GB limit for one "
            "file; use --external-data auto or always to write its weights to OUTPUT.data"
        )
    external = config.external_data == "always" or (
        config.external_data == "auto" and (loaded.external_folder is not None or size > SINGLE_FILE_LIMIT)
    )
    if external:
        check = functools.partial(_check_output_file, loaded.float_proto)
        written, sha256 = write_with_external_data(model, path, check)
        return _Written(written, sha256, None)
    ir.external_data.load_to_model(model)  # weights still in the float model's data files come in
    data = _check_output(loaded.float_proto, ir.to_proto(model))
    write_atomically(data, path)
    return _Written(len(data), hashlib.sha256(data).hexdigest(), data)


def _model_bytes(model: ModelInput, proto: onnx.ModelProto) -> int:
    return proto.ByteSize() if isinstance(model, onnx.ModelProto) else model_bytes(Path(model), proto)


def _tensor_digest(tensor: ir.TensorProtocol) -> str:
    """sha256 of a tensor's bytes; external data is read from its file in blocks, not mapped."""
    digest = hashlib.sha256()
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.tofile(types.SimpleNamespace(write=digest.update))
        except (OSError, ValueError) as exc:  # a short file; onnx_ir refuses links out of the folder and hard links
            raise ModelError(
                f"cannot read the external data of tensor {tensor.name!r}: {exc}; keep the weights as plain "
                "files inside the model's folder"
            ) from exc
    else:
        digest.update(tensor.tobytes())
    return digest.hexdigest()


def _weights_fingerprint(graph: ir.Graph) -> str:
    digests = sorted(_tensor_digest(v.const_value) for v in graph.initializers.values())
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _batch_fingerprint(batch: Batch) -> str:
    digest = hashlib.sha256()
    for name in sorted(batch.feed):
        array = batch.feed[name]
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _manifest(graph: ir.Graph, config: QuantConfig, first_batch: Batch | None) -> dict:
    return {
        "onnxq_version": __version__,
        "model": {"structure": graph_fingerprint(graph), "weights": _weights_fingerprint(graph)},
        "config": config.result_options(),
        "data": None if first_batch is None else {"first_batch_sha256": _batch_fingerprint(first_batch)},
    }


def default_workspace(output: str | os.PathLike) -> Path:
    """``OUTPUT.onnxq/`` next to the output."""
    output = Path(output)
    return output.with_name(output.name + ".onnxq")


@dataclasses.dataclass(frozen=True)
class _Loaded:
    float_proto: onnx.ModelProto
    proto: onnx.ModelProto  # upgraded to opset >= 13
    model: ir.Model
    notes: tuple[str, ...]
    external_folder: Path | None = None  # where the weights the protos reference lie (models with external data)


def _load(model: ModelInput) -> _Loaded:
    float_proto = load_model(model)
    external_folder = external_data_folder(model, float_proto)
    proto, upgrade_note = upgrade_opset(float_proto)
    prepared, notes = _prepare(proto, external_folder)
    notes = ([upgrade_note] if upgrade_note else []) + notes
    return _Loaded(float_proto, proto, prepared, tuple(notes), external_folder)


def _plan(loaded: _Loaded, state: CalibrationState, config: QuantConfig, keep_float=frozenset()) -> QuantPlan:
    graph = loaded.model.graph
    by_key = state.ranges()
    ranges = {name: by_key[key] for name, key in tensor_keys(graph).items() if key in by_key}
    return plan_quantization(graph, ranges, config, keep_float)


@dataclasses.dataclass(frozen=True)
class _LayerChoices:
    """Per-layer decisions measured on a trial QDQ model, by node signature: layers that need
    7-bit weights on this CPU, and quantized nodes ONNX Runtime would not fuse."""

    reduced: tuple[str, ...] = ()
    unfused: tuple[str, ...] = ()

    def to_payload(self, calibration_step: int) -> dict:
        return {"calibration_step": calibration_step, "reduced": list(self.reduced), "unfused": list(self.unfused)}

    @classmethod
    def from_payload(cls, payload: dict) -> _LayerChoices:
        return cls(tuple(payload["reduced"]), tuple(payload["unfused"]))


def _measure_layers(
    loaded: _Loaded, state: CalibrationState, config: QuantConfig, feed: dict | None
) -> _LayerChoices:
    """Rewrite a fresh copy of the graph to QDQ (8-bit weights) and measure on it which layers
    saturate this CPU's kernels (on ``feed``; skipped without one) and which would not fuse."""
    if (config.reduce_range != "auto" or feed is None) and config.quantize_unfused:
        return _LayerChoices()  # nothing to measure
    model = _prepare(loaded.proto, loaded.external_folder)[0]
    keys = node_signatures(model.graph)
    plan = _plan(dataclasses.replace(loaded, model=model), state, config)
    apply_qdq(model, plan)
    with contextlib.ExitStack() as stack:
        folder = None
        if loaded.external_folder is not None:  # a big model goes to ONNX Runtime with its weights in a file
            folder = stack.enter_context(offloaded(model))
        reduced = []
        if config.reduce_range == "auto" and feed is not None:
            reduced = sorted(keys[node] for node in saturating_layers(model, plan, feed, folder))
        unfused = []
        if not config.quantize_unfused:
            by_name = {node.name: node for node in plan.decisions if node.op_type in COMPUTE_OPS}
            names = unfused_nodes(ir.to_proto(model), folder)
            unfused = sorted(keys[by_name[name]] for name in names if name in by_name)
    return _LayerChoices(tuple(reduced), tuple(unfused))


def _build(
    loaded: _Loaded, state: CalibrationState, config: QuantConfig, layers: _LayerChoices
) -> tuple[dict[str, OpCount], list[str]]:
    """Rewrite ``loaded.model`` to the quantized model from calibrated state. Layers in
    ``layers.reduced`` (every layer, for ``reduce_range="always"``) get 7-bit weights; nodes in
    ``layers.unfused`` stay float."""
    graph = loaded.model.graph
    keys = node_signatures(graph)
    notes = []
    unfused = set(layers.unfused)
    keep_float = frozenset(node for node in graph if keys[node] in unfused)
    if keep_float:
        ops = collections.Counter(node.op_type for node in keep_float)
        notes.append(
            f"kept float {len(keep_float)} node(s) that ONNX Runtime's CPU provider would not fuse into "
            f"integer kernels ({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))}); "
            "--quantize-unfused quantizes them anyway"
        )
    plan = _plan(loaded, state, config, keep_float)
    op_counts = _op_counts(graph, plan)
    if config.reduce_range == "always":
        reduced = {node for node, decision in plan.decisions.items() if decision.weight_slot is not None}
    else:
        wanted = set(layers.reduced)
        reduced = {node for node in plan.decisions if keys[node] in wanted}
    notes += plan.notes + apply_qdq(loaded.model, plan, reduced).notes
    if reduced and config.reduce_range == "auto":
        names = ", ".join(sorted(node.name or node.op_type for node in reduced)[:8])
        more = f" and {len(reduced) - 8} more" if len(reduced) > 8 else ""
        notes.append(
            f"7-bit weights on {len(reduced)} layer(s) whose 8-bit form this CPU's integer kernels "
            f"would saturate (no VNNI): {names}{more}"
        )
    if config.format == "qoperator":
        notes += to_qoperator(loaded.model)
    return op_counts, notes


def _convert_quantized(loaded: _Loaded, model: ModelInput, output_path: Path, config: QuantConfig) -> ConversionResult:
    """An already quantized model (QDQ from another tool, a QAT export, or onnxq): completed
    (int32 biases, quantized constants) and, for ``qoperator``, rewritten; no calibration."""
    notes = list(loaded.notes) + ["the model is already quantized: its scales are kept, no calibration"]
    notes += to_qoperator(loaded.model) if config.format == "qoperator" else normalize_qdq(loaded.model)
    written = _write_output(loaded, loaded.model, output_path, config)
    counts = inspect_model(output_path, fusion=False).op_counts()
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, loaded.float_proto),
        quantized_bytes=written.size,
        op_counts={op: OpCount(c["int8"], c["float"]) for op, c in counts.items()},
        notes=tuple(notes),
        calibration_samples=0,
        workspace=None,
        calibration_step=None,
    )


def convert(
    model: ModelInput,
    output: str | os.PathLike,
    calibration_data: DataSource | None,
    config: QuantConfig | None = None,
    *,
    eval_data: DataSource | None = None,
    workspace: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
) -> ConversionResult:
    """Quantize ``model`` to int8 (QDQ or QOperator form, per ``config.format``), calibrated on
    ``calibration_data``; write ``output``. A model that is already quantized is converted
    without calibration.

    Calibration is checkpointed in ``workspace`` (default ``OUTPUT.onnxq/``); ``resume=True``
    continues a run that was killed, and gives the same model as an uninterrupted run
    (``calibration_data`` may then be ``None`` if calibration had finished). ``eval_data``
    (same formats) measures fidelity after conversion, with top-1 accuracy when it has a
    ``label`` array. Bad input raises an ``OnnxqError`` subclass, and nothing is written then.
    """
    config = config or QuantConfig()
    loaded = _load(model)
    output_path = check_writable(output)
    if has_quantize_nodes(loaded.model):
        return _convert_quantized(loaded, model, output_path, config)
    inputs = model_inputs(loaded.proto)
    source = None
    if calibration_data is not None:
        source = BatchSource(calibration_data, inputs, config.batch_size, config.max_samples)
    elif not resume:
        raise CalibrationDataError("no calibration data; pass --calibration-data (an .npz file, a folder or a loader)")
    eval_source = None if eval_data is None else BatchSource(eval_data, inputs, config.batch_size)

    graph = loaded.model.graph
    manifest = _manifest(graph, config, None if source is None else source.first)
    workspace_path = Path(workspace) if workspace is not None else default_workspace(output_path)
    state = None
    notes = list(loaded.notes)
    if resume and not (workspace_path / "manifest.json").is_file():
        notes.append(f"nothing to resume in {workspace_path}: started a new run")
        resume = False
    if resume:
        space = Workspace.open(workspace_path)
        space.check_matches(manifest)
        step = space.latest("calibration")
        state = None if step is None else CalibrationState.from_payload(step.payload, config.percentile)
    else:
        space = Workspace.create(workspace_path, manifest)
    if state is None or not state.complete:
        if source is None:
            raise CalibrationDataError(
                f"calibration in {workspace_path} is not finished; pass the same --calibration-data to resume it"
            )
        keys = tensor_keys(graph)
        candidates = candidate_tensors(graph)
        float_ranks = {
            v.name: None if v.shape is None else len(v.shape) for v in candidates if v.dtype == ir.DataType.FLOAT
        }
        state, calibration_notes = calibrate(
            ir.to_proto(loaded.model),
            {v.name: keys[v.name] for v in candidates},
            float_ranks,
            source,
            config,
            state,
            checkpoint=lambda s: space.append("calibration", s.to_payload()),
            progress=progress,
            external_folder=loaded.external_folder,
        )
        notes += calibration_notes
    calibration_step = space.latest("calibration")
    if calibration_step is None:  # pragma: no cover - calibrate always records the final state
        raise WorkspaceError(f"workspace {workspace_path} lost its calibration state; start a new run")
    recorded = space.latest("layers") if resume else None
    if recorded is not None and recorded.payload["calibration_step"] == calibration_step.index:
        layers = _LayerChoices.from_payload(recorded.payload)
    else:
        layers = _measure_layers(loaded, state, config, None if source is None else source.first.feed)
        space.append("layers", layers.to_payload(calibration_step.index))
    op_counts, build_notes = _build(loaded, state, config, layers)
    written = _write_output(loaded, loaded.model, output_path, config)
    space.append("quantized", {"calibration_step": calibration_step.index, "output_sha256": written.sha256})
    fidelity = None
    if eval_source is not None:
        fidelity = compare_models(
            create_session(loaded.proto, "the float model", external_folder=loaded.external_folder),
            create_session(output_path if written.data is None else written.data, "the quantized model"),
            eval_source(),
        )
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, loaded.float_proto),
        quantized_bytes=written.size,
        op_counts=op_counts,
        notes=tuple(notes + build_notes),
        calibration_samples=state.samples_seen,
        workspace=workspace_path,
        calibration_step=calibration_step.index,
        fidelity=fidelity,
    )


def recover(
    model: ModelInput,
    workspace: str | os.PathLike,
    output: str | os.PathLike,
    index: int | None = None,
    external_data: str = "auto",
) -> ConversionResult:
    """Rebuild the quantized model of recorded step ``index`` (default: the last calibration
    step) from the float model and the workspace alone, without calibrating; ``external_data``
    as in ``QuantConfig``."""
    loaded = _load(model)
    output_path = check_writable(output)
    space = Workspace.open(workspace)
    config = QuantConfig(**space.manifest["config"], external_data=external_data)
    space.check_matches(_manifest(loaded.model.graph, config, None) | {"data": space.manifest.get("data")})
    step = space.latest("calibration") if index is None else space.step(index)
    if step is None:
        raise WorkspaceError(f"workspace {workspace} has no intact calibration step to recover from")
    if step.kind == "quantized":
        step = space.step(step.payload["calibration_step"])
    state = CalibrationState.from_payload(step.payload, config.percentile)
    recorded = space.latest("layers")
    layers = _measure_layers(loaded, state, config, None) if recorded is None else _LayerChoices.from_payload(recorded.payload)
    op_counts, build_notes = _build(loaded, state, config, layers)
    written = _write_output(loaded, loaded.model, output_path, config)
    partial = [] if state.complete else [f"step {step.index} holds partial calibration (pass {state.pass_index + 1} of {len(state.passes)}, {state.samples_done} samples in)"]
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, loaded.float_proto),
        quantized_bytes=written.size,
        op_counts=op_counts,
        notes=tuple(list(loaded.notes) + partial + build_notes),
        calibration_samples=state.samples_seen,
        workspace=Path(workspace),
        calibration_step=step.index,
    )
