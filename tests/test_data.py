"""The calibration data contract: sources, layouts, batching and checks."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

import onnxq
from onnxq.calibration.data import InputSpec, iter_batches
from onnxq.errors import CalibrationDataError
from tests.test_cli_errors import DEMO

IMAGE = InputSpec("image", np.dtype(np.float32), (None, 3, 4, 4))
FIXED = InputSpec("image", np.dtype(np.float32), (1, 3, 4, 4))
STATE = InputSpec("state", np.dtype(np.float32), (2, None, 5))  # batch on axis 1, like an RNN state


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 4, 4)).astype(np.float32)


def _batches(source, inputs, **kwargs):
    return list(iter_batches(source, inputs, **kwargs))


def test_dynamic_batch_is_fed_batch_size_at_a_time_with_a_short_tail():
    data = _images(10)
    batches = _batches({"image": data}, [IMAGE], batch_size=4)
    assert [b.samples for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.feed["image"] for b in batches]), data)


def test_fixed_batch_of_one_is_fed_sample_by_sample_whatever_the_batch_size():
    batches = _batches({"image": _images(3)}, [FIXED], batch_size=8)
    assert [b.feed["image"].shape for b in batches] == [(1, 3, 4, 4)] * 3


def test_array_with_one_more_axis_holds_complete_inputs():
    states = np.random.default_rng(1).normal(size=(6, 2, 1, 5)).astype(np.float32)
    batches = _batches({"state": states}, [STATE])
    assert len(batches) == 6 and batches[0].feed["state"].shape == (2, 1, 5)
    np.testing.assert_array_equal(batches[4].feed["state"], states[4])


def test_max_samples_stops_early_even_inside_a_batch():
    batches = _batches({"image": _images(10)}, [IMAGE], batch_size=4, max_samples=6)
    assert sum(b.samples for b in batches) == 6


def test_metadata_keys_and_labels_are_not_inputs():
    batches = _batches({"image": _images(4), "__source": np.array("camera 3"), "label": np.arange(4)}, [IMAGE], batch_size=2)
    assert [b.labels.tolist() for b in batches] == [[0, 1], [2, 3]]
    assert set(batches[0].feed) == {"image"}


def test_folder_of_npz_files_is_read_in_name_order(tmp_path):
    np.savez(tmp_path / "b.npz", image=_images(2, seed=2))
    np.savez(tmp_path / "a.npz", image=_images(3, seed=1))
    (tmp_path / "notes.txt").write_text("ignored")
    batches = _batches(tmp_path, [IMAGE], batch_size=8)
    assert [b.samples for b in batches] == [3, 2]
    np.testing.assert_array_equal(batches[0].feed["image"], _images(3, seed=1))


def test_folder_of_npy_files_for_a_single_input_model(tmp_path):
    np.save(tmp_path / "0.npy", _images(2))
    assert sum(b.samples for b in _batches(tmp_path, [IMAGE], batch_size=8)) == 2


def test_npy_files_are_refused_for_multi_input_models(tmp_path):
    np.save(tmp_path / "0.npy", _images(2))
    with pytest.raises(CalibrationDataError, match="single-input"):
        _batches(tmp_path, [IMAGE, STATE])


def test_loader_from_a_python_file(tmp_path):
    loader = tmp_path / "my_loader.py"
    loader.write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for seed in range(3):\n"
        "        yield {'image': np.full((2, 3, 4, 4), seed, np.float32)}\n"
    )
    batches = _batches(f"{loader}:samples", [IMAGE], batch_size=2)
    assert [float(b.feed["image"].mean()) for b in batches] == [0.0, 1.0, 2.0]


def test_loader_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "calib_pkg").mkdir()
    (tmp_path / "calib_pkg" / "__init__.py").write_text("")
    (tmp_path / "calib_pkg" / "data.py").write_text(
        "import numpy as np\ndef load():\n    return {'image': np.ones((5, 3, 4, 4), np.float32)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sum(b.samples for b in _batches("calib_pkg.data:load", [IMAGE], batch_size=4)) == 5


def test_loader_naming_a_missing_function(tmp_path):
    loader = tmp_path / "loader.py"
    loader.write_text("x = 1\n")
    with pytest.raises(CalibrationDataError, match="no function 'samples'"):
        _batches(f"{loader}:samples", [IMAGE])


def test_iterable_of_non_dicts_is_refused():
    with pytest.raises(CalibrationDataError, match="not a dict"):
        _batches([_images(2)], [IMAGE])


def test_inputs_with_different_sample_counts_are_refused():
    with pytest.raises(CalibrationDataError, match="different numbers of samples"):
        _batches({"image": _images(3), "state": np.zeros((4, 2, 1, 5), np.float32)}, [IMAGE, STATE])


def test_fixed_batch_larger_than_one_needs_whole_batches():
    spec = InputSpec("image", np.dtype(np.float32), (4, 3, 4, 4))
    assert [b.samples for b in _batches({"image": _images(8)}, [spec])] == [4, 4]
    with pytest.raises(CalibrationDataError, match="multiple of 4"):
        _batches({"image": _images(6)}, [spec])


def test_data_problems_in_later_chunks_are_found_while_streaming():
    def chunks():
        yield {"image": _images(2)}
        yield {"image": np.zeros((2, 3, 4, 5), np.float32)}

    stream = iter_batches(chunks(), [IMAGE], batch_size=2)
    assert next(stream).samples == 2
    with pytest.raises(CalibrationDataError, match="item 1"):
        next(stream)


TEXT = InputSpec("text", np.dtype(object), (None, 1))  # an ONNX string input


def test_string_input_takes_arrays_of_str():
    words = np.array([["a"], ["bb"], ["ccc"]])
    batches = _batches({"text": words}, [TEXT], batch_size=2)
    assert [b.feed["text"].tolist() for b in batches] == [[["a"], ["bb"]], [["ccc"]]]


def test_string_input_given_numbers_says_it_expects_strings():
    with pytest.raises(CalibrationDataError, match="'text' is float32 but the model expects strings"):
        _batches({"text": np.ones((3, 1), np.float32)}, [TEXT])


def test_one_hot_labels_are_read_as_class_indices():
    classes = np.random.default_rng(4).integers(0, 5, 10)
    batches = _batches({"image": _images(10), "label": np.eye(5, dtype=np.float32)[classes]}, [IMAGE], batch_size=4)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), classes)
    column = _batches({"image": _images(10), "label": classes[:, None]}, [IMAGE], batch_size=4)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in column]), classes)


@pytest.mark.parametrize("label", [np.zeros((10, 2, 2)), np.zeros(9, np.int64)])
def test_labels_that_are_not_one_per_sample_are_refused(label):
    with pytest.raises(CalibrationDataError, match=r"'label' has shape .* give class indices \[10\] or one-hot rows"):
        _batches({"image": _images(10), "label": label}, [IMAGE])


def test_one_hot_eval_labels_give_the_top1_row(tmp_path):
    """Top-1 with one-hot labels is the float model's accuracy, computed here with ONNX Runtime."""
    with np.load(DEMO.parent / "eval.npz") as data:
        inputs, labels = data["input"], data["label"]
    one_hot = np.eye(10, dtype=np.float32)[labels]
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", DEMO.parent / "calib.npz",
                           eval_data={"input": inputs, "label": one_hot})
    session = onnxruntime.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"input": inputs})[0].argmax(axis=1)
    assert result.fidelity.float_top1 == pytest.approx(float((predicted == labels).mean()))
    assert result.fidelity.quantized_top1 is not None
