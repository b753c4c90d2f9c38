"""Zipformer building blocks: activations, BiasNorm and the parameter-free training shapers.

The shapers (Balancer, Whiten, penalize_abs_values_gt, limit_param_value, scheduled dropout)
only act during training, mostly by editing gradients; in eval mode, and whenever the model is
traced, scripted or exported to ONNX, every one of them is the identity, so the eval forward
pass is plain arithmetic that exports cleanly.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import torch
from torch import Tensor, nn

try:  # k2 gives fused, memory-lean Swoosh kernels; everything works without it.
    import k2  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - k2 may fail to import for many ABI reasons
    k2 = None

_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
_custom_bwd = torch.amp.custom_bwd(device_type="cuda")


def is_exporting() -> bool:
    """True while scripting, tracing, exporting to ONNX or compiling: no Python-side randomness,
    no custom autograd Functions, only plain tensor ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    return bool(torch.compiler.is_compiling())


class ScheduledFloat(nn.Module):
    """A float that follows a piecewise-linear schedule of the training batch count.

    It is a Module only so that training code can find it through ``model.modules()`` and set
    ``batch_count`` on it. Outside training (or before any batch count is set) it is ``default``.
    """

    def __init__(self, *points: tuple[float, float], default: float = 0.0) -> None:
        super().__init__()
        if not points:
            raise ValueError("ScheduledFloat needs at least one (batch_count, value) point")
        self.points = [(float(x), float(y)) for x, y in points]
        for (x0, _), (x1, _) in zip(self.points, self.points[1:], strict=False):
            if not x1 > x0:
                raise ValueError(f"ScheduledFloat points must increase in x: {self.points}")
        self.default = float(default)
        self.batch_count: float | None = None
        self.name: str | None = None

    def value_at(self, batch_count: float) -> float:
        """The scheduled value at ``batch_count``, held constant beyond the end points."""
        points = self.points
        if batch_count <= points[0][0]:
            return points[0][1]
        if batch_count >= points[-1][0]:
            return points[-1][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= batch_count <= x1:
                return y0 + (y1 - y0) * (batch_count - x0) / (x1 - x0)
        raise AssertionError("unreachable")

    def __float__(self) -> float:
        if self.batch_count is None or not self.training or is_exporting():
            return self.default
        return self.value_at(self.batch_count)

    def extra_repr(self) -> str:
        return f"points={self.points}, default={self.default}, batch_count={self.batch_count}"


FloatLike = float | ScheduledFloat


# --------------------------------------------------------------------------------------------
# Swoosh activations
# --------------------------------------------------------------------------------------------

_SWOOSH_L = (4.0, 0.035)  # offset, constant: log(1+exp(x-4)) - 0.08x - 0.035
_SWOOSH_R = (1.0, 0.313261687)  # log(1+exp(x-1)) - 0.08x - 0.313261687
_SWOOSH_SLOPE = 0.08
# Derivatives lie in (-0.08, 0.92); the small margin keeps the quantised value below 256.
_DERIV_FLOOR = -0.08
_DERIV_CEIL = 0.925


def _softplus_stable(x: Tensor) -> Tensor:
    """log(1 + exp(x)) written with ops that every exporter supports (no logaddexp)."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))


def _swoosh_formula(x: Tensor, offset: float, const: float) -> Tensor:
    return _softplus_stable(x - offset) - _SWOOSH_SLOPE * x - const


def swoosh_l_formula(x: Tensor) -> Tensor:
    return _swoosh_formula(x, *_SWOOSH_L)


def swoosh_r_formula(x: Tensor) -> Tensor:
    return _swoosh_formula(x, *_SWOOSH_R)


def _swoosh_eager(x: Tensor, offset: float, const: float) -> Tensor:
    """The Swoosh formula in two passes instead of ten: a fused softplus, then one in-place
    multiply-add. Eager, no-gradient use only (exporters get `_swoosh_for_export` below, whose
    ops every runtime has). softplus returns its input above 20, where log1p(exp(20)) - 20 is
    2e-9, below float32 resolution at that magnitude."""
    y = nn.functional.softplus(x - offset)
    return y.add_(x, alpha=-_SWOOSH_SLOPE).sub_(const)


def _swoosh_eager_(x: Tensor, offset: float, const: float) -> Tensor:
    """_swoosh_eager that overwrites x (a temporary its caller hands over): the shifted input
    lives in x's memory, so only the result is allocated. Uses
    swoosh = softplus(z) - 0.08 z - (const + 0.08 offset) with z = x - offset."""
    shifted = x.sub_(offset)
    y = nn.functional.softplus(shifted)
    return y.add_(shifted, alpha=-_SWOOSH_SLOPE).sub_(const + _SWOOSH_SLOPE * offset)


def _swoosh_for_export(x: Tensor, offset: float, const: float) -> Tensor:
    """The Swoosh formula in 8 ONNX ops instead of 11, for the exporters: with z = x - offset,
    softplus(z) = relu(z) - log(sigmoid(|z|)), and relu(z) - 0.08 z is 0.92 z above zero and
    -0.08 z below, i.e. 0.92 * LeakyRelu(z, -0.08 / 0.92). Stable at any |z| (sigmoid(|z|)
    lies in [0.5, 1]); ONNX Runtime runs each op as one pass over the tensor, and its own
    Softplus kernel is slower than this (see docs/benchmarks.md)."""
    shifted = x - offset
    positive_slope = 1.0 - _SWOOSH_SLOPE
    linear_part = nn.functional.leaky_relu(shifted, -_SWOOSH_SLOPE / positive_slope)
    log_part = torch.log(torch.sigmoid(shifted.abs()))
    return linear_part * positive_slope - log_part - (const + _SWOOSH_SLOPE * offset)


def _swoosh_forward_only(x: Tensor, offset: float, const: float) -> Tensor:
    """Swoosh for the forward-only paths: the export formula while exporting, the plain one
    under autograd, else the two-pass eager one."""
    if is_exporting():
        return _swoosh_for_export(x, offset, const)
    if x.requires_grad and torch.is_grad_enabled():
        return _swoosh_formula(x, offset, const)
    return _swoosh_eager(x, offset, const)


def swoosh_l(x: Tensor) -> Tensor:
    """SwooshL for the forward-only paths (see _swoosh_forward_only)."""
    return _swoosh_forward_only(x, *_SWOOSH_L)


def swoosh_r(x: Tensor) -> Tensor:
    """SwooshR for the forward-only paths (see _swoosh_forward_only)."""
    return _swoosh_forward_only(x, *_SWOOSH_R)


def _swoosh_forward_and_deriv(x: Tensor, offset: float, const: float) -> tuple[Tensor, Tensor]:
    """(value, derivative) in float32, from one shifted copy of x: six passes, not thirteen."""
    x = x.float()
    shifted = x - offset
    y = nn.functional.softplus(shifted).add_(x, alpha=-_SWOOSH_SLOPE).sub_(const)
    return y, torch.sigmoid_(shifted).sub_(_SWOOSH_SLOPE)


def _swoosh_deriv(x: Tensor, offset: float, const: float) -> Tensor:
    """The derivative alone (float32), for a backward that needs no value."""
    del const
    return torch.sigmoid_(x.float() - offset).sub_(_SWOOSH_SLOPE)


class _SwooshFunction(torch.autograd.Function):
    """Swoosh whose backward keeps only a uint8-quantised derivative (1 byte per element).

    Random dithering before truncation makes the quantised derivative unbiased.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, offset: float, const: float) -> Tensor:
        in_dtype = x.dtype
        with torch.amp.autocast("cuda", enabled=False):
            y, deriv = _swoosh_forward_and_deriv(x, offset, const)
            scale = 255.0 / (_DERIV_CEIL - _DERIV_FLOOR)
            dithered = (deriv - _DERIV_FLOOR) * scale + torch.rand_like(deriv)
            ctx.save_for_backward(dithered.clamp_(0.0, 255.0).to(torch.uint8))
        return y.to(in_dtype) if in_dtype != torch.float32 else y

    @staticmethod
    def backward(ctx: Any, y_grad: Tensor) -> tuple[Tensor, None, None]:
        (quantised,) = ctx.saved_tensors
        deriv = quantised.to(y_grad.dtype) * ((_DERIV_CEIL - _DERIV_FLOOR) / 255.0) + _DERIV_FLOOR
        return y_grad * deriv, None, None


