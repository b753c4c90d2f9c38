"""The optimiser and learning-rate schedule of a run (see `TrainingConfig.optimizer_kind`)."""

from __future__ import annotations

import torch
from torch import nn

from zipvoice.training.config import TrainingConfig, TrainingError
from zipvoice.training.distributed import unwrap_ddp
from zipvoice.utils.optim import Eden, FixedLRScheduler, LRScheduler, ScaledAdam, WarmupCosine


def build_optimizer(
    model: nn.Module, config: TrainingConfig
) -> tuple[torch.optim.Optimizer, LRScheduler, str]:
    """AdamW + warm-up + cosine for adapters; upstream's ScaledAdam + Eden for full training.

    Only parameters that require grad are optimised: what trains is decided by `setup_model`.
    """
    kind = config.optimizer_kind
    optim = config.optim
    params = [p for p in unwrap_ddp(model).parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen")
    lr = config.base_lr
    if kind == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.999), weight_decay=optim.weight_decay
        )
        num_iters = config.run.num_iters
        total = num_iters if (num_iters > 0 and optim.lr_schedule == "cosine") else 0
        scheduler: LRScheduler = WarmupCosine(
            optimizer, warmup_steps=config.warmup_steps, total_steps=total
        )
    elif kind == "scaledadam":
        optimizer = ScaledAdam(params, lr=lr, clipping_scale=2.0)
        scheduler = scaledadam_schedule(optimizer, config)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return optimizer, scheduler, kind


def scaledadam_schedule(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> LRScheduler:
    """Upstream's choice: a constant --base-lr when fine-tuning (--finetune 1), else Eden decaying
    over --lr-batches and --lr-hours (hours of audio, stepped per batch) or --lr-epochs (stepped
    once per epoch by the trainer)."""
    optim = config.optim
    if config.model.finetune:
        return FixedLRScheduler(optimizer)
    lr_epochs = optim.lr_hours if optim.lr_hours > 0 else optim.lr_epochs
    return Eden(optimizer, optim.lr_batches, lr_epochs)
