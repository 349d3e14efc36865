"""Writing the quantized model: the checks every output passes (the float model's interface,
``onnx.checker`` with full check, an ONNX Runtime session), then one atomic write of one
protobuf file, or of ``OUTPUT`` and ``OUTPUT.data`` for models with external data or over 2 GB."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import OutputError
from onnxq.files import (
    SINGLE_FILE_LIMIT,
    tensor_bytes,
    write_atomically,
    write_with_external_data,
)
from onnxq.graph import proto_graphs
from onnxq.load.prepare import LoadedModel
from onnxq.runtime import create_session


def _check_interface(float_proto: onnx.ModelProto, proto: onnx.ModelProto) -> None:
    """Drop the shape annotations onnxq inferred for its own use, in bodies too (the model's own
    stay), and check that the graph inputs and outputs are the float model's as loaded
    (``LoadedModel.proto``: an IR 3 model's weights are no longer graph inputs there)."""
    declared = {info.name for graph in proto_graphs(float_proto.graph) for info in graph.value_info}
    for graph in proto_graphs(proto.graph):
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


ModelSource = bytes | Path  # a serialized model, or a model file (with its data beside it)
BeforeCommit = Callable[[ModelSource], None]


def _check_output_file(float_proto: onnx.ModelProto, before_commit: BeforeCommit, path: Path) -> None:
    """``_check_output`` for a model written with external data: done by path, where the model
    file is rewritten without onnxq's own shape annotations."""
    proto = onnx.load(path, load_external_data=False)
    _check_interface(float_proto, proto)
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
    onnx.checker.check_model(path, full_check=True)
    create_session(path, "the quantized model")
    before_commit(path)


@dataclasses.dataclass(frozen=True)
class WrittenModel:
    """The quantized model as written: its size on disk and sha256."""

    size: int
    sha256: str


def write_output(loaded: LoadedModel, model: ir.Model, path: Path, external_data: str,
                 before_commit: BeforeCommit = lambda model: None) -> WrittenModel:
    """Check and write the quantized ``model``: one protobuf file, or with its tensors in
    ``OUTPUT.data`` per ``external_data`` (``RunOptions``) (``auto``: when the float model had external
    data or the output would pass protobuf's 2 GB limit). ``before_commit`` gets the checked
    model (its bytes, or its file still under a temporary name) before it replaces ``path``;
    if it raises, nothing is written and an existing file at ``path`` stays as it was."""
    size = tensor_bytes(model)
    if external_data == "never" and size > SINGLE_FILE_LIMIT:
        raise OutputError(
            f"the quantized model holds {size / 1e9:.1f} GB of tensors, over protobuf's 2 GB limit for one "
            "file; use --external-data auto or always to write its weights to OUTPUT.data"
        )
    external = external_data == "always" or (
        external_data == "auto" and (loaded.external_folder is not None or size > SINGLE_FILE_LIMIT)
    )
    if external:
        check = functools.partial(_check_output_file, loaded.proto, before_commit)
        written, sha256 = write_with_external_data(model, path, check)
        return WrittenModel(written, sha256)
    ir.external_data.load_to_model(model)  # weights still in the float model's data files come in
    data = _check_output(loaded.proto, ir.to_proto(model))
    before_commit(data)
    write_atomically(data, path)
    return WrittenModel(len(data), hashlib.sha256(data).hexdigest())