def _use_plain_formula(module: nn.Module, x: Tensor) -> bool:
    return (
        is_exporting() or not module.training or not (x.requires_grad and torch.is_grad_enabled())
    )


class SwooshL(nn.Module):
    """SwooshL(x) = log(1+exp(x-4)) - 0.08x - 0.035."""

    def forward(self, x: Tensor) -> Tensor:
        if _use_plain_formula(self, x):
            return swoosh_l(x)
        if k2 is not None:
            return k2.swoosh_l(x)
        return _SwooshFunction.apply(x, *_SWOOSH_L)


class SwooshR(nn.Module):
    """SwooshR(x) = log(1+exp(x-1)) - 0.08x - 0.313261687."""

    def forward(self, x: Tensor) -> Tensor:
        if _use_plain_formula(self, x):
            return swoosh_r(x)
        if k2 is not None:
            return k2.swoosh_r(x)
        return _SwooshFunction.apply(x, *_SWOOSH_R)


_ACTIVATIONS = {"SwooshL": _SWOOSH_L, "SwooshR": _SWOOSH_R}


def _linear_2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """linear(x, weight, bias) as one 2-D product.

    For a 3-D x whose leading dims do not fold into one (the convolution module's (T, B, C)
    view of a (B, C, T) tensor) and a weight that needs no gradient, matmul runs one
    vector-matrix product per frame (bmm against the weight expanded T times): 4x slower
    than one GEMM (measured at 200 x 512 -> 512 and 2 x 1219 x 512 -> 512). A (T, 1, C) view
    reshapes without a copy (the GEMM reads it transposed); otherwise reshape copies once."""
    out = nn.functional.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


