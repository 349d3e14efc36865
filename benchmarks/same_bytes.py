"""Prove that a refactor changed no output bytes: each case is converted by the code at REF and by
the current tree, and the sha256 of what each wrote (``OUTPUT``, and ``OUTPUT.data`` if any) must match.

``python -m benchmarks.same_bytes [--ref REF] [--quick]`` prints one row per case and exits 1 if
any case differs or fails in either tree (its one-line error is shown).

1. REF is checked out into a temporary ``git worktree``, removed at the end.
2. Every conversion runs in a fresh process (this file run as ``--worker``) whose ``sys.path``
   starts with the tree under test, so that ``onnxq`` (and ``benchmarks.workloads``, which imports
   it) come from that tree and not from the editable install; the worker asserts it.
3. Both trees read the same inputs, REF's ``models/``, and write to same-named files in their own
   folder, so a path cannot differ between them. ``--quick`` skips YOLOv8n (``--current PATH``
   replaces the current tree, to check the check itself against a second worktree of REF).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_REF = "a33e947"  # the last commit before onnxq was split into subpackages: the bytes to keep
YOLO_SAMPLES = 8
CASES = {  # case -> QuantConfig options beyond device="cpu"; the cases after "default" may read its output
    "default": {},
    "qoperator": {"format": "qoperator"},
    "per-tensor-int8": {"per_channel": False, "activations": "int8"},
    "percentile": {"method": "percentile"},
    "entropy": {"method": "entropy"},
    "mse": {"method": "mse"},
    "fp16-first-conv": {},
    "search": {},
    "recover": {},
    "requantize-qoperator": {"format": "qoperator"},
    "external-data": {},
    "loop-percentile": {"method": "percentile"},  # an RNN as a Loop: body tensors carried out, quantized in the body
    "attention-sentinel": {},  # a mask of the float minimum: sentinel tensors kept float
    "yolo-qdq": {},
    "yolo-qoperator": {"format": "qoperator"},
}


def _worker(code_root: str, models: str, case: str, folder: str) -> None:
    sys.path[0] = code_root  # replaces this script's folder; the editable install's finder comes after sys.path
    import onnxq

    assert Path(onnxq.__file__).resolve().is_relative_to(Path(code_root).resolve()), f"onnxq from {onnxq.__file__}"
    model, output, default = f"{models}/digits_cnn.onnx", f"{folder}/{case}.onnx", f"{folder}/default.onnx"
    calibration, options = f"{models}/calib.npz", {}
    run = {"device": "cpu", **({"external_data": "always"} if case == "external-data" else {})}
    if hasattr(onnxq, "RunOptions"):  # how the run goes moved out of QuantConfig in the restructuring
        config, options["run"] = onnxq.QuantConfig(**CASES[case]), onnxq.RunOptions(**run)
    else:
        config = onnxq.QuantConfig(**run, **CASES[case])
    if case == "recover":
        onnxq.recover(model, default + ".onnxq", output)
        return
    if case == "requantize-qoperator":
        model, calibration = default, None
    elif case == "fp16-first-conv":
        options["fallback"] = onnxq.FallbackOptions(keep_float=(onnxq.parse_rule("first:Conv"),), dtype="fp16")
    elif case == "search":  # plain int8 loses 0.2% top-1 on the demo, so the search runs trials (4 here)
        options["eval_data"] = f"{models}/eval.npz"
        options["fallback"] = onnxq.FallbackOptions(max_drop=0.001, max_trials=6)
    elif case == "loop-percentile":  # this tree's tests build the model: they import onnxq as the tree has it
        from tests.test_control_flow import _sequences, rnn_loop

        assert Path(rnn_loop.__code__.co_filename).resolve().is_relative_to(Path(code_root).resolve())
        model, calibration = rnn_loop(True), _sequences(24, 0)
    elif case == "attention-sentinel":
        from tests.graphs import attention_block, attention_data

        assert Path(attention_block.__code__.co_filename).resolve().is_relative_to(Path(code_root).resolve())
        model, calibration = attention_block(), attention_data(16)
    elif case.startswith("yolo-"):
        # this tree's benchmarks: it imports onnxq, whose modules' paths the refactor moves
        from benchmarks.workloads import WORKLOADS

        assert Path(sys.modules["benchmarks"].__file__).resolve().is_relative_to(Path(code_root).resolve())
        yolo = WORKLOADS["yolov8n"]
        model, calibration = yolo.model_path(), yolo.calibration_inputs(YOLO_SAMPLES)
    onnxq.convert(model, output, calibration, config, **options)


def _digest(output: Path) -> str:
    """sha256 of ``output``; with ``OUTPUT.data`` beside it, sha256 of both files' digests."""
    data = output.with_name(output.name + ".data")
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    if data.exists():
        digest = hashlib.sha256(bytes.fromhex(digest) + hashlib.sha256(data.read_bytes()).digest()).hexdigest()
    return digest


def _convert(code_root: Path, models: Path, case: str, folder: Path) -> str:
    """The output's digest, or ``error: <last line of stderr>``."""
    folder.mkdir(exist_ok=True)
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", str(code_root), str(models), case, str(folder)]
    done = subprocess.run(worker, check=False, capture_output=True, text=True, cwd=folder)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit code {done.returncode}"]
        return "error: " + lines[-1].strip()
    output = folder / f"{case}.onnx"
    return _digest(output) if output.exists() else "error: the worker wrote no output"


def _git(*args: str) -> None:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed: {done.stderr.strip()}")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        _worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default=BASELINE_REF, help=f"commit whose bytes must be kept (default {BASELINE_REF})")
    parser.add_argument("--quick", action="store_true", help="skip YOLOv8n")
    parser.add_argument("--current", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [case for case in CASES if not (args.quick and case.startswith("yolo-"))]
    start, failed, current_tree = time.perf_counter(), 0, args.current.resolve()
    with tempfile.TemporaryDirectory(prefix="same_bytes.") as tmp:
        ref_tree = Path(tmp) / "ref-tree"
        _git("worktree", "add", "--detach", str(ref_tree), args.ref)
        try:
            print(f"ref {args.ref} vs current {current_tree}")
            print(f"{'case':22} {'ref':12} {'current':12} {'seconds':>7}  result")
            for case in cases:
                case_start = time.perf_counter()
                ref = _convert(ref_tree, ref_tree / "models", case, Path(tmp) / "ref")
                current = _convert(current_tree, ref_tree / "models", case, Path(tmp) / "current")
                seconds = time.perf_counter() - case_start
                errors = [f"    {name}: {text}" for name, text in (("ref", ref), ("current", current)) if text[:6] == "error:"]
                result = "FAILED" if errors else "same" if ref == current else "DIFFERENT"
                failed += result != "same"
                ref_short, current_short = ("error" if text[:6] == "error:" else text[:12] for text in (ref, current))
                row = f"{case:22} {ref_short:12} {current_short:12} {seconds:7.1f}  {result}"
                print("\n".join([row, *errors]), flush=True)
        finally:
            _git("worktree", "remove", "--force", str(ref_tree))
    print(f"{len(cases) - failed} of {len(cases)} cases same ({time.perf_counter() - start:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
