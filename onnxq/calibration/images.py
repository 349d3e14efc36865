"""Folders of images as calibration data, with the preprocessing vision models expect.

Each image is read with Pillow, converted to RGB (or grayscale for one-channel inputs), resized
(``stretch`` to the size, ``letterbox``: fit inside and pad with gray 114 as YOLO does, or
``crop``: cover and crop the center), scaled (``pixel * scale``), normalized
(``(x - mean) / std`` per channel), put in ``rgb`` or ``bgr`` order and in ``nchw`` or ``nhwc``
layout (``auto``: whichever axis of the model input has 1 or 3 channels).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from onnxq.errors import CalibrationDataError, ConfigError
from onnxq.options import check_choices, option

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
IMAGES_PER_CHUNK = 32


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def parse_image_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (``224x224``) as ``(height, width)``."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image-size takes HEIGHTxWIDTH such as 224x224, not {text!r}") from None
    return height, width


def parse_number(text: str, flag: str) -> float:
    """A number or a fraction (``0.00392``, ``1/255``)."""
    try:
        return float(fractions.Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{flag} takes a number or a fraction such as 1/255, not {text!r}") from None


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated numbers (``0.485,0.456,0.406``) as a tuple."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers such as 0.485,0.456,0.406, not {text!r}") from None


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """Calibration data read from a folder of images for a single image input; the other
    fields are the preprocessing (each field's help says what it does)."""

    path: Path
    size: tuple[int, int] | None = option(
        None, flag="--image-size", parse=parse_image_size,
        help="Image folders: HEIGHTxWIDTH (default: the model input's fixed size).")
    resize: Literal["stretch", "letterbox", "crop"] = option(
        "stretch", choices=("stretch", "letterbox", "crop"),
        help="Image folders: stretch to the size, fit inside and pad with gray 114 (letterbox, YOLO), or cover "
        "and crop the center.")
    scale: float = option(1 / 255, flag="--pixel-scale", parse=functools.partial(parse_number, flag="--pixel-scale"),
                          help="Image folders: pixels (0-255) are multiplied by this (a number or a fraction, 1/255).")
    mean: tuple[float, ...] = option(
        (0.0,), parse=functools.partial(parse_floats, flag="--mean"),
        help="Image folders: per-channel mean subtracted after scaling (a,b,c).")
    std: tuple[float, ...] = option(
        (1.0,), parse=functools.partial(parse_floats, flag="--std"),
        help="Image folders: per-channel std divided by after the mean (a,b,c).")
    channel_order: Literal["rgb", "bgr"] = option("rgb", choices=("rgb", "bgr"), help="Image folders: channel order.")
    layout: Literal["auto", "nchw", "nhwc"] = option(
        "auto", choices=("auto", "nchw", "nhwc"), help="Image folders: tensor layout (auto: from the model input).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        check_choices(self, CalibrationDataError)
        if any(s == 0 for s in self.std):
            raise CalibrationDataError("std must not contain 0; give the per-channel standard deviations")

    def _geometry(self, dims: tuple[int | None, ...], name: str) -> tuple[str, int, int, int]:
        if len(dims) != 4:
            raise CalibrationDataError(
                f"input {name!r} has rank {len(dims)}; image folders feed rank-4 image inputs only"
            )
        layout = self.layout
        if layout == "auto":
            layout = "nhwc" if dims[1] not in (1, 3) and dims[3] in (1, 3) else "nchw"
        channels, height, width = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
        if self.size is not None:
            height, width = self.size
        if height is None or width is None:
            raise CalibrationDataError(
                f"input {name!r} has no fixed height and width; give the image size with --image-size HxW"
            )
        if channels not in (1, 3):
            raise CalibrationDataError(f"input {name!r} has {channels} channels; image folders give 1 or 3")
        return layout, channels, height, width

    def _load(self, file: Path, channels: int, height: int, width: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                image = _resized(image, self.resize, width, height)
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"cannot read image {file} ({exc}); remove or replace it") from exc
        pixels = np.asarray(image, np.float32).reshape(height, width, channels)
        if channels == 3 and self.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (pixels * np.float32(self.scale) - mean) / std

    def chunks(self, name: str, dims: tuple[int | None, ...], dtype: np.dtype) -> Iterator[tuple[str, dict]]:
        """``(origin, {name: batch})`` chunks of up to ``IMAGES_PER_CHUNK`` preprocessed images."""
        if not self.path.is_dir():
            raise CalibrationDataError(f"image folder not found: {self.path}; check the path")
        files = image_files(self.path)
        if not files:
            raise CalibrationDataError(f"folder {self.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        layout, channels, height, width = self._geometry(dims, name)
        for start in range(0, len(files), IMAGES_PER_CHUNK):
            batch = np.stack([self._load(f, channels, height, width) for f in files[start : start + IMAGES_PER_CHUNK]])
            if layout == "nchw":
                batch = batch.transpose(0, 3, 1, 2)
            yield str(files[start]), {name: np.ascontiguousarray(batch, dtype=dtype)}


def _resized(image, mode: str, width: int, height: int):
    from PIL import Image

    if mode == "stretch":
        return image.resize((width, height), Image.BILINEAR)
    ratio = (min if mode == "letterbox" else max)(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.BILINEAR)
    if mode == "crop":
        left, top = (fitted.width - width) // 2, (fitted.height - height) // 2
        return fitted.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height), 114 if image.mode == "L" else (114, 114, 114))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas
