"""The conversion pipeline: load -> analyze -> calibrate -> plan -> rewrite -> check -> save,
with a workspace that makes it resumable, and ``recover`` to rebuild any recorded step."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir
import onnxruntime as ort

from onnxq._version import __version__
from onnxq.cleanup import clean_up
from onnxq.calibrate import CalibrationState, ProgressCallback, calibrate, create_session
from onnxq.config import QuantConfig
from onnxq.data import Batch, BatchSource, DataSource, model_inputs
from onnxq.errors import CalibrationDataError, ConfigError, ModelError, OnnxqError, OutputError, WorkspaceError
from onnxq.evaluate import Fidelity, compare_models
from onnxq.model_io import (
    SINGLE_FILE_LIMIT,
    check_writable,
    external_data_folder,
    external_data_path,
    fit_opset,
    load_model,
    model_bytes,
    offloaded,
    tensor_bytes,
    write_atomically,
    write_with_external_data,
)
from onnxq.ops import rule_for
from onnxq.plan import QuantPlan, is_constant, plan_quantization
from onnxq.qdq import apply_qdq
from onnxq.inspect import inspect_model
from onnxq.qoperator import has_quantize_nodes, normalize_qdq, to_qoperator
from onnxq.fp16 import to_fp16_islands
from onnxq.fusion import COMPUTE_OPS, unfused_nodes
from onnxq.saturation import saturating_layers
from onnxq.rules import resolve_rules, save_rules
from onnxq.shapes import correct_declared_shapes
from onnxq.signatures import graph_fingerprint, node_signatures, tensor_keys
from onnxq.tuning import (
    MIN_BATCHES_TO_SPLIT, FallbackOptions, FallbackReport, KeptNode, rank_units, relative_error,
    resolve_metric, search_fallback, target,
)
from onnxq.subgraphs import all_nodes, control_flow_notes, owning_graph, proto_bodies, quantizable_nodes
from onnxq.workspace import Workspace

ModelInput = str | os.PathLike | onnx.ModelProto
TuningProgress = Callable[[str, int, int], None]  # phase, done, total


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
    fallback: FallbackReport | None = None

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


def candidate_tensors(graph: ir.Graph, method: str) -> list[ir.Value]:
    """Every tensor whose range a quantization decision may need, in graph order; inside the
    If/Loop/Scan bodies that ``method`` can calibrate, only tensors known to be float."""
    values: dict[str, ir.Value] = {}
    for node in quantizable_nodes(graph, method):
        rule = rule_for(node)
        if rule is None:
            continue
        slots = range(len(node.inputs)) if rule.activation_inputs is None else rule.activation_inputs
        if rule.weight_input is not None:
            slots = (*slots, rule.weight_input)
        tensors = [node.inputs[slot] for slot in slots if slot < len(node.inputs)] + list(node.outputs)
        for value in tensors:
            in_body = value is not None and owning_graph(value) is not graph
            if _may_be_float(value) and not (in_body and value.dtype != ir.DataType.FLOAT):
                values[value.name] = value
    return list(values.values())


def _op_counts(graph: ir.Graph, plan: QuantPlan) -> dict[str, OpCount]:
    quantized, total = collections.Counter(), collections.Counter()
    for node in all_nodes(graph):
        total[node.op_type] += 1
        quantized[node.op_type] += node in plan.decisions
    return {op: OpCount(quantized[op], total[op] - quantized[op]) for op in sorted(total)}


def _proto_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs, recursively."""
    return [graph] + [sub for node in graph.node for body in proto_bodies(node) for sub in _proto_graphs(body)]


