"""Upstream's `register_inf_check_hooks`: name the modules whose outputs or gradients are not
finite (`--inf-check 1`), so a NaN is traced to where it starts rather than to the loss."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger("zipvoice.train")


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def register_inf_check_hooks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks on every module and gradient hooks on every trainable parameter that log
    a warning naming the module (or parameter) with a non-finite value; returns the handles."""
    handles = []
    for name, module in model.named_modules():
        label = name or "<model>"

        def forward_hook(_module: nn.Module, _inputs: object, output: object, label=label):
            for tensor in _tensors(output):
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    logger.warning("inf-check: %s produced a non-finite output", label)
                    return

        handles.append(module.register_forward_hook(forward_hook))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue

        def grad_hook(grad: Tensor, name=name) -> None:
            if not torch.isfinite(grad).all():
                logger.warning("inf-check: gradient of %s is not finite", name)

        handles.append(param.register_hook(grad_hook))
    return handles