class _ActivationDropoutAndLinearFunction(torch.autograd.Function):
    """activation -> dropout -> linear that stores only its input (and a small dropout mask);
    the activation is recomputed in backward."""

    @staticmethod
    @_custom_fwd
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        activation: str,
        dropout_p: float,
        dropout_shared_dim: int | None,
    ) -> Tensor:
        dropout_mask = None
        if dropout_p != 0.0:
            shape = list(x.shape)
            if dropout_shared_dim is not None:
                shape[dropout_shared_dim] = 1
            keep = torch.rand(*shape, device=x.device, dtype=x.dtype) > dropout_p
            dropout_mask = keep.to(x.dtype) * (1.0 / (1.0 - dropout_p))
        ctx.save_for_backward(x, weight, bias, dropout_mask)
        ctx.activation = activation
        if k2 is not None:
            y = _ActivationDropoutAndLinearFunction._activate(x, activation)[0].to(x.dtype)
        else:  # the value only: its derivative is recomputed in backward
            y = _swoosh_eager(x.float(), *_ACTIVATIONS[activation]).to(x.dtype)
        if dropout_mask is not None:
            y = y * dropout_mask
        return _linear_2d(y, weight, bias)

    @staticmethod
    def _activate(x: Tensor, activation: str) -> tuple[Tensor, Tensor]:
        if k2 is not None:
            if activation == "SwooshL":
                return k2.swoosh_l_forward_and_deriv(x)
            return k2.swoosh_r_forward_and_deriv(x)
        return _swoosh_forward_and_deriv(x, *_ACTIVATIONS[activation])

    @staticmethod
    @_custom_bwd
    def backward(ctx: Any, ans_grad: Tensor):
        x, weight, bias, dropout_mask = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        out_channels, in_channels = weight.shape
        grad_2d = ans_grad.reshape(-1, out_channels)
        weight_grad = bias_grad = x_grad = None
        if need_weight:  # frozen (adapter training): neither y nor this product is needed
            y, deriv = _ActivationDropoutAndLinearFunction._activate(x, ctx.activation)
            y = y.to(ans_grad.dtype)
            if dropout_mask is not None:
                y = y * dropout_mask
            weight_grad = torch.matmul(grad_2d.t(), y.reshape(-1, in_channels).to(grad_2d.dtype))
        elif need_x:
            deriv = _swoosh_deriv(x, *_ACTIVATIONS[ctx.activation])
        if need_bias and bias is not None:
            bias_grad = grad_2d.sum(dim=0)
        if need_x:
            x_grad = torch.matmul(ans_grad, weight.to(ans_grad.dtype)) * deriv.to(ans_grad.dtype)
            if dropout_mask is not None:
                x_grad = x_grad * dropout_mask
            x_grad = x_grad.to(x.dtype)
        return x_grad, weight_grad, bias_grad, None, None, None