def _check_interface(float_proto: onnx.ModelProto, proto: onnx.ModelProto) -> None:
    """Drop the shape annotations onnxq inferred for its own use, in bodies too (the model's own
    stay), and check that the graph inputs and outputs are the float model's."""
    declared = {info.name for graph in _proto_graphs(float_proto.graph) for info in graph.value_info}
    for graph in _proto_graphs(proto.graph):
        kept = [info for info in graph.value_info if info.name in declared]
        del graph.value_info[:]
        graph.value_info.extend(kept)
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
    proto: onnx.ModelProto  # declared shapes corrected, opset fitted to 13..ONNX Runtime's newest
    model: ir.Model  # cleaned up; read only (see ``fresh``)
    notes: tuple[str, ...]
    external_folder: Path | None = None  # where the weights the protos reference lie (models with external data)

    @functools.cached_property
    def cleaned(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def fresh(self) -> ir.Model:
        """A new copy of the cleaned-up graph to rewrite (weights in external data stay on disk)."""
        if self.external_folder is not None:
            return _prepare(self.proto, self.external_folder)[0]
        return ir.from_proto(self.cleaned)


@contextlib.contextmanager
def _session_of(loaded: _Loaded, model: ir.Model, what: str = "a trial model") -> Iterator[ort.InferenceSession]:
    """An ONNX Runtime session of ``model`` (a rewritten copy, not written yet); a big model goes
    with its weights in a temporary file, which ``model`` then refers to until the block ends."""
    if loaded.external_folder is None:
        yield create_session(ir.to_proto(model).SerializeToString(), what)
        return
    with offloaded(model) as folder:
        yield create_session(ir.to_proto(model), what, external_folder=folder)


def _load(model: ModelInput) -> _Loaded:
    float_proto = load_model(model)
    external_folder = external_data_folder(model, float_proto)
    proto, shape_notes = correct_declared_shapes(float_proto)
    proto, upgrade_note = fit_opset(proto)
    prepared, notes = _prepare(proto, external_folder)
    notes = shape_notes + ([upgrade_note] if upgrade_note else []) + notes
    return _Loaded(float_proto, proto, prepared, tuple(notes), external_folder)


def load_prepared(model: ModelInput) -> tuple[ir.Model, list[str]]:
    """A float model loaded, upgraded to opset 13 when older, and cleaned up as ``convert``
    does before calibrating; with notes on what was changed."""
    loaded = _load(model)
    return loaded.model, list(loaded.notes)


SENTINEL_MAGNITUDE = 5e3  # a range reaching this far is checked for sentinel (mask) values
_SURE_SENTINEL = 1e8  # ... and one reaching this far, where the values cannot be looked at, is one
SENTINEL_BATCHES = 32  # calibration batches searched for the values behind a suspect range


def _is_sentinel_range(low: float, high: float, threshold: float) -> bool:
    return not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) >= threshold


def _sentinel_tensors(loaded: _Loaded, state: CalibrationState, source: BatchSource | None) -> list[str]:
    """Keys of the tensors whose range is dominated by sentinel values (masks of -1e4, -1e9, the
    float minimum, -inf...): a non-finite range, or one reaching ``SENTINEL_MAGNITUDE`` whose
    extreme E is made by values near it (|x| >= E/10) with a gap below them: every other value
    is under E/100, in the first calibration batches. Where those batches never show values
    near E, a range reaching ``_SURE_SENTINEL`` counts as one."""
    suspects = {key: r for key, r in state.ranges().items() if _is_sentinel_range(*r, SENTINEL_MAGNITUDE)}
    if not suspects:
        return []
    names = {key: name for name, key in tensor_keys(loaded.model.graph).items() if key in suspects}
    extreme = {key: max(-low, high) for key, (low, high) in suspects.items()}
    near_seen = {key: not math.isfinite(extreme[key]) for key in names}
    rest_seen = {key: 0.0 for key in names}  # largest |x| below E/10
    if source is not None:
        wanted = [key for key in names if not near_seen[key]]
        proto = onnx.ModelProto()
        proto.CopyFrom(loaded.cleaned)
        existing = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=names[k]) for k in wanted if names[k] not in existing)
        session = create_session(proto, "the float model", external_folder=loaded.external_folder) if wanted else None
        for batch in itertools.islice(source(), SENTINEL_BATCHES) if wanted else ():
            for key, values in zip(wanted, session.run([names[k] for k in wanted], batch.feed)):
                magnitude = np.abs(np.asarray(values, dtype=np.float64))
                near = magnitude >= extreme[key] / 10
                near_seen[key] |= bool(near.any())
                if (~near).any():
                    rest_seen[key] = max(rest_seen[key], float(magnitude[~near].max()))
            if all(near_seen[k] for k in wanted):
                break
    return sorted(
        key for key, (low, high) in suspects.items()
        if not math.isfinite(extreme[key])
        or (near_seen[key] and rest_seen[key] <= extreme[key] / 100)
        or (not near_seen[key] and _is_sentinel_range(low, high, _SURE_SENTINEL))
    )


