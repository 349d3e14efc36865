"""The op registry: everything onnxq knows about an op type, in one table (``OPS``) that every
stage reads.

Per standard-domain op type (``OpInfo``):
1. ``kind``, how onnxq's own plan quantizes it (``None``: it stays float):
   - ``compute``: DequantizeLinear on its activation inputs, QuantizeLinear on its output with
     the output's own range; a constant ``weight_input`` gets int8 weights (per channel on the
     axis ``weight_axis`` gives) and a constant ``bias_input`` an int32 bias with scale ``s_x * s_w``;
   - ``shared``: data movement, quantized only when its input already is; the output reuses the
     input's scale and zero point, so the op runs on integers;
   - ``concat``: inputs and output share one scale;
   - ``activation``: Relu/Clip right after a quantized compute op are absorbed (the Q goes after
     them, with their clipped range).
2. ``qlinear``: its QLinear operator (domain, op type), which ONNX Runtime's CPU provider fuses
   QDQ groups into and ``--format qoperator`` writes. LeakyRelu and Softmax have one but no
   quantization rule: their QDQ groups come only from models quantized by other tools.
3. ``compute``: it computes new values; a quantized one that still reads a DequantizeLinear
   after ONNX Runtime's optimizations runs unfused (``onnxq.tune.fusion``).
4. ``data_movement``: it only moves values, so in QOperator form it runs on the integer tensor
   when its input and output share a scale.
5. ``fp16_safe``: whether it may compute in float16 in an fp16 island; reductions,
   exponentials and normalizations overflow float16 long before their inputs do.
6. ``normalization``: a normalization op (``pattern:normalization`` keeps it float).
7. ``reduction``: it reduces a tensor to statistics (a mean, sum, norm, max); what a graph
   computes from a reduction and its input again is found by dataflow (``onnxq.analysis.rules``).
8. ``float_output``: a quantized node of this op may leave its output float, in QDQ form, and
   still compute from its int8 inputs: ONNX Runtime's CPU provider fuses DequantizeLinear ->
   MatMul with no QuantizeLinear after it into MatMulIntegerToFloat (checked by
   ``onnxq.tune.fusion`` like every fusion). Used where the output may not be quantized.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

RuleKind = Literal["compute", "shared", "concat", "activation"]
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What onnxq knows about one op type (see the module docstring)."""

    kind: RuleKind | None = None  # the quantization rule; None: onnxq's plan leaves it float
    activation_inputs: tuple[int, ...] | None = (0,)  # None: every input
    weight_input: int | None = None
    bias_input: int | None = None
    qlinear: tuple[str, str] | None = None
    compute: bool = False
    data_movement: bool = False
    fp16_safe: bool = True
    normalization: bool = False
    reduction: bool = False
    float_output: bool = False


def _weighted(qlinear: tuple[str, str] | None, bias: bool = True, float_output: bool = False) -> OpInfo:
    return OpInfo("compute", (0,), 1, 2 if bias else None, qlinear, compute=True, float_output=float_output)


def _compute(qlinear_op: str, activation_inputs: tuple[int, ...] | None = (0,)) -> OpInfo:
    return OpInfo("compute", activation_inputs, qlinear=(MS_DOMAIN, qlinear_op), compute=True)


_SHARED = OpInfo("shared", data_movement=True)
_FP32 = OpInfo(fp16_safe=False)
_NORMALIZATION = OpInfo(fp16_safe=False, normalization=True)
_REDUCTION = OpInfo(fp16_safe=False, reduction=True)