class ActivationDropoutAndLinear(nn.Module):
    """Swoosh activation, dropout, then a linear map, with ``weight``/``bias`` held directly on
    this module (the published checkpoints name them ``out_proj.weight``/``out_proj.bias``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        activation: str = "SwooshL",
        dropout_p: FloatLike = 0.0,
        dropout_shared_dim: int | None = -1,
        initial_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {activation}")
        linear = ScaledLinear(in_channels, out_channels, bias=bias, initial_scale=initial_scale)
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.activation = activation
        self.dropout_p = dropout_p
        self.dropout_shared_dim = dropout_shared_dim

    def forward(self, x: Tensor, consume_input: bool = False) -> Tensor:
        """consume_input: the caller hands x over, and a path without autograd may overwrite
        it instead of allocating a copy of the hidden activations."""
        if _use_plain_formula(self, x):
            if consume_input and not is_exporting() and not x.requires_grad:
                x = _swoosh_eager_(x, *_ACTIVATIONS[self.activation])
            else:
                x = _swoosh_forward_only(x, *_ACTIVATIONS[self.activation])
            if is_exporting():
                return nn.functional.linear(x, self.weight, self.bias)
            return _linear_2d(x, self.weight, self.bias)
        return _ActivationDropoutAndLinearFunction.apply(
            x,
            self.weight,
            self.bias,
            self.activation,
            float(self.dropout_p),
            self.dropout_shared_dim,
        )


# --------------------------------------------------------------------------------------------
# Linear layers and normalisation
# --------------------------------------------------------------------------------------------


def ScaledLinear(*args: Any, initial_scale: float = 1.0, **kwargs: Any) -> nn.Linear:  # noqa: N802
    """A plain ``nn.Linear`` (so PEFT can wrap it) whose initial weights are scaled by
    ``initial_scale`` and whose bias starts uniform in +-0.1*initial_scale."""
    linear = nn.Linear(*args, **kwargs)
    with torch.no_grad():
        linear.weight.mul_(initial_scale)
        if linear.bias is not None:
            nn.init.uniform_(linear.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return linear


class _BiasNormFunction(torch.autograd.Function):
    """BiasNorm that keeps its input and the per-frame scales, recomputing the rest in
    backward (saves the intermediate (x - bias) tensors)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor, log_scale: Tensor, channel_dim: int) -> Tensor:
        shaped_bias = bias.reshape([-1] + [1] * (x.ndim - channel_dim - 1))
        scales = torch.mean((x - shaped_bias) ** 2, dim=channel_dim, keepdim=True) ** -0.5
        ctx.save_for_backward(x, bias, log_scale)
        ctx.channel_dim = channel_dim
        return x * (scales * log_scale.exp())

    @staticmethod
    def backward(ctx: Any, ans_grad: Tensor):
        x, bias, log_scale = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        bias = bias.detach().requires_grad_(True)
        log_scale = log_scale.detach().requires_grad_(True)
        with torch.enable_grad():
            shaped_bias = bias.reshape([-1] + [1] * (x.ndim - ctx.channel_dim - 1))
            scales = torch.mean((x - shaped_bias) ** 2, dim=ctx.channel_dim, keepdim=True) ** -0.5
            ans = x * (scales * log_scale.exp())
            ans.backward(gradient=ans_grad)
        return x.grad, bias.grad, log_scale.grad, None


