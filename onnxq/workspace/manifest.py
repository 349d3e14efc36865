"""What ties a workspace to one run: fingerprints of the model's structure and weights, the
result-affecting options and the calibration data, and the default workspace path."""

from __future__ import annotations

import hashlib
import os
import types
from collections.abc import Iterable
from pathlib import Path

import onnx_ir as ir

from onnxq._version import __version__
from onnxq.analysis.signatures import GraphKeys, graph_fingerprint
from onnxq.calibration.data import Batch
from onnxq.calibration.state import CalibrationState
from onnxq.config import QuantConfig
from onnxq.errors import ModelError, WorkspaceError


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


def batch_fingerprint(batch: Batch) -> str:
    """sha256 of a batch's input names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(batch.feed):
        array = batch.feed[name]
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fold_batch(digest: str, batch: Batch) -> str:
    """The fingerprint of the batches folded into ``digest`` followed by ``batch``: computed
    batch by batch, so that a checkpoint can record the data it has consumed so far."""
    return hashlib.sha256(f"{digest}:{batch_fingerprint(batch)}".encode()).hexdigest()


def data_fingerprint(batches: Iterable[Batch]) -> str:
    """``fold_batch`` over every batch, from the empty fingerprint."""
    digest = ""
    for batch in batches:
        digest = fold_batch(digest, batch)
    return digest


def build_manifest(keys: GraphKeys, graph: ir.Graph, config: QuantConfig, first_batch: Batch | None) -> dict:
    """The manifest of a run on ``graph`` (the cleaned-up float graph, whose keys are ``keys``)
    with ``config``."""
    return {
        "onnxq_version": __version__,
        "model": {"structure": graph_fingerprint(graph), "weights": _weights_fingerprint(graph)},
        "config": config.result_options(),
        "data": None if first_batch is None else {"first_batch_sha256": batch_fingerprint(first_batch)},
        "ties": keys.tied_names(),
    }


def check_tied_ranges(manifest: dict, keys: GraphKeys, state: CalibrationState, workspace: Path) -> None:
    """Refuse to reuse recorded ranges when nodes that only their order tells apart
    (``GraphKeys.tied``) may come in another order than in the recorded run (other names, or
    another order of the same names) and the ranges recorded for them differ: onnxq could give
    one node the other's ranges."""
    current = keys.tied_names()
    if manifest.get("ties") == current:
        return
    groups: dict[str, list[str]] = {}
    for key in current:
        groups.setdefault(key.rpartition(":")[0], []).append(key)
    for group in groups.values():
        recorded = [
            sorted((t, o.to_dict()) for t, o in state.observers.items() if t.rpartition("/")[0] == key)
            for key in group
        ]
        if any(ranges != recorded[0] for ranges in recorded[1:]):
            names = sorted(current[key] for key in group)
            raise WorkspaceError(
                f"nodes {names} have the same structure, place and weights, and the ranges recorded in {workspace} "
                "for them differ: in this model onnxq cannot tell which is which; start a new run without "
                "--resume (or recover with the model the workspace was made from)"
            )


def default_workspace(output: str | os.PathLike) -> Path:
    """``OUTPUT.onnxq/`` next to the output."""
    output = Path(output)
    return output.with_name(output.name + ".onnxq")
