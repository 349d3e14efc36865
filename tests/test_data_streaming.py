"""Data read a batch at a time: .npy files and .npz members (stored or compressed) never held
whole, and ONNX Runtime's CalibrationDataReader protocol (``get_next()``, optional ``rewind()``)."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

import onnxq
from onnxq.calibration.data import InputSpec, iter_batches
from onnxq.errors import CalibrationDataError
from tests.test_cli_errors import DEMO

IMAGE = InputSpec("image", np.dtype(np.float32), (None, 3, 32, 32))
SAMPLES = 400  # 12 KiB each: 4.7 MiB in all
SAMPLE_BYTES = 3 * 32 * 32 * 4
DEMO_CALIB = DEMO.parent / "calib.npz"
DEMO_EVAL = DEMO.parent / "eval.npz"


def _images(n=SAMPLES):
    return np.random.default_rng(0).normal(size=(n, 3, 32, 32)).astype(np.float32)


def _write(tmp_path, form):
    images, labels = _images(), np.arange(SAMPLES) % 10
    if form == "npy":
        path = tmp_path / "data.npy"
        np.save(path, images)
    else:
        path = tmp_path / "data.npz"
        (np.savez_compressed if form == "compressed npz" else np.savez)(path, image=images, label=labels)
    return path, images, labels


def _peak_while_reading(path, batch_size=4):
    """The traced peak (bytes) while every batch is read and summed, and the batches."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        feeds, labels = [], []
        for batch in iter_batches(path, [IMAGE], batch_size):
            feeds.append(float(batch.feed["image"].astype(np.float64).sum()))
            labels.append(None if batch.labels is None else batch.labels.copy())
        return tracemalloc.get_traced_memory()[1] - before, feeds, labels
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("form", ["npz", "compressed npz", "npy"])
def test_a_file_is_read_a_batch_at_a_time_and_gives_the_same_values(tmp_path, form):
    path, images, labels = _write(tmp_path, form)
    peak, sums, batch_labels = _peak_while_reading(path)
    # the file holds 400 samples, a batch 4: reading holds a few batches (the batch, the bytes read,
    # the decompressor's buffers, the float64 copy summed here), never the file
    assert peak < 32 * SAMPLE_BYTES, f"peak {peak / SAMPLE_BYTES:.1f} samples"
    expected = images.astype(np.float64).reshape(-1, 4, 3 * 32 * 32).sum(axis=(1, 2))
    np.testing.assert_allclose(sums, expected, rtol=1e-12)
    if form != "npy":
        np.testing.assert_array_equal(np.concatenate(batch_labels), labels)


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    np.savez(small / "d.npz", image=_images(50))
    np.savez(large / "d.npz", image=_images(SAMPLES))
    peak_small = _peak_while_reading(small / "d.npz")[0]
    peak_large = _peak_while_reading(large / "d.npz")[0]
    assert peak_large < 1.1 * peak_small + SAMPLE_BYTES


def test_a_nan_deep_in_a_file_names_its_sample(tmp_path):
    images = _images()
    images[297, 1, 2, 3] = np.nan
    np.savez_compressed(tmp_path / "d.npz", image=images)
    with pytest.raises(CalibrationDataError, match=r"'image' sample 297 contains NaN"):
        list(iter_batches(tmp_path / "d.npz", [IMAGE], batch_size=8))


def test_a_truncated_member_is_a_clear_error(tmp_path):
    path = tmp_path / "d.npz"
    header = tmp_path / "h.npy"
    np.lib.format.open_memmap(header, mode="w+", dtype=np.float32, shape=(SAMPLES, 3, 32, 32)).flush()
    with zipfile.ZipFile(path, "w") as archive:  # the header promises 400 samples, the member holds 10
        archive.writestr("image.npy", header.read_bytes()[: 128 + 10 * SAMPLE_BYTES])
    with pytest.raises(CalibrationDataError, match=r"cannot read .*'image'.*ends after 10 of 400 rows"):
        list(iter_batches(path, [IMAGE], batch_size=4))


def test_fortran_ordered_member_is_read_whole_with_the_same_values(tmp_path):
    images = np.asfortranarray(_images(20))
    np.savez(tmp_path / "d.npz", image=images)
    feeds = [b.feed["image"] for b in iter_batches(tmp_path / "d.npz", [IMAGE], batch_size=8)]
    np.testing.assert_array_equal(np.concatenate(feeds), images)


class _Reader(CalibrationDataReader):
    """ONNX Runtime's reader protocol, fed one sample of ``path`` at a time."""

    def __init__(self, path, rewindable=True):
        with np.load(path) as data:
            self.samples = [{"input": data["input"][i : i + 1]} for i in range(len(data["input"]))]
            self.labels = data["label"] if "label" in data.files else None
        if self.labels is not None:
            for sample, label in zip(self.samples, self.labels):
                sample["label"] = label[None]
        self.position = 0
        self.rewinds = 0
        if not rewindable:
            self.rewind = None

    def get_next(self):
        if self.position == len(self.samples):
            return None
        self.position += 1
        return self.samples[self.position - 1]

    def rewind(self):
        self.rewinds += 1
        self.position = 0


def test_a_calibration_data_reader_gives_the_same_model_as_the_npz(tmp_path):
    reference = onnxq.convert(DEMO, tmp_path / "npz.onnx", DEMO_CALIB, eval_data=DEMO_EVAL)
    reader, eval_reader = _Reader(DEMO_CALIB), _Reader(DEMO_EVAL)
    result = onnxq.convert(DEMO, tmp_path / "reader.onnx", reader, eval_data=eval_reader)
    assert (tmp_path / "reader.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()
    assert result.fidelity.samples == 500 and result.fidelity.quantized_top1 == reference.fidelity.quantized_top1
    assert reader.rewinds >= 1 and eval_reader.rewinds >= 1


def test_a_plain_object_with_get_next_is_a_reader(tmp_path):
    class Plain:
        def __init__(self):
            self.left = [{"input": x[None]} for x in np.load(DEMO_CALIB)["input"]]

        def get_next(self):
            return self.left.pop(0) if self.left else None

    onnxq.convert(DEMO, tmp_path / "plain.onnx", Plain())
    onnxq.convert(DEMO, tmp_path / "npz.onnx", DEMO_CALIB)
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()


def test_a_reader_without_rewind_cannot_feed_a_second_pass(tmp_path):
    reader = _Reader(DEMO_CALIB, rewindable=False)
    run = onnxq.RunOptions(memory_budget_mb=0.001)  # one tensor per pass: several passes
    with pytest.raises(CalibrationDataError, match="reader with rewind"):
        onnxq.convert(DEMO, tmp_path / "out.onnx", reader, onnxq.QuantConfig(method="percentile"), run=run)
    assert not (tmp_path / "out.onnx").exists()


def test_a_reader_returning_a_non_dict_is_named(tmp_path):
    class Bad:
        def get_next(self):
            return np.zeros((1, 1, 8, 8), np.float32)

    with pytest.raises(CalibrationDataError, match="item 0 is a ndarray"):
        onnxq.convert(DEMO, tmp_path / "out.onnx", Bad())
