"""The measured safety net: output parts, the accuracy target, held-out calibration samples and
the automatic fallback, checked with numpy on ONNX Runtime's outputs of the float model."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnxq
import onnxq.api
from onnxq.calibration.holdout import HOLD_OUT_EVERY
from onnxq.calibration.data import Batch
from onnxq.report.evaluate import Fidelity, OutputFidelity, compare_runs, fidelity_of
from onnxq.report.parts import Part, is_distribution, output_parts
from onnxq.tune.metrics import top1_score
from onnxq.tune.target import AccuracyTarget
from tests.graphs import make_model, run, sqnr_db
from tests.test_cli_errors import onnxq as onnxq_cli

ANCHORS, FEATURES, CLASSES = 32, 8, 6


def detector_head() -> onnx.ModelProto:
    """A YOLO-style output ``[1, ANCHORS, 4 + CLASSES]``: box coordinates in pixels (hundreds)
    concatenated with class scores in [0, 1]."""
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="to_anchors"),
        oh.make_node("MatMul", ["xt", "w_box"], ["box_raw"], name="box_matmul"),
        oh.make_node("Mul", ["box_raw", "stride"], ["boxes"], name="box_scale"),
        oh.make_node("MatMul", ["xt", "w_cls"], ["cls_raw"], name="cls_matmul"),
        oh.make_node("Sigmoid", ["cls_raw"], ["scores"], name="cls_sigmoid"),
        oh.make_node("Concat", ["boxes", "scores"], ["y"], axis=2, name="head_concat"),
    ]
    initializers = [
        ("w_box", rng.normal(0, 0.5, (FEATURES, 4)).astype(np.float32)),
        ("stride", np.array(300.0, np.float32)),
        ("w_cls", rng.normal(0, 1.0, (FEATURES, CLASSES)).astype(np.float32)),
    ]
    return make_model(nodes, [("x", [1, FEATURES, ANCHORS])], [("y", [1, ANCHORS, 4 + CLASSES])], initializers)


def detector_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (samples, FEATURES, ANCHORS)).astype(np.float32)}


def _outputs(model, data: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([run(model, {"x": data["x"][i : i + 1]})[0] for i in range(len(data["x"]))])


# --- parts and distributions ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["anchors-last", "features-last"])
def test_box_and_score_rows_are_two_parts_in_either_layout(layout):
    rng = np.random.default_rng(1)
    output = np.concatenate([rng.uniform(10, 600, (2, 4, 500)), rng.uniform(0, 1, (2, 18, 500)) ** 6], axis=1)
    axis = 1
    if layout == "features-last":
        output, axis = np.transpose(output, (0, 2, 1)), 2
    assert output_parts(output.astype(np.float32)) == (Part(axis, 0, 4), Part(axis, 4, 22))


def test_positions_whose_magnitude_follows_the_content_are_not_parts():
    rng = np.random.default_rng(2)
    probability_map = rng.uniform(0, 1, (1, 1, 64, 96)) ** 8  # text-detector-like map
    probability_map[..., 30:40] *= 1e-3  # an empty stretch between words
    hidden = rng.normal(0, 1, (2, 16, 64))
    assert output_parts(probability_map) == ()
    assert output_parts(hidden) == ()


def test_softmax_outputs_are_distributions_and_logits_or_sigmoids_are_not():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, 40, 30)).astype(np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert is_distribution(softmax)
    assert not is_distribution(logits)
    assert not is_distribution(1 / (1 + np.exp(-logits)))


# --- the target --------------------------------------------------------------------------


def _fidelity(sqnr: float, agreement: float | None = None, decisions: int = 0) -> Fidelity:
    return Fidelity(1, (OutputFidelity("y", sqnr, 1.0, 0.0, (), agreement, decisions),))


def test_a_two_class_softmax_is_one_part_though_its_classes_differ_tenfold():
    """A face / not-face softmax whose 'face' column is rare: its columns differ in RMS by far
    more than 10x, yet a distribution's axis holds one quantity and is judged by agreement."""
    rng = np.random.default_rng(11)
    face = np.where(rng.random(200) < 0.01, 0.97, rng.uniform(0.0, 0.01, 200))
    probabilities = np.stack([1 - face, face], axis=1).astype(np.float32)
    assert is_distribution(probabilities)
    assert output_parts(probabilities) == ()
    assert output_parts(probabilities[:, :1] * [1.0, 0.01]) != ()  # not a distribution: it splits
    per_step = probabilities.reshape(4, 50, 2)  # the same softmax per time step, [N, T, classes]
    assert is_distribution(per_step) and output_parts(per_step) == ()


