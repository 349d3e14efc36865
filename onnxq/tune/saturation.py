"""Saturation-aware weights: 7-bit weights only on the layers where the CPU's int8 kernels
would otherwise lose accuracy.

On x86 CPUs without VNNI (AVX2 only), ONNX Runtime multiplies uint8 activations by int8 weights
with an instruction that adds pairs of products into int16, saturating above 32767: with
8-bit weights (up to 127) and activations up to 255, a pair can reach 64770. Weights of 7 bits
(up to 63) cannot saturate, but lose resolution everywhere ("reduce_range"). Rules:
1. CPUs with VNNI or AMX (x86) or dot-product instructions (ARM) do not saturate: nothing to do.
2. Otherwise each uint8 Conv/Gemm/MatMul layer of the main graph is run on the first
   ``MEASURED_BATCHES`` calibration batches twice, as ONNX Runtime's fused integer kernel and as
   the exact QDQ arithmetic, from the same quantized input. Saturation depends on the values (a
   pair of large activations meeting a pair of large weights): one sample of a small layer (a Gemm
   on a vector) can miss it when most samples hit it, so every measured batch counts.
3. A layer whose saturation error (fused vs exact, in output steps, over all measured batches)
   has more power than its own rounding noise (1/12 step squared) gets 7-bit weights. A MatMul
   that writes float (``OpInfo.float_output``, MatMulIntegerToFloat) is judged in the steps a
   uint8 output over its measured range would have.
4. Layers inside If/Loop/Scan bodies cannot be run on their own, so they are not measured: on
   a CPU that saturates, every uint8 one gets 7-bit weights (the safe side).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnx_ir as ir
import onnxruntime as ort

from onnxq.calibration.data import KEPT_BATCHES
from onnxq.cpu import DOT_PRODUCT_FLAGS, read_cpuinfo
from onnxq.graph import with_outputs
from onnxq.ops import rule_for
from onnxq.rewrite.plan import QuantPlan
from onnxq.runtime import session_options

MEASURED_BATCHES = KEPT_BATCHES  # the first calibration batches, which a one-shot source keeps too
ROUNDING_NOISE = 1 / 12  # power of the rounding error of a quantized output, in steps squared


def saturates(machine: str, cpuinfo: str | None) -> bool:
    """Whether u8 x s8 kernels saturate on a CPU of ``machine`` type with ``/proc/cpuinfo`` text
    ``cpuinfo`` (``None`` when unknown): x86 without VNNI/AMX does, ARM does not."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False  # ARM: dot-product kernels accumulate in 32 bits
    if cpuinfo is None:
        return True  # unknown x86: assume the common AVX2 path
    return not DOT_PRODUCT_FLAGS.intersection(cpuinfo.split())


@functools.cache
def cpu_saturates() -> bool:
    """Whether this CPU's u8 x s8 integer kernels can saturate."""
    return saturates(platform.machine(), read_cpuinfo())


def _session(model: onnx.ModelProto, fused: bool, external_folder: Path | None) -> ort.InferenceSession:
    options = session_options(external_folder)
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _layer_boundaries(model: ir.Model, plan: QuantPlan) -> dict[ir.Node, tuple[str, str]]:
    """For each candidate layer of the QDQ ``model``: (its quantized input, its quantized output,
    or its float output where it writes float: ``OpInfo.float_output``)."""
    boundaries = {}
    for node, decision in plan.decisions.items():
        if node.op_type not in ("Conv", "Gemm", "MatMul") or decision.weight_slot is None:
            continue
        dequantize = node.inputs[0].producer()
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        if dequantize.inputs[0].dtype != ir.DataType.UINT8:
            continue  # int8 activations go through other kernels
        output = node.outputs[0]
        uses = output.uses()
        if len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip"):
            output = uses[0].node.outputs[0]
        quantize = [u.node for u in output.uses() if u.node.op_type == "QuantizeLinear"]
        if quantize:
            boundaries[node] = (dequantize.inputs[0].name, quantize[0].outputs[0].name)
        elif output is node.outputs[0] and rule_for(node).float_output:
            boundaries[node] = (dequantize.inputs[0].name, output.name)
    return boundaries


def saturation_hurts(fused: list[np.ndarray], exact: list[np.ndarray]) -> bool:
    """Rule 3: whether a layer's outputs from the fused kernel (``fused``, one array per measured
    batch) differ from the exact ones (``exact``) by more power than rounding noise: in steps of
    its quantized output, or for a float output in the steps a uint8 output over its range would have."""
    errors = np.concatenate([(f.astype(np.float64) - e.astype(np.float64)).ravel()
                             for f, e in zip(fused, exact, strict=True)])
    if exact and np.issubdtype(exact[0].dtype, np.floating):
        values = np.concatenate([e.ravel() for e in exact])
        errors = errors / max(float(np.ptp(values)) / 255, np.finfo(np.float32).tiny)
    return float(np.mean(errors ** 2)) > ROUNDING_NOISE


def saturating_layers(
    qdq_model: ir.Model, plan: QuantPlan, feeds: list[dict[str, np.ndarray]], external_folder: Path | None = None
) -> set[ir.Node]:
    """The layers of ``plan`` (rewritten to QDQ as ``qdq_model``) that lose accuracy to
    saturation on this CPU, measured on the batches ``feeds`` (rule 2); ``external_folder``
    holds the external data files the model's tensors reference, if any."""
    if not cpu_saturates():
        return set()
    boundaries = _layer_boundaries(qdq_model, plan)
    hurt = {node for node in boundaries if node.graph is not qdq_model.graph}  # in bodies: assumed
    boundaries = {node: pair for node, pair in boundaries.items() if node not in hurt}
    if not boundaries:
        return hurt
    proto = ir.to_proto(qdq_model)
    sources = sorted({source for source, _ in boundaries.values()})
    whole = _session(with_outputs(proto, sources), False, external_folder)
    measured = [dict(zip(sources, whole.run(sources, feed))) for feed in feeds]  # the layers' quantized inputs
    extractor = onnx.utils.Extractor(proto)
    for node, (source, target) in boundaries.items():
        layer = extractor.extract_model([source], [target])
        fused, exact = (_session(layer, kind, external_folder) for kind in (True, False))
        runs = [{source: values[source]} for values in measured]
        if saturation_hurts([fused.run(None, run)[0] for run in runs], [exact.run(None, run)[0] for run in runs]):
            hurt.add(node)
    return hurt
