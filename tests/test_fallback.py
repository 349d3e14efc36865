"""Accuracy-driven fallback: a model where plain int8 misses the target reaches it with a minimal
set of float nodes; scores are recomputed here with numpy on ONNX Runtime outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxq
from tests.graphs import make_model, run

MAX_DROP = 0.002  # sqnr metric: noise power at most 0.2% of signal power (27 dB)


def outlier_mlp() -> onnx.ModelProto:
    """Three Gemms; one channel of the first layer's output is 300x larger than the rest (and
    the second layer scales it back down), so one scale for that tensor erases the others."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (32, 64)).astype(np.float32)
    w1[:, 5] *= 300
    w2 = rng.normal(0, 0.3, (64, 32)).astype(np.float32)
    w2[5, :] /= 300
    w3 = rng.normal(0, 0.3, (32, 10)).astype(np.float32)
    nodes = [
        oh.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="g1"),
        oh.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        oh.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="g2"),
        oh.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        oh.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="g3"),
    ]
    inits = [("w1", w1), ("b1", np.zeros(64, np.float32)), ("w2", w2), ("b2", np.full(32, 0.1, np.float32)),
             ("w3", w3), ("b3", np.zeros(10, np.float32))]
    return make_model(nodes, [("x", [None, 32])], [("y", [None, 10])], inits)


def _data(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (64, 32)).astype(np.float32)}


def sqnr_score(model, quantized_path, data) -> float:
    """1 - noise/signal of the quantized model's output vs the float model's, with numpy."""
    reference = run(model, data)[0].astype(np.float64)
    quantized = run(quantized_path, data)[0].astype(np.float64)
    return 1 - float(np.sum((reference - quantized) ** 2) / np.sum(reference**2))


def plain_int8(model, output, workspace, keep_float=()) -> onnxq.ConversionResult:
    """Calibrated on every sample of ``_data(0)``, as with eval data, with the given keep-float
    rules and no safety net: the model the search starts from."""
    return onnxq.convert(model, output, _data(0), onnxq.QuantConfig(hold_out=False), workspace=workspace,
                         fallback=onnxq.FallbackOptions(keep_float=tuple(keep_float), auto=False))


def _float_gemms(path) -> set[str]:
    """Names of the Gemms whose weight is still a float initializer."""
    model = onnx.load(path)
    floats = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    return {n.name for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in floats}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fallback")
    model = outlier_mlp()
    result = onnxq.convert(
        model, folder / "tuned.onnx", _data(0), eval_data=_data(1), workspace=folder / "ws",
        fallback=onnxq.FallbackOptions(max_drop=MAX_DROP, metric="sqnr", save_rules=str(folder / "rules.json")),
    )
    plain = plain_int8(model, folder / "plain.onnx", folder / "ws_plain")
    return folder, model, result, plain


def test_plain_int8_misses_and_fallback_meets_the_target(tuned):
    folder, model, result, plain = tuned
    assert sqnr_score(model, plain.output, _data(1)) < 1 - MAX_DROP
    # the target holds on the evaluation data and on data the search never saw
    assert sqnr_score(model, result.output, _data(1)) >= 1 - MAX_DROP
    assert sqnr_score(model, result.output, _data(2)) >= 1 - 2 * MAX_DROP
    report = result.fallback
    assert report.met and report.final_score >= 1 - MAX_DROP > report.int8_score
    assert report.int8_score == pytest.approx(sqnr_score(model, plain.output, _data(1)), abs=1e-4)
    assert any("accuracy-driven fallback" in note for note in result.notes)


def test_fallback_set_is_minimal_and_most_compute_stays_int8(tuned, tmp_path):
    folder, model, result, _ = tuned
    kept = {k.name for k in result.fallback.kept}
    assert kept == _float_gemms(result.output)
    assert "g3" not in kept and len(kept) <= 2
    for name in kept:  # re-quantizing any one of them breaks the target
        others = [f"name:{n}" for n in kept - {name}]
        trial = plain_int8(model, tmp_path / f"without_{name}.onnx", tmp_path / f"ws_{name}", others)
        assert sqnr_score(model, trial.output, _data(1)) < 1 - MAX_DROP


