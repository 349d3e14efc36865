"""Scales, zero points and (de)quantization with ONNX QuantizeLinear/DequantizeLinear semantics.

Plain numpy on arrays; nothing here knows about graphs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INT32_MAX = 2**31 - 1
WEIGHT_QMAX = 127  # int8 weights are symmetric in [-127, 127], zero point 0
REDUCED_WEIGHT_QMAX = 63  # 7-bit weights, where CPU kernels would saturate (onnxq.tune.saturation)

QRANGE = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.int32): (-(2**31), INT32_MAX),
}


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a quantized tensor; ``axis`` is set for per-channel params."""

    scale: np.ndarray  # float32, scalar or 1-D
    zero_point: np.ndarray  # uint8 / int8 / int32, same shape as scale
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def activation_params(rmin: float, rmax: float, dtype: str) -> QuantParams:
    """Per-tensor params for an activation observed in ``[rmin, rmax]``.

    uint8: asymmetric, the range widened to include 0, ``s = (rmax - rmin) / 255``,
    ``zp = round(-rmin / s)``. int8: symmetric, ``s = max(|rmin|, |rmax|) / 127``, ``zp = 0``.
    A range of width zero gets scale 1 (every value is 0 then, exactly representable).
    """
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if dtype == "uint8":
        scale = np.float32((rmax - rmin) / 255.0)
        if scale == 0:
            return QuantParams(np.array(1.0, np.float32), np.array(0, np.uint8))
        zero_point = np.clip(np.rint(-rmin / np.float64(scale)), 0, 255)
        return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))
    if dtype == "int8":
        scale = np.float32(max(-rmin, rmax) / 127.0)
        if scale == 0:
            scale = np.float32(1.0)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    raise ValueError(f"unknown activation type {dtype!r}")


def weight_scale(weight: np.ndarray, axis: int | None, qmax: int = WEIGHT_QMAX) -> np.ndarray:
    """Symmetric int8 scale ``max|w| / qmax`` (127, or 63 for 7-bit weights), per channel along
    ``axis`` or per tensor.

    A channel that is entirely zero gets the median scale of the other channels (1.0 if every
    channel is zero): any positive scale represents its zeros exactly, and a typical one keeps
    the resolution of a bias added to that channel.
    """
    # max|w| as max(max w, -min w): exact, and no copy of a big weight
    if axis is None:
        amax = np.array(np.maximum(weight.max(), -weight.min()) if weight.size else 0.0, np.float64)
    else:
        others = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
        amax = np.maximum(weight.max(axis=others), -weight.min(axis=others)).astype(np.float64)
    scale = amax / qmax
    nonzero = scale > 0
    fill = np.median(scale[nonzero]) if nonzero.any() else 1.0
    return np.where(nonzero, scale, fill).astype(np.float32)


def _broadcast_shape(params: QuantParams, ndim: int) -> tuple[int, ...]:
    if params.axis is None or params.scale.ndim == 0:
        return ()
    shape = [1] * ndim
    shape[params.axis] = params.scale.size
    return tuple(shape)


_BLOCK_ELEMENTS = 1 << 22  # quantize works in blocks of about this many elements


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """``saturate(round_half_to_even(x / scale) + zero_point)``, as ONNX QuantizeLinear, to an
    8-bit type (saturated in float32, where the zero point and the range are exact).

    Big arrays go in blocks along their first axis, so that the temporaries stay small.
    """
    shape = _broadcast_shape(params, x.ndim)
    scale = params.scale.astype(np.float32).reshape(shape)
    zero_point = params.zero_point.astype(np.float32).reshape(shape)
    qmin, qmax = QRANGE[params.dtype]
    if x.ndim == 0:
        return np.clip(np.rint(np.float32(x) / scale) + zero_point, qmin, qmax).astype(params.dtype)
    out = np.empty(x.shape, params.dtype)
    rows = max(1, _BLOCK_ELEMENTS // max(1, x[0].size))
    per_row = scale.ndim > 0 and scale.shape[0] > 1  # per-channel along the first axis
    for start in range(0, x.shape[0], rows):
        block = slice(start, start + rows)
        q = np.rint(x[block].astype(np.float32, copy=False) / (scale[block] if per_row else scale))
        q += zero_point[block] if per_row else zero_point
        out[block] = np.clip(q, qmin, qmax, out=q)
    return out


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """``(q - zero_point) * scale``, as ONNX DequantizeLinear."""
    shape = _broadcast_shape(params, q.ndim)
    scale = params.scale.astype(np.float32).reshape(shape)
    zero_point = params.zero_point.astype(np.int64).reshape(shape)
    return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedBias:
    """An int32 bias whose scale is ``input_scale * weight_scale`` per channel.

    ``weight_scale`` is the weight scale to use with it: equal to the requested one except on
    ``widened_channels``, where it was enlarged so that the bias fits in int32 without wrapping.
    """

    values: np.ndarray  # int32
    scale: np.ndarray  # float32
    weight_scale: np.ndarray  # float32
    widened_channels: tuple[int, ...]


def quantize_bias(
    bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
) -> QuantizedBias:
    """Quantize a Conv/Gemm bias to int32 with scale ``s_x * s_w``.

    ``weight_scale`` is per channel (1-D, one per bias element) or per tensor (scalar). Where
    ``|round(b / (s_x * s_w))|`` would exceed 2**31 - 1, the weight scale is widened until the
    bias fits, instead of letting the integer wrap.
    """
    bias = bias.astype(np.float64)
    input_scale = np.float32(input_scale)
    scale = weight_scale.astype(np.float32).copy()
    needed = np.abs(bias) / (np.float64(input_scale) * INT32_MAX)
    overflowing = needed > scale
    if scale.ndim == 0:
        needed = np.array(needed.max(initial=0.0))
    too_small = needed > scale
    # Round up in float32 so that the quotient below is certain to fit.
    scale[too_small] = np.nextafter(needed[too_small].astype(np.float32), np.float32(np.inf))
    bias_scale = (input_scale * scale).astype(np.float32)
    values = np.clip(np.rint(bias / bias_scale.astype(np.float64)), -INT32_MAX, INT32_MAX)
    return QuantizedBias(
        values=values.astype(np.int32),
        scale=bias_scale,
        weight_scale=scale,
        widened_channels=tuple(int(i) for i in np.flatnonzero(overflowing)),
    )