class BiasNorm(nn.Module):
    """LayerNorm replacement: y = x * rms(x - bias)^-1 * exp(log_scale), rms over channels.

    The bias only enters the scale, so one channel cannot defeat the normalisation by
    sitting at a large constant.
    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int = -1,
        log_scale: float = 1.0,
        log_scale_min: float = -1.5,
        log_scale_max: float = 1.5,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.log_scale = nn.Parameter(torch.tensor(log_scale))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale_min = log_scale_min
        self.log_scale_max = log_scale_max

    def forward(self, x: Tensor) -> Tensor:
        channel_dim = self.channel_dim if self.channel_dim >= 0 else self.channel_dim + x.ndim
        if not self.training or is_exporting():
            bias = self.bias.reshape([-1] + [1] * (x.ndim - channel_dim - 1))
            scales = torch.mean((x - bias) ** 2, dim=channel_dim, keepdim=True) ** -0.5
            return x * (scales * self.log_scale.exp())
        log_scale = limit_param_value(
            self.log_scale, min=self.log_scale_min, max=self.log_scale_max, training=True
        )
        return _BiasNormFunction.apply(x, self.bias, log_scale, channel_dim)


class _SoftmaxFunction(torch.autograd.Function):
    """Softmax that saves only its (possibly half-precision) output for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:
        ans = x.softmax(dim=dim)
        if torch.is_autocast_enabled():
            ans = ans.to(torch.float16)
        ctx.save_for_backward(ans)
        ctx.dim = dim
        return ans

    @staticmethod
    def backward(ctx: Any, ans_grad: Tensor):
        (ans,) = ctx.saved_tensors
        with torch.amp.autocast("cuda", enabled=False):
            ans_grad = ans_grad.float()
            ans = ans.float()
            x_grad = ans_grad * ans
            x_grad = x_grad - ans * x_grad.sum(dim=ctx.dim, keepdim=True)
        return x_grad, None


def softmax(x: Tensor, dim: int) -> Tensor:
    if not x.requires_grad or is_exporting():
        return x.softmax(dim=dim)
    return _SoftmaxFunction.apply(x, dim)


# --------------------------------------------------------------------------------------------
# Gradient shapers (identity in the forward pass)
# --------------------------------------------------------------------------------------------


def _shaper_inactive(module: nn.Module, x: Tensor) -> bool:
    return (
        not module.training or is_exporting() or not x.requires_grad or not torch.is_grad_enabled()
    )


