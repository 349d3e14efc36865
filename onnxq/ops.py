"""The op registry: one small rule per op type saying how its QDQ form is built.

Kinds of rule:
1. ``compute``: DequantizeLinear on every activation input, QuantizeLinear on the output with
   the output's own range; a constant weight slot gets int8 weights (per channel on the output
   channel axis) and a constant bias slot an int32 bias with scale ``s_x * s_w``.
2. ``shared``: data-movement ops. Quantized only when their input already is (its producer is
   quantized); the output reuses the input's scale and zero point, so the op runs on integers.
3. ``concat``: inputs and output share one scale.
4. ``activation``: Relu/Clip right after a quantized compute op are absorbed: the Q goes after
   them, with their (non-negative / clipped) range.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

RuleKind = Literal["compute", "shared", "concat", "activation"]


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op type is quantized; ``activation_inputs=None`` means every input."""

    kind: RuleKind
    activation_inputs: tuple[int, ...] | None = (0,)
    weight_input: int | None = None
    bias_input: int | None = None


_COMPUTE_WITH_WEIGHTS = OpRule("compute", (0,), weight_input=1, bias_input=2)
_SHARED = OpRule("shared", (0,))

RULES: dict[str, OpRule] = {
    "Conv": _COMPUTE_WITH_WEIGHTS,
    "ConvTranspose": _COMPUTE_WITH_WEIGHTS,
    "Gemm": _COMPUTE_WITH_WEIGHTS,
    "MatMul": OpRule("compute", (0,), weight_input=1),
    "Add": OpRule("compute", (0, 1)),
    "Mul": OpRule("compute", (0, 1)),
    "AveragePool": OpRule("compute"),
    "GlobalAveragePool": OpRule("compute"),
    "Sigmoid": OpRule("compute"),
    "Concat": OpRule("concat", None),
    "Relu": OpRule("activation"),
    "Clip": OpRule("activation"),
    **{
        op: _SHARED
        for op in (
            "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
            "Resize", "Split", "Slice", "Gather", "Pad",
        )
    },
}


def rule_for(node: ir.Node) -> OpRule | None:
    """The rule for a node of the standard domain, or ``None`` when it stays float."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


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


def bias_is_foldable(node: ir.Node) -> bool:
    """Whether the bias slot can be an int32 bias of scale ``s_x * s_w`` (Gemm needs alpha = beta = 1)."""
    if node.op_type == "Gemm":
        return _float_attr(node, "alpha", 1.0) == 1.0 and _float_attr(node, "beta", 1.0) == 1.0
    return True