def test_every_trial_is_recorded_and_recoverable(tuned, tmp_path):
    folder, model, result, _ = tuned
    steps = [json.loads(p.read_text()) for p in sorted((folder / "ws" / "steps").glob("*.json"))]
    trials = [s for s in steps if s["kind"] == "trial"]
    assert len(trials) == result.fallback.trials >= 2
    assert any(s["kind"] == "sensitivity" for s in steps)
    for trial in (trials[0], trials[-1]):
        out = tmp_path / f"trial_{trial['index']}.onnx"
        onnxq.recover(model, folder / "ws", out, index=trial["index"])
        assert sqnr_score(model, out, _data(1)) == pytest.approx(trial["payload"]["score"], abs=1e-6)
    # without an index, recover rebuilds the model that was written
    onnxq.recover(model, folder / "ws", tmp_path / "final.onnx")
    assert (tmp_path / "final.onnx").read_bytes() == result.output.read_bytes()


def test_resume_reuses_sensitivity_and_trials(tuned):
    folder, model, result, _ = tuned
    before = sorted((folder / "ws" / "steps").glob("*.json"))
    again = onnxq.convert(model, folder / "again.onnx", None, eval_data=_data(1), workspace=folder / "ws", resume=True,
                          fallback=onnxq.FallbackOptions(max_drop=MAX_DROP, metric="sqnr"))
    after = sorted((folder / "ws" / "steps").glob("*.json"))
    new_kinds = {p.name.split("-", 1)[1] for p in after[len(before):]}
    assert new_kinds <= {"layers.json", "quantized.json"}  # nothing re-measured, nothing re-tried
    assert again.output.read_bytes() == result.output.read_bytes()


def test_only_quantized_sensitivity_is_the_error_of_each_unit_alone_in_int8(tuned, tmp_path):
    folder, model, result, _ = tuned
    again = onnxq.convert(
        model, tmp_path / "q1.onnx", None, eval_data=_data(1), workspace=folder / "ws", resume=True,
        fallback=onnxq.FallbackOptions(max_drop=MAX_DROP, metric="sqnr", sensitivity="only-quantized",
                                       sensitivity_samples=64),
    )
    assert again.fallback.met and {k.name for k in again.fallback.kept} == {k.name for k in result.fallback.kept}
    steps = [json.loads(p.read_text()) for p in sorted((folder / "ws" / "steps").glob("*-sensitivity.json"))]
    measured = steps[-1]["payload"]
    assert measured["mode"] == "only-quantized"
    units = [unit.split("|") for unit in measured["gains"]]
    every_key = set().union(*units)
    reference = run(model, _data(1))[0].astype(np.float64)
    for unit, gain in zip(units, measured["gains"].values()):
        # the same model built from rules: every other unit float; its error recomputed with numpy
        others = tuple(f"sig:{key}" for key in sorted(every_key - set(unit)))
        alone = plain_int8(model, tmp_path / "alone.onnx", tmp_path / "ws_alone", others)
        error = float(np.sum((reference - run(alone.output, _data(1))[0]) ** 2) / np.sum(reference**2))
        assert gain + measured["baseline"] == pytest.approx(error, rel=1e-3, abs=1e-9)
    # the outlier layers' units add by far the most error when quantized alone
    top = max(measured["gains"], key=measured["gains"].get)
    assert measured["gains"][top] > 10 * min(measured["gains"].values())


def test_saved_rules_reproduce_the_fallback_without_a_search(tuned, tmp_path):
    folder, model, result, _ = tuned
    replay = plain_int8(model, tmp_path / "replay.onnx", tmp_path / "ws", [str(folder / "rules.json")])
    assert _float_gemms(replay.output) == {k.name for k in result.fallback.kept}


