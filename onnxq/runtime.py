"""ONNX Runtime sessions: quiet options, execution providers (CUDA only when it really loads),
and running a session over batches."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort

from onnxq.errors import CalibrationDataError, DeviceError, ModelError, first_line
from onnxq.files import offloaded
from onnxq.graph import proto_graphs

if TYPE_CHECKING:  # only a type here: the ground floor does not import the stages
    from onnxq.calibration.data import Batch

CPU = "CPUExecutionProvider"


CUDA = "CUDAExecutionProvider"


_RUNTIME_API = ("InferenceSession", "SessionOptions", "GraphOptimizationLevel", "get_available_providers")


def _runtime_distributions() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module."""
    return sorted({
        dist.metadata["Name"] for dist in importlib.metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith("onnxruntime")
        and "onnxruntime" in (dist.read_text("top_level.txt") or "onnxruntime").split()
    })


@functools.cache
def installation_note() -> str | None:
    """Refuse a broken ONNX Runtime: two distributions (``onnxruntime`` and ``onnxruntime-gpu``)
    install one ``onnxruntime`` module, and removing either leaves it without its API; say which
    distributions are installed and how to repair them. Two that still work give a note."""
    installed = _runtime_distributions()
    names = " ".join(installed) or "onnxruntime"
    missing = [name for name in _RUNTIME_API if not hasattr(ort, name)]
    if not missing:
        if len(installed) < 2:
            return None
        return (f"{' and '.join(installed)} are all installed and share one onnxruntime module: removing one breaks "
                f"the others; keep one: pip uninstall -y {names} && pip install {installed[-1]}")
    raise DeviceError(
        f"ONNX Runtime is broken: its module lacks {missing[0]} (installed: {', '.join(installed) or 'none'}; two "
        f"distributions shared one module and one was removed); repair with: pip uninstall -y {names} && "
        "pip install onnxruntime (or onnxruntime-gpu alone)"
    )


def session_options(external_folder: Path | None = None) -> ort.SessionOptions:
    """Quiet session options (failures reach the user as one-line errors, not as log lines),
    without ONNX Runtime's memory pattern;
    ``external_folder`` is where the external data files of a model given as bytes lie. Its
    weights are then mapped from there in place: neither copied into the bytes nor into
    prepacked buffers, so that memory stays near the size of the weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # no memory pattern: ONNX Runtime would keep, beside its arena, one block planned for all
    # of a run's tensors at once (large for the sessions that expose every activation)
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def create_session(
    model: onnx.ModelProto | bytes | Path,
    what: str,
    providers: tuple[str, ...] = (CPU,),
    external_folder: Path | None = None,
    threads: int = 0,
    profile_prefix: Path | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session of a model given as a proto, bytes or a file path (see
    ``session_options`` for ``external_folder``) on ``threads`` threads (0: ONNX Runtime's default),
    profiled into files starting with ``profile_prefix`` when given; a model it refuses is
    reported as ``ModelError``."""
    options = session_options(external_folder)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    data = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=list(providers))
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or ``None`` when its CUDA provider loads.

    A tiny model is loaded with the CUDA provider first in line; CUDA counts only if the
    session really uses it (ONNX Runtime otherwise falls back to the CPU quietly).
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    probe = oh.make_model(
        oh.make_graph(
            [oh.make_node("Identity", ["x"], ["y"])], "probe",
            [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[oh.make_opsetid("", 13)],
    )
    ort.set_default_logger_severity(4)  # the failed load is expected; don't print it
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, CPU])
        loaded = session.get_providers()[0] == CUDA
    except Exception:
        loaded = False
    finally:
        ort.set_default_logger_severity(2)
    if loaded:
        return None
    return "ONNX Runtime's CUDA execution provider did not load (no GPU, or CUDA/cuDNN libraries missing)"


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU its driver knows (whatever ONNX Runtime can use)."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def calibration_providers(device: str) -> tuple[tuple[str, ...], str | None]:
    """Execution providers for calibration, and a note when ``auto`` fell back to the CPU on a
    machine with an NVIDIA GPU (without one, the CPU is what anyone expects: nothing to say).

    ``cuda`` raises ``DeviceError`` with the reason when CUDA cannot be used.
    """
    if device == "cpu":
        return (CPU,), None
    reason = cuda_unavailable_reason()
    if reason is None:
        return (CUDA, CPU), None
    if device == "cuda":
        raise DeviceError(f"cannot calibrate on CUDA: {reason}; use --device cpu or auto")
    return (CPU,), f"calibrating on CPU: {reason}" if nvidia_gpu_present() else None


@contextlib.contextmanager
def session_of(model: ir.Model, offload: bool, what: str = "a trial model") -> Iterator[ort.InferenceSession]:
    """An ONNX Runtime session of ``model`` (a rewritten copy, not written yet), without the shape
    annotations onnxq inferred (as it will be written: ONNX Runtime's optimizer reads them, and
    some combinations with weights shared by subgraphs stop it); with ``offload`` (a big model) it
    goes with its weights in a temporary file, which ``model`` then refers to until the block ends."""
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(offloaded(model)) if offload else None
        proto = session_proto(model)
        yield create_session(proto if offload else proto.SerializeToString(), what, external_folder=folder)


def session_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as it will be written: without the shape annotations onnxq inferred (see ``session_of``)."""
    proto = ir.to_proto(model)
    for graph in proto_graphs(proto.graph):
        del graph.value_info[:]
    return proto


def run_batches(session: ort.InferenceSession, batches: Sequence[Batch]) -> tuple[list[str], list[list[np.ndarray]]]:
    """The output names of ``session`` and its outputs on each of ``batches``."""
    names = [output.name for output in session.get_outputs()]
    return names, [session.run(names, batch.feed) for batch in batches]


def run_all(session: ort.InferenceSession, batches: Sequence[Batch], parts: tuple[slice, ...] = (slice(None),),
            flat_if_ragged: bool = False) -> list[dict[str, np.ndarray]]:
    """Every output of ``session`` over ``batches``, concatenated along the sample axis, once per
    slice of the batches in ``parts`` (default: one dict, of all of them). Outputs whose shapes
    differ across batches (or scalars) are an error, or with ``flat_if_ragged`` concatenated
    flat (for metrics that compare values, not positions)."""
    names, runs = run_batches(session, batches)
    return [concatenate_runs(names, runs[part], flat_if_ragged) for part in parts]


def concatenate_runs(names: list[str], runs: list[list[np.ndarray]], flat_if_ragged: bool = False) -> dict[str, np.ndarray]:
    """The outputs ``names`` of several runs, each concatenated along the sample axis (see ``run_all``)."""
    try:
        return {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}
    except ValueError as exc:
        if flat_if_ragged:
            return {name: np.concatenate([np.ravel(run[i]) for run in runs]) for i, name in enumerate(names)}
        raise CalibrationDataError(
            f"the model's outputs differ in shape across evaluation batches ({exc}); "
            "give evaluation samples of one shape"
        ) from exc
