"""Leaving float what int8 only slows down (``onnxq.tune.speed``): kernels charged to the nodes
that need them, the nodes found slower, the choice, and the pass inside ``convert`` (its timing
injected: a test cannot rely on which kernels this CPU runs faster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from onnxq.report.profile import Kernel
from onnxq.tune import speed
from onnxq.workspace.steps import SpeedStep
from onnxq.workspace.store import Workspace
from tests.graphs import run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "calib.npz"


def _kernel(name: str, op: str, ms: float) -> Kernel:
    return Kernel(name, op, "part", False, ms)


def _graphs() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x -> Conv c1 -> HardSwish h1 -> Conv c2 -> y, float and in QDQ form (h1 left float)."""
    floats = oh.make_graph([oh.make_node("Conv", ["x", "w1"], ["t1"], name="c1"),
                            oh.make_node("HardSwish", ["t1"], ["t2"], name="h1"),
                            oh.make_node("Conv", ["t2", "w2"], ["y"], name="c2")], "g", [], [])
    qdq = oh.make_graph([
        oh.make_node("QuantizeLinear", ["x", "s"], ["x_q"], name="x_q"),
        oh.make_node("DequantizeLinear", ["x_q", "s"], ["x_dq"], name="x_dq"),
        oh.make_node("DequantizeLinear", ["w1_q", "s"], ["w1_dq"], name="w1_dq"),
        oh.make_node("Conv", ["x_dq", "w1_dq"], ["t1"], name="c1"),
        oh.make_node("QuantizeLinear", ["t1", "s"], ["t1_q"], name="t1_q"),
        oh.make_node("DequantizeLinear", ["t1_q", "s"], ["t1_dq"], name="t1_dq"),
        oh.make_node("HardSwish", ["t1_dq"], ["t2"], name="h1"),
        oh.make_node("QuantizeLinear", ["t2", "s"], ["t2_q"], name="t2_q"),
        oh.make_node("DequantizeLinear", ["t2_q", "s"], ["t2_dq"], name="t2_dq"),
        oh.make_node("DequantizeLinear", ["w2_q", "s"], ["w2_dq"], name="w2_dq"),
        oh.make_node("Conv", ["t2_dq", "w2_dq"], ["y"], name="c2"),
    ], "g", [], [])
    return oh.make_model(floats), oh.make_model(qdq)


def test_kernels_are_charged_to_the_nodes_that_need_them():
    float_model, int8_model = _graphs()
    # as ONNX Runtime runs the int8 model: the input's Q (c1 needs it), c1 fused, the DQ of c1's
    # int8 output (c1 writes it), the HardSigmoid and Mul ONNX Runtime made of h1, the Q h1's
    # output needs for c2, a weight DQ left unfused (read by c2), c2 fused
    int8_kernels = [_kernel("x_q", "QuantizeLinear", 0.1), _kernel("c1", "QLinearConv", 0.5),
                    _kernel("t1_dq", "DequantizeLinear", 0.2), _kernel("HardSigmoid_7", "HardSigmoid", 0.3),
                    _kernel("Mul_8", "Mul", 0.4), _kernel("t2_q", "QuantizeLinear", 0.6),
                    _kernel("w2_dq", "DequantizeLinear", 0.05), _kernel("c2", "QLinearConv", 0.7)]
    charged = speed.charged_ms(int8_kernels, int8_model, float_model.graph)
    assert charged == pytest.approx({"c1": 0.1 + 0.5 + 0.2 + 0.3 + 0.4, "c2": 0.6 + 0.05 + 0.7})
    # the float model: c1 fused with h1 and named after its output, c2 by its name
    float_kernels = [_kernel("t1", "Conv", 0.8), _kernel("c2", "Conv", 0.9)]
    assert speed.charged_ms(float_kernels, float_model, float_model.graph) == pytest.approx({"c1": 0.8, "c2": 0.9})