class _BalancerFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        min_mean: float,
        max_mean: float,
        min_rms: float,
        max_rms: float,
        grad_scale: float,
        channel_dim: int,
    ) -> Tensor:
        if channel_dim < 0:
            channel_dim += x.ndim
        ctx.save_for_backward(x)
        ctx.config = (min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim = ctx.config
        try:
            with torch.no_grad(), torch.amp.autocast("cuda", enabled=False):
                x = x.detach().float()
                loss_grad = _balancer_loss_grad(
                    x, channel_dim, min_mean, max_mean, min_rms, max_rms, grad_scale
                )
                x_grad_float = x_grad.float()
                # Scale by |x_grad| so the edit is proportionate to the real gradient there.
                x_grad = torch.addcmul(x_grad_float, x_grad_float.abs(), loss_grad).to(x_grad.dtype)
        except Exception as exc:  # noqa: BLE001 - a shaper must never break training
            logging.info("Balancer backward skipped: %s (shape %s)", exc, list(x_grad.shape))
        return x_grad, None, None, None, None, None, None


def _balancer_loss_grad(
    x: Tensor,
    channel_dim: int,
    min_mean: float,
    max_mean: float,
    min_rms: float,
    max_rms: float,
    grad_scale: float,
) -> Tensor:
    """d(loss)/dx of the Balancer's loss, scaled to rms grad_scale per channel. The loss: per
    channel, |m - clamp(m)| with m = mean / stddev (the sign balance, kept in [min_mean,
    max_mean]) plus |log(clamp(rms) / rms)| (the magnitude, kept in [min_rms, max_rms]).

    The loss depends on x only through each channel's mean and mean square q, so the gradient
    is a + b x per channel, one pass: a = dL/d(mean) / N, b = 2 dL/dq / N, with (s = stddev,
    sign_m and sign_r -1 below the range, +1 above, 0 inside)
    dL/d(mean) = sign_m (1 / s + mean^2 / s^3), dL/dq = -sign_m mean / (2 s^3) + sign_r / (2 q)
    (autograd's values for the same formula, written out: no graph over per-channel
    tensors)."""
    mean_dims = [i for i in range(x.ndim) if i != channel_dim]
    size = x.numel() // x.shape[channel_dim]
    mean = x.mean(dim=mean_dims, keepdim=True)
    # (x * x).mean: linalg.vector_norm over leading dims is not vectorised (~13x slower).
    mean_square = (x * x).mean(dim=mean_dims, keepdim=True)
    variance = mean_square - mean * mean
    stddev = variance.clamp(min=1.0e-20).sqrt()
    m = mean / stddev
    sign_m = (m > max_mean).to(x.dtype) - (m < min_mean).to(x.dtype)
    rms = mean_square.clamp(min=1.0e-20).sqrt()
    sign_r = (rms > max_rms).to(x.dtype) - (rms < min_rms).to(x.dtype)
    # Where the variance is clamped, m does not depend on it.
    through_stddev = (variance > 1.0e-20).to(x.dtype) * mean / stddev**3
    d_mean = sign_m * (1.0 / stddev + through_stddev * mean)
    d_mean_square = -0.5 * sign_m * through_stddev
    d_mean_square += (
        0.5 * sign_r * (mean_square > 1.0e-20).to(x.dtype) / mean_square.clamp(min=1.0e-20)
    )
    loss_grad = torch.addcmul(d_mean / size, d_mean_square, x, value=2.0 / size)
    loss_grad_rms = (loss_grad * loss_grad).mean(dim=mean_dims, keepdim=True)
    return loss_grad.mul_(grad_scale / loss_grad_rms.sqrt().clamp(min=1.0e-20))


def _proportion_positive_to_mean(p: float) -> float:
    """Approximate mean/stddev of a Gaussian with P(x > 0) = p."""
    x = 2.0 * p - 1.0
    eps = 1.0e-10
    atanh = (math.log(1 + x + eps) - math.log(1 - x + eps)) / 2.0
    return 0.8139535143 * atanh  # 1 / (sqrt(pi) * ln 2): crude inverse erf


def _abs_to_rms(mean_abs: float) -> float:
    return 1.25331413732 * mean_abs  # sqrt(pi/2): rms of a Gaussian with that mean |x|


class Balancer(nn.Module):
    """Pushes each channel's proportion of positive values into [min_positive, max_positive]
    and its mean |x| into [min_abs, max_abs], by editing gradients, on a random ``prob``
    fraction of training calls."""

    def __init__(
        self,
        num_channels: int,
        channel_dim: int,
        min_positive: FloatLike = 0.05,
        max_positive: FloatLike = 0.95,
        min_abs: FloatLike = 0.2,
        max_abs: FloatLike = 100.0,
        grad_scale: FloatLike = 0.04,
        prob: FloatLike | None = None,
    ) -> None:
        super().__init__()
        self.prob = (
            ScheduledFloat((0.0, 0.5), (8000.0, 0.125), default=0.4) if prob is None else prob
        )
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.min_positive = min_positive
        self.max_positive = max_positive
        self.min_abs = min_abs
        self.max_abs = max_abs
        self.grad_scale = grad_scale

    def forward(self, x: Tensor) -> Tensor:
        if _shaper_inactive(self, x) or random.random() >= float(self.prob):
            return x
        if x.shape[self.channel_dim] != self.num_channels:
            raise ValueError(
                f"Balancer expects {self.num_channels} channels on dim {self.channel_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        return _BalancerFunction.apply(
            x,
            _proportion_positive_to_mean(float(self.min_positive)),
            _proportion_positive_to_mean(float(self.max_positive)),
            _abs_to_rms(float(self.min_abs)),
            _abs_to_rms(float(self.max_abs)),
            float(self.grad_scale),
            self.channel_dim,
        )


def _centred_groups(x: Tensor, num_groups: int) -> Tensor:
    """(num_groups, frames, channels // num_groups): each group's channels, mean removed."""
    x = x.reshape(-1, x.shape[-1])
    num_frames, num_channels = x.shape
    x = x.reshape(num_frames, num_groups, num_channels // num_groups).transpose(0, 1)
    return x - x.mean(dim=1, keepdim=True)


def _whitening_penalty(x: Tensor, num_groups: int, limit: float) -> tuple[float, Tensor | None]:
    """The whitening metric m (1.0 when each group's centred covariance is a multiple of I,
    the same across groups; larger the less white) and, when m is not below limit, dm/dx.

    m = S / (D^2 + eps), with C_g = x_g^T x_g of the centred groups, D the mean of all the
    diagonals and S the sum of all squared entries over G * P (G groups of P channels). Its
    gradient is written out: dm/dC_g = 2 / (G P) * (C_g / (D^2 + eps) - S D / (D^2 + eps)^2 I)
    and dm/dx_g = 2 x_g dm/dC_g (C_g is symmetric; the centring passes it unchanged, since
    x_g dm/dC_g already has zero mean over frames): one product more than the metric, where
    autograd's backward of x^T x takes two.

    With fewer frames N than channels P (a small batch, or a downsampled stack) the same
    numbers come from the N x N Gram matrix K_g = x_g x_g^T: it has C_g's trace and sum of
    squares, and x_g C_g = K_g x_g, so both products cost N^2 P instead of N P^2."""
    centred = _centred_groups(x, num_groups)
    num_groups, num_frames, per_group = centred.shape
    use_gram = num_frames < per_group
    transposed = centred.transpose(1, 2)
    # C_g (P x P) or K_g (N x N): same diagonal sum, same sum of squares.
    product = torch.matmul(centred, transposed) if use_gram else torch.matmul(transposed, centred)
    count = num_groups * per_group
    mean_diag = torch.diagonal(product, dim1=1, dim2=2).sum() / count
    mean_sq = (product**2).sum() / count
    denom = mean_diag**2 + 1.0e-20
    metric = float(mean_sq / denom)
    if metric < limit:
        return metric, None
    scaled = product.mul_(2.0 / (count * denom))  # the product is not needed after this
    torch.diagonal(scaled, dim1=1, dim2=2).sub_(2.0 * mean_sq * mean_diag / (count * denom**2))
    # x_g (a C_g - b I) = (a K_g - b I) x_g
    grad = torch.matmul(scaled, centred) if use_gram else torch.matmul(centred, scaled)
    return metric, grad.mul_(2.0).transpose(0, 1).reshape(x.shape)  # (G, frames, P) -> x's


class _WhiteningPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, module: Whiten) -> Tensor:
        ctx.save_for_backward(x)
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, x_grad: Tensor):
        (x_orig,) = ctx.saved_tensors
        whiten: Whiten = ctx.module
        try:
            with torch.no_grad(), torch.amp.autocast("cuda", enabled=False):
                _, penalty_grad = _whitening_penalty(
                    x_orig.detach().float(), whiten.num_groups, float(whiten.whitening_limit)
                )
                if penalty_grad is None:
                    whiten.prob = whiten.min_prob
                    return x_grad, None
                whiten.prob = whiten.max_prob
                scale = float(whiten.grad_scale) * (
                    x_grad.float().norm() / (penalty_grad.norm() + 1.0e-20)
                )
                return x_grad + (penalty_grad * scale).to(x_grad.dtype), None
        except Exception as exc:  # noqa: BLE001 - a shaper must never break training
            logging.info("Whiten backward skipped: %s (shape %s)", exc, list(x_grad.shape))
        return x_grad, None


