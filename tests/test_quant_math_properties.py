"""Properties of the quantization arithmetic, checked with hypothesis on generated ranges and
arrays (a fixed, derandomized example set: see tests/conftest.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.rewrite.quant_math import INT32_MAX, QuantParams, activation_params, dequantize, quantize, quantize_bias, weight_scale

FLOAT32_EPS = float(np.finfo(np.float32).eps)
bounds = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)
activation_dtypes = st.sampled_from(["uint8", "int8"])


@st.composite
def ranges(draw) -> tuple[float, float]:
    """An observed ``(rmin, rmax)`` with ``rmin <= rmax`` and a width of at least 1e-3."""
    low, high = sorted((draw(bounds), draw(bounds)))
    assume(high - low >= 1e-3)
    return low, high


def _values_in(low: float, high: float, draw) -> np.ndarray:
    fractions = draw(hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(0, 1)))
    return np.concatenate([[low, high, 0.0], low + fractions * (high - low)]).astype(np.float32)


@given(observed=ranges(), dtype=activation_dtypes, data=st.data())
def test_dequantize_of_quantize_is_within_half_a_step_inside_the_range(observed, dtype, data):
    params = activation_params(*observed, dtype)
    low, high = min(observed[0], 0.0), max(observed[1], 0.0)
    x = _values_in(low, high, data.draw)
    error = np.abs(dequantize(quantize(x, params), params).astype(np.float64) - x)
    scale = float(params.scale)
    # half a step, plus float32 rounding of x / scale and of (q - zp) * scale
    assert error.max() <= scale / 2 + 4 * FLOAT32_EPS * max(abs(low), abs(high), scale)


@given(observed=ranges(), dtype=activation_dtypes, data=st.data())
def test_quantize_is_monotonic(observed, dtype, data):
    params = activation_params(*observed, dtype)
    # values beyond the range too: saturation must not break the order
    x = np.sort(_values_in(2 * min(observed[0], -1.0), 2 * max(observed[1], 1.0), data.draw))
    q = quantize(x, params).astype(np.int64)
    assert (np.diff(q) >= 0).all()


@given(observed=ranges(), dtype=activation_dtypes)
def test_zero_is_exactly_representable(observed, dtype):
    params = activation_params(*observed, dtype)
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    assert params.zero_point.dtype.kind in "iu" and qmin <= int(params.zero_point) <= qmax
    assert dequantize(quantize(np.zeros(4, np.float32), params), params).tolist() == [0.0] * 4


@st.composite
def sparse_weights(draw) -> tuple[np.ndarray, int]:
    """A 2-D to 4-D float32 weight with exact zeros scattered in (sometimes a whole channel),
    and the output-channel axis to quantize it along."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, allow_subnormal=False, width=32)))
    zeros = draw(hnp.arrays(np.bool_, shape))
    weight = np.where(zeros, np.float32(0), values).astype(np.float32)
    axis = draw(st.integers(0, len(shape) - 1))
    if draw(st.booleans()):
        np.moveaxis(weight, axis, 0)[0] = 0  # a channel of zeros
    return weight, axis


@given(weight_and_axis=sparse_weights(), reduced=st.booleans())
def test_exact_zeros_in_weights_stay_exact_per_channel(weight_and_axis, reduced):
    weight, axis = weight_and_axis
    scale = weight_scale(weight, axis, 63 if reduced else 127)
    params = QuantParams(scale, np.zeros(scale.shape, np.int8), axis)
    q = quantize(weight, params)
    restored = dequantize(q, params)
    assert (q[weight == 0] == 0).all() and (restored[weight == 0] == 0).all()
    assert (scale > 0).all()
    # and the others within half a step of their channel's scale
    steps = np.moveaxis(np.broadcast_to(scale.reshape([-1] + [1] * (weight.ndim - 1)), np.moveaxis(weight, axis, 0).shape), 0, axis)
    assert (np.abs(restored - weight) <= steps / 2 * (1 + 1e-5)).all()


@given(
    bias=hnp.arrays(np.float32, st.integers(1, 8), elements=st.floats(-1e6, 1e6, allow_subnormal=False, width=32)),
    input_scale=st.floats(1e-8, 1.0),
    weight_scales=st.floats(1e-8, 1.0),
)
def test_int32_bias_never_wraps_and_is_within_half_a_step(bias, input_scale, weight_scales):
    weight_scale_per_channel = np.full(bias.shape, weight_scales, np.float32)
    fitted = quantize_bias(bias, np.float32(input_scale), weight_scale_per_channel)
    assert (np.abs(fitted.values.astype(np.int64)) <= INT32_MAX).all()
    assert (fitted.weight_scale >= weight_scale_per_channel).all()
    restored = fitted.values.astype(np.float64) * fitted.scale.astype(np.float64)
    assert (np.abs(restored - bias) <= fitted.scale.astype(np.float64) / 2 * (1 + 1e-5) + 1e-6 * np.abs(bias)).all()
