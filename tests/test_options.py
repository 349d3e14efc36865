"""Options declared once: the command line offers every documented flag, passes values to the
Python API unchanged, and the API refuses values outside an option's choices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer.main
from PIL import Image

import onnxq
from onnxq.cli.commands import app
from onnxq.errors import CalibrationDataError, ConfigError
from tests.test_cli_errors import DEMO, ROOT
from tests.test_cli_errors import onnxq as run_cli

CALIBRATION = ROOT / "models" / "calib.npz"
EVALUATION = ROOT / "models" / "eval.npz"

CONVERT_FLAGS = {  # the command line's contract, as README.md documents it
    "--output", "-o", "--calibration-data", "--eval-data", "--format", "--target", "--force-format", "--activations",
    "--per-channel", "--per-tensor", "--quantize-unfused", "--reduce-range", "--method", "--percentile", "--device",
    "--batch-size", "--max-samples", "--memory-budget", "--workspace", "--resume", "--checkpoint-interval",
    "--external-data", "--image-size", "--resize", "--pixel-scale", "--mean", "--std", "--channel-order", "--layout",
    "--quiet", "-q", "--json", "--keep-float", "--max-drop", "--metric", "--check-halves", "--no-check-halves",
    "--fallback-dtype", "--save-rules", "--max-trials", "--sensitivity", "--sensitivity-samples",
    "--equalize", "--no-equalize", "--bias-correction", "--no-bias-correction",
}
IMAGE_FLAGS = {"--image-size", "--resize", "--pixel-scale", "--mean", "--std", "--channel-order", "--layout"}


def _flags(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]
    return {name for param in click_command.params for name in (*param.opts, *param.secondary_opts)}


def test_convert_offers_every_documented_flag():
    assert CONVERT_FLAGS <= _flags("convert")


def test_compare_and_recover_share_the_data_and_output_options_of_convert():
    assert IMAGE_FLAGS | {"--data", "--batch-size", "--max-samples", "--rows", "--json"} <= _flags("compare")
    assert {"--external-data", "--index", "--output", "--json"} <= _flags("recover")


@pytest.mark.parametrize("make, error, words", [
    (lambda: onnxq.QuantConfig(method="kl"), ConfigError, "method must be one of auto, minmax, percentile, entropy, mse"),
    (lambda: onnxq.QuantConfig(format="onnx"), ConfigError, "format must be one of qdq, qoperator"),
    (lambda: onnxq.RunOptions(device="tpu"), ConfigError, "device must be one of auto, cpu, cuda"),
    (lambda: onnxq.FallbackOptions(dtype="bf16"), ConfigError, "dtype must be one of fp32, fp16"),
    (lambda: onnxq.FallbackOptions(keep_float=("pattern:nothing",)), ConfigError, "pattern"),
    (lambda: onnxq.ImageFolder(ROOT, resize="zoom"), CalibrationDataError, "resize must be one of stretch"),
])
def test_the_api_refuses_a_value_outside_the_choices(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_cli_and_api_make_the_same_model_from_the_same_options(tmp_path):
    flags = ["--per-tensor", "--activations", "int8", "--method", "percentile", "--percentile", "99.9",
             "--keep-float", "first:Conv", "--fallback-dtype", "fp16", "--device", "cpu", "-q"]
    result = run_cli("convert", DEMO, "-o", tmp_path / "cli.onnx", "--calibration-data", CALIBRATION, *flags)
    assert result.returncode == 0, result.stderr
    onnxq.convert(
        DEMO, tmp_path / "api.onnx", CALIBRATION,
        onnxq.QuantConfig(per_channel=False, activations="int8", method="percentile", percentile=99.9),
        run=onnxq.RunOptions(device="cpu"), fallback=onnxq.FallbackOptions(keep_float=("first:Conv",), dtype="fp16"),
    )
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()


def test_compare_preprocesses_an_image_folder_as_convert_does(tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 12), dtype=np.uint8)).save(folder / f"{index}.png")
    quantized = tmp_path / "q.onnx"
    onnxq.convert(DEMO, quantized, CALIBRATION, run=onnxq.RunOptions(device="cpu"))
    options = ["--resize", "letterbox", "--pixel-scale", "0.0625", "--mean", "0.5"]
    result = run_cli("compare", DEMO, quantized, "--data", folder, *options, "--json")
    assert result.returncode == 0, result.stderr
    images = onnxq.ImageFolder(folder, resize="letterbox", scale=0.0625, mean=(0.5,))
    expected = onnxq.compare(DEMO, quantized, images).fidelity.outputs[0]
    reported = json.loads(result.stdout)["fidelity"]["outputs"][0]
    assert reported["sqnr_db"] == pytest.approx(expected.sqnr_db, rel=1e-9)
    default = onnxq.compare(DEMO, quantized, onnxq.ImageFolder(folder)).fidelity.outputs[0]
    assert default.sqnr_db != pytest.approx(expected.sqnr_db)  # the options did change the inputs


def test_a_bad_shared_option_is_a_clean_error_in_compare_too(tmp_path):
    result = run_cli("compare", DEMO, DEMO, "--data", EVALUATION, "--batch-size", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: batch size must be at least 1, not 0"]