def test_a_node_is_slower_in_int8_only_beyond_the_noise_and_only_if_quantized():
    float_ms = {"same": 1.0, "slower": 1.0, "fused_in_float": 0.0, "not_quantized": 0.1, "faster": 2.0}
    int8_ms = {"same": 1.0 + speed.NOISE / 2, "slower": 1.5, "fused_in_float": 0.2, "not_quantized": 9.0,
               "faster": 1.0}
    quantized = {"same", "slower", "fused_in_float", "faster"}
    assert speed.slower_nodes(float_ms, int8_ms, quantized) == ["slower", "fused_in_float"]


def test_the_sign_test_needs_more_faster_pairs_than_chance_gives():
    # binomial tables for a fair coin: P(X >= 9 of 10) = 0.0107, P(X = 10) = 0.00098;
    # P(X >= 15 of 20) = 0.0207, P(X >= 16 of 20) = 0.0059; P(X >= 40 of 60) = 0.0067, P(X >= 39) = 0.0137
    assert [speed.faster_needed(n) for n in (10, 20, 60)] == [10, 16, 40]


def test_the_model_with_slower_nodes_float_is_kept_only_when_faster_beyond_chance_and_as_accurate():
    n = 20
    clearly = [0.8] * speed.faster_needed(n) + [1.2] * (n - speed.faster_needed(n))
    by_chance = [0.8] * (speed.faster_needed(n) - 1) + [1.2] * (n - speed.faster_needed(n) + 1)
    kept = speed.choose(["a"], lambda: clearly, lambda: True)
    assert kept.kept and (kept.faster_pairs, kept.pairs) == (speed.faster_needed(n), n)
    assert not speed.choose(["a"], lambda: by_chance, lambda: True).kept
    assert not speed.choose(["a"], lambda: clearly, lambda: False).kept


def _convert(tmp_path: Path, name: str, **fallback) -> onnxq.ConversionResult:
    return onnxq.convert(DEMO, tmp_path / f"{name}.onnx", CALIB, workspace=tmp_path / "ws",
                         fallback=onnxq.FallbackOptions(auto=False, **fallback), resume=name == "resumed")


@pytest.fixture
def first_conv_slow(monkeypatch):
    """The demo's first Conv found slower in int8, and the model with it float faster: what this
    CPU measures is replaced, the rest of the pass runs."""
    monkeypatch.setattr(speed, "MIN_FLOAT_MS", 0.0)
    conv = next(node.name for node in onnx.load(DEMO).graph.node if node.op_type == "Conv")
    monkeypatch.setattr(speed, "slower_nodes", lambda f, i, quantized: [n for n in quantized if n == conv])
    monkeypatch.setattr(speed, "paired_ratios", lambda *args: [0.8] * 20)
    return conv


def test_convert_keeps_the_slower_node_float_records_it_and_a_resumed_run_reads_it_back(tmp_path, first_conv_slow,
                                                                                       monkeypatch):
    result = _convert(tmp_path, "out")
    written = onnx.load(tmp_path / "out.onnx")
    conv = next(node for node in written.graph.node if node.name == first_conv_slow)
    assert all(not name.endswith("_dequantized") for name in conv.input[1:])  # float weights: kept float
    assert sum(node.op_type == "Conv" for node in written.graph.node) >= 2  # the other Convs stay quantized
    assert any("speed fallback: kept float 1 node(s)" in note for note in result.notes)
    recorded = Workspace.open(tmp_path / "ws").latest(SpeedStep).read(SpeedStep)
    # round 1 keeps the Conv float; round 2 finds nothing more (the Conv is no longer quantized)
    assert [(len(r["slower"]), r["kept"], r["faster_pairs"], r["pairs"]) for r in recorded.rounds] == [(1, True, 20, 20)]
    # the written model still computes what the float model does, within int8 error
    feed = {"input": np.load(CALIB)["input"][:4]}
    expected, got = run(onnx.load(DEMO), feed)[0], run(written, feed)[0]
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.99
    monkeypatch.setattr(onnxq.api, "leave_slow_float", lambda *args: pytest.fail("a resumed run times nothing"))
    _convert(tmp_path, "resumed")
    assert (tmp_path / "resumed.onnx").read_bytes() == (tmp_path / "out.onnx").read_bytes()