def _plan(
    graph: ir.Graph, state: CalibrationState, config: QuantConfig, sentinel=(), keep_float=frozenset()
) -> QuantPlan:
    by_key = state.ranges()
    excluded = set(sentinel)
    ranges = {name: by_key[key] for name, key in tensor_keys(graph).items() if key in by_key and key not in excluded}
    return plan_quantization(graph, ranges, config, keep_float)


@dataclasses.dataclass(frozen=True)
class _LayerChoices:
    """Per-layer decisions measured after calibration, by topology key: layers that need 7-bit
    weights on this CPU, quantized nodes ONNX Runtime would not fuse, and tensors whose range
    is dominated by sentinel values."""

    reduced: tuple[str, ...] = ()
    unfused: tuple[str, ...] = ()
    sentinel: tuple[str, ...] = ()

    def to_payload(self, calibration_step: int) -> dict:
        return {"calibration_step": calibration_step, "reduced": list(self.reduced), "unfused": list(self.unfused),
                "sentinel": list(self.sentinel)}

    @classmethod
    def from_payload(cls, payload: dict) -> _LayerChoices:
        return cls(tuple(payload["reduced"]), tuple(payload["unfused"]), tuple(payload.get("sentinel", ())))


def _measure_layers(
    loaded: _Loaded, state: CalibrationState, config: QuantConfig, source: BatchSource | None
) -> _LayerChoices:
    """Find sentinel-dominated tensors (looking at calibration batches when ``source`` is given);
    then rewrite a fresh copy of the graph to QDQ (8-bit weights) and measure on it which layers
    saturate this CPU's kernels (on the first batch; skipped without data) and which would not fuse."""
    sentinel = tuple(_sentinel_tensors(loaded, state, source))
    feed = None if source is None else source.first.feed
    if (config.reduce_range != "auto" or feed is None) and config.quantize_unfused:
        return _LayerChoices(sentinel=sentinel)
    model = loaded.fresh()
    keys = node_signatures(model.graph)
    plan = _plan(model.graph, state, config, sentinel)
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
    return _LayerChoices(tuple(reduced), tuple(unfused), sentinel)


@dataclasses.dataclass(frozen=True)
class _Built:
    """One quantized model, not yet checked: the rewritten graph, per-op counts, notes, its
    fallback units (see ``_fallback_units``) and the nodes it kept float on purpose (key: why)."""

    model: ir.Model
    op_counts: dict[str, OpCount]
    notes: list[str]
    units: tuple[tuple[str, ...], ...]
    kept_float: dict[str, str]


def _fallback_units(graph: ir.Graph, plan: QuantPlan, keys: dict[ir.Node, str]) -> tuple[tuple[str, ...], ...]:
    """The node sets a fallback keeps float together, one per quantized tensor source: a tensor
    is float only when its producer and every quantized reader are, so a unit is a quantized
    compute node (or a graph input) with the compute nodes reading its output, through the
    data-movement ops that share its scale."""
    candidates = {n for n, d in plan.decisions.items() if d.rule.kind in ("compute", "concat")}

    def readers(values) -> set[ir.Node]:
        found, stack = set(), list(values)
        while stack:
            for use in stack.pop().uses():
                if use.node in candidates:
                    found.add(use.node)
                elif use.node in plan.decisions:
                    stack.extend(use.node.outputs)
        return found

    units: dict[tuple[str, ...], None] = {}
    sources = [({}, [value]) for value in graph.inputs] + [({node}, node.outputs) for node in all_nodes(graph) if node in candidates]
    for own, values in sources:
        unit = tuple(sorted(keys[n] for n in set(own) | readers(values)))
        if unit:
            units[unit] = None
    return tuple(units)


