"""Models with external data and over 2 GB: read by path, weights beside the output
(``--external-data auto|always|never``), nothing partial on failure, memory near the weights."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq.errors import ModelError, OutputError
from onnxq.files import write_with_external_data
from tests.graphs import sqnr_db

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "digits_cnn.onnx"
CALIBRATION = ROOT / "models" / "calib.npz"
CONFIG = onnxq.QuantConfig(max_samples=16)
RUN = onnxq.RunOptions(device="cpu")
output_writer = importlib.import_module("onnxq.save.output")  # where the single-file limit is applied


def outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def demo_feed() -> dict[str, np.ndarray]:
    with np.load(CALIBRATION) as data:
        return {name: data[name][:8] for name in data.files}


def external_locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> Path:
    """The demo model converted the default way: one protobuf file."""
    output = tmp_path_factory.mktemp("single") / "demo.int8.onnx"
    onnxq.convert(DEMO, output, CALIBRATION, CONFIG, run=RUN)
    return output


def test_small_model_is_one_file_by_default(single_file):
    assert external_locations(single_file) == set()
    assert not Path(f"{single_file}.data").exists()


def test_always_puts_the_weights_beside_the_output_and_changes_nothing_else(tmp_path, single_file):
    output = tmp_path / "demo.int8.onnx"
    result = onnxq.convert(DEMO, output, CALIBRATION, onnxq.QuantConfig(max_samples=16), run=onnxq.RunOptions(device="cpu", external_data="always"))
    data = tmp_path / "demo.int8.onnx.data"
    assert external_locations(output) == {data.name}
    assert result.quantized_bytes == output.stat().st_size + data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.int8.onnx", "demo.int8.onnx.data", "demo.int8.onnx.onnxq"]
    feed = demo_feed()
    for ours, reference in zip(outputs(output, feed), outputs(single_file, feed)):
        np.testing.assert_array_equal(ours, reference)
    from onnxq.report.inspect import inspect_model

    inspected, expected = inspect_model(output), inspect_model(single_file)
    assert (inspected.op_counts(), inspected.unfused) == (expected.op_counts(), expected.unfused)


@pytest.fixture(scope="module")
def external_input(tmp_path_factory) -> Path:
    """The demo model saved with its weights in an external data file."""
    folder = tmp_path_factory.mktemp("external")
    path = folder / "demo.onnx"
    onnx.save_model(onnx.load(DEMO), path, save_as_external_data=True, location="demo.weights", size_threshold=0)
    assert external_locations(path) == {"demo.weights"}
    return path


def test_auto_keeps_an_external_data_model_external(tmp_path, external_input, single_file):
    output = tmp_path / "demo.int8.onnx"
    result = onnxq.convert(external_input, output, CALIBRATION, CONFIG, run=RUN)
    assert external_locations(output) == {"demo.int8.onnx.data"}
    assert result.float_bytes == external_input.stat().st_size + (external_input.parent / "demo.weights").stat().st_size
    feed = demo_feed()
    for ours, reference in zip(outputs(output, feed), outputs(single_file, feed)):
        np.testing.assert_array_equal(ours, reference)


def test_recover_and_an_already_quantized_external_model_stay_external(tmp_path, external_input, single_file):
    first = tmp_path / "first" / "demo.int8.onnx"
    first.parent.mkdir()
    onnxq.convert(external_input, first, CALIBRATION, CONFIG, run=RUN)
    recovered = tmp_path / "recovered.onnx"
    onnxq.recover(external_input, Path(f"{first}.onnxq"), recovered)
    again = tmp_path / "again.onnx"
    result = onnxq.convert(first, again, None, CONFIG, run=RUN)  # already quantized: no calibration
    assert result.calibration_samples == 0
    feed = demo_feed()
    for path in (recovered, again):
        assert external_locations(path) == {f"{path.name}.data"}
        for ours, reference in zip(outputs(path, feed), outputs(single_file, feed)):
            np.testing.assert_array_equal(ours, reference)


def test_never_writes_an_external_data_model_as_one_file_when_it_fits(tmp_path, external_input, single_file):
    output = tmp_path / "demo.int8.onnx"
    onnxq.convert(external_input, output, CALIBRATION, onnxq.QuantConfig(max_samples=16), run=onnxq.RunOptions(device="cpu", external_data="never"))
    assert external_locations(output) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.int8.onnx", "demo.int8.onnx.onnxq"]
    feed = demo_feed()
    for ours, reference in zip(outputs(output, feed), outputs(single_file, feed)):
        np.testing.assert_array_equal(ours, reference)


def test_never_refuses_a_model_over_the_single_file_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(output_writer, "SINGLE_FILE_LIMIT", 1000)  # the demo's weights then count as too big
    output = tmp_path / "demo.int8.onnx"
    with pytest.raises(OutputError, match="--external-data auto or always"):
        onnxq.convert(DEMO, output, CALIBRATION, onnxq.QuantConfig(max_samples=16), run=onnxq.RunOptions(device="cpu", external_data="never"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.int8.onnx.onnxq"]
    # the calibration is kept: resuming with external data writes the model without any data
    onnxq.convert(DEMO, output, None, onnxq.QuantConfig(max_samples=16), run=onnxq.RunOptions(device="cpu"), resume=True)
    assert external_locations(output) == {"demo.int8.onnx.data"}


def test_auto_switches_to_external_data_over_the_single_file_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(output_writer, "SINGLE_FILE_LIMIT", 1000)
    output = tmp_path / "demo.int8.onnx"
    onnxq.convert(DEMO, output, CALIBRATION, CONFIG, run=RUN)
    assert external_locations(output) == {"demo.int8.onnx.data"}


def test_cli_option_and_its_error(tmp_path):
    from typer.testing import CliRunner

    from onnxq.cli.commands import app

    output = tmp_path / "demo.int8.onnx"
    args = ["convert", str(DEMO), "-o", str(output), "--calibration-data", str(CALIBRATION), "--max-samples", "8", "-q"]
    result = CliRunner().invoke(app, [*args, "--external-data", "always"])
    assert result.exit_code == 0, result.output
    assert external_locations(output) == {"demo.int8.onnx.data"}
    result = CliRunner().invoke(app, [*args, "--external-data", "sometimes"])
    assert result.exit_code == 2
    recovered = tmp_path / "recovered.onnx"
    args = ["recover", str(DEMO), f"{output}.onnxq", "-o", str(recovered), "-q", "--external-data", "always"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert external_locations(recovered) == {"recovered.onnx.data"}


def test_failed_check_leaves_no_file_and_keeps_the_old_output(tmp_path, single_file):
    import onnx_ir as ir

    output = tmp_path / "model.onnx"
    output.write_bytes(b"old")

    def refuse(staged: Path) -> None:  # the finishing step fails
        assert staged.is_file() and (staged.parent / "model.onnx.data").is_file()
        raise OutputError("refused")

    with pytest.raises(OutputError, match="refused"):
        write_with_external_data(ir.load(single_file), output, refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert output.read_bytes() == b"old"


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def _available_ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return 0.0


@pytest.fixture
def big_folder(tmp_path):
    """``tmp_path``, emptied afterwards: pytest keeps recent temporary folders, not 3 GB in each."""
    if _free_gb(tmp_path) < 10:
        pytest.skip(f"needs 10 GB free disk in {tmp_path}, has {_free_gb(tmp_path):.1f}")
    if _available_ram_gb() < 8:
        pytest.skip(f"needs 8 GB of available memory, has {_available_ram_gb():.1f}")
    yield tmp_path
    for path in tmp_path.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@pytest.mark.slow
def test_model_over_2gb_converts_with_memory_near_its_weights(big_folder):
    """About 80 s on 2 cores: writing 2.5 GB of weights, converting in a fresh process
    (calibration on 4 samples, the saturation trial, the output check), checking the output."""
    from benchmarks.big_model import LAYERS, WIDTH, convert_in_fresh_process, write_big_model

    tmp_path = big_folder

    model = write_big_model(tmp_path)
    weights = tmp_path / "big.onnx.data"
    assert weights.stat().st_size > 2**31  # over protobuf's limit
    output = tmp_path / "big.int8.onnx"
    result = convert_in_fresh_process(model, output, tmp_path / "calibration.npz")
    assert result["error"] is None, result["error"]

    # memory: near the weights (ONNX Runtime maps them all during calibration), never a second copy
    assert result["peak_rss_mb"] * 2**20 < 1.5 * weights.stat().st_size, result

    # layout: a small model file, int8 weights beside it, no float copy, nothing else left behind
    data = tmp_path / "big.int8.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["big.onnx", "big.onnx.data", "calibration.npz", "big.int8.onnx", "big.int8.onnx.data", "big.int8.onnx.onnxq"]
    )
    assert output.stat().st_size < 2**20
    proto = onnx.load(output, load_external_data=False)
    big = {t.name: t.data_type for t in proto.graph.initializer if np.prod(t.dims) >= WIDTH * WIDTH}
    assert list(big.values()) == [onnx.TensorProto.INT8] * LAYERS
    total = output.stat().st_size + data.stat().st_size
    float_total = model.stat().st_size + weights.stat().st_size
    assert 0.24 < total / float_total < 0.26

    # numbers: the int8 model against numpy's float computation on the mapped weights
    samples = np.load(tmp_path / "calibration.npz")["x"]
    w = np.memmap(weights, np.float32, "r", shape=(LAYERS, WIDTH, WIDTH))
    expected = samples
    for i in range(LAYERS):
        expected = expected @ w[i]
        if i < LAYERS - 1:
            expected = np.maximum(expected, 0)
    (actual,) = outputs(output, {"x": samples})
    assert sqnr_db(expected, actual) > 25


def test_hard_linked_external_data_is_refused(tmp_path, external_input):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(external_input, folder / "demo.onnx")
    shutil.copy(external_input.parent / "demo.weights", folder / "demo.weights")
    os.link(folder / "demo.weights", tmp_path / "elsewhere")  # the same file under another name
    with pytest.raises(ModelError, match="demo.weights.*hard links"):
        onnxq.convert(folder / "demo.onnx", tmp_path / "out.onnx", CALIBRATION, CONFIG, run=RUN)
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_reads_external_weights_from_the_model_folder(external_input):
    from onnxq.report.inspect import inspect_model

    ours, reference = inspect_model(external_input), inspect_model(DEMO)
    assert ours.bytes_by_dtype == reference.bytes_by_dtype
    assert ours.weights == reference.weights


def test_compare_reads_a_quantized_model_with_external_data_from_another_folder(tmp_path, monkeypatch):
    output = tmp_path / "out" / "demo.int8.onnx"
    output.parent.mkdir()
    onnxq.convert(DEMO, output, CALIBRATION, CONFIG, run=onnxq.RunOptions(device="cpu", external_data="always"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the weights are found beside the model, not in the working folder
    comparison = onnxq.compare(DEMO, output, CALIBRATION, max_samples=8)
    feed = demo_feed()
    [expected] = [sqnr_db(f, q) for f, q in zip(outputs(DEMO, feed), outputs(output, feed))]
    assert comparison.fidelity.samples == 8
    assert comparison.fidelity.outputs[0].sqnr_db == pytest.approx(expected, rel=1e-6)
    assert comparison.layers  # the per-layer table read the dequantized weights from OUTPUT.data
