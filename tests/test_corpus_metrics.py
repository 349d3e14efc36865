"""The real-model corpus's decoders and metrics (``benchmarks/corpus_models.py``) against values
worked out by hand or with plain numpy, on arrays built in the test (no model is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.corpus import (
    corpus_section,
    render_verdicts,
    replace_section,
    write_calibration,
)
from benchmarks.corpus_models import (
    LAYOUT_SIZE,
    MAGIKA_BLOCK,
    MAGIKA_PADDING,
    captcha_decode,
    decode_picodet,
    decode_yolox,
    embedding_cosine,
    heatmap_roi_iou,
    magika_features,
    retrieval_agreement,
    threshold_agreement,
    top1_agreement,
    wordpiece,
)


def _logits(steps: list[int], classes: int = 37) -> np.ndarray:
    """``[T, 1, classes]`` logits whose argmax at step t is ``steps[t]``."""
    logits = np.zeros((len(steps), 1, classes), np.float32)
    logits[np.arange(len(steps)), 0, steps] = 5.0
    return logits


def test_captcha_decode_merges_repeats_drops_blank_and_ignores_class_0_and_the_last_step():
    # class 0 never wins (the decoder looks at classes 1..36); 36 is the blank; the last step is not read
    steps = [3, 3, 36, 3, 0, 12, 12, 36, 36, 7]
    logits = _logits(steps)
    logits[4, 0, 5] = 1.0  # at the step where class 0 is largest, class 5 is the largest of 1..36
    assert captcha_decode(logits) == [3, 3, 5, 12]


def test_threshold_agreement_counts_values_on_the_same_side():
    reference = [[np.array([[0.9]])], [np.array([[0.2]])], [np.array([[0.6]])], [np.array([[0.4]])]]
    quantized = [[np.array([[0.7]])], [np.array([[0.6]])], [np.array([[0.55]])], [np.array([[0.1]])]]
    assert threshold_agreement(0.5)(reference, quantized) == pytest.approx(0.75)


def test_top1_agreement_compares_argmax_over_the_last_axis():
    reference = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])]]
    quantized = [[np.array([[0.3, 0.7]])], [np.array([[0.4, 0.6]])]]
    assert top1_agreement(reference, quantized) == 0.5


def test_heatmap_roi_iou_thresholds_the_min_max_normalised_map():
    rng = np.random.default_rng(0)
    reference, quantized = rng.random((1, 1, 8, 8)), rng.random((1, 1, 8, 8))
    quantized = 3 * quantized + 1  # an affine change of a map does not move its regions

    def mask(m):
        return (m - m.min()) / (m.max() - m.min()) > 0.8

    expected = (mask(reference) & mask(quantized)).sum() / (mask(reference) | mask(quantized)).sum()
    assert heatmap_roi_iou([[reference]], [[quantized]]) == pytest.approx(expected)
    assert heatmap_roi_iou([[reference]], [[2 * reference - 1]]) == 1.0


def test_embedding_cosine_and_retrieval_agreement_match_numpy():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(6, 4))
    quantized = reference + rng.normal(scale=0.3, size=reference.shape)
    as_outputs = lambda rows: [[np.zeros(1), rows[i : i + 1]] for i in range(len(rows))]
    cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(reference, quantized, strict=True)]
    assert embedding_cosine(1)(as_outputs(reference), as_outputs(quantized)) == pytest.approx(np.mean(cosines))

    def nearest(rows):
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        similarity = unit @ unit.T - 3 * np.eye(len(rows))
        return similarity.argmax(axis=1)

    expected = np.mean(nearest(reference) == nearest(quantized))
    assert retrieval_agreement(1)(as_outputs(reference), as_outputs(quantized)) == pytest.approx(expected)


def test_wordpiece_splits_lowercased_words_into_longest_pieces():
    vocabulary = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "un", "##aff", "##able", "the", ",", "cafe"])}
    assert wordpiece("The unaffable, CAFÉ xyz", vocabulary) == [5, 2, 3, 4, 6, 7, 1]


@pytest.mark.parametrize(("level", "row", "col"), [(1, 3, 5), (3, 2, 9)])  # stride 64: 10 columns for 608 px
def test_decode_picodet_turns_distance_bins_into_the_box_around_the_cell_centre(level, row, col):
    height, width = LAYOUT_SIZE
    strides = (8, 16, 32, 64)
    cells = [-(-height // s) * -(-width // s) for s in strides]  # rapid-layout's np.arange(H / s) x np.arange(W / s)
    outputs = [np.zeros((1, n, 10), np.float32) for n in cells] + [np.full((1, n, 32), -20.0, np.float32) for n in cells]
    stride = strides[level]
    cell = row * -(-width // stride) + col
    outputs[level][0, cell, 4] = 0.9  # class 4, score 0.9; the box sides at bins 1, 2, 3, 4
    for side, bin_index in enumerate((1, 2, 3, 4)):
        outputs[4 + level][0, cell, side * 8 + bin_index] = 20.0
    ((box, score, cls),) = decode_picodet(outputs, conf=0.5)
    centre_x, centre_y = (col + 0.5) * stride, (row + 0.5) * stride
    expected = [centre_x - stride, centre_y - 2 * stride, centre_x + 3 * stride, centre_y + 4 * stride]
    np.testing.assert_allclose(box, expected, atol=1e-3)
    assert (score, cls) == (pytest.approx(0.9), 4)


@pytest.mark.parametrize(("stride", "row", "col"), [(8, 3, 5), (32, 12, 0)])
def test_decode_yolox_places_the_box_at_its_cell_and_keeps_one_of_two_overlapping(stride, row, col):
    """ddddocr's YOLOX head: anchors of strides 8, 16, 32 (52x52, 26x26, 13x13 cells at 416 px) in
    that order, each (x offset, y offset, log w, log h, objectness, class score)."""
    first = {8: 0, 16: 52 * 52, 32: 52 * 52 + 26 * 26}
    output = np.zeros((1, 3549, 6), np.float32)
    anchor = first[stride] + row * (416 // stride) + col
    output[0, anchor] = [0.5, 0.25, np.log(2.0), np.log(3.0), 0.9, 0.8]
    output[0, anchor + 1] = [-0.5, 0.25, np.log(2.0), np.log(3.0), 0.5, 0.5]  # next cell, same box: suppressed
    ((box, score, cls),) = decode_yolox([output], conf=0.1)
    cx, cy = (col + 0.5) * stride, (row + 0.25) * stride
    np.testing.assert_allclose(box, [cx - stride, cy - 1.5 * stride, cx + stride, cy + 1.5 * stride], atol=1e-4)
    assert (score, cls) == (pytest.approx(0.72), 0)
    assert decode_yolox([output], conf=0.8) == []


def test_magika_features_of_a_short_file_pad_each_part_as_magika_does():
    content = b"  \n{\"a\": 1}\n\n"  # stripped: {"a": 1}, 8 bytes
    row = magika_features(content)[0]
    body = list(b'{"a": 1}')
    assert row.shape == (1536,)
    assert row[:8].tolist() == body and set(row[8:512].tolist()) == {MAGIKA_PADDING}
    assert row[512 : 512 + 252].tolist() == [MAGIKA_PADDING] * 252 and row[764:772].tolist() == body
    assert row[1536 - 8 :].tolist() == body and set(row[1024:1528].tolist()) == {MAGIKA_PADDING}


def test_magika_features_of_a_long_file_take_stripped_ends_and_the_middle():
    rng = np.random.default_rng(2)
    core = rng.integers(33, 127, size=3 * MAGIKA_BLOCK).astype(np.uint8).tobytes()
    content = b"\n" * 10 + core + b" " * 5
    row = magika_features(content)[0].astype(int)
    assert row[:512].tolist() == list(core[:512])
    assert row[1024:].tolist() == list(core[-512:])
    start = 10 + (len(content) - 10 - 5 - 512) // 2
    assert row[512:1024].tolist() == list(content[start : start + 512])


def test_calibration_npz_holds_one_complete_feed_per_index(tmp_path):
    feeds = [{"x": np.full((1, 3), i, np.float32), "sr": np.array(16000, np.int64)} for i in range(4)]
    write_calibration(feeds, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as data:
        assert data["x"].shape == (4, 1, 3) and data["sr"].shape == (4,)
        np.testing.assert_array_equal(data["x"][2], feeds[2]["x"])


def test_replace_section_swaps_only_the_corpus_section():
    document = "# Title\n\n## A\na\n\n## Real-model corpus\nold\n\n## B\nb\n"
    assert replace_section(document, "## Real-model corpus\nnew\n") == "# Title\n\n## A\na\n\n## Real-model corpus\nnew\n\n## B\nb\n"
    assert replace_section("# Title\n", "## Real-model corpus\nnew\n") == "# Title\n\n## Real-model corpus\nnew\n"


def test_the_corpus_section_survives_a_rewrite_of_the_rest():
    document = "# Title\n\n## Real-model corpus\ntable\n\n## B\nb\n"
    assert replace_section("# New\n\n## B\nb2\n", corpus_section(document)) == "# New\n\n## B\nb2\n\n## Real-model corpus\ntable\n"
    assert replace_section(document, corpus_section(document)) == document


def _row(model, tool, **fields):
    return {"model": model, "tool": tool, "status": "ok", **fields}


def test_verdicts_hold_each_model_to_metric_int8_share_and_the_fastest_ort_output():
    rows = [
        _row("a", "onnxq", task_metric=0.99, int8_compute=(8, 10), latency_ms=1.0),
        _row("a", "ort", latency_ms=1.5), _row("a", "ort-u8", latency_ms=1.2),
        _row("b", "onnxq", task_metric=0.97, int8_compute=(7, 10), latency_ms=2.0, onnxq_summary={"target_met": False}),
        _row("b", "ort", latency_ms=1.0),
        {"model": "c", "tool": "onnxq", "status": "refused"},
    ]
    lines = render_verdicts(rows)
    assert lines[-3] == "| a | 0.990 | 80% | 0.83 | not reported | yes |"
    assert lines[-2] == "| b | 0.970 | 70% | 2.00 | False | no: metric, int8, latency |"
    assert lines[-1] == "| c | - | - | - | - | no: refused |"
