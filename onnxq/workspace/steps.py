"""Typed workspace steps: what each kind of step records, checked against its schema on read.

Each step type is a frozen dataclass with a ``KIND`` (the kind in its file name), written as a
JSON payload by ``to_payload`` and read back by ``from_payload``, which refuses a payload with a
missing field or a field of the wrong JSON type (``WorkspaceError``). Fields with a default may
be absent (payloads of earlier onnxq versions). The calibration step is
``onnxq.calibration.state.CalibrationState``, whose observers need the percentile to be read.
"""

from __future__ import annotations

import base64
import dataclasses
import types
import typing
import zlib
from typing import Any, ClassVar

import numpy as np

from onnxq.errors import WorkspaceError

_JSON_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), tuple: (list,), list: (list,), dict: (dict,)}


def _json_types(annotation: Any) -> tuple[type, ...]:
    origin = typing.get_origin(annotation) or annotation
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _json_types(arg))
    if annotation is type(None):
        return (type(None),)
    return _JSON_TYPES[origin]


def encode_array(array: np.ndarray) -> dict:
    """An array as JSON: dtype, shape and its little-endian bytes, compressed, in base64."""
    array = np.ascontiguousarray(array)
    data = base64.b64encode(zlib.compress(array.astype(array.dtype.newbyteorder("<")).tobytes())).decode("ascii")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}


def decode_array(encoded: dict) -> np.ndarray:
    """The array ``encode_array`` wrote; a damaged one is a ``WorkspaceError``."""
    try:
        raw = zlib.decompress(base64.b64decode(encoded["data"]))
        return np.frombuffer(raw, np.dtype(encoded["dtype"]).newbyteorder("<")).reshape(encoded["shape"]).astype(
            np.dtype(encoded["dtype"]))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise WorkspaceError(f"a recorded array is damaged ({exc}); the workspace is damaged, start a new run") from exc


class StepRecord:
    """Base of the step types: payload conversion and the schema check."""

    KIND: ClassVar[str]

    def to_payload(self) -> dict:
        payload = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            payload[field.name] = list(value) if isinstance(value, tuple) else value
        return payload

    @classmethod
    def from_payload(cls, payload: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if field.name not in payload:
                if required:
                    raise WorkspaceError(f"a {cls.KIND} step lacks {field.name!r}; the workspace is damaged, start a new run")
                continue
            value, allowed = payload[field.name], _json_types(hints[field.name])
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise WorkspaceError(
                    f"a {cls.KIND} step's {field.name!r} is a {type(value).__name__}; the workspace is damaged, "
                    "start a new run"
                )
            values[field.name] = tuple(value) if typing.get_origin(hints[field.name]) is tuple else value
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class CalibrationStep(StepRecord):
    """Observer states by tensor key (each observer's ``to_dict``), the tensor keys of each pass
    over the data, the pass in progress, samples done in it, whether all passes are done, the
    samples in the data (counted on the first pass), the fingerprint of the batches done in the
    pass in progress and of all the data (once the first pass ends; ``fold_batch``)."""

    KIND: ClassVar[str] = "calibration"
    observers: dict
    passes: list
    pass_index: int
    samples_done: int
    complete: bool
    samples_seen: int
    data_done_sha256: str = ""
    data_sha256: str = ""


@dataclasses.dataclass(frozen=True)
class LayersStep(StepRecord):
    """Per-layer choices measured after the calibration step ``calibration_step``, by topology
    key: layers that need 7-bit weights on this CPU, quantized nodes ONNX Runtime would not fuse,
    tensors whose range is dominated by sentinel values, tensors whose 8-bit error is poor,
    the ranges chosen by their downstream error (``--method auto``: tensor key -> ``[low, high]``),
    the mean int8 shift of each layer's output channels that bias correction removes
    (``onnxq.tune.bias_correction``), and the learned integer weights of ``--rounding gptq`` with
    the scale they were rounded for (``{"values", "scale"}``, each an ``encode_array``)."""

    KIND: ClassVar[str] = "layers"
    calibration_step: int
    reduced: tuple[str, ...]
    unfused: tuple[str, ...]
    sentinel: tuple[str, ...] = ()
    poor: tuple[str, ...] = ()
    ranges: dict = dataclasses.field(default_factory=dict)
    bias_shifts: dict = dataclasses.field(default_factory=dict)
    rounded: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SensitivityStep(StepRecord):
    """Per-unit sensitivity (unit keys joined by ``|`` -> gain) measured on ``samples`` samples
    of the evaluation set ``eval``, with the ``base`` keep-float set, in ``mode``; ``ranking``:
    the units most sensitive first, in the order the search tries them (JSON keeps no dict
    order; a step without it is measured again)."""

    KIND: ClassVar[str] = "sensitivity"
    calibration_step: int
    eval: str
    base: list
    samples: int
    baseline: float
    gains: dict
    mode: str = "only-float"
    ranking: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TrialStep(StepRecord):
    """One model of the fallback search: its keep-float set (and why each node is in it), its
    score on the whole evaluation set and on each half, and whether it passed."""

    KIND: ClassVar[str] = "trial"
    calibration_step: int
    eval: str
    metric: str
    fallback_dtype: str
    keep_float: list
    score: float
    float_score: float
    passes: bool
    reasons: dict = dataclasses.field(default_factory=dict)
    half_scores: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class QuantizedStep(StepRecord):
    """A written model: the calibration step it came from, its keep-float set (key: why), the
    precision of its float nodes and the SHA-256 of what was written."""

    KIND: ClassVar[str] = "quantized"
    calibration_step: int
    output_sha256: str
    keep_float: dict
    fallback_dtype: str = "fp32"


@dataclasses.dataclass(frozen=True)
class SpeedStep(StepRecord):
    """The rounds of ``onnxq.tune.speed`` on the model of the calibration step ``calibration_step``
    with the keep-float set ``base`` (keys): each round a dict of the quantized nodes slower in
    int8 on this machine (``slower``, keys), whether the model with them float was kept
    (``kept``), the median of its paired time ratios to the model before (``ratio``), and in how
    many of how many pairs it was faster (``faster_pairs``, ``pairs``)."""

    KIND: ClassVar[str] = "speed"
    calibration_step: int
    base: list
    rounds: list


@dataclasses.dataclass(frozen=True)
class SmoothingStep(StepRecord):
    """The outlier-migration factors (``onnxq.transform.smoothing``): tensor key of each
    smoothed activation -> its per-channel factors (``encode_array``)."""

    KIND: ClassVar[str] = "smoothing"
    factors: dict

    @classmethod
    def of(cls, factors: dict[str, np.ndarray]) -> SmoothingStep:
        return cls({key: encode_array(array) for key, array in sorted(factors.items())})

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: decode_array(encoded) for key, encoded in self.factors.items()}
