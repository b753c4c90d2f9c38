"""Graph passes over exported ONNX files that change their speed, not their numbers.

`fuse_bias_gemm`: the TorchScript exporter writes a linear layer on a (T, N, C) input as a
MatMul and a separate bias Add, and onnxruntime fuses the two into one Gemm only for 2-D
inputs. The pass flattens the input to (T*N, C), runs one Gemm with the bias and restores the
leading axes: one pass less over every linear layer's output (about 2 % of a released-size
decoder call on this machine, docs/benchmarks.md). onnxruntime's dynamic int8 quantiser turns
each Gemm back into MatMul + Add before quantising, so the int8 copies are unchanged.

Every node a fusion adds is named `zv_bias_gemm/<i>/<role>`, so a reader of the graph can
tell them from the exporter's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_PREFIX = "zv_bias_gemm/"
_ZERO, _MINUS_ONE = _PREFIX + "zero", _PREFIX + "minus_one"  # Slice bounds, one copy per graph


def _fused_nodes(prefix: str, x: str, weight: str, bias: str, out: str) -> list[onnx.NodeProto]:
    """Flatten(x) -> Gemm(., weight, bias) -> Reshape(., shape(x)[:-1] + [width]), with the
    graph's shared `_ZERO` and `_MINUS_ONE` and this fusion's `<prefix>width` constants."""
    return [
        helper.make_node("Shape", [x], [prefix + "shape"], name=prefix + "shape"),
        helper.make_node(
            "Slice", [prefix + "shape", _ZERO, _MINUS_ONE], [prefix + "lead"], name=prefix + "lead"
        ),
        helper.make_node(
            "Concat",
            [prefix + "lead", prefix + "width"],
            [prefix + "out_shape"],
            axis=0,
            name=prefix + "out_shape",
        ),
        helper.make_node("Flatten", [x], [prefix + "rows"], axis=-1, name=prefix + "rows"),
        helper.make_node(
            "Gemm", [prefix + "rows", weight, bias], [prefix + "product"], name=prefix + "gemm"
        ),
        helper.make_node(
            "Reshape", [prefix + "product", prefix + "out_shape"], [out], name=prefix + "restore"
        ),
    ]


def _bias_of(
    add: onnx.NodeProto, product: str, constants: dict[str, onnx.TensorProto]
) -> str | None:
    """The Add's other input when it is a 1-D constant, else None."""
    if add.op_type != "Add" or len(add.input) != 2 or product not in add.input:
        return None
    other = add.input[1] if add.input[0] == product else add.input[0]
    tensor = constants.get(other)
    return other if tensor is not None and len(tensor.dims) == 1 else None


def fuse_bias_gemm(model: onnx.ModelProto) -> int:
    """Rewrite MatMul(x, W) + b (W a 2-D constant, b a 1-D constant, x not known to be 2-D,
    which onnxruntime fuses itself, and the product used only by the Add) as one Gemm on
    flattened rows; returns how many. Correct at any rank of x: Flatten keeps the last axis."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    users: dict[str, list[int]] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            users.setdefault(name, []).append(position)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in graph.input})
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    outputs = {o.name for o in graph.output}
    for position, node in enumerate(graph.node):
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or ranks.get(node.input[0], 3) < 3:
            continue
        following = users.get(node.output[0], [])
        if len(following) != 1 or node.output[0] in outputs:
            continue
        add = graph.node[following[0]]
        bias = _bias_of(add, node.output[0], constants)
        if bias is None or constants[bias].dims[0] != weight.dims[1]:
            continue
        prefix = f"{_PREFIX}{len(replaced)}/"
        width = numpy_helper.from_array(np.array([weight.dims[1]], np.int64), prefix + "width")
        graph.initializer.append(width)
        replaced[position] = _fused_nodes(prefix, node.input[0], node.input[1], bias, add.output[0])
        dropped.add(following[0])
    if replaced:
        graph.initializer.extend(
            numpy_helper.from_array(np.array([value], np.int64), name)
            for name, value in ((_ZERO, 0), (_MINUS_ONE, -1))
        )
    _rebuild(graph, replaced, dropped)
    return len(replaced)


def _rebuild(
    graph: onnx.GraphProto, replaced: dict[int, list[onnx.NodeProto]], dropped: set[int]
) -> None:
    """The graph's nodes in their order, each replaced position by its list, dropped ones left
    out (a replacement's inputs are all computed before the node it replaces, so order holds)."""
    nodes = []
    for position, node in enumerate(graph.node):
        if position in replaced:
            nodes.extend(replaced[position])
        elif position not in dropped:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # detached: the repeated field is cleared below
            nodes.append(kept)
    del graph.node[:]
    graph.node.extend(nodes)
