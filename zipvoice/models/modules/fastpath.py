"""Layouts that compute the same numbers faster on the CPU.

Each function here replaces a plain expression in a module's forward on the CPU when nothing is
being exported or compiled (the plain expression stays the exported one): the inference ones
when no autograd graph is recorded, `depthwise_conv1d` in training too. tests/test_perf_parity.py
pins each against the expression it replaces.
`OneDnnLinears` is the exception: a mode the samplers enter around generation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from zipvoice.models.modules.scaling import is_exporting


def use_inference_layout(x: Tensor) -> bool:
    """True on the CPU when x records no graph and no export or compile traces the call."""
    return (
        x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not is_exporting()
    )


def gated_depthwise_conv(
    conv: nn.Conv1d, x: Tensor, gate: Tensor, padding_mask: Tensor | None
) -> Tensor:
    """conv((x * gate) as (B, C, T), padding frames zeroed) for x, gate of shape (T, B, C).

    oneDNN's depthwise convolution is about 8x faster with channels innermost, (B, T, C) in
    memory, than on the (B, C, T) layout that Conv1d is given (measured on this machine: 4.3 ms
    against 34 ms at 2 x 512 x 1219, kernel 31), with bit-identical results. The product is
    written straight into that layout, so it costs no extra copy. Returns (B, C, T) with
    channels-last strides."""
    num_frames, batch, channels = x.shape
    product = torch.empty(batch, num_frames, channels, dtype=x.dtype, device=x.device)
    torch.mul(x, gate, out=product.transpose(0, 1))
    if padding_mask is not None:
        product.masked_fill_(padding_mask.unsqueeze(-1), 0.0)
    return _channels_last_conv(
        product.transpose(1, 2),  # (B, C, T) view of (B, T, C) memory: no copy
        conv.weight,
        conv.bias,
        conv.padding[0],
        stride=conv.stride[0],
        dilation=conv.dilation[0],
    )


def use_channels_last_conv(conv: nn.Conv1d, x: Tensor) -> bool:
    """Whether `depthwise_conv1d` can stand in for conv(x): a CPU float32 depthwise
    convolution with stride 1, no dilation and "same" padding of an odd kernel, outside
    autocast (its backward runs without it), export and compilation."""
    kernel = conv.kernel_size[0]
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1,)
        and conv.dilation == (1,)
        and kernel % 2 == 1
        and conv.padding == (kernel // 2,)
        and conv.bias is not None
        and not torch.is_autocast_enabled("cpu")
        and not is_exporting()
    )


def _channels_last_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: int,
    stride: int = 1,
    dilation: int = 1,
) -> Tensor:
    """Depthwise conv1d of x (B, C, T) by weight (C, 1, K) as a channels-last conv2d.

    The input is given the canonical channels-last strides of (B, C, 1, T), copying only when
    its memory is not (B, T, C)-ordered already. A permuted (T, B, C) tensor with B = 1 is
    that order, but its batch stride is C rather than T * C (any value is valid for a size-1
    dimension); oneDNN then takes a path 15x slower (4.2 ms against 0.3 ms at 512 x 200)."""
    batch, channels, frames = x.shape
    if not x.transpose(1, 2).is_contiguous():
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    size = frames * channels
    x = x.as_strided((batch, channels, 1, frames), (size, 1, size, channels))
    out = F.conv2d(
        x,
        weight.unsqueeze(2),
        bias,
        stride=(1, stride),
        padding=(0, padding),
        dilation=(1, dilation),
        groups=weight.shape[0],
    )
    return out.squeeze(2)


class _DepthwiseConv1d(torch.autograd.Function):
    """Depthwise conv1d whose forward and backward are all fast oneDNN calls.

    On the CPU oneDNN's depthwise convolution on (B, C, T) and its backward are several times
    slower than the channels-last forward, whose own backward is slower still past ~300 frames.
    Forward + backward here against Conv1d's, 512 channels, kernel 31: 1.6 ms against 7.0 ms
    at 200 frames, 13 against 37 ms at 1000 (docs/benchmarks.md). So:
    forward channels-last; input gradient = the same convolution of the output gradient with the
    kernel reversed; weight gradient = one grouped convolution that slides the output gradient
    of each (batch, channel) over that row of the padded input, summed over the batch; bias
    gradient = the output gradient's sum."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _channels_last_conv(x, weight, bias, weight.shape[-1] // 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        x, weight = ctx.saved_tensors
        padding = weight.shape[-1] // 2
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _channels_last_conv(grad, weight.flip(-1), None, padding)
        if ctx.needs_input_grad[1]:
            batch, channels, frames = x.shape
            rows = F.pad(x, (padding, padding)).transpose(0, 1).reshape(1, channels * batch, -1)
            kernels = grad.transpose(0, 1).reshape(channels * batch, 1, frames)
            per_row = F.conv1d(rows, kernels, groups=channels * batch)
            grad_weight = per_row.view(channels, batch, -1).sum(1).unsqueeze(1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0, 2))
        return grad_x, grad_weight, grad_bias


def depthwise_conv1d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """conv(x) for x (B, C, T) through `_DepthwiseConv1d` (see use_channels_last_conv)."""
    return _DepthwiseConv1d.apply(x, conv.weight, conv.bias)


def depthwise_conv1d_as_2d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """conv(x) for x (B, C, T), written as a 2-D convolution over (B, C, 1, T) for the ONNX
    export: onnxruntime runs 2-D depthwise convolutions on its blocked-layout kernels and 1-D
    ones on a generic path, 2.7x slower (2.2 against 6.0 ms at 2 x 512 x 1219, kernel 31, one
    thread, measured on this machine); the file's numbers are the same."""
    weight = conv.weight.unsqueeze(2)  # (C, 1, 1, K)
    padding = (0, conv.padding[0])
    y = nn.functional.conv2d(x.unsqueeze(2), weight, conv.bias, padding=padding, groups=conv.groups)
    return y.squeeze(2)


# Below this many rows a product is too small for oneDNN's set-up to pay (measured: 1 row
# 1.4x slower than MKL's, 40 rows even, 64 rows and more 0.8-0.9x its time).
_ONEDNN_MIN_ROWS = 32


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear operator (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_can_run(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """A float32 CPU product of at least _ONEDNN_MIN_ROWS rows that records no graph (the
    operator has no backward), outside autocast (which would have cast it) and export."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        x.dim() >= 2
        and weight.dim() == 2
        and weight.is_contiguous()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1] > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.is_autocast_enabled("cpu")
        and not is_exporting()
    )


class OneDnnLinears(TorchFunctionMode):
    """Within this mode, large float32 CPU products of `F.linear` (every nn.Linear, PEFT's
    base layers and adapters) that record no graph run on oneDNN's linear operator instead
    of MKL's sgemm.

    On this project's AVX-512 CPU oneDNN's kernels take 0.77-0.93x MKL's time for the
    decoder's shapes at generation (e.g. 2438 x 512 -> 1536: 37 against 44 ms), and matrix
    products are ~85 % of a decoder step; the sums are ordered differently, so outputs differ
    from MKL's in the last bits (~1e-5 after a generation, tests/test_perf_parity.py).
    Everything else (other dtypes, autograd, autocast, export, small products) calls
    `F.linear` unchanged."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
            x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
            if _onednn_can_run(x, weight, bias):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)
