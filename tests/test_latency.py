"""Latency of the int8 model against float, reported by every conversion: the figures follow
from the returned runs, an int8 model slower than float is said loudly with the parts that make
it slow, --no-latency turns it off; the profiler's trace and the CPU's flags are read right."""

from __future__ import annotations

import json

import numpy as np
import onnx.helper as oh
import pytest

import onnx
from typer.testing import CliRunner

import onnxq
from onnxq.cli.commands import app
from onnxq.cpu import int8_features, int8_summary
from onnxq.report.latency import interleaved_ms
from onnxq.report.profile import ModelNodes, kernels, slow_parts
from tests.graphs import make_model

CHANNELS = 4


def conv_relu(tmp_path):
    """A small Conv -> Relu -> Conv model and its calibration data."""
    rng = np.random.default_rng(0)
    model = make_model(
        [oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         oh.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
        [("x", [None, CHANNELS, 8, 8])], [("y", [None, CHANNELS, 8, 8])],
        [("w1", rng.normal(size=(CHANNELS, CHANNELS, 3, 3)).astype(np.float32)),
         ("w2", rng.normal(size=(CHANNELS, CHANNELS, 3, 3)).astype(np.float32))],
    )
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(16, CHANNELS, 8, 8)).astype(np.float32))
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, data


def unfused_chain(tmp_path, layers: int = 12):
    """ConvTranspose layers quantized with --quantize-unfused: ONNX Runtime has no int8
    ConvTranspose kernel, so each runs in float between DequantizeLinear and QuantizeLinear
    kernels, about twice the float model's time."""
    rng = np.random.default_rng(1)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights.append((f"w{i}", rng.normal(size=(CHANNELS, CHANNELS, 1, 1)).astype(np.float32) / 2))
        nodes.append(oh.make_node("ConvTranspose", [x, f"w{i}"], [f"t{i}"], name=f"up{i}"))
        x = f"t{i}"
    model = make_model(nodes, [("x", [1, CHANNELS, 16, 16])], [(x, [1, CHANNELS, 16, 16])], weights)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(8, CHANNELS, 16, 16)).astype(np.float32))
    path = tmp_path / "chain.onnx"
    path.write_bytes(model.SerializeToString())
    return path, data


