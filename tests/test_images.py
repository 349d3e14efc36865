"""Image folders as calibration data: preprocessing against numpy, errors, end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import onnxq
from onnxq.calibration.data import InputSpec, iter_batches
from tests.test_cli_errors import DEMO, onnxq as run_cli

RGB_INPUT = InputSpec("images", np.dtype(np.float32), (None, 3, 6, 8))


def _write(folder, name, pixels):
    folder.mkdir(exist_ok=True)
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
