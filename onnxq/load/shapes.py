"""Declared shapes checked against shape inference, before anything relies on them.

Rules:
0. A dimension declared as ``-1`` is a dynamic dimension (ONNX Runtime runs it as one): it is
   read as an unnamed dynamic dimension, in bodies too, and reported.
1. Shapes and types are inferred afresh from the graph inputs and initializers, ignoring every
   declared ``value_info`` and graph output type.
2. A declared annotation contradicts the inferred one when both know the element type and it
   differs, both know the rank and it differs, or both fix a dimension to different sizes.
   Symbolic dims (``N`` vs ``batch``) never contradict.
3. A contradicting ``value_info`` entry is dropped; a contradicting graph output takes the
   inferred type. Each correction is reported. Annotations that inference cannot check (outputs
   of custom-domain ops) are kept as declared.
"""

from __future__ import annotations

import onnx
import onnx.shape_inference

from onnxq.graph import proto_graphs


def read_minus_one_as_dynamic(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rule 0: ``proto`` with its ``-1`` dimensions made unnamed dynamic ones, and a note naming
    the tensors that declared them; ``proto`` itself when none does."""
    def declared(model: onnx.ModelProto) -> list[tuple[onnx.ValueInfoProto, onnx.TensorShapeProto.Dimension]]:
        return [
            (value, dim)
            for graph in proto_graphs(model.graph)
            for value in [*graph.input, *graph.output, *graph.value_info]
            if value.type.HasField("tensor_type")
            for dim in value.type.tensor_type.shape.dim
            if dim.HasField("dim_value") and dim.dim_value == -1
        ]

    if not declared(proto):
        return proto, []
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(proto)
    found = declared(dynamic)
    for _, dim in found:
        dim.Clear()
    names = ", ".join(dict.fromkeys(repr(value.name) for value, _ in found))
    return dynamic, [f"dimension -1 read as a dynamic dimension in {names}"]


def _contradicts(declared: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    if not (declared.HasField("tensor_type") and inferred.HasField("tensor_type")):
        return False
    a, b = declared.tensor_type, inferred.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
        for x, y in zip(a.shape.dim, b.shape.dim)
    )


def _text(type_proto: onnx.TypeProto) -> str:
    tensor = type_proto.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    if not tensor.HasField("shape"):
        return dtype
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{dtype}[{', '.join(dims)}]"


def correct_declared_shapes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` with the declared shapes that contradict inference corrected (see the module
    rules), and a note per correction; ``proto`` itself when nothing contradicts."""
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    for output in bare.graph.output:
        output.type.Clear()
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False, data_prop=True).graph
    except Exception:  # nothing to check against
        return proto, []
    known = {info.name: info.type for info in [*inferred.value_info, *inferred.output]}
    wrong_infos = [i for i in proto.graph.value_info if i.name in known and _contradicts(i.type, known[i.name])]
    wrong_outputs = [o for o in proto.graph.output if o.name in known and _contradicts(o.type, known[o.name])]
    if not wrong_infos and not wrong_outputs:
        return proto, []
    notes = [
        f"output {output.name!r} is declared {_text(output.type)} but computes {_text(known[output.name])}: "
        "the quantized model declares the computed type"
        for output in wrong_outputs
    ]
    if wrong_infos:
        names = ", ".join(repr(info.name) for info in wrong_infos[:5])
        more = f" and {len(wrong_infos) - 5} more" if len(wrong_infos) > 5 else ""
        notes.append(f"dropped {len(wrong_infos)} shape annotation(s) that contradict the graph: {names}{more}")
    corrected = onnx.ModelProto()
    corrected.CopyFrom(proto)
    dropped = {info.name for info in wrong_infos}
    kept = [info for info in corrected.graph.value_info if info.name not in dropped]
    del corrected.graph.value_info[:]
    corrected.graph.value_info.extend(kept)
    wrong = {output.name for output in wrong_outputs}
    for output in corrected.graph.output:
        if output.name in wrong:
            output.type.CopyFrom(known[output.name])
    return corrected, notes
