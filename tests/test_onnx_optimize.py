"""The bias-Gemm graph pass: the same numbers in fewer passes, and int8 copies unchanged."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from zipvoice.onnx.export import quantize_int8
from zipvoice.onnx.optimize import fuse_bias_gemm


class _Layers(nn.Module):
    """Linear layers on a (T, N, C) input, one without a bias, and a 2-D one at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.no_bias = nn.Linear(16, 16, bias=False)
        self.last = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.no_bias(self.first(x)))
        return self.last(hidden), self.last(hidden.mean(dim=0))


def _export(tmp_path: Path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path / "layers.onnx"
    torch.onnx.export(
        _Layers().eval(),
        (torch.randn(5, 2, 8),),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["x"],
        output_names=["y", "pooled"],
        dynamic_axes={"x": {0: "T", 1: "N"}},
    )
    return onnx.load(str(path))


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_fusion_keeps_the_numbers_at_any_shape(tmp_path):
    plain = _export(tmp_path)
    fused = onnx.ModelProto()
    fused.CopyFrom(plain)
    # first and last on 3-D inputs have biases; no_bias has none; the 2-D use of last is
    # already a Gemm from the exporter.
    assert fuse_bias_gemm(fused) == 2
    onnx.checker.check_model(fused)
    assert (_ops(plain)["Gemm"], _ops(fused)["Gemm"]) == (1, 3)
    assert (_ops(plain)["Add"], _ops(fused)["Add"]) == (2, 0)
    for seed, shape in enumerate(((5, 2, 8), (1, 1, 8), (17, 3, 8))):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for got, expected in zip(_run(fused, x), _run(plain, x), strict=True):
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_int8_of_a_fused_graph_quantizes_every_linear_layer(tmp_path):
    plain = _export(tmp_path)
    fused = onnx.ModelProto()
    fused.CopyFrom(plain)
    fuse_bias_gemm(fused)
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    int8_fused = onnx.load(str(quantize_int8(tmp_path / "fused.onnx", tmp_path / "f8.onnx")))
    int8_plain = onnx.load(str(quantize_int8(tmp_path / "plain.onnx", tmp_path / "p8.onnx")))
    linear_layers = _ops(plain)["MatMul"] + _ops(plain)["Gemm"]
    assert _ops(int8_fused)["MatMulInteger"] == _ops(int8_plain)["MatMulInteger"] == linear_layers
    assert _ops(int8_fused)["Gemm"] == 0
    x = np.random.default_rng(0).standard_normal((6, 2, 8)).astype(np.float32)
    for got, expected in zip(_run(int8_fused, x), _run(int8_plain, x), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