def test_no_speed_fallback_quantizes_the_slower_node(tmp_path, first_conv_slow):
    result = _convert(tmp_path, "out", speed=False)
    assert not any("slower" in note for note in result.notes)
    assert Workspace.open(tmp_path / "ws").latest(SpeedStep) is None
    written = onnx.load(tmp_path / "out.onnx")
    conv = next(node for node in written.graph.node if node.name == first_conv_slow)
    assert conv.input[1].endswith("_dequantized")


def test_rounds_go_on_while_their_model_is_kept_and_stop_at_one_that_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "MIN_FLOAT_MS", 0.0)
    first, second = [node.name for node in onnx.load(DEMO).graph.node if node.op_type == "Conv"][:2]
    # round 1 finds the first Conv slower and its model is faster; round 2 the second, and its model is not
    monkeypatch.setattr(speed, "slower_nodes", lambda f, i, quantized: [n for n in (first, second) if n in quantized][:1])
    timings = iter([[0.8] * 20, [1.1] * 20])
    monkeypatch.setattr(speed, "paired_ratios", lambda *args: next(timings))
    result = _convert(tmp_path, "out")
    recorded = Workspace.open(tmp_path / "ws").latest(SpeedStep).read(SpeedStep)
    assert [(len(r["slower"]), r["kept"]) for r in recorded.rounds] == [(1, True), (1, False)]
    written = {node.name: node for node in onnx.load(tmp_path / "out.onnx").graph.node}
    assert not written[first].input[1].endswith("_dequantized") and written[second].input[1].endswith("_dequantized")
    assert any("round 2: 1 node(s) left int8" in note for note in result.notes)


def test_with_streamed_eval_data_the_accuracy_check_leaves_the_report_all_of_it(tmp_path, first_conv_slow):
    # --eval-data read from a file is streamed to the report: the pass's own accuracy check must not use it up
    eval_path = ROOT / "models" / "eval.npz"
    result = onnxq.convert(DEMO, tmp_path / "out.onnx", CALIB, eval_data=eval_path, workspace=tmp_path / "ws",
                           fallback=onnxq.FallbackOptions(auto=False))
    assert any("speed fallback: kept float 1 node(s)" in note for note in result.notes)
    assert result.fidelity.samples == len(np.load(eval_path)["input"])


def test_the_note_says_when_nothing_was_kept():
    left = speed.SpeedChoice((speed.SpeedRound(("a", "b"), False, 1.07, 17, 42),))
    assert speed.speed_notes(left) == [
        "speed fallback: 2 quantized node(s) ran slower in int8 than in float on this CPU (profiled), but the model with "
        "them float was not faster or not as accurate, so they stay int8: round 1: 2 node(s) left int8, 1.07x the time "
        "of the model before (median of 42 paired runs, faster in 17, 29 needed)"]


def test_a_float_model_too_fast_to_judge_is_said_so(tmp_path, monkeypatch):
    """Under ``MIN_FLOAT_MS`` a run's time is ONNX Runtime's overhead: the pass does not run, and
    the summary says why instead of leaving the user to wonder (a new user's MTCNN ONet, 0.5 ms)."""
    monkeypatch.setattr(speed, "MIN_FLOAT_MS", 1e9)  # whatever this CPU's speed: every model is "too fast"
    result = _convert(tmp_path, "out")
    assert any(note.startswith("speed fallback: not run: the float model takes under 1e+09 ms") for note in result.notes)
    assert Workspace.open(tmp_path / "ws").latest(SpeedStep) is None


def test_a_model_for_a_gpu_target_is_not_judged_by_cpu_kernels(tmp_path, first_conv_slow):
    result = onnxq.convert(DEMO, tmp_path / "out.onnx", CALIB, onnxq.QuantConfig(target="cuda"),
                           workspace=tmp_path / "ws", fallback=onnxq.FallbackOptions(auto=False))
    assert not any("speed fallback" in note for note in result.notes)
    assert Workspace.open(tmp_path / "ws").latest(SpeedStep) is None