def onnxq_cli(*args):
    """The command line, run in this process (the same code as ``onnxq``, without its start-up time)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def test_latency_figures_follow_from_the_returned_runs(tmp_path):
    model, data = conv_relu(tmp_path)
    latency = onnxq.convert(model, tmp_path / "q.onnx", data).latency
    floats, int8s = [np.array(r) for r in latency.float_times], [np.array(r) for r in latency.int8_times]
    assert len(floats) == len(int8s) >= 3 and all(len(f) == len(q) == len(floats[0]) for f, q in zip(floats, int8s))
    assert latency.runs == sum(len(r) for r in int8s)
    assert latency.float_ms == pytest.approx(np.median(np.concatenate(floats)))
    assert latency.int8_ms == pytest.approx(np.median(np.concatenate(int8s)))
    per_repeat = [np.median(q) / np.median(f) for f, q in zip(floats, int8s)]
    assert latency.ratio == pytest.approx(np.median(per_repeat))
    assert latency.spread == pytest.approx((min(per_repeat), max(per_repeat)))
    assert latency.provider == "CPUExecutionProvider"


def test_json_has_the_latency_block_and_no_latency_turns_it_off(tmp_path):
    model, data = conv_relu(tmp_path)
    measured = onnxq_cli("convert", model, "-o", tmp_path / "a.onnx", "--calibration-data", data, "--json", "-q")
    assert measured.exit_code == 0, measured.output
    block = json.loads(measured.stdout)["latency"]
    assert {"float_ms", "int8_ms", "ratio", "spread", "runs"} <= set(block) and len(block["spread"]) == 2
    assert block["spread"][0] <= block["ratio"] <= block["spread"][1]
    off = onnxq_cli("convert", model, "-o", tmp_path / "b.onnx", "--calibration-data", data, "--json", "-q",
                    "--no-latency")
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["latency"] is None
    assert onnxq.convert(model, tmp_path / "c.onnx", data, run=onnxq.RunOptions(latency=False)).latency is None


def test_slower_int8_model_is_said_loudly_with_its_slow_parts(tmp_path):
    model, data = unfused_chain(tmp_path)
    output = tmp_path / "q.onnx"
    result = onnxq_cli("convert", model, "-o", output, "--calibration-data", data, "--quantize-unfused",
                       "--json", "--quiet")
    assert result.exit_code == 0, result.output
    latency = json.loads(result.stdout)["latency"]
    assert latency["spread"][0] > 1, latency  # every repeat: int8 slower (not a threshold: the model's design)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "the int8 model is slower than float on this machine" in warnings[0]
    assert f"{latency['ratio']:.2f}x" in warnings[0]
    [qdq] = [line for line in warnings[1:] if "QuantizeLinear/DequantizeLinear ONNX Runtime did not fuse away" in line]
    named = [kernel.split(" (")[0] for kernel in qdq.split("slowest: ")[1].split(", ")]
    assert named and set(named) <= {node.name for node in onnx.load(output).graph.node}
    assert [line for line in warnings[1:] if line.startswith("warning:   slow: ")] == warnings[1:]


def _event(name: str, op: str, dur_us: float, inputs: list[dict]) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur_us,
            "args": {"op_name": op, "input_type_shape": inputs}}


def test_profile_trace_leaves_out_the_warm_up_and_sorts_kernels_into_parts():
    runs = 3
    dw = [{"float": [1, 8, 4, 4]}, {"float": [8, 1, 3, 3]}]
    trace = [{"cat": "Session", "name": "model_run", "dur": 999}]
    for run, (conv_us, dw_us, q_us) in enumerate([(500, 500, 500), (10, 4, 2), (12, 6, 2), (11, 5, 9)]):
        trace += [_event("dw_nchwc", "Conv", dw_us, dw),  # depthwise by its weight's shape
                  _event("c_token_3", "QLinearConv", conv_us, [{"uint8": [1, 8, 4, 4]}]),
                  _event("up", "ConvTranspose", conv_us, [{"float": [1, 8, 4, 4]}]),
                  _event("g", "QLinearConv", dw_us, [{"uint8": [1, 8, 4, 4]}]),
                  _event("x_q", "QuantizeLinear", q_us, [{"float": [1, 8, 4, 4]}])]
        trace += [{"cat": "Node", "name": "up_fence_before", "dur": 1000}]
    found = {k.name: k for k in kernels(trace, runs, ModelNodes(grouped=frozenset({"g"}),
                                                                dequantized_inputs=frozenset({"up", "c"})))}
    assert set(found) == {"dw", "c", "up", "g", "x_q"}
    assert found["dw"].ms == pytest.approx(np.median([4, 6, 5]) / 1000)
    assert found["x_q"].ms == pytest.approx(np.median([2, 2, 9]) / 1000)
    assert found["dw"].part == found["g"].part == "depthwise or grouped Conv layers"
    assert found["c"].part == "Conv layers" and not found["c"].in_float  # fused into an int8 kernel
    assert found["up"].part == "ConvTranspose nodes" and found["up"].in_float
    assert found["x_q"].part.startswith("QuantizeLinear/DequantizeLinear")


def test_slow_parts_are_the_parts_slower_in_int8_worst_first():
    float_trace = [_event("a", "Add", us, [{"float": [4]}]) for us in (50, 1, 1)] + \
                  [_event("c", "Conv", us, [{"float": [1, 8, 4, 4]}, {"float": [8, 8, 3, 3]}]) for us in (50, 20, 20)]
    int8_trace = [_event("a", "QLinearAdd", us, [{"uint8": [4]}]) for us in (50, 3, 3)] + \
                 [_event("c", "QLinearConv", us, [{"uint8": [1, 8, 4, 4]}]) for us in (50, 10, 10)] + \
                 [_event("q", "QuantizeLinear", us, [{"float": [4]}]) for us in (50, 7, 7)]
    lines = slow_parts(kernels(float_trace, 2), kernels(int8_trace, 2))
    assert len(lines) == 2  # Conv is faster in int8: not named
    assert lines[0].startswith("QuantizeLinear/DequantizeLinear ONNX Runtime did not fuse away: 1 kernel(s), "
                               "0.007 ms in the int8 model vs 0.000 ms in the float model")
    assert lines[1].startswith("Add nodes: 1 kernel(s), 0.003 ms in the int8 model vs 0.001 ms in the float model")
    assert slow_parts(kernels(int8_trace, 2), kernels(int8_trace, 2))[0].startswith("no part's kernels take longer")


class _Recorder:
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def run(self, outputs, feed):
        self.calls.append(self.name)


def test_runs_are_interleaved_in_a_seeded_random_order():
    calls: list[str] = []
    sessions = {name: _Recorder(name, calls) for name in ("float", "int8")}
    times = interleaved_ms(sessions, dict.fromkeys(sessions, {}), runs=20, repeats=3, seed=7)
    assert [len(r) for r in times["float"]] == [len(r) for r in times["int8"]] == [20, 20, 20]
    repeats = [calls[i * 40:(i + 1) * 40] for i in range(3)]
    assert all(r.count("float") == r.count("int8") == 20 for r in repeats)
    assert len({tuple(r) for r in repeats}) == 3  # another order each repeat
    assert repeats[0] != ["float", "int8"] * 20 and repeats[0] != ["float"] * 20 + ["int8"] * 20
    again: list[str] = []
    interleaved_ms({n: _Recorder(n, again) for n in sessions}, dict.fromkeys(sessions, {}), runs=20, repeats=3, seed=7)
    assert again == calls


@pytest.mark.parametrize(("flags", "features", "fast"), [
    ("fpu sse2 avx2 fma", ("avx2",), "without"),
    ("avx2 avx512f avx512bw avx512_vnni", ("avx512_vnni", "avx512bw", "avx2"), "with"),
    ("avx2 avx_vnni", ("avx_vnni", "avx2"), "with"),
    ("fp asimd asimddp", ("asimddp",), "with"),
    ("fpu sse2", (), "without"),
])
def test_cpu_int8_features_are_read_from_the_flags(flags, features, fast):
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert int8_features(cpuinfo) == features
    assert int8_summary(cpuinfo) == (f"CPU int8 features: {', '.join(features) or 'none'} "
                                     f"({fast} VNNI/AMX/dot-product int8 instructions)")
    assert int8_summary(None) == "CPU int8 features unknown (no /proc/cpuinfo)"