def test_custom_metric_callable_and_loader(tmp_path):
    model = outlier_mlp()
    calls = []

    def worst_case(outputs, reference, labels):
        calls.append(labels)
        return -float(np.abs(outputs["y"] - reference["y"]).max())

    result = onnxq.convert(model, tmp_path / "m.onnx", _data(0), eval_data=_data(1), workspace=tmp_path / "ws",
                           fallback=onnxq.FallbackOptions(max_drop=0.5, metric=worst_case))
    assert calls and result.fallback.metric == "worst_case"
    # float scores 0 and only an exact match keeps a relative drop of 0: every Gemm goes float
    assert result.fallback.met and _float_gemms(result.output) == {"g1", "g2", "g3"}

    def unreachable(outputs, reference, labels):
        return 1.0 if outputs is reference else 0.0

    result = onnxq.convert(model, tmp_path / "n.onnx", _data(0), eval_data=_data(1), workspace=tmp_path / "ws2",
                           fallback=onnxq.FallbackOptions(max_drop=0.1, metric=unreachable))
    assert not result.fallback.met and result.output.is_file()
    assert any("NOT met" in note for note in result.notes)

    metric_file = tmp_path / "metric.py"
    metric_file.write_text(
        "import numpy as np\n"
        "def agreement(outputs, reference, labels):\n"
        "    return float((outputs['y'].argmax(1) == reference['y'].argmax(1)).mean())\n"
    )
    np.savez(tmp_path / "calib.npz", **_data(0))
    np.savez(tmp_path / "eval.npz", **_data(1))
    onnx.save(model, tmp_path / "m.onnx")
    completed = subprocess.run(
        [sys.executable, "-m", "onnxq", "convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "cli.onnx"),
         "--calibration-data", str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "eval.npz"),
         "--max-drop", "0.02", "--metric", f"{metric_file}:agreement", "--json", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)["fallback"]
    reference = run(model, _data(1))[0].argmax(1)
    agreement = float((run(str(tmp_path / "cli.onnx"), _data(1))[0].argmax(1) == reference).mean())
    assert report["met"] and agreement >= 0.98
    assert report["final_score"] == pytest.approx(agreement)


def test_the_target_must_also_hold_on_each_half_of_the_evaluation_data(tmp_path):
    model = outlier_mlp()
    sizes = []

    def lenient_on_the_whole(outputs, reference, labels):
        """Passes any model on all 64 samples; on a half it is 1 - noise/signal."""
        sizes.append(len(reference["y"]))
        if len(reference["y"]) == 64:
            return 1.0
        return 1 - float(np.sum((outputs["y"] - reference["y"]) ** 2) / np.sum(reference["y"] ** 2))

    checked = onnxq.convert(model, tmp_path / "halves.onnx", _data(0), eval_data=_data(1), workspace=tmp_path / "ws1",
                            fallback=onnxq.FallbackOptions(max_drop=MAX_DROP, metric=lenient_on_the_whole))
    assert set(sizes) == {64, 32}
    assert checked.fallback.met and _float_gemms(checked.output) == {"g1", "g2"}
    half = {"x": _data(1)["x"][32:]}
    assert sqnr_score(model, checked.output, half) >= 1 - MAX_DROP  # recomputed on the second half
    sizes.clear()
    whole_only = onnxq.convert(
        model, tmp_path / "whole.onnx", _data(0), eval_data=_data(1), workspace=tmp_path / "ws2",
        fallback=onnxq.FallbackOptions(max_drop=MAX_DROP, metric=lenient_on_the_whole, check_halves=False),
    )
    assert set(sizes) == {64} and whole_only.fallback.met and not _float_gemms(whole_only.output)


def test_rank_units_finds_the_sensitive_units_among_many_with_few_trials():
    from onnxq.tune.sensitivity import rank_units

    units = [(f"n{i}",) for i in range(100)]
    true_gain = {f"n{i}": 0.001 for i in range(100)} | {"n37": 1.0, "n80": 0.5, "n81": 0.2}
    measured = []

    def gains_of(node_sets):
        measured.extend(node_sets)
        return [sum(true_gain[n] for n in nodes) for nodes in node_sets]

    ranking = list(rank_units(units, gains_of))
    assert ranking[:3] == [("n37",), ("n80",), ("n81",)]
    assert len(measured) <= 10 + 6 * 10  # groups of 10, then six groups unit by unit
    few = [(f"m{i}",) for i in range(5)]
    assert list(rank_units(few, lambda node_sets: [float(sorted(n)[0][1:]) for n in node_sets])) == few[::-1]


def test_search_finds_the_needed_nodes_and_prunes_the_rest():
    from onnxq.tune.search import search_fallback

    ranked = [frozenset({f"n{i}"}) for i in (3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 17, 11, 12)]
    needed = {"n3", "n17"}
    result = search_fallback(
        ranked, frozenset({"rule"}), {},
        score=lambda keep: 1.0 if needed <= keep else 0.0, accept=lambda value: value >= 1.0, max_trials=64,
    )
    assert result.met and result.keep_float == frozenset(needed | {"rule"})
    unreachable = search_fallback(ranked, frozenset(), {}, score=lambda keep: 0.0, accept=lambda v: v > 0, max_trials=64)
    assert not unreachable.met and unreachable.keep_float == frozenset().union(*ranked)