def _labelled_batches(order: list[str], float_outputs: dict[str, np.ndarray], labels: np.ndarray):
    """One labelled batch per sample: (batch, float outputs, int8 outputs) with the outputs in
    ``order``; int8 flips sample 0's class."""
    int8_outputs = dict(float_outputs, face=float_outputs["face"].copy())
    int8_outputs["face"][0] = int8_outputs["face"][0, ::-1]
    return [(Batch({"x": np.zeros(1, np.float32)}, 1, labels[i : i + 1]),
             [float_outputs[name][i : i + 1] for name in order], [int8_outputs[name][i : i + 1] for name in order])
            for i in range(len(labels))]


@pytest.mark.parametrize("order", [["boxes", "face"], ["face", "boxes"]])
def test_top1_is_read_from_the_softmax_output_not_the_box_regression_beside_it(order):
    """MTCNN's ONet writes a [N, 4] box regression first and the [N, 2] face softmax last (other
    exports the other way round); labels 0/1 index both, but only the softmax is a classifier."""
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, 20)
    float_outputs = {"face": np.where(labels[:, None] == 1, [0.1, 0.9], [0.8, 0.2]).astype(np.float32),
                     "boxes": rng.normal(0, 0.1, (20, 4)).astype(np.float32)}
    batches = _labelled_batches(order, float_outputs, labels)
    fidelity = compare_runs(order, batches)
    assert fidelity.top1_output == "face"
    assert fidelity.float_top1 == 1.0
    assert fidelity.quantized_top1 == pytest.approx(19 / 20)  # only sample 0 flipped
    int8_outputs = {name: np.concatenate([b[2][order.index(name)] for b in batches]) for name in order}
    reference = {name: float_outputs[name] for name in order}
    assert top1_score(int8_outputs, reference, labels) == pytest.approx(19 / 20)


def test_target_is_met_exactly_at_its_sqnr_and_agreement():
    target = AccuracyTarget(min_sqnr_db=20.0, min_agreement=0.98)
    assert target.misses(_fidelity(20.0)) == []
    assert target.misses(_fidelity(19.9)) == ["y: SQNR 19.9 dB"]
    assert target.shortfall(_fidelity(10.0)) == pytest.approx(10.0)  # noise 10x the tolerated
    assert target.misses(_fidelity(30.0, 0.98, 100)) == []
    assert target.misses(_fidelity(30.0, 0.95, 100)) == ["y: arg-max agreement 0.950"]
    assert target.misses(_fidelity(30.0, 0.5, 10)) == []  # ten decisions are too few to judge


def test_agreement_is_counted_over_every_decision_of_a_softmax_output(tmp_path):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1, (5, 40, 12))
    reference = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    quantized = reference.copy()
    flips = [(0, 3), (2, 7), (4, 39)]
    for sample, step in flips:  # swap the top two classes of three decisions
        order = np.argsort(reference[sample, step])
        quantized[sample, step, order[-1]], quantized[sample, step, order[-2]] = \
            reference[sample, step, order[-2]], reference[sample, step, order[-1]]
    fidelity = fidelity_of({"p": quantized}, {"p": reference})
    [output] = fidelity.outputs
    assert output.decisions == 5 * 40
    assert output.agreement == pytest.approx(1 - len(flips) / 200)


# --- end to end --------------------------------------------------------------------------


def _scores_sqnr(model_path, data) -> tuple[float, float]:
    """Numpy SQNR of the whole output and of its score columns, int8 vs float, on ``data``."""
    reference, quantized = _outputs(detector_head(), data), _outputs(str(model_path), data)
    return sqnr_db(reference, quantized), sqnr_db(reference[..., 4:], quantized[..., 4:])


ONE_SCALE = onnxq.QuantConfig(max_shared_range_ratio=1e6)  # the Concat quantized: boxes and scores share a scale


