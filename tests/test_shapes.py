"""Shapes: symbolic dims, batches > 1, samples of different lengths, and declared shapes that
contradict the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
from onnxq.calibration.observers import METHODS
from onnxq.rewrite.quant_math import activation_params
from onnxq.load.shapes import correct_declared_shapes
from tests.graphs import initializers, make_model, producer, run, sqnr_db
from tests.test_cli_errors import onnxq as onnxq_cli

rng = np.random.default_rng(0)
W1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
B1 = rng.normal(0, 0.1, 32).astype(np.float32)
W2 = rng.normal(0, 0.3, (32, 8)).astype(np.float32)


def _sequence_model(batch, opset: int = 17) -> onnx.ModelProto:
    """x [batch, T, 16] -> MatMul -> Add -> Relu -> MatMul -> y [batch, T, 8]: every op works
    position by position, so a tensor's values over a set of sequences are the union of the
    values over each sequence, however the sequences are cut and grouped."""
    return make_model(
        [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "b1"], ["hb"]),
         oh.make_node("Relu", ["hb"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["y"])],
        [("x", [batch, "T", 16])], [("y", [batch, "T", 8])], [("w1", W1), ("b1", B1), ("w2", W2)], opset=opset,
    )


def _sequences(batch: int, lengths) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.normal(size=(batch, t, 16)).astype(np.float32)} for t in lengths]


def _scales(path) -> dict[str, float]:
    return {name: float(array) for name, array in initializers(onnx.load(path)).items()
            if name.endswith("_scale") and array.ndim == 0}


@pytest.mark.parametrize("method", METHODS)
def test_samples_of_different_lengths_calibrate_like_the_same_values_in_one_sample(tmp_path, method):
    samples = _sequences(1, (5, 9, 13))
    config = onnxq.QuantConfig(method=method, reduce_range="never")
    onnxq.convert(_sequence_model(1), tmp_path / "cut.onnx", samples, config)
    joined = {"x": np.concatenate([s["x"] for s in samples], axis=1)}  # one sample, T = 27
    onnxq.convert(_sequence_model(1), tmp_path / "joined.onnx", [joined], config)
    cut, whole = _scales(tmp_path / "cut.onnx"), _scales(tmp_path / "joined.onnx")
    assert len(cut) >= 3 and cut == whole


def test_symbolic_batch_and_length_with_batches_of_several_samples(tmp_path):
    chunks = _sequences(4, (5, 9, 13))  # 12 samples; batches of 3 cut across each chunk
    result = onnxq.convert(_sequence_model("N"), tmp_path / "q.onnx", chunks,
                           onnxq.QuantConfig(batch_size=3))
    assert result.calibration_samples == 12
    x = np.concatenate([c["x"].reshape(-1, 16) for c in chunks])
    expected = activation_params(x.min(), x.max(), "uint8")
    assert _scales(tmp_path / "q.onnx")["x_scale"] == pytest.approx(float(expected.scale), rel=1e-6)
    model = _sequence_model("N")
    for chunk in chunks + _sequences(2, (3, 17)):  # and lengths never seen in calibration
        assert sqnr_db(run(model, chunk)[0], run(str(tmp_path / "q.onnx"), chunk)[0]) > 30


def test_fixed_batch_larger_than_one(tmp_path):
    data = {"x": rng.normal(size=(8, 6, 16)).astype(np.float32)}  # two runs of the fixed batch 4
    result = onnxq.convert(_sequence_model(4), tmp_path / "q.onnx", data)
    assert result.calibration_samples == 8
    feed = {"x": data["x"][:4]}
    assert sqnr_db(run(_sequence_model(4), feed)[0], run(str(tmp_path / "q.onnx"), feed)[0]) > 30


def _declared_wrong(kind: str, opset: int = 17) -> onnx.ModelProto:
    model = _sequence_model(1, opset)
    if kind == "output-dim":  # y is [1, T, 8]
        model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 7
    elif kind == "output-rank":
        model.graph.output[0].type.CopyFrom(oh.make_tensor_type_proto(onnx.TensorProto.FLOAT, [1, 8]))
    elif kind == "value-info-rank":  # hb is [1, T, 32]
        model.graph.value_info.append(oh.make_tensor_value_info("hb", onnx.TensorProto.FLOAT, [1, 32, 5, 5]))
    elif kind == "value-info-type":
        model.graph.value_info.append(oh.make_tensor_value_info("h", onnx.TensorProto.INT64, [1, "T", 32]))
    return model


@pytest.mark.parametrize("opset", [11, 17])  # below 13 the model is also converted to opset 13 first
@pytest.mark.parametrize("kind", ["output-dim", "output-rank", "value-info-rank", "value-info-type"])
def test_declared_shapes_that_contradict_the_graph_are_corrected(tmp_path, kind, opset):
    model = _declared_wrong(kind, opset)
    data = _sequences(1, (5, 9))
    result = onnxq.convert(model, tmp_path / "q.onnx", data)
    assert any("contradict" in note or "declared" in note for note in result.notes), result.notes
    quantized = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(quantized, full_check=True)
    assert [d.dim_value for d in quantized.graph.output[0].type.tensor_type.shape.dim][::2] == [1, 8]
    for sample in data:  # close to float, computed in numpy (the broken declaration may stop ORT)
        x = sample["x"]
        reference = np.maximum(x @ W1 + B1, 0) @ W2
        assert sqnr_db(reference, run(quantized, sample)[0]) > 30


def test_symbolic_dims_with_other_names_do_not_contradict():
    model = _sequence_model("N")
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # not "N": still no contradiction
    model.graph.value_info.append(oh.make_tensor_value_info("hb", onnx.TensorProto.FLOAT, ["B", None, 32]))
    corrected, notes = correct_declared_shapes(model)
    assert notes == [] and corrected is model


def test_declared_output_of_a_custom_op_is_kept():
    """Inference cannot check what a custom-domain op computes: its declaration stands."""
    model = _sequence_model(1)
    model.graph.node[-1].CopyFrom(oh.make_node("Mystery", ["r", "w2"], ["y"], domain="com.example"))
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 99
    corrected, notes = correct_declared_shapes(model)
    assert notes == [] and corrected.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 99


def test_minus_one_dims_are_dynamic_dims(tmp_path):
    """A classifier whose input declares [-1, 3, -1, -1], as some exporters write dynamic dims:
    ONNX Runtime runs it at any batch and size, and so does the quantized model."""
    weight = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    model = make_model(
        [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["r"]),
         oh.make_node("GlobalAveragePool", ["r"], ["y"])],
        [("x", ["N", 3, "H", "W"])], [("y", ["N", 8, 1, 1])], [("w", weight)],
    )
    for value, axes in ((model.graph.input[0], (0, 2, 3)), (model.graph.output[0], (0,))):
        for axis in axes:
            value.type.tensor_type.shape.dim[axis].dim_value = -1
    path, out = tmp_path / "model.onnx", tmp_path / "q.onnx"
    path.write_bytes(model.SerializeToString())
    calibration = rng.normal(size=(6, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=calibration)
    result = onnxq_cli("convert", path, "-o", out, "--calibration-data", tmp_path / "calib.npz", "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    quantized = onnx.load(out)
    assert [d.HasField("dim_value") for d in quantized.graph.input[0].type.tensor_type.shape.dim] == [False, True, False, False]
    conv = next(node for node in quantized.graph.node if node.op_type == "Conv")
    assert initializers(quantized)[producer(quantized, conv.input[1]).input[0]].dtype == np.int8
    for feed in ({"x": calibration[:2]}, {"x": rng.normal(size=(5, 3, 20, 16)).astype(np.float32)}):
        assert sqnr_db(run(model, feed)[0], run(quantized, feed)[0]) > 30  # ONNX Runtime runs the -1 model
