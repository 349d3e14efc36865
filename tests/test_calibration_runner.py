"""The calibration runner: device selection, passes under a memory budget, methods end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.runtime import calibration_providers, CUDA, cuda_unavailable_reason
from onnxq.errors import DeviceError
from tests.graphs import initializers, run
from tests.test_cli_errors import DEMO, ROOT, onnxq as run_cli

CALIB = ROOT / "models" / "calib.npz"
NO_CUDA = cuda_unavailable_reason()


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA is available here")
def test_cuda_requested_without_cuda_fails_with_the_reason(tmp_path):
    out = tmp_path / "m.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", CALIB, "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot calibrate on CUDA: {NO_CUDA}; use --device cpu or auto"
    assert not out.exists()


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA is available here")
def test_auto_device_falls_back_to_cpu_and_says_so_where_there_is_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("onnxq.runtime.nvidia_gpu_present", lambda: True)
    providers, note = calibration_providers("auto")
    assert providers == ("CPUExecutionProvider",) and NO_CUDA in note
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", CALIB)
    assert any(note.startswith("calibrating on CPU") for note in result.notes)


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA is available here")
def test_auto_device_on_a_machine_without_a_gpu_calibrates_on_cpu_quietly(tmp_path, monkeypatch):
    monkeypatch.setattr("onnxq.runtime.nvidia_gpu_present", lambda: False)
    assert calibration_providers("auto") == (("CPUExecutionProvider",), None)
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", CALIB)
    assert not any("CUDA" in note for note in result.notes)


def test_cpu_device_never_probes_cuda():
    assert calibration_providers("cpu") == (("CPUExecutionProvider",), None)


@pytest.mark.skipif(NO_CUDA is not None, reason=f"needs CUDA: {NO_CUDA}")
def test_cuda_calibration_matches_cpu_calibration(tmp_path):
    assert calibration_providers("cuda")[0][0] == CUDA
    cpu = onnxq.convert(DEMO, tmp_path / "cpu.onnx", CALIB, onnxq.QuantConfig(), run=onnxq.RunOptions(device="cpu"))
    cuda = onnxq.convert(DEMO, tmp_path / "cuda.onnx", CALIB, onnxq.QuantConfig(), run=onnxq.RunOptions(device="cuda"))
    assert cpu.op_counts == cuda.op_counts
    scales_cpu, scales_cuda = initializers(onnx.load(cpu.output)), initializers(onnx.load(cuda.output))
    for name, value in scales_cpu.items():
        if name.endswith("_scale"):
            np.testing.assert_allclose(scales_cuda[name], value, rtol=1e-4)


def test_cuda_device_raises_device_error_in_the_api_when_unavailable(tmp_path):
    if NO_CUDA is None:
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError):
        onnxq.convert(DEMO, tmp_path / "m.onnx", CALIB, onnxq.QuantConfig(), run=onnxq.RunOptions(device="cuda"))


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_tiny_memory_budget_calibrates_in_passes_with_the_same_result(tmp_path, method):
    one = onnxq.convert(DEMO, tmp_path / "one.onnx", CALIB, onnxq.QuantConfig(method=method), run=onnxq.RunOptions(device="cpu"))
    many = onnxq.convert(
        DEMO, tmp_path / "many.onnx", CALIB, onnxq.QuantConfig(method=method), run=onnxq.RunOptions(device="cpu", memory_budget_mb=0.01)
    )
    assert any("passes" in note for note in many.notes)
    assert not any("passes" in note for note in one.notes)
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "many.onnx").read_bytes()


def test_one_shot_iterator_that_needs_several_passes_is_a_clear_error(tmp_path):
    with np.load(CALIB) as data:
        chunks = iter([{"input": data["input"]}])
    with pytest.raises(onnxq.CalibrationDataError, match="one-shot iterator"):
        onnxq.convert(DEMO, tmp_path / "m.onnx", chunks, onnxq.QuantConfig(method="mse"), run=onnxq.RunOptions(memory_budget_mb=0.01))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_method_keeps_the_demo_accurate(tmp_path, method):
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", CALIB, onnxq.QuantConfig(method=method), run=onnxq.RunOptions(device="cpu"),
                           eval_data=ROOT / "models" / "eval.npz")
    assert result.fidelity.quantized_top1 >= result.fidelity.float_top1 - 0.015


def test_minmax_in_graph_reduction_gives_the_exact_extremes(tmp_path):
    # Independent reference: the float model's own Relu output over the data, via ORT.
    model = onnx.load(DEMO)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.output.append(onnx.helper.make_tensor_value_info(relu.output[0], onnx.TensorProto.FLOAT, None))
    with np.load(CALIB) as data:
        images = data["input"]
    expected_max = max(float(run(model, {"input": images[i : i + 1]})[1].max()) for i in range(len(images)))
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", CALIB, onnxq.QuantConfig(), run=onnxq.RunOptions(device="cpu"))
    quantized = onnx.load(result.output)
    q_node = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
    scale = initializers(quantized)[q_node.input[1]]
    assert scale == np.float32(expected_max / 255)