@pytest.fixture
def detector(tmp_path):
    np.savez(tmp_path / "calibration.npz", **detector_data(64, seed=5))
    (tmp_path / "model.onnx").write_bytes(detector_head().SerializeToString())
    return tmp_path / "model.onnx", str(tmp_path / "calibration.npz")


@pytest.fixture
def without_poor_tensor_rule(monkeypatch):
    """The per-tensor rule (``onnxq.tune.tensor_error``) would keep the erased scores float by
    itself; without it, what is left to catch them is the measurement of the output's parts."""
    monkeypatch.setattr("onnxq.tune.tensor_error.POOR_TENSOR_DB", -math.inf)


def test_a_tensor_whose_own_8_bit_form_is_poor_is_kept_float(detector, tmp_path):
    model, calibration = detector
    result = onnxq.convert(model, tmp_path / "out.onnx", calibration, ONE_SCALE,
                           fallback=onnxq.FallbackOptions(auto=False))
    assert any("8-bit error is poor" in note and "scores" in note for note in result.notes)
    whole, scores = _scores_sqnr(result.output, detector_data(16, seed=6))
    assert whole > 20 and scores > 20


def test_a_broken_part_is_reported_though_the_whole_output_looks_fine(detector, tmp_path, without_poor_tensor_rule):
    """One scale for boxes and scores erases the scores; the output's SQNR is the boxes' and
    looks fine. Without the fallback, the summary says so."""
    model, calibration = detector
    result = onnxq.convert(model, tmp_path / "out.onnx", calibration, ONE_SCALE,
                           fallback=onnxq.FallbackOptions(auto=False))
    whole, scores = _scores_sqnr(result.output, detector_data(16, seed=6))
    assert whole > 20 and scores < 10  # independent of onnxq's own measurement
    assert result.target_met is False
    assert result.fallback is None
    assert [m.rsplit(": SQNR", 1)[0] for m in result.accuracy.misses] == ["y[axis 2: 4:10]"]
    assert result.accuracy.measured_on == "8 held-out calibration samples"


def test_the_safety_net_repairs_the_broken_part_by_default(detector, tmp_path, without_poor_tensor_rule):
    model, calibration = detector
    result = onnxq.convert(model, tmp_path / "out.onnx", calibration, ONE_SCALE)
    assert result.target_met is True
    assert result.fallback is not None and result.fallback.met
    assert any(k.reason == "accuracy fallback" for k in result.fallback.kept)
    assert any(note.startswith("safety net: plain int8 missed") for note in result.notes)
    _, scores = _scores_sqnr(result.output, detector_data(16, seed=6))  # other samples than searched on
    assert scores >= 23  # the default target
    assert result.op_counts["MatMul"].quantized == 2  # the repair keeps the heavy ops int8


@pytest.fixture
def searched_on(monkeypatch):
    """The inputs ``x`` of every batch the fallback search scores its trials on, as recorded."""
    seen: list[np.ndarray] = []
    tune_fallback = onnxq.api.tune_fallback

    def recording(loaded, state, config, layers, base, options, batches, *rest):
        seen.extend(batch.feed["x"] for batch in batches)
        return tune_fallback(loaded, state, config, layers, base, options, batches, *rest)

    monkeypatch.setattr(onnxq.api, "tune_fallback", recording)
    return seen


def _rows_in(rows: list[np.ndarray], data: np.ndarray) -> list[int]:
    """The indices of ``data``'s samples that are among ``rows``."""
    return [i for i, sample in enumerate(data) if any(np.array_equal(sample[None], row) for row in rows)]


