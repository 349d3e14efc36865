"""Saturation-aware weights: 7-bit weights only where this CPU's u8 x s8 kernels saturate."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from onnxq.tune.saturation import cpu_saturates, saturates, saturation_hurts
from tests.graphs import initializers, make_model, run, sqnr_db


def test_cpu_capability_detection():
    assert saturates("x86_64", "flags : fpu sse2 avx2 fma")
    assert not saturates("x86_64", "flags : fpu avx2 avx512f avx512_vnni")
    assert not saturates("x86_64", "flags : avx2 avx_vnni")
    assert not saturates("aarch64", "Features : fp asimd asimddp")
    assert saturates("x86_64", None)


def test_saturation_in_any_measured_batch_counts_and_rounding_level_differences_do_not():
    exact = [np.full((1, 8), 128, np.uint8) for _ in range(4)]
    saturated = [batch.copy() for batch in exact]
    saturated[2][0, :3] -= 15  # the third batch alone saturates: 3 outputs off by 15 steps
    assert saturation_hurts(saturated, exact)  # 675 / 32 steps^2 over the four batches
    assert not saturation_hurts(saturated[:2], exact[:2])  # the first batches alone look exact
    off_by_one = [batch.copy() for batch in exact]
    off_by_one[0][0, 0] += 1  # one output one step off: 1 / 32 steps^2, below rounding noise (1/12)
    assert not saturation_hurts(off_by_one, exact)


def test_a_float_output_is_judged_in_the_steps_of_its_range():
    """A MatMul writing float (MatMulIntegerToFloat): its range 0..255 gives steps of 1.0 here."""
    exact = [np.linspace(0, 255, 64, dtype=np.float32).reshape(1, 64)]
    assert saturation_hurts([exact[0] + np.where(np.arange(64) < 8, 4.0, 0.0).astype(np.float32)], exact)  # 2 steps^2
    assert not saturation_hurts([exact[0] + 0.1], exact)  # 0.01 steps^2: rounding level


def _first_layer_model():
    """An image-like first layer: 3 input channels, so few products per output that one pair of
    large uint8 pixels times large weights can pass int16."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("y", None)], [("w", w), ("b", np.zeros(8, np.float32))])


def _weight_qmax(path):
    stored = initializers(onnx.load(path))
    w, scale = stored["w_quantized"], stored["w_scale"]
    return np.abs(w.astype(np.int32)).max(), scale


def _convert(tmp_path, reduce_range):
    rng = np.random.default_rng(1)
    data = {"x": rng.uniform(0, 1, (8, 3, 16, 16)).astype(np.float32)}
    out = tmp_path / f"{reduce_range}.onnx"
    result = onnxq.convert(_first_layer_model(), out, data, onnxq.QuantConfig(reduce_range=reduce_range))
    return result, out


def test_never_and_always_choose_8_and_7_bit_weights(tmp_path):
    _, never = _convert(tmp_path, "never")
    _, always = _convert(tmp_path, "always")
    assert _weight_qmax(never)[0] == 127 and _weight_qmax(always)[0] == 63


@pytest.mark.skipif(not cpu_saturates(), reason="this CPU's int8 kernels do not saturate (VNNI/ARM)")
def test_auto_gives_7_bit_weights_to_a_saturating_layer_and_restores_accuracy(tmp_path):
    result, auto = _convert(tmp_path, "auto")
    _, never = _convert(tmp_path, "never")
    assert _weight_qmax(auto)[0] == 63
    assert any("7-bit weights on 1 layer" in note for note in result.notes)
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    reference = run(_first_layer_model(), {"x": x})[0]
    # Measured against the float model with ONNX Runtime's fused integer kernels, as deployed.
    assert sqnr_db(reference, run(str(auto), {"x": x})[0]) > sqnr_db(reference, run(str(never), {"x": x})[0]) + 3


@pytest.mark.skipif(not cpu_saturates(), reason="this CPU's int8 kernels do not saturate (VNNI/ARM)")
def test_auto_keeps_8_bit_weights_where_saturation_does_not_hurt(tmp_path):
    rng = np.random.default_rng(3)
    w = (rng.normal(0, 0.05, (8, 64, 1, 1))).astype(np.float32)
    w[:, 0] = 1.0  # one large weight per output sets the scale: the rest are small, pairs stay in int16
    model = make_model([oh.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 64, 4, 4])], [("y", None)], [("w", w)])
    data = {"x": rng.uniform(-1, 1, (4, 64, 4, 4)).astype(np.float32)}
    result = onnxq.convert(model, tmp_path / "m.onnx", data, onnxq.QuantConfig(reduce_range="auto"))
    assert _weight_qmax(tmp_path / "m.onnx")[0] == 127
    assert not any("7-bit" in note for note in result.notes)


def test_recover_reuses_the_recorded_choice(tmp_path):
    result, auto = _convert(tmp_path, "auto")
    recovered = tmp_path / "recovered.onnx"
    onnxq.recover(_first_layer_model(), result.workspace, recovered)
    assert recovered.read_bytes() == auto.read_bytes()


def _dense_gemm_model():
    """Audio-like inputs in +-30000 into one Gemm: most samples, but not the first two, have a pair
    of large uint8 activations meeting a pair of large weights."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (64, 8)).astype(np.float32)
    model = make_model([oh.make_node("Gemm", ["x", "w", "b"], ["y"])], [("x", [None, 64])], [("y", [None, 8])],
                       [("w", w), ("b", np.zeros(8, np.float32))])
    return model, {"x": rng.uniform(-30000, 30000, (32, 64)).astype(np.float32)}


@pytest.mark.skipif(not cpu_saturates(), reason="this CPU's int8 kernels do not saturate (VNNI/ARM)")
def test_auto_finds_saturation_that_the_first_sample_does_not_show(tmp_path):
    model, data = _dense_gemm_model()
    outputs = {}
    for reduce_range in ("auto", "never"):
        out = tmp_path / f"{reduce_range}.onnx"
        onnxq.convert(model, out, data, onnxq.QuantConfig(reduce_range=reduce_range),
                      fallback=onnxq.FallbackOptions(auto=False), workspace=tmp_path / reduce_range)
        outputs[reduce_range] = (_weight_qmax(out)[0], run(str(out), data)[0])
    reference = run(model, data)[0]
    assert outputs["auto"][0] == 63 and outputs["never"][0] == 127
    # Measured against the float model with ONNX Runtime's fused integer kernels, as deployed.
    assert sqnr_db(reference, outputs["auto"][1]) > sqnr_db(reference, outputs["never"][1]) + 3