def _build(
    loaded: _Loaded,
    state: CalibrationState,
    config: QuantConfig,
    layers: _LayerChoices,
    keep_float: dict[str, str] | None = None,
    fallback_dtype: str = "fp32",
) -> _Built:
    """A quantized model from calibrated state, on a fresh copy of the graph: plan and rewrite
    (``_write_output`` checks and writes it). Nodes whose key is in ``keep_float`` (key: reason) stay float, and so do those in
    ``layers.unfused``; layers in ``layers.reduced`` (every layer, for ``reduce_range="always"``)
    get 7-bit weights; with ``fallback_dtype="fp16"`` nodes left float run in fp16."""
    model = loaded.fresh()
    graph = model.graph
    keys = node_signatures(graph)
    keep_float = dict(keep_float or {})
    notes = []
    unfused = set(layers.unfused)
    unfused_nodes_ = [node for node in all_nodes(graph) if keys[node] in unfused and keys[node] not in keep_float]
    keep_float.update((keys[node], "not fused by ONNX Runtime") for node in unfused_nodes_)
    if unfused_nodes_:
        ops = collections.Counter(node.op_type for node in unfused_nodes_)
        notes.append(
            f"kept float {len(unfused_nodes_)} node(s) that ONNX Runtime's CPU provider would not fuse into "
            f"integer kernels ({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))}); "
            "--quantize-unfused quantizes them anyway"
        )
    kept = frozenset(node for node in all_nodes(graph) if keys[node] in keep_float)
    plan = _plan(graph, state, config, layers.sentinel, kept)
    if layers.sentinel:
        names = sorted(name for name, key in tensor_keys(graph).items() if key in set(layers.sentinel))
        notes.append(
            f"kept float {len(names)} tensor(s) whose range is dominated by sentinel values (attention masks "
            f"such as -1e9, the float minimum or -inf), and the nodes that read or write them: {', '.join(names[:6])}"
            + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        )
    op_counts = _op_counts(graph, plan)
    units = _fallback_units(graph, plan, keys)
    if config.reduce_range == "always":
        reduced = {node for node, decision in plan.decisions.items() if decision.weight_slot is not None}
    else:
        wanted = set(layers.reduced)
        reduced = {node for node in plan.decisions if keys[node] in wanted}
    islands = set()
    if fallback_dtype == "fp16":
        sentinel_names = {name for name, key in tensor_keys(graph).items() if key in set(layers.sentinel)}
        islands = {
            node for node in graph
            if (node in kept or rule_for(node) is not None) and node not in plan.decisions
            and not any(v is not None and v.name in sentinel_names for v in (*node.inputs, *node.outputs))
        }
    notes += control_flow_notes(graph, config.method, set(plan.decisions))
    notes += plan.notes + apply_qdq(model, plan, reduced).notes
    if reduced and config.reduce_range == "auto":
        names = ", ".join(sorted(node.name or node.op_type for node in reduced)[:8])
        more = f" and {len(reduced) - 8} more" if len(reduced) > 8 else ""
        notes.append(
            f"7-bit weights on {len(reduced)} layer(s) whose 8-bit form this CPU's integer kernels "
            f"would saturate (no VNNI): {names}{more}"
        )
        in_bodies = sum(node.graph is not graph for node in reduced)
        if in_bodies:
            notes.append(
                f"{in_bodies} of those are inside If/Loop/Scan bodies, where saturation cannot be "
                "measured: they get 7-bit weights to be safe"
            )
    if islands:
        notes += to_fp16_islands(model, islands)
    if config.format == "qoperator":
        notes += to_qoperator(model)
    return _Built(model, op_counts, notes, units, keep_float)


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


def _run_all(session, batches: list[Batch], parts: tuple[slice, ...] = (slice(None),)) -> list[dict[str, np.ndarray]]:
    """Every output of ``session`` over ``batches``, concatenated along the sample axis, once per
    slice of the batches in ``parts`` (default: one dict, of all of them)."""
    names = [output.name for output in session.get_outputs()]
    runs = [session.run(names, batch.feed) for batch in batches]
    return [_concatenate(names, runs[part]) for part in parts]