class Whiten(nn.Module):
    """Adds, through the gradient, a penalty when the feature covariance is far from white
    (metric above ``whitening_limit``). Runs with probability max_prob after a violation and
    min_prob otherwise."""

    def __init__(
        self,
        num_groups: int,
        whitening_limit: FloatLike,
        prob: float | tuple[float, float],
        grad_scale: FloatLike,
    ) -> None:
        super().__init__()
        if num_groups < 1 or float(whitening_limit) < 1 or float(grad_scale) < 0:
            raise ValueError("Whiten needs num_groups >= 1, whitening_limit >= 1, grad_scale >= 0")
        self.num_groups = num_groups
        self.whitening_limit = whitening_limit
        self.grad_scale = grad_scale
        if isinstance(prob, float):
            prob = (prob, prob)
        self.min_prob, self.max_prob = prob
        if not 0 < self.min_prob <= self.max_prob <= 1:
            raise ValueError(f"Whiten prob must satisfy 0 < min <= max <= 1, got {prob}")
        self.prob = self.max_prob
        self.name: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if _shaper_inactive(self, x) or random.random() > self.prob or float(self.grad_scale) == 0:
            return x
        return _WhiteningPenaltyFunction.apply(x, self)


class _WithLoss(torch.autograd.Function):
    """Returns x; in backward acts as if y.sum() had been added to the loss."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor) -> Tensor:
        ctx.y_shape = y.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, ans_grad: Tensor):
        ones = torch.ones(ctx.y_shape, dtype=ans_grad.dtype, device=ans_grad.device)
        return ans_grad, ones, None


def penalize_abs_values_gt(
    x: Tensor, limit: float, penalty: float, name: str | None = None
) -> Tensor:
    """Returns x unchanged; backward adds the gradient of penalty * relu(|x| - limit).sum()."""
    if is_exporting() or not x.requires_grad:
        return x
    over_limit = (x.abs() - limit) > 0
    # Same derivative as penalty * relu(|x| - limit), cheaper to keep for backward.
    aux_loss = penalty * ((x.sign() * over_limit).to(torch.int8) * x)
    return _WithLoss.apply(x, aux_loss)


class _LimitParamValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, min: float, max: float) -> Tensor:  # noqa: A002
        if max < min:
            raise ValueError(f"limit_param_value: max {max} < min {min}")
        ctx.save_for_backward(x)
        ctx.min, ctx.max = min, max
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, x_grad: Tensor):
        (x,) = ctx.saved_tensors
        # Below min, make every gradient push the value up; above max, push it down.
        x_grad = x_grad * torch.where((x_grad > 0) & (x < ctx.min), -1.0, 1.0)
        x_grad = x_grad * torch.where((x_grad < 0) & (x > ctx.max), -1.0, 1.0)
        return x_grad, None, None


def limit_param_value(
    x: Tensor,
    min: float,  # noqa: A002
    max: float,  # noqa: A002
    prob: float = 0.6,
    training: bool = True,
) -> Tensor:
    """Keeps a parameter (mostly) inside [min, max] by flipping gradients that push it out.
    Applied on a random ``prob`` fraction of training calls."""
    if training and not is_exporting() and random.random() < prob:
        return _LimitParamValue.apply(x, min, max)
    return x


class Dropout2(nn.Module):
    """Dropout whose rate may follow a ScheduledFloat."""

    def __init__(self, p: FloatLike) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or is_exporting():
            return x
        return nn.functional.dropout(x, p=float(self.p), training=True)
