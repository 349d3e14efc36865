"""Folders of images as calibration data, with the preprocessing vision models expect.

1. A folder holding images directly is read in name order, without labels. A folder holding
   none directly but subfolders of images is a labelled set, as torchvision's ``ImageFolder``
   reads it: each subfolder is a class, its index the subfolder's position in name order, its
   images those inside it at any depth; the images come one class after another in turn (the
   first of each class, then the second, ...) so that ``--max-samples`` sees every class.
2. Each image is read with Pillow (refused when over Pillow's decompression-bomb limit),
   converted to RGB (or grayscale for one-channel inputs), resized (``stretch`` to the size,
   ``letterbox``: fit inside and pad with ``pad_value``, or ``crop``: cover and crop the center;
   with ``short_side``, the short side is resized to it first, as in the 256 -> 224 recipe),
   scaled (``pixel * scale``), normalized (``(x - mean) / std`` per channel), put in ``rgb`` or
   ``bgr`` order and in ``nchw`` or ``nhwc`` layout (``auto``: whichever axis of the model input
   has 1 or 3 channels).
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from onnxq.errors import CalibrationDataError, ConfigError, first_line
from onnxq.options import check_choices, option

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
IMAGES_PER_CHUNK = 32
LABEL_KEY = "label"  # the data contract's key of class labels, never an input (onnxq.calibration.data)


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def labelled_images(folder: Path) -> list[tuple[Path, int | None]]:
    """``(image, class index)`` pairs of a folder: its own images without a class, else the
    images of its class subfolders (module docstring, rule 1)."""
    files = image_files(folder)
    if files:
        return [(file, None) for file in files]
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    per_class = [
        [(file, index) for file in sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)]
        for index, c in enumerate(classes)
    ]
    return [pair for turn in itertools.zip_longest(*per_class) for pair in turn if pair is not None]


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of images (directly or in class subfolders) and of no
    ``.npz``/``.npy`` files."""
    return path.is_dir() and not any(path.glob("*.np[yz]")) and bool(labelled_images(path))


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
        help="Image folders: stretch to the size, fit inside and pad with --pad-value (letterbox, YOLO), or cover "
        "and crop the center.")
    short_side: int | None = option(
        None, help="Image folders: with --resize crop, resize the short side to this first, then crop the center "
        "(256 for the 256 -> 224 recipe of most classifiers).")
    pad_value: int = option(114, help="Image folders: the gray level (0-255) letterbox pads with.")
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
        if self.short_side is not None and (self.resize != "crop" or self.short_side < 1):
            raise CalibrationDataError(
                f"short side {self.short_side} needs --resize crop and a positive number of pixels; "
                "give both (--resize crop --short-side 256)"
            )
        if not 0 <= self.pad_value <= 255:
            raise CalibrationDataError(f"pad value must be a gray level from 0 to 255, not {self.pad_value}")

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
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, channels):
                raise CalibrationDataError(
                    f"{flag} has {len(values)} values but input {name!r} has {channels} channel(s); "
                    f"give 1 value or {channels}"
                )
        if self.short_side is not None and self.short_side < min(height, width):
            raise CalibrationDataError(
                f"--short-side {self.short_side} is smaller than the {height}x{width} crop; give at least "
                f"{min(height, width)}"
            )
        return layout, channels, height, width

    def _load(self, file: Path, channels: int, height: int, width: int) -> np.ndarray:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    image = image.convert("L" if channels == 1 else "RGB")
                    image = _resized(image, self, width, height)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise CalibrationDataError(
                f"image {file} is over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
                f"({first_line(exc)}); remove it or shrink it"
            ) from exc
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"cannot read image {file} ({exc}); remove or replace it") from exc
        pixels = np.asarray(image, np.float32).reshape(height, width, channels)
        if channels == 3 and self.channel_order == "bgr":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (pixels * np.float32(self.scale) - mean) / std

    def chunks(self, name: str, dims: tuple[int | None, ...], dtype: np.dtype) -> Iterator[tuple[str, dict]]:
        """``(origin, {name: batch})`` chunks of up to ``IMAGES_PER_CHUNK`` preprocessed images,
        with a ``label`` array of class indices when the folder has class subfolders."""
        if not self.path.is_dir():
            raise CalibrationDataError(f"image folder not found: {self.path}; check the path")
        images = labelled_images(self.path)
        if not images:
            raise CalibrationDataError(
                f"folder {self.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), directly or in "
                "class subfolders"
            )
        layout, channels, height, width = self._geometry(dims, name)
        for start in range(0, len(images), IMAGES_PER_CHUNK):
            part = images[start : start + IMAGES_PER_CHUNK]
            batch = np.stack([self._load(file, channels, height, width) for file, _ in part])
            if layout == "nchw":
                batch = batch.transpose(0, 3, 1, 2)
            chunk = {name: np.ascontiguousarray(batch, dtype=dtype)}
            if part[0][1] is not None:
                chunk[LABEL_KEY] = np.array([label for _, label in part], np.int64)
            yield str(part[0][0]), chunk


def _resized(image, folder: ImageFolder, width: int, height: int):
    from PIL import Image

    if folder.resize == "stretch":
        return image.resize((width, height), Image.BILINEAR)
    if folder.short_side is not None:  # torchvision's Resize(short_side) then CenterCrop((height, width))
        short, long = sorted((image.width, image.height))
        resized_long = int(folder.short_side * long / short)
        size = (folder.short_side, resized_long) if image.width == short else (resized_long, folder.short_side)
        fitted = image.resize(size, Image.BILINEAR)
        left, top = round((fitted.width - width) / 2), round((fitted.height - height) / 2)
        return fitted.crop((left, top, left + width, top + height))
    ratio = (min if folder.resize == "letterbox" else max)(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.BILINEAR)
    if folder.resize == "crop":
        left, top = (fitted.width - width) // 2, (fitted.height - height) // 2
        return fitted.crop((left, top, left + width, top + height))
    gray = folder.pad_value
    canvas = Image.new(image.mode, (width, height), gray if image.mode == "L" else (gray, gray, gray))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas
