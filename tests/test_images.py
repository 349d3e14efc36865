"""Image folders as calibration data: preprocessing against numpy, errors, end to end."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime
import pytest
from PIL import Image

import onnxq
from onnxq.calibration.data import InputSpec, iter_batches
from tests.graphs import make_model
from tests.test_cli_errors import DEMO, assert_clean_failure, onnxq as run_cli

RGB_INPUT = InputSpec("images", np.dtype(np.float32), (None, 3, 6, 8))


def _write(folder, name, pixels):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    return pixels


def _pixels(height, width, channels=3, seed=0):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _feeds(source, spec, batch_size=8):
    return np.concatenate([b.feed[spec.name] for b in iter_batches(source, [spec], batch_size)])


def test_same_size_images_are_scaled_normalized_and_made_nchw(tmp_path):
    a = _write(tmp_path, "a.png", _pixels(6, 8, seed=1))
    b = _write(tmp_path, "b.png", _pixels(6, 8, seed=2))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    source = onnxq.ImageFolder(tmp_path, mean=mean, std=std)
    expected = (np.stack([a, b]).astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(_feeds(source, RGB_INPUT), expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


def test_bgr_order_and_nhwc_layout(tmp_path):
    a = _write(tmp_path, "a.png", _pixels(6, 8, seed=3))
    spec = InputSpec("images", np.dtype(np.float32), (1, 6, 8, 3))
    feeds = _feeds(onnxq.ImageFolder(tmp_path, channel_order="bgr", scale=1.0), spec)
    np.testing.assert_array_equal(feeds[0], a[..., ::-1].astype(np.float32))


def test_letterbox_fits_inside_and_pads_with_gray(tmp_path):
    _write(tmp_path, "wide.png", np.full((3, 8, 3), 200, np.uint8))  # half the target height
    feeds = _feeds(onnxq.ImageFolder(tmp_path, resize="letterbox", scale=1.0), RGB_INPUT)[0]
    rows = feeds[0, :, 0]
    assert rows.tolist() == [114, 200, 200, 200, 114, 114] or rows.tolist() == [114, 114, 200, 200, 200, 114]


def test_crop_covers_the_target_and_keeps_the_center(tmp_path):
    pixels = np.zeros((6, 16, 3), np.uint8)
    pixels[:, 4:12] = 255  # the center 8 columns are white
    _write(tmp_path, "wide.png", pixels)
    feeds = _feeds(onnxq.ImageFolder(tmp_path, resize="crop", scale=1.0), RGB_INPUT)[0]
    assert feeds.min() == 255


def test_dynamic_size_needs_an_image_size(tmp_path):
    _write(tmp_path, "a.png", _pixels(6, 8))
    spec = InputSpec("images", np.dtype(np.float32), (None, 3, None, None))
    with pytest.raises(onnxq.CalibrationDataError, match="--image-size"):
        _feeds(onnxq.ImageFolder(tmp_path), spec)
    assert _feeds(onnxq.ImageFolder(tmp_path, size=(12, 10)), spec).shape == (1, 3, 12, 10)


def test_unreadable_image_is_named(tmp_path):
    _write(tmp_path, "a.png", _pixels(6, 8))
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(onnxq.CalibrationDataError, match="b.jpg"):
        _feeds(onnxq.ImageFolder(tmp_path), RGB_INPUT)


def test_cli_calibrates_the_demo_on_a_folder_of_grayscale_images(tmp_path):
    folder = tmp_path / "digits"
    for index in range(12):
        _write(folder, f"{index:02d}.png", _pixels(16, 16, channels=1, seed=index))
    out = tmp_path / "m.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", folder, "--batch-size", "4", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert '"calibration_samples": 12' in result.stdout


def test_cli_rejects_a_malformed_image_size(tmp_path):
    _write(tmp_path / "imgs", "a.png", _pixels(6, 8))
    result = run_cli("convert", DEMO, "-o", tmp_path / "m.onnx", "--calibration-data", tmp_path / "imgs",
                     "--image-size", "big")
    assert result.returncode == 2 and "HEIGHTxWIDTH" in result.stderr


def _class_folders(root, counts, height=6, width=8):
    """Class subfolders (``{class name: image count}``); returns ``{class name: [pixels, ...]}``."""
    images = {}
    for seed, (name, count) in enumerate(sorted(counts.items())):
        images[name] = [_write(root / name, f"{i:02d}.png", _pixels(height, width, seed=10 * seed + i)) for i in range(count)]
    return images


def test_class_subfolders_give_labels_in_sorted_class_order(tmp_path):
    images = _class_folders(tmp_path, {"dog": 3, "ant": 2, "cat": 1})
    (tmp_path / "zebra").mkdir()  # an empty class still takes its index, as in torchvision
    batches = list(iter_batches(onnxq.ImageFolder(tmp_path, scale=1.0), [RGB_INPUT], batch_size=4))
    feeds = np.concatenate([b.feed["images"] for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    # one class after another in turn: ant 0, cat 0, dog 0, ant 1, dog 1, dog 2
    order = [("ant", 0), ("cat", 0), ("dog", 0), ("ant", 1), ("dog", 1), ("dog", 2)]
    index = {"ant": 0, "cat": 1, "dog": 2}
    assert labels.tolist() == [index[name] for name, _ in order]
    expected = np.stack([images[name][i] for name, i in order]).astype(np.float32).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(feeds, expected)


def test_class_folders_give_top1_without_an_npz(tmp_path):
    """The demo's eval digits saved as 8-bit PNGs in one folder per digit: the top-1 onnxq reports
    is the float model's accuracy on those PNGs, computed here with ONNX Runtime."""
    with np.load(DEMO.parent / "eval.npz") as data:
        inputs, labels = data["input"][:60], data["label"][:60]
    folder = tmp_path / "digits"
    pixels = np.round(inputs[:, 0] * 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        _write(folder / f"digit{label}", f"{i:03d}.png", image)
    result = onnxq.convert(DEMO, tmp_path / "m.onnx", DEMO.parent / "calib.npz", eval_data=onnxq.ImageFolder(folder))
    session = onnxruntime.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"input": pixels[:, None].astype(np.float32) / 255})[0].argmax(axis=1)
    # class index = position of "digitN" among the folder names: N, since all ten digits are present
    assert sorted(set(labels.tolist())) == list(range(10)) and result.fidelity.samples == 60
    assert result.fidelity.float_top1 == pytest.approx(float((predicted == labels).mean()))


def test_short_side_then_center_crop_as_torchvision(tmp_path):
    pixels = _write(tmp_path, "a.png", _pixels(30, 40, seed=5))
    spec = InputSpec("images", np.dtype(np.float32), (None, 3, 12, 12))
    feeds = _feeds(onnxq.ImageFolder(tmp_path, resize="crop", short_side=16, scale=1.0), spec)[0]
    # Resize(16): the short side (30) becomes 16, the long side int(16 * 40 / 30) = 21; CenterCrop(12)
    resized = np.asarray(Image.fromarray(pixels).resize((21, 16), Image.BILINEAR))
    left, top = round((21 - 12) / 2), round((16 - 12) / 2)
    np.testing.assert_array_equal(feeds, resized[top : top + 12, left : left + 12].transpose(2, 0, 1).astype(np.float32))


def test_short_side_needs_crop_and_a_side_at_least_the_size(tmp_path):
    _write(tmp_path, "a.png", _pixels(30, 40))
    with pytest.raises(onnxq.CalibrationDataError, match="--resize crop"):
        onnxq.ImageFolder(tmp_path, short_side=256)
    spec = InputSpec("images", np.dtype(np.float32), (None, 3, 12, 12))
    with pytest.raises(onnxq.CalibrationDataError, match="give at least 12"):
        _feeds(onnxq.ImageFolder(tmp_path, resize="crop", short_side=8), spec)


def test_letterbox_pads_with_the_pad_value(tmp_path):
    _write(tmp_path, "wide.png", np.full((3, 8, 3), 200, np.uint8))
    feeds = _feeds(onnxq.ImageFolder(tmp_path, resize="letterbox", pad_value=0, scale=1.0), RGB_INPUT)[0]
    rows = feeds[:, :, 0].tolist()  # column 0 of each channel, top to bottom
    assert all(r in ([0, 200, 200, 200, 0, 0], [0, 0, 200, 200, 200, 0]) for r in rows)
    with pytest.raises(onnxq.CalibrationDataError, match="0 to 255"):
        onnxq.ImageFolder(tmp_path, pad_value=300)


def _png_header(width, height):
    """A PNG that declares ``width`` x ``height`` 8-bit gray pixels (and holds no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [40000, 10000])  # over twice Pillow's limit (its error), over the limit (its warning)
def test_decompression_bomb_in_an_image_folder_is_a_one_line_error(tmp_path, side):
    _write(tmp_path / "imgs", "a.png", _pixels(8, 8, channels=1))
    (tmp_path / "imgs" / "b.png").write_bytes(_png_header(side, side))
    out = tmp_path / "m.onnx"
    result = run_cli("convert", DEMO, "-o", out, "--calibration-data", tmp_path / "imgs")
    assert_clean_failure(result, out, "b.png", "decompression-bomb")


def test_mean_with_the_wrong_number_of_channels_is_a_one_line_error(tmp_path):
    model = make_model([oh.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 6, 8])], [("y", None)],
                       [("w", np.ones((2, 3, 1, 1), np.float32))])
    onnx.save(model, tmp_path / "rgb.onnx")
    _write(tmp_path / "imgs", "a.png", _pixels(6, 8))
    out = tmp_path / "m.onnx"
    result = run_cli("convert", tmp_path / "rgb.onnx", "-o", out, "--calibration-data", tmp_path / "imgs", "--mean", "0.5,0.5")
    assert_clean_failure(result, out, "--mean has 2 values", "3 channel")
