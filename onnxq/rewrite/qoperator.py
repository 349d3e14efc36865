"""Operator form: QDQ node groups become QLinear operators running on the integer tensors.

Rules, applied to a model in QDQ form (onnxq's own, or one quantized by another tool):
1. Quantize nodes of constants are folded: the constant is stored quantized (PyTorch exports
   weights as float -> QuantizeLinear -> DequantizeLinear, and zero points behind Identity).
2. A compute op whose inputs all come from DequantizeLinear and whose single output goes only to
   a QuantizeLinear becomes its QLinear operator (``onnxq.ops``: ``qlinear``), reading the quantized inputs
   and writing the quantized output. A Relu or Clip between the op and the QuantizeLinear is
   dropped when the output's quantized range already clips exactly as it does.
3. A Conv or Gemm bias becomes int32 with scale ``s_x * s_w``: a float bias is quantized, an
   int32 bias with another scale is requantized. The weights are already quantized, so their
   scale is not widened: a bias that would overflow int32 stays float (with a note), and its
   group stays in QDQ form.
4. A data-movement op between a DequantizeLinear and QuantizeLinear with the same scale and zero
   point runs on the integer tensor directly (Pad pads with the zero point).
5. What matches no rule stays as it is (float islands keep their DequantizeLinear and
   QuantizeLinear), and Dequantize/Quantize nodes left without consumers are removed. A model
   already in operator form has nothing to match: converting twice changes nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.analysis.subgraphs import CONTROL_FLOW
from onnxq.graph import all_nodes, bodies, constant_array
from onnxq.ops import MS_DOMAIN, OPS, QLINEAR_OPS
from onnxq.passes import GraphPass, PassResult
from onnxq.rewrite.qdq import Emitter
from onnxq.rewrite.quant_math import (
    QRANGE,
    QuantParams,
    dequantize,
    quantize,
    quantize_bias,
)


@dataclasses.dataclass(frozen=True)
class _Quantized:
    """A tensor in integer form with its params: the input of a DequantizeLinear."""

    value: ir.Value  # the integer tensor
    scale: ir.Value
    zero_point: ir.Value | None
    params: QuantParams


def _params(node: ir.Node) -> QuantParams | None:
    """Constant params of a QuantizeLinear / DequantizeLinear node."""
    scale = constant_array(node.inputs[1])
    zero_point = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None and zero_point is None):
        return None
    if zero_point is None:
        zero_point = np.zeros(scale.shape, np.uint8)
    if scale.size == 1:  # [1]-shaped params are per tensor (PyTorch writes them so)
        return QuantParams(scale.reshape(()).astype(np.float32), zero_point.reshape(()))
    axis = node.attributes.get("axis")
    return QuantParams(scale.astype(np.float32), zero_point, axis.as_int() if axis is not None else 1)


def _dequantized(value: ir.Value | None) -> _Quantized | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    params = _params(producer)
    if params is None:
        return None
    zero_point = producer.inputs[2] if len(producer.inputs) > 2 else None
    return _Quantized(producer.inputs[0], producer.inputs[1], zero_point, params)


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _quantize_sink(value: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """The QuantizeLinear that alone consumes ``value`` (through an exactly absorbable Relu/Clip),
    and the nodes in between."""
    consumer = _only_use(value)
    between = []
    if consumer is not None and consumer.op_type in ("Relu", "Clip"):
        between.append(consumer)
        consumer = _only_use(consumer.outputs[0])
    if consumer is None or consumer.op_type != "QuantizeLinear":
        return None
    params = _params(consumer)
    if params is None or params.scale.ndim:
        return None
    for node in between:
        if not _absorbed_exactly(node, params):
            return None
    return consumer, between


def _absorbed_exactly(node: ir.Node, params: QuantParams) -> bool:
    """Whether quantizing to ``params`` clips exactly as the Relu/Clip ``node`` does: its lower
    bound quantizes to the lowest integer and its upper bound to the highest."""
    qmin, qmax = QRANGE[params.dtype]
    zero_point, scale = int(params.zero_point), float(params.scale)
    if node.op_type == "Relu":
        return zero_point == qmin
    lower, upper = (constant_array(v) for v in (list(node.inputs[1:3]) + [None, None])[:2])
    lower = -np.inf if lower is None else float(lower)
    upper = np.inf if upper is None else float(upper)
    return np.rint(lower / scale) + zero_point <= qmin and np.rint(upper / scale) + zero_point >= qmax


class _Rewriter:
    """Applies the rules to one graph of ``model`` (its main graph, or an If/Loop/Scan body);
    ``names`` are the names taken across the model, shared by the rewriters of its graphs."""

    def __init__(self, model: ir.Model, graph: ir.Graph | None = None, names: set[str] | None = None) -> None:
        self.model = model
        self.graph = model.graph if graph is None else graph
        self.emitter = Emitter(self.graph, names)
        self.unique = self.emitter.unique
        self.initializer = self.emitter.initializer
        self.notes: list[str] = []

    def fold_constant_identities(self) -> None:
        """Identity nodes of constants (PyTorch exports shared zero points so) become the constant."""
        for node in list(self.graph):
            if node.op_type == "Identity" and constant_array(node.inputs[0]) is not None and not node.outputs[0].is_graph_output():
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                self._remove([node])

    def fold_constant_quantize(self) -> None:
        for node in list(self.graph):
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            array, params = constant_array(node.inputs[0]), _params(node)
            if array is None or params is None:
                continue
            stored = self.initializer(f"{node.inputs[0].name}_quantized", quantize(array, params))
            self._replace(node.outputs[0], stored)
            self._remove([node])

    def quantize_float_biases(self) -> None:
        """Conv/Gemm with quantized input and weight but a float bias get an int32 bias."""
        for node in list(self.graph):
            if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            x, w, bias = _dequantized(node.inputs[0]), _dequantized(node.inputs[1]), constant_array(node.inputs[2])
            if x is None or w is None or bias is None or bias.ndim != 1 or x.params.scale.ndim:
                continue
            fitted = quantize_bias(bias, x.params.scale, w.params.scale)
            if fitted.widened_channels:
                self.notes.append(f"{node.op_type} {node.name!r}: float bias kept, it would overflow int32 "
                                  "with the given input and weight scales")
                continue
            old = node.inputs[2]
            values = self.initializer(f"{old.name}_quantized", fitted.values)
            scale = self.initializer(f"{old.name}_scale", fitted.scale)
            zero_point = self.initializer(f"{old.name}_zero_point", np.zeros(fitted.scale.shape, np.int32))
            output = ir.Value(name=self.unique(f"{old.name}_dequantized"), type=old.type, shape=old.shape)
            attributes = {"axis": 0} if fitted.scale.ndim else {}
            dequantize_node = ir.node("DequantizeLinear", [values, scale, zero_point], attributes, outputs=[output],
                                      name=self.unique(f"{old.name}_dequantize"))
            self.graph.insert_before(node, dequantize_node)
            node.replace_input_with(2, output)
            self._drop_if_unused(old)
            self.notes.append(f"{node.op_type} {node.name!r}: float bias quantized to int32 (scale s_x * s_w)")

    def _replace(self, old: ir.Value, new: ir.Value) -> None:
        """Every use (and graph output) of ``old`` now reads ``new``, which takes ``old``'s name."""
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if new.const_value is None:
            name = old.name
            old.name = self.unique(f"{name}_replaced")
            new.name = name

    def _remove(self, nodes: list[ir.Node]) -> None:
        for node in nodes:
            if node.graph is not self.graph:
                continue  # already removed through another input
            inputs = list(dict.fromkeys(v for v in node.inputs if v is not None))
            self.graph.remove(node, safe=True)
            for value in inputs:
                self._drop_if_unused(value)

    def _drop_if_unused(self, value: ir.Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        producer = value.producer()
        if producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
            if all(not out.uses() and not out.is_graph_output() for out in producer.outputs):
                self._remove([producer])
        elif producer is None and value.name in self.graph.initializers and not value.is_graph_input():
            self.graph.initializers.pop(value.name)

    def _emit(self, template: ir.Node, domain: str, op_type: str, inputs: list[ir.Value | None],
              attributes: dict, quantize_node: ir.Node, between: list[ir.Node]) -> None:
        output = ir.Value(name=self.unique(f"{quantize_node.outputs[0].name}_qlinear"),
                          type=quantize_node.outputs[0].type, shape=quantize_node.outputs[0].shape)
        node = ir.node(op_type, inputs, attributes, domain=domain, outputs=[output],
                       name=self.unique(f"{template.name or op_type}_quant"))
        self.graph.insert_before(template, node)
        self._replace(quantize_node.outputs[0], output)
        self._remove([quantize_node, *reversed(between), template])

    def _bias(self, node: ir.Node, x: _Quantized, w: _Quantized) -> ir.Value | None | bool:
        """The int32 bias for ``node``: a value, ``None`` when it has none, ``False`` when it
        cannot be made (the group then stays in QDQ form)."""
        slot = 2
        if len(node.inputs) <= slot or node.inputs[slot] is None:
            return None
        bias_value = node.inputs[slot]
        source = _dequantized(bias_value)
        if source is not None and constant_array(source.value) is not None:
            bias = dequantize(constant_array(source.value), source.params)
        else:
            bias = constant_array(bias_value)
        if bias is None or bias.ndim != 1 or constant_array(w.value) is None:
            return False
        w_scale = w.params.scale
        if source is not None and source.params.dtype == np.int32:
            expected = (np.float32(x.params.scale) * w_scale).astype(np.float32)
            if np.allclose(source.params.scale, expected, rtol=1e-6, atol=0):
                return source.value
        fitted = quantize_bias(bias, x.params.scale, w_scale)
        if fitted.widened_channels:
            return False  # the weights are already quantized: their scale is not ours to widen
        return self.initializer(f"{bias_value.name}_int32", fitted.values)

    def _conv_like(self, node: ir.Node, domain: str, op_type: str) -> bool:
        x, w = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
        sink = _quantize_sink(node.outputs[0])
        if x is None or w is None or sink is None or x.params.scale.ndim:
            return False
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attributes.values()}
            if "beta" in attrs and attrs["beta"].as_float() != 1.0:
                return False
        bias = self._bias(node, x, w)
        if bias is False:
            return False
        quantize_node, between = sink
        y_scale, y_zero_point = quantize_node.inputs[1], quantize_node.inputs[2]
        attributes = {a.name: a for a in node.attributes.values()}
        if node.op_type == "Conv":
            inputs = [x.value, x.scale, x.zero_point, w.value, w.scale, w.zero_point, y_scale, y_zero_point, bias]
        elif node.op_type == "MatMul":
            inputs = [x.value, x.scale, x.zero_point, w.value, w.scale, w.zero_point, y_scale, y_zero_point]
        else:  # Gemm -> QGemm: C is the int32 bias
            attributes.pop("beta", None)
            inputs = [x.value, x.scale, x.zero_point, w.value, w.scale, w.zero_point, bias, y_scale, y_zero_point]
        if any(v is None for v in inputs[:6]) or y_zero_point is None:
            return False
        self._emit(node, domain, op_type, inputs, attributes, quantize_node, between)
        return True

    def _elementwise(self, node: ir.Node, domain: str, op_type: str) -> bool:
        sources = [_dequantized(v) for v in node.inputs]
        sink = _quantize_sink(node.outputs[0]) if len(node.outputs) == 1 else None
        if sink is None or any(s is None or s.params.scale.ndim or s.zero_point is None for s in sources):
            return False
        quantize_node, between = sink
        y_scale, y_zero_point = quantize_node.inputs[1], quantize_node.inputs[2]
        attributes = {a.name: a for a in node.attributes.values()}
        if node.op_type == "Concat":
            inputs = [y_scale, y_zero_point]
            for s in sources:
                inputs += [s.value, s.scale, s.zero_point]
        else:
            inputs = []
            for s in sources:
                inputs += [s.value, s.scale, s.zero_point]
            inputs += [y_scale, y_zero_point]
        if node.op_type == "Softmax":
            opset = self.graph.opset_imports.get("", self.model.opset_imports.get("", 13))
            attributes["opset"] = ir.AttrInt64("opset", opset)
        if y_zero_point is None:
            return False
        self._emit(node, domain, op_type, inputs, attributes, quantize_node, between)
        return True

    def _data_movement(self, node: ir.Node) -> bool:
        source = _dequantized(node.inputs[0])
        if source is None:
            return False
        sinks = []
        for output in node.outputs:
            if not output.uses() and not output.is_graph_output():
                return False  # e.g. MaxPool's indices: keep such nodes as they are
            consumer = _only_use(output)
            if consumer is None or consumer.op_type != "QuantizeLinear":
                return False
            params = _params(consumer)
            if params is None or not _same(params, source.params):
                return False
            sinks.append(consumer)
        extra = list(node.inputs[1:])
        if node.op_type == "Pad":  # pad with the integer that means 0.0
            mode = node.attributes.get("mode")
            if mode is not None and mode.as_string() != "constant" or source.zero_point is None:
                return False
            extra += [None] * (2 - len(extra))
            if extra[1] is not None and (constant_array(extra[1]) is None or float(constant_array(extra[1])) != 0.0):
                return False
            extra[1] = source.zero_point
        outputs = [ir.Value(name=self.unique(f"{q.outputs[0].name}_int"), type=q.outputs[0].type,
                            shape=q.outputs[0].shape) for q in sinks]
        attributes = {a.name: a for a in node.attributes.values()}
        moved = ir.node(node.op_type, [source.value, *extra], attributes, domain=node.domain, outputs=outputs,
                        name=self.unique(f"{node.name or node.op_type}_int"))
        self.graph.insert_before(node, moved)
        for quantize_node, output in zip(sinks, outputs):
            self._replace(quantize_node.outputs[0], output)
        self._remove([*sinks, node])
        return True

    def run(self) -> int:
        rewritten = 0
        changed = True
        while changed:
            changed = False
            for node in list(self.graph):
                if node.graph is None or node.domain not in ("", "ai.onnx"):
                    continue
                target = OPS[node.op_type].qlinear if node.op_type in OPS else None
                if node.op_type in ("Conv", "MatMul", "Gemm"):
                    done = self._conv_like(node, *target)
                elif target is not None:
                    done = self._elementwise(node, *target)
                elif node.op_type in OPS and OPS[node.op_type].data_movement:
                    done = self._data_movement(node)
                else:
                    continue
                rewritten += done
                changed |= done
        return rewritten


