"""The quantization arithmetic against the ONNX formulas written out independently in numpy."""

import numpy as np
import pytest

from onnxq.rewrite.quant_math import (
    INT32_MAX,
    QuantParams,
    activation_params,
    dequantize,
    quantize,
    quantize_bias,
    weight_scale,
)


@pytest.mark.parametrize("rmin, rmax", [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (-0.013, 0.21)])
def test_uint8_params_widen_range_to_zero_and_use_255_steps(rmin, rmax):
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    expected_scale = np.float32((hi - lo) / 255)
    params = activation_params(rmin, rmax, "uint8")
    assert params.scale.dtype == np.float32 and params.zero_point.dtype == np.uint8
    assert params.scale == expected_scale
    assert params.zero_point == np.uint8(round(-lo / float(expected_scale)))


@pytest.mark.parametrize("rmin, rmax", [(-1.0, 3.0), (-5.0, 2.0), (0.0, 7.0)])
def test_int8_params_are_symmetric_with_zero_point_zero(rmin, rmax):
    params = activation_params(rmin, rmax, "int8")
    assert params.zero_point == 0 and params.zero_point.dtype == np.int8
    assert params.scale == np.float32(max(abs(rmin), abs(rmax)) / 127)


def test_zero_is_exactly_representable():
    for rmin, rmax in [(-1.3, 3.7), (0.2, 9.1), (-8.0, -0.5)]:
        params = activation_params(rmin, rmax, "uint8")
        assert dequantize(quantize(np.zeros(3, np.float32), params), params).tolist() == [0, 0, 0]


def test_quantize_rounds_half_to_even_and_saturates():
    params = QuantParams(np.array(1.0, np.float32), np.array(0, np.int8))
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0], np.float32)
    assert quantize(x, params).tolist() == [0, 2, 2, 0, -2, -2, 127, -128]


def test_dequantize_of_quantize_is_within_half_a_step_inside_the_range():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2.0, 5.0, 1000).astype(np.float32)
    params = activation_params(x.min(), x.max(), "uint8")
    error = np.abs(dequantize(quantize(x, params), params) - x)
    assert error.max() <= params.scale / 2 * (1 + 1e-5)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_per_channel_weight_scale_is_max_abs_over_the_other_axes(axis):
    rng = np.random.default_rng(axis)
    w = rng.normal(size=(4, 5, 2, 3)).astype(np.float32)
    expected = [np.abs(np.take(w, c, axis=axis)).max() / 127 for c in range(w.shape[axis])]
    np.testing.assert_allclose(weight_scale(w, axis), expected, rtol=1e-6)


def test_per_tensor_weight_scale():
    w = np.array([[0.5, -2.54], [1.0, 0.0]], np.float32)
    assert weight_scale(w, None) == np.float32(2.54 / 127)


def test_all_zero_channel_gets_a_positive_scale_and_stays_exactly_zero():
    w = np.ones((3, 4), np.float32) * np.array([[1.0], [0.0], [2.0]], np.float32)
    scale = weight_scale(w, 0)
    assert (scale > 0).all()
    params = QuantParams(scale, np.zeros(3, np.int8), 0)
    assert (quantize(w, params)[1] == 0).all()


def test_weights_quantize_to_the_symmetric_int8_range():
    w = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    params = QuantParams(weight_scale(w, 0), np.zeros(4, np.int8), 0)
    q = quantize(w, params)
    assert q.min() >= -127 and q.max() <= 127
    assert (np.abs(q).max(axis=1) == 127).all()


def test_bias_is_int32_with_scale_input_scale_times_weight_scale():
    bias = np.array([0.1, -2.0, 3.3], np.float32)
    input_scale = np.float32(0.02)
    w_scale = np.array([0.01, 0.003, 0.5], np.float32)
    result = quantize_bias(bias, input_scale, w_scale)
    expected_scale = (input_scale * w_scale).astype(np.float32)
    np.testing.assert_array_equal(result.scale, expected_scale)
    np.testing.assert_array_equal(result.values, np.rint(bias.astype(np.float64) / expected_scale).astype(np.int32))
    assert result.values.dtype == np.int32 and result.widened_channels == ()


def test_bias_that_would_overflow_widens_that_channels_weight_scale_instead_of_wrapping():
    bias = np.array([1.0, 5.0e6, -3.0], np.float32)
    input_scale = np.float32(1e-3)
    w_scale = np.array([1e-3, 1e-6, 1e-2], np.float32)  # 5e6 / 1e-9 would be 5e15
    result = quantize_bias(bias, input_scale, w_scale)
    assert result.widened_channels == (1,)
    assert np.abs(result.values.astype(np.int64)).max() <= INT32_MAX
    assert result.weight_scale[0] == w_scale[0] and result.weight_scale[2] == w_scale[2]
    assert result.weight_scale[1] > w_scale[1]
    restored = result.values.astype(np.float64) * result.scale
    np.testing.assert_allclose(restored, bias, rtol=1e-6)
    # The sign survives: a wrapped int32 would flip it.
    assert np.sign(result.values).tolist() == [1, 1, -1]


def test_per_tensor_bias_overflow_widens_the_single_weight_scale():
    bias = np.array([4.0e6, 1.0], np.float32)
    result = quantize_bias(bias, np.float32(1e-3), np.array(1e-6, np.float32))
    assert result.weight_scale.ndim == 0 and result.widened_channels == (0,)
    assert np.abs(result.values.astype(np.int64)).max() <= INT32_MAX
