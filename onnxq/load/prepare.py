"""Loading: the float model read and checked, its declared shapes corrected, its opset fitted,
and the cleaned-up graph that every later stage calibrates and rewrites."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx_ir as ir
import onnxruntime as ort

from onnxq.analysis.cleanup import clean_up
from onnxq.analysis.signatures import GraphKeys
from onnxq.load.float16 import lift_float16
from onnxq.load.model import external_data_folder, load_model, model_bytes
from onnxq.load.opset import fit_ir_version, fit_opset
from onnxq.load.shapes import correct_declared_shapes, read_minus_one_as_dynamic
from onnxq.passes import GraphPass, run_passes
from onnxq.runtime import create_session, installation_note

ModelInput = str | os.PathLike | onnx.ModelProto


def prepare(proto: onnx.ModelProto, external_folder: Path | None = None) -> tuple[ir.Model, list[str]]:
    """The graph that is calibrated and rewritten: shapes and types inferred, then cleaned up
    as runtimes would (``onnxq.analysis.cleanup``). Tensors in external data files (in
    ``external_folder``) stay there, mapped into memory only when read."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # types then come from the calibration run instead
        pass
    model = ir.from_proto(proto)
    if external_folder is not None:
        ir.external_data.set_base_dir(model.graph, external_folder)
    return model, clean_up(model)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A float model as loaded: the user's proto, the proto the stages work from, the
    cleaned-up graph, notes on what loading changed, and where external weights lie."""

    source: ModelInput  # the path or ModelProto the user gave
    float_proto: onnx.ModelProto
    proto: onnx.ModelProto  # shapes corrected, opset and IR version fitted, float16 lifted to float32 inside
    model: ir.Model  # cleaned up; read only (see ``fresh``)
    notes: tuple[str, ...]
    external_folder: Path | None = None  # where the weights the protos reference lie (models with external data)
    passes: tuple[GraphPass, ...] = ()  # float-exact rewrites applied after clean-up (``onnxq.transform``)

    @functools.cached_property
    def cleaned(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    @functools.cached_property
    def keys(self) -> GraphKeys:
        """Topology keys of the cleaned-up graph's nodes and tensors (``fresh`` copies share them)."""
        return GraphKeys.of(self.model.graph)

    @functools.cached_property
    def float_bytes(self) -> int:
        """Size of the float model: its file and external data files, or its serialized size."""
        if isinstance(self.source, onnx.ModelProto):
            return self.float_proto.ByteSize()
        return model_bytes(Path(self.source), self.float_proto)

    @property
    def offload(self) -> bool:
        """Whether trial models go to ONNX Runtime with their weights in a file (big models)."""
        return self.external_folder is not None

    def float_session(self, proto: onnx.ModelProto | None = None) -> ort.InferenceSession:
        """A session of the cleaned-up float model (or of ``proto``, a copy of it with extra outputs)."""
        return create_session(self.cleaned if proto is None else proto, "the float model",
                              external_folder=self.external_folder)

    def fresh(self) -> ir.Model:
        """A new copy of the cleaned-up graph to rewrite (weights in external data stay on disk)."""
        if self.offload:
            model = prepare(self.proto, self.external_folder)[0]
            run_passes(model, self.passes)
            return model
        return ir.from_proto(self.cleaned)

    def with_passes(self, passes: tuple[GraphPass, ...]) -> LoadedModel:
        """This model with ``passes`` applied to a copy of its cleaned-up graph (their notes
        added); every later stage, the float reference included, then works from that graph."""
        if not passes:
            return self
        model = self.fresh()
        notes = run_passes(model, passes)
        return dataclasses.replace(self, model=model, notes=self.notes + tuple(notes), passes=self.passes + passes)


def load(model: ModelInput) -> LoadedModel:
    """Read, check and prepare a float model given as a path or a ModelProto."""
    float_proto = load_model(model)
    external_folder = external_data_folder(model, float_proto)
    proto, dynamic_notes = read_minus_one_as_dynamic(float_proto)
    proto, shape_notes = correct_declared_shapes(proto)
    proto, opset_note = fit_opset(proto)
    proto, ir_note = fit_ir_version(proto)
    proto, float16_note = lift_float16(proto, external_folder)
    prepared, notes = prepare(proto, external_folder)
    installation = installation_note()
    notes = ([installation] if installation else []) + dynamic_notes + shape_notes + \
        [note for note in (opset_note, ir_note, float16_note) if note] + notes
    return LoadedModel(model, float_proto, proto, prepared, tuple(notes), external_folder)