def _same(a: QuantParams, b: QuantParams) -> bool:
    return (a.scale.shape == b.scale.shape and np.array_equal(a.scale, b.scale)
            and a.dtype == b.dtype and np.array_equal(a.zero_point, b.zero_point))


def has_quantize_nodes(model: ir.Model) -> bool:
    """Whether the model is already quantized (holds Quantize/Dequantize or QLinear nodes)."""
    quantized_ops = {"QuantizeLinear", "DequantizeLinear"} | set(QLINEAR_OPS)
    return any(node.op_type in quantized_ops for node in all_nodes(model.graph))


def _rewriters(model: ir.Model) -> list[_Rewriter]:
    """A rewriter for the main graph and one for each If/Loop/Scan body, sharing one set of names."""
    main = _Rewriter(model)
    graphs = [body for node in all_nodes(model.graph) if node.op_type in CONTROL_FLOW for _, body in bodies(node)]
    return [main] + [_Rewriter(model, graph, main.emitter.names()) for graph in graphs]


class NormalizeQdqPass(GraphPass):
    """Complete a QDQ model (rules 1 and 3): constants stored quantized, int32 biases; in
    If/Loop/Scan bodies too."""

    def call(self, model: ir.Model) -> PassResult:
        notes = []
        for rewriter in _rewriters(model):
            rewriter.fold_constant_identities()
            rewriter.fold_constant_quantize()
            rewriter.quantize_float_biases()
            notes += rewriter.notes
        model.graph.sort()
        return PassResult(model, bool(notes), notes)


class QOperatorPass(GraphPass):
    """Rewrite a QDQ model (bodies included) to operator form: every rule above."""

    def call(self, model: ir.Model) -> PassResult:
        notes = NormalizeQdqPass()(model).notes
        count = sum(rewriter.run() for rewriter in _rewriters(model))
        if any(node.domain == MS_DOMAIN for node in all_nodes(model.graph)):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.graph.sort()
        return PassResult(model, True, notes + [f"{count} node groups rewritten to QLinear operators"])