def _concatenate(names: list[str], runs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    try:
        return {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}
    except ValueError as exc:
        raise CalibrationDataError(
            f"the model's outputs differ in shape across evaluation batches ({exc}); "
            "give evaluation samples of one shape"
        ) from exc


def _tune(
    loaded: _Loaded,
    state: CalibrationState,
    config: QuantConfig,
    layers: _LayerChoices,
    base: dict[str, str],
    options: FallbackOptions,
    batches: list[Batch],
    space: Workspace,
    calibration_index: int,
    progress: TuningProgress | None,
) -> tuple[dict[str, str], FallbackReport]:
    """Accuracy-driven fallback (``onnxq.tuning``): rank the quantized nodes by sensitivity,
    then search the smallest set to keep float; returns it (key: why) and the report.
    Sensitivity and every trial are workspace steps, and a resumed run reuses them."""
    float_session = create_session(loaded.proto, "the float model", external_folder=loaded.external_folder)
    # the whole evaluation set, and with check_halves its two halves: the target must hold on each
    middle = len(batches) // 2 if options.check_halves and len(batches) >= MIN_BATCHES_TO_SPLIT else 0
    parts = (slice(None),) + ((slice(0, middle), slice(middle, None)) if middle else ())
    references = _run_all(float_session, batches, parts)
    has_labels = all(batch.labels is not None for batch in batches)
    labels = [np.concatenate([b.labels.reshape(-1) for b in batches[part]]) if has_labels else None for part in parts]
    metric_name, metric = resolve_metric(options.metric, has_labels)
    float_scores = [float(metric(ref, ref, lab)) for ref, lab in zip(references, labels)]
    subset, samples = [], 0
    for batch in batches:
        if samples >= options.sensitivity_samples:
            break
        subset.append(batch)
        samples += batch.samples
    eval_id = hashlib.sha256("".join(_batch_fingerprint(b) for b in batches).encode()).hexdigest()
    [subset_reference] = _run_all(float_session, subset)

    def keep_of(keys: frozenset[str]) -> dict[str, str]:
        return {k: base.get(k, "accuracy fallback") for k in keys}

    def outputs_of(keys: frozenset[str], data: list[Batch], data_parts=(slice(None),)) -> list[dict[str, np.ndarray]]:
        with _session_of(loaded, _build(loaded, state, config, layers, keep_of(keys), options.dtype).model) as session:
            return _run_all(session, data, data_parts)

    plain = _build(loaded, state, config, layers, base, options.dtype)  # its units and what it keeps float
    scores: dict[frozenset[str], list[float]] = {}  # the whole set's score, then the halves'
    for step in space.steps():
        if step.kind == "trial" and step.payload["calibration_step"] == calibration_index and step.payload["eval"] == eval_id \
                and step.payload["metric"] == metric_name and step.payload["fallback_dtype"] == options.dtype \
                and len(step.payload.get("half_scores", [])) == len(parts) - 1:
            scores[frozenset(step.payload["keep_float"])] = [step.payload["score"], *step.payload.get("half_scores", [])]

    def worst_margin(values: list[float]) -> float:
        return min(value - target(reference, options.max_drop) for value, reference in zip(values, float_scores))

    def margin(keys: frozenset[str]) -> float:
        """How far the worst part's score is above its target (the search accepts >= 0)."""
        if keys not in scores:
            outputs = outputs_of(keys, batches, parts)
            scores[keys] = [float(metric(out, ref, lab)) for out, ref, lab in zip(outputs, references, labels)]
            space.append("trial", {
                "calibration_step": calibration_index, "eval": eval_id, "metric": metric_name,
                "fallback_dtype": options.dtype, "keep_float": sorted(keys), "reasons": plain.kept_float | keep_of(keys),
                "score": scores[keys][0], "half_scores": scores[keys][1:], "float_score": float_scores[0],
                "passes": accept(worst_margin(scores[keys])),
            })
        if progress is not None:
            progress("fallback search", len(scores), options.max_trials)
        return worst_margin(scores[keys])

    def accept(value: float) -> bool:
        return value >= 0

    gains: dict[str, float] = {}
    base_margin = margin(frozenset(base))
    base_score = scores[frozenset(base)][0]
    if accept(base_margin):
        report = FallbackReport(metric_name, options.max_drop, float_scores[0], base_score, base_score, True,
                                len(scores), _kept_nodes(loaded, plain.kept_float, gains))
        return base, report
    # 1. sensitivity of each unit: output error with it alone float, or alone quantized
    recorded = [
        step for step in space.steps()
        if step.kind == "sensitivity" and step.payload["calibration_step"] == calibration_index
        and step.payload["eval"] == eval_id and step.payload["base"] == sorted(base)
        and step.payload["samples"] == samples and step.payload.get("mode", "only-float") == options.sensitivity
    ]
    if recorded:
        gains_by_unit = {tuple(k.split("|")): v for k, v in recorded[-1].payload["gains"].items()}
    else:
        def error_of(keys: frozenset[str]) -> float:
            return relative_error(outputs_of(keys, subset)[0], subset_reference)

        if options.sensitivity == "only-float":
            baseline = error_of(frozenset(base))

            def gain_of(nodes: frozenset[str]) -> float:
                return baseline - error_of(frozenset(base) | nodes)
        else:  # only-quantized: the error one unit adds to the model with every unit float
            all_float = frozenset(base).union(*plain.units)
            baseline = error_of(all_float)

            def gain_of(nodes: frozenset[str]) -> float:
                return error_of(all_float - nodes) - baseline

        report = None if progress is None else (lambda done, total: progress("sensitivity", done, total))
        gains_by_unit = rank_units(plain.units, gain_of, progress=report)
        space.append("sensitivity", {"calibration_step": calibration_index, "eval": eval_id, "base": sorted(base),
                                     "samples": samples, "mode": options.sensitivity, "baseline": baseline,
                                     "gains": {"|".join(unit): gain for unit, gain in gains_by_unit.items()}})
    ranked = list(gains_by_unit)
    for unit, gain in gains_by_unit.items():  # a node is as sensitive as its most sensitive unit
        for key in unit:
            gains[key] = max(gain, gains.get(key, -math.inf))

    # 2. the search, on the whole evaluation set (and its halves)
    result = search_fallback([frozenset(u) for u in ranked], frozenset(base), gains, margin, accept, options.max_trials)
    final = plain.kept_float | keep_of(result.keep_float)
    report = FallbackReport(metric_name, options.max_drop, float_scores[0], base_score, scores[result.keep_float][0],
                            result.met, len(scores), _kept_nodes(loaded, final, gains))
    return keep_of(result.keep_float), report


def _kept_nodes(loaded: _Loaded, kept_float: dict[str, str], gains: dict[str, float]) -> tuple[KeptNode, ...]:
    """The nodes kept float (key: why), most sensitive first, with names from the float model."""
    by_key = {key: node for node, key in node_signatures(loaded.model.graph).items()}
    ordered = sorted(kept_float.items(), key=lambda item: -gains.get(item[0], math.inf))
    return tuple(
        KeptNode(by_key[key].name or key, by_key[key].op_type, reason, gains.get(key))
        for key, reason in ordered if key in by_key
    )


def _fallback_notes(report: FallbackReport) -> list[str]:
    chosen = [k for k in report.kept if k.reason == "accuracy fallback"]
    listed = ", ".join(f"{k.name} ({k.op})" for k in chosen[:8]) + (f" and {len(chosen) - 8} more" if len(chosen) > 8 else "")
    verdict = "met" if report.met else "NOT met (every candidate was tried; the closest model was written)"
    return [
        f"accuracy-driven fallback, metric {report.metric}: float {report.float_score:.4f}, plain int8 "
        f"{report.int8_score:.4f}, final {report.final_score:.4f}; target (drop <= {report.max_drop:g}) {verdict}; "
        f"{report.trials} model(s) evaluated",
        f"kept float for accuracy: {len(chosen)} node(s){': ' + listed if chosen else ''}",
    ]


def convert(
    model: ModelInput,
    output: str | os.PathLike,
    calibration_data: DataSource | None,
    config: QuantConfig | None = None,
    *,
    eval_data: DataSource | None = None,
    fallback: FallbackOptions | None = None,
    workspace: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    tuning_progress: TuningProgress | None = None,
) -> ConversionResult:
    """Quantize ``model`` to int8 (QDQ or QOperator form, per ``config.format``), calibrated on
    ``calibration_data``; write ``output``. A model that is already quantized is converted
    without calibration.

    Calibration is checkpointed in ``workspace`` (default ``OUTPUT.onnxq/``); ``resume=True``
    continues a run that was killed, and gives the same model as an uninterrupted run
    (``calibration_data`` may then be ``None`` if calibration had finished). ``eval_data``
    (same formats) measures fidelity after conversion, with top-1 accuracy when it has a
    ``label`` array. ``fallback`` keeps nodes float by rules and, with ``max_drop`` and
    ``eval_data``, by measured sensitivity until the metric is met. Bad input raises an
    ``OnnxqError`` subclass, and nothing is written then.
    """
    config = config or QuantConfig()
    fallback = fallback or FallbackOptions()
    if fallback.max_drop is not None and eval_data is None:
        raise ConfigError("--max-drop needs --eval-data: the metric is measured on it")
    loaded = _load(model)
    output_path = check_writable(output)
    if has_quantize_nodes(loaded.model):
        return _convert_quantized(loaded, model, output_path, config)
    node_keys = node_signatures(loaded.model.graph)
    ruled, rule_notes = resolve_rules(fallback.keep_float, loaded.model.graph, node_keys)
    base = {node_keys[node]: reason for node, reason in ruled.items()}
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
    notes = list(loaded.notes) + rule_notes
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
        candidates = candidate_tensors(graph, config.method)
        float_ranks = {
            v.name: None if v.shape is None else len(v.shape) for v in candidates if v.dtype == ir.DataType.FLOAT
        }
        state, calibration_notes = calibrate(
            loaded.cleaned,
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
        layers = _measure_layers(loaded, state, config, source)
        space.append("layers", layers.to_payload(calibration_step.index))
    report = None
    keep = base
    if fallback.max_drop is not None:
        keep, report = _tune(loaded, state, config, layers, base, fallback, list(eval_source()), space,
                             calibration_step.index, tuning_progress)
        notes += _fallback_notes(report)
    if base:
        notes.append(f"kept float {len(base)} node(s) by --keep-float rules")
    built = _build(loaded, state, config, layers, keep, fallback.dtype)
    written = _write_output(loaded, built.model, output_path, config)
    space.append("quantized", {
        "calibration_step": calibration_step.index, "output_sha256": written.sha256,
        "keep_float": built.kept_float, "fallback_dtype": fallback.dtype,
    })
    if fallback.save_rules is not None:
        by_key = {key: node for node, key in node_keys.items()}
        save_rules(fallback.save_rules, {by_key[k]: r for k, r in built.kept_float.items() if k in by_key}, node_keys)
    fidelity = None
    if eval_source is not None:
        try:
            fidelity = compare_models(
                create_session(loaded.proto, "the float model", external_folder=loaded.external_folder),
                create_session(output_path if written.data is None else written.data, "the quantized model"),
                eval_source(),
            )
        except OnnxqError:  # evaluation data the models fail on: exit 2 leaves no output behind
            output_path.unlink(missing_ok=True)
            if written.data is None:
                external_data_path(output_path).unlink(missing_ok=True)
            raise
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, loaded.float_proto),
        quantized_bytes=written.size,
        op_counts=built.op_counts,
        notes=tuple(notes + built.notes),
        calibration_samples=state.samples_seen,
        workspace=workspace_path,
        calibration_step=calibration_step.index,
        fidelity=fidelity,
        fallback=report,
    )


def recover(
    model: ModelInput,
    workspace: str | os.PathLike,
    output: str | os.PathLike,
    index: int | None = None,
    external_data: str = "auto",
) -> ConversionResult:
    """Rebuild a recorded model from the float model and the workspace alone, without
    calibrating: by default the last one written (else the last calibration step); with
    ``index``, that step (a calibration step, a fallback trial, or a written model).
    ``external_data`` as in ``QuantConfig``."""
    loaded = _load(model)
    output_path = check_writable(output)
    space = Workspace.open(workspace)
    config = QuantConfig(**space.manifest["config"], external_data=external_data)
    space.check_matches(_manifest(loaded.model.graph, config, None) | {"data": space.manifest.get("data")})
    if index is not None:
        step = space.step(index)
    else:
        step = space.latest("quantized") or space.latest("calibration")
    if step is None:
        raise WorkspaceError(f"workspace {workspace} has no intact calibration step to recover from")
    keep_float, fallback_dtype = {}, "fp32"
    if step.kind in ("quantized", "trial"):
        keep_float = step.payload.get("reasons", step.payload.get("keep_float", {}))
        if isinstance(keep_float, list):
            keep_float = {key: "recorded" for key in keep_float}
        fallback_dtype = step.payload.get("fallback_dtype", "fp32")
        step = space.step(step.payload["calibration_step"])
    if step.kind != "calibration":
        raise WorkspaceError(f"step {step.index} of {workspace} is a {step.kind} step; give a calibration, "
                             "trial or quantized step")
    state = CalibrationState.from_payload(step.payload, config.percentile)
    recorded = space.latest("layers")
    layers = _measure_layers(loaded, state, config, None) if recorded is None else _LayerChoices.from_payload(recorded.payload)
    built = _build(loaded, state, config, layers, keep_float, fallback_dtype)
    written = _write_output(loaded, built.model, output_path, config)
    partial = [] if state.complete else [f"step {step.index} holds partial calibration (pass {state.pass_index + 1} of {len(state.passes)}, {state.samples_done} samples in)"]
    return ConversionResult(
        output=output_path,
        float_bytes=_model_bytes(model, loaded.float_proto),
        quantized_bytes=written.size,
        op_counts=built.op_counts,
        notes=tuple(list(loaded.notes) + partial + built.notes),
        calibration_samples=state.samples_seen,
        workspace=Path(workspace),
        calibration_step=step.index,
    )