OPS: dict[str, OpInfo] = {
    "Conv": _weighted(("", "QLinearConv")),
    "ConvTranspose": _weighted(None),
    "Gemm": _weighted((MS_DOMAIN, "QGemm")),
    "MatMul": _weighted(("", "QLinearMatMul"), bias=False, float_output=True),
    "Add": _compute("QLinearAdd", (0, 1)),
    "Mul": _compute("QLinearMul", (0, 1)),
    "AveragePool": _compute("QLinearAveragePool"),
    "GlobalAveragePool": _compute("QLinearGlobalAveragePool"),
    "Sigmoid": _compute("QLinearSigmoid"),
    "Concat": OpInfo("concat", None, qlinear=(MS_DOMAIN, "QLinearConcat"), compute=True),
    "LeakyRelu": OpInfo(qlinear=(MS_DOMAIN, "QLinearLeakyRelu"), compute=True),
    "Softmax": OpInfo(qlinear=(MS_DOMAIN, "QLinearSoftmax"), compute=True, fp16_safe=False),
    "Relu": OpInfo("activation"),
    "Clip": OpInfo("activation"),
    **{op: _SHARED for op in ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize",
                              "Split", "Slice", "Gather", "Pad")},
    "Identity": OpInfo(data_movement=True),
    **{op: _REDUCTION for op in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
                                 "ReduceLogSumExp", "ReduceMax", "ReduceMin")},
    **{op: _FP32 for op in ("Pow", "Sqrt", "Reciprocal", "Exp", "Log", "LogSoftmax", "CumSum")},
    **{op: _NORMALIZATION for op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization",
                                     "BatchNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                                     "SkipLayerNormalization")},
}

QLINEAR_OPS = {info.qlinear[1]: op for op, info in OPS.items() if info.qlinear}  # QLinear op -> float op
FUSION_CHECKED = frozenset(op for op, info in OPS.items() if info.compute)
WEIGHTED = tuple(op for op, info in OPS.items() if info.weight_input is not None)
FP32_ONLY = frozenset(op for op, info in OPS.items() if not info.fp16_safe)
NORMALIZATION_OPS = frozenset(op for op, info in OPS.items() if info.normalization)
REDUCTIONS = frozenset(op for op, info in OPS.items() if info.reduction)


def rule_for(node: ir.Node) -> OpInfo | None:
    """The quantization rule of a node of the standard domain, or ``None`` when it stays float."""
    if node.domain not in ("", "ai.onnx"):
        return None
    info = OPS.get(node.op_type)
    return info if info is not None and info.kind is not None else None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def weight_axis(node: ir.Node, weight_rank: int) -> int | None:
    """The output-channel axis of a node's weight, or ``None`` where only per-tensor is sound.

    Conv: 0. ConvTranspose: 1 (per tensor when grouped, since axis 1 then spans one group).
    Gemm: 0 with transB, else 1. MatMul with a constant B of rank >= 2: its last axis.
    """
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if _int_attr(node, "group", 1) == 1 else None
    if op == "Gemm":
        return 0 if _int_attr(node, "transB", 0) else 1
    if op == "MatMul" and weight_rank >= 2:
        return weight_rank - 1
    return None


def reduction_axis(op_type: str, weight_rank: int, trans_b: bool = False) -> int | None:
    """The axis of a weight that ``op_type`` sums its products over (where 2:4 sparse kernels
    want two zeros in every four), or ``None`` for an op without one.

    Conv: 1 (input channels). ConvTranspose: 0 (input channels). Gemm: 1 with transB, else 0.
    MatMul with B of rank >= 2: rank - 2 (K).
    """
    if op_type == "Conv":
        return 1
    if op_type == "ConvTranspose":
        return 0
    if op_type == "Gemm":
        return 1 if trans_b else 0
    if op_type == "MatMul" and weight_rank >= 2:
        return weight_rank - 2
    return None


def output_channels(node: ir.Node, weight_shape: tuple[int, ...]) -> int:
    """How many output channels a node with a weight of ``weight_shape`` has (its bias length)."""
    op = node.op_type
    if op == "ConvTranspose":
        return weight_shape[1] * _int_attr(node, "group", 1)
    if op == "Gemm":
        return weight_shape[0] if _int_attr(node, "transB", 0) else weight_shape[1]
    return weight_shape[0] if op == "Conv" else weight_shape[-1]


def bias_is_foldable(node: ir.Node) -> bool:
    """Whether the bias slot can be an int32 bias of scale ``s_x * s_w`` (Gemm needs alpha = beta = 1)."""
    if node.op_type == "Gemm":
        return _float_attr(node, "alpha", 1.0) == 1.0 and _float_attr(node, "beta", 1.0) == 1.0
    return True