def test_the_search_never_scores_on_the_held_out_samples_it_is_judged_by(detector, tmp_path, searched_on,
                                                                         without_poor_tensor_rule):
    """Choosing the float set on the samples that then report the result would grade the
    search on its own answers: it searches on calibration samples, the check is on the others."""
    model, calibration = detector
    result = onnxq.convert(model, tmp_path / "out.onnx", calibration, ONE_SCALE)
    data = np.load(calibration)["x"]
    held = [i for i in range(len(data)) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    searched = _rows_in(searched_on, data)
    assert searched and not set(searched) & set(held)
    assert len(searched) == onnxq.api.SEARCH_SAMPLES
    assert result.fallback is not None and result.accuracy.measured_on == f"{len(held)} held-out calibration samples"
    assert any("which it did not see" in note for note in result.notes)


def test_with_eval_data_the_search_scores_on_calibration_samples(detector, tmp_path, searched_on,
                                                                 without_poor_tensor_rule):
    model, calibration = detector
    np.savez(tmp_path / "eval.npz", **detector_data(16, seed=9))
    result = onnxq.convert(model, tmp_path / "out.onnx", calibration, ONE_SCALE, eval_data=str(tmp_path / "eval.npz"))
    assert _rows_in(searched_on, np.load(tmp_path / "eval.npz")["x"]) == []
    assert len(_rows_in(searched_on, np.load(calibration)["x"])) == onnxq.api.SEARCH_SAMPLES
    assert result.fallback is not None and result.accuracy.measured_on == "--eval-data"


def test_cli_says_loudly_when_the_target_is_missed_and_json_carries_it(detector, tmp_path):
    model, calibration = detector
    out = tmp_path / "out.onnx"
    result = onnxq_cli("convert", model, "-o", out, "--calibration-data", calibration,
                       "--no-fallback", "--min-sqnr", "60", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target_met"] is False
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning: the model misses")]
    assert "misses the accuracy target (SQNR >= 60 dB" in warning and "y[axis 2: 0:4]: SQNR" in warning
    assert out.is_file()


def test_held_out_batches_do_not_calibrate(tmp_path):
    """Every 8th sample is held out: huge values put only there do not reach the input's scale."""
    data = detector_data(16, seed=7)
    held = [i for i in range(16) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    data["x"][held] *= 100
    np.savez(tmp_path / "calibration.npz", **data)
    (tmp_path / "model.onnx").write_bytes(detector_head().SerializeToString())
    result = onnxq.convert(tmp_path / "model.onnx", tmp_path / "out.onnx", str(tmp_path / "calibration.npz"),
                           onnxq.QuantConfig(method="minmax"), fallback=onnxq.FallbackOptions(auto=False))
    calibrated = np.delete(data["x"], held, axis=0)
    model = onnx.load(result.output)
    [quantize] = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "xt"]  # x transposed
    scale = onh.to_array(next(i for i in model.graph.initializer if i.name == quantize.input[1]))
    expected = (calibrated.max() - calibrated.min()) / 255
    assert float(scale) == pytest.approx(expected, rel=1e-6)
    assert result.calibration_samples == 16 - len(held)
    assert result.accuracy.measured_on == f"{len(held)} held-out calibration samples"


def test_too_few_batches_are_measured_in_sample_and_said_so(tmp_path):
    np.savez(tmp_path / "calibration.npz", **detector_data(HOLD_OUT_EVERY - 1, seed=8))
    (tmp_path / "model.onnx").write_bytes(detector_head().SerializeToString())
    result = onnxq.convert(tmp_path / "model.onnx", tmp_path / "out.onnx", str(tmp_path / "calibration.npz"))
    assert result.calibration_samples == HOLD_OUT_EVERY - 1
    assert result.accuracy.measured_on.endswith("(not held out: too few batches)")


def test_a_spent_time_budget_writes_the_closest_model_and_says_so(tmp_path):
    np.savez(tmp_path / "calibration.npz", **detector_data(32, seed=5))
    (tmp_path / "model.onnx").write_bytes(detector_head().SerializeToString())
    fallback = onnxq.FallbackOptions(min_sqnr_db=200.0, budget_s=1e-9)  # unreachable, and no time to search
    result = onnxq.convert(tmp_path / "model.onnx", tmp_path / "out.onnx", str(tmp_path / "calibration.npz"),
                           fallback=fallback)
    assert result.fallback.out_of_time and not result.fallback.met
    assert result.target_met is False
    assert any("time budget" in note for note in result.notes)
    onnx.checker.check_model(onnx.load(result.output))


@pytest.mark.parametrize("options", [{"min_agreement": 1.0}, {"min_sqnr_db": float("nan")}, {"budget_s": -1.0}])
def test_bad_target_options_are_config_errors(options):
    with pytest.raises(onnxq.ConfigError):
        onnxq.FallbackOptions(**options)
