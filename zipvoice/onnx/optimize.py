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


def _fused_nodes(
    prefix: str, x: str, weight: str, bias: str, out: str, width: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Flatten(x) -> Gemm(., weight, bias) -> Reshape(., shape(x)[:-1] + [width])."""
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), prefix + "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), prefix + "minus_one"),
        numpy_helper.from_array(np.array([width], np.int64), prefix + "width"),
    ]
    p = prefix
    nodes = [
        helper.make_node("Shape", [x], [p + "shape"], name=p + "shape"),
        helper.make_node(
            "Slice", [p + "shape", p + "zero", p + "minus_one"], [p + "lead"], name=p + "lead"
        ),
        helper.make_node(
            "Concat", [p + "lead", p + "width"], [p + "out_shape"], axis=0, name=p + "out_shape"
        ),
        helper.make_node("Flatten", [x], [p + "rows"], axis=-1, name=p + "rows"),
        helper.make_node("Gemm", [p + "rows", weight, bias], [p + "product"], name=p + "gemm"),
        helper.make_node("Reshape", [p + "product", p + "out_shape"], [out], name=p + "restore"),
    ]
    return nodes, constants


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
    """Rewrite MatMul(x, W) + b (W a 2-D constant, b a 1-D constant, x of rank 3 or more and
    the product used only by the Add) as one Gemm on flattened rows; returns how many."""
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
        nodes, new_constants = _fused_nodes(
            prefix, node.input[0], node.input[1], bias, add.output[0], weight.dims[1]
        )
        graph.initializer.extend(new_constants)
        replaced[position] = nodes
        dropped.add(following[0])
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
