"""Float16 models: onnxq's design (float32 inside, the float16 interface kept through Casts)
against the alternative, Q/DQ with float16 scales (opset 21, no Casts), on the network of
``tests/test_float16.py``. Prints a markdown table: file size, SQNR against ONNX Runtime on the
float32 twin, median CPU latency (ONNX Runtime's default session; the runs of all models interleaved
in random order, each on its own input).

    python -m benchmarks.float16
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as onh

import onnxq
from benchmarks.timing import cpu_line, latencies_ms, median_ms, session, sqnr_db
from tests.graphs import as_float16, conv_classifier

BATCH, RUNS = 8, 300


def float16_scales(quantized: onnx.ModelProto) -> onnx.ModelProto:
    """onnxq's output of a float16 model rewritten as Q/DQ with float16 scales: the interface
    Casts removed, every float32 initializer (scales) made float16, opset 21."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    outputs = {value.name for value in graph.output}
    for cast in [node for node in graph.node if node.op_type == "Cast"]:
        graph.node.remove(cast)
        source, target = cast.input[0], cast.output[0]
        renames = (source, target) if target in outputs else (target, source)  # keep the graph output's name
        for node in graph.node:
            for slots in (node.input, node.output):
                for index, name in enumerate(slots):
                    if name == renames[0]:
                        slots[index] = renames[1]
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(onh.from_array(onh.to_array(init).astype(np.float16), init.name))
    del graph.value_info[:]
    model.opset_import[0].version, model.ir_version = 21, 10
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    twin = conv_classifier(rng)
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: Path(folder, f"{name}.onnx") for name in ("float32", "float16", "onnxq", "float16-scales")}
        onnx.save(twin, paths["float32"])
        onnx.save(as_float16(twin), paths["float16"])
        calibration = rng.normal(size=(64, 3, 16, 16)).astype(np.float16)
        onnxq.convert(paths["float16"], paths["onnxq"], {"x": calibration}, run=onnxq.RunOptions(device="cpu"),
                      workspace=Path(folder, "ws"))
        onnx.save(float16_scales(onnx.load(paths["onnxq"])), paths["float16-scales"])
        x = rng.normal(size=(BATCH, 3, 16, 16))
        sessions = {name: session(path) for name, path in paths.items()}
        feeds = {name: {"x": x.astype(np.float32 if name == "float32" else np.float16)} for name in paths}
        reference = sessions["float32"].run(None, feeds["float32"])
        times = latencies_ms(sessions, None, RUNS, feeds)
        print(cpu_line(), end="\n\n")
        print(f"| model | size KB | size / float16 | SQNR dB vs float32 | median ms (batch {BATCH}) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, path in paths.items():
            size = path.stat().st_size
            quality = sqnr_db(reference, sessions[name].run(None, feeds[name]))
            print(f"| {name} | {size / 1024:.1f} | {size / paths['float16'].stat().st_size:.3f} | {quality:.1f} | "
                  f"{median_ms(times[name]):.3f} |")


if __name__ == "__main__":
    main()
