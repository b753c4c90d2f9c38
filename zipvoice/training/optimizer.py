"""The optimiser and learning-rate schedule of a run (see `TrainingConfig.optimizer_kind`)."""

from __future__ import annotations

import torch
from torch import nn

from zipvoice.training.config import TrainingConfig, TrainingError
from zipvoice.training.distributed import unwrap_ddp
from zipvoice.utils.optim import Eden, LRScheduler, ScaledAdam, WarmupCosine


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
        lr_epochs = optim.lr_hours if optim.lr_hours > 0 else optim.lr_epochs
        scheduler = Eden(optimizer, optim.lr_batches, lr_epochs)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return optimizer, scheduler, kind
