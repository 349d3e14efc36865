"""A float model over 2 GB (weights in external data), and what converting it costs.

``python -m benchmarks.big_model [FOLDER]`` writes the model and its calibration data to FOLDER
(default: a temporary folder, removed afterwards), converts it with ``onnxq`` in a fresh process
(``benchmarks.convert_one``, which reports its peak RSS as VmHWM) and prints JSON: seconds,
peak RSS against the bytes of the float weights, and the output's size against the float model's.

The model is ``LAYERS`` MatMul layers of ``WIDTH x WIDTH`` float32 weights with a Relu between
them (3 x 14336 x 14336 x 4 bytes = 2.47 GB). It is written straight to disk, one layer at a
time: no protobuf over 2 GB is ever built, here or in onnxq.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 3
WIDTH = 14336
SAMPLES = 4


def write_big_model(folder: Path, layers: int = LAYERS, width: int = WIDTH) -> Path:
    """Write ``big.onnx`` with its weights in ``big.onnx.data`` to ``folder``, and
    ``calibration.npz`` (``SAMPLES`` samples); returns the model's path.

    Every layer gets the same random matrix (scaled to keep activations near unit size):
    generating one is the slow part, and the quantizer has no way to notice.
    """
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((width, width), dtype=np.float32)
    weight *= np.float32(1 / np.sqrt(width))
    data_name = "big.onnx.data"
    with open(folder / data_name, "wb") as data:
        for _ in range(layers):
            weight.tofile(data)
    del weight
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", width]))
    nodes, initializers, current = [], [], x
    for i in range(layers):
        tensor = ir.ExternalTensor(
            data_name, offset=i * width * width * 4, length=width * width * 4, dtype=ir.DataType.FLOAT,
            shape=ir.Shape([width, width]), name=f"w{i}", base_dir=folder,
        )
        w = ir.Value(name=f"w{i}", const_value=tensor, type=ir.TensorType(ir.DataType.FLOAT), shape=tensor.shape)
        initializers.append(w)
        matmul = ir.node("MatMul", [current, w], name=f"matmul{i}")
        nodes.append(matmul)
        current = matmul.outputs[0]
        if i < layers - 1:
            relu = ir.node("Relu", [current], name=f"relu{i}")
            nodes.append(relu)
            current = relu.outputs[0]
    current.name = "y"
    current.type, current.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", width])
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 17}, name="big")
    path = folder / "big.onnx"
    ir.save(ir.Model(graph, ir_version=8), path)  # tensors stay where they are: external
    samples = np.random.default_rng(1).standard_normal((SAMPLES, width), dtype=np.float32)
    np.savez(folder / "calibration.npz", x=samples)
    return path


def convert_in_fresh_process(model: Path, output: Path, calibration: Path) -> dict:
    """``onnxq.convert`` run by ``benchmarks.convert_one``: its seconds, peak RSS and error."""
    command = [sys.executable, "-m", "benchmarks.convert_one", "onnxq", str(model), str(output), str(calibration)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure(folder: Path) -> dict:
    """Write the model to ``folder``, convert it, and report time, memory and sizes."""
    model = write_big_model(folder)
    output = folder / "big.int8.onnx"
    result = convert_in_fresh_process(model, output, folder / "calibration.npz")
    weight_bytes = (folder / "big.onnx.data").stat().st_size
    float_bytes = model.stat().st_size + weight_bytes
    output_bytes = output.stat().st_size + (folder / "big.int8.onnx.data").stat().st_size
    return result | {
        "float_weight_mb": weight_bytes / 2**20,
        "peak_rss_over_weights": result["peak_rss_mb"] * 2**20 / weight_bytes,
        "output_mb": output_bytes / 2**20,
        "output_over_float": output_bytes / float_bytes,
    }


def render(result: dict) -> str:
    """The measurement as a section of ``benchmarks/RESULTS.md``."""
    if result["error"]:
        return f"## Model over 2 GB\n\nonnxq failed: {result['error']}\n"
    return "\n".join([
        "## Model over 2 GB (external data)",
        "",
        f"{LAYERS} MatMul layers of {WIDTH}x{WIDTH} float32 weights, {result['float_weight_mb']:.0f} MiB in external "
        f"data, {SAMPLES} calibration samples (`python -m benchmarks.big_model`, a fresh process):",
        "",
        "| conversion s | peak RSS MiB | peak RSS / float weights | output MiB | output / float model |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {result['seconds']:.1f} | {result['peak_rss_mb']:.0f} | {result['peak_rss_over_weights']:.2f} | "
        f"{result['output_mb']:.0f} | {result['output_over_float']:.3f} |",
        "",
        "The peak is ONNX Runtime mapping every float weight while calibrating; onnxq keeps no second copy.",
        "",
    ])


def main() -> None:
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
        folder.mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(folder), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-big-") as folder:
        print(json.dumps(measure(Path(folder)), indent=2))


if __name__ == "__main__":
    main()
