"""What one training step computes: batches, the flow-matching loss, the optimiser update,
and the deterministic validation loss (the same number for the same weights in any run)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def set_batch_count(model: nn.Module, batch_count: float) -> None:
    """Drive the model's ScheduledFloat schedules (dropout, skip rates, balancer probs)."""
    for module in model.modules():
        if hasattr(module, "batch_count"):
            module.batch_count = batch_count


def adjusted_batch_count(step: int, max_duration: float, world_size: int, ref_duration: float):
    """Batch count in units of `ref_duration` seconds of audio, as upstream's schedules expect."""
    return step * (max_duration * world_size) / ref_duration


@dataclass
class Batch:
    tokens: list[list[int]]
    features: Tensor
    features_lens: Tensor
    cut_ids: list[str]
    # (B,) bool: the replay cuts of the pretraining domain (zipvoice.dataset.replay)
    replay: Tensor | None = None


def prepare_batch(batch: Mapping[str, Any], tokenizer: Any, feat_scale: float, device) -> Batch:
    tokens = batch["tokens"]
    if tokens and tokens[0] and isinstance(tokens[0][0], str):
        tokens = tokenizer.tokens_to_token_ids(tokens)
    features = batch["features"].to(device) * feat_scale
    cut_ids = list(batch.get("cut_ids") or [])
    replay = batch.get("replay")
    replay = replay.to(device) if isinstance(replay, Tensor) else None
    return Batch(tokens, features, batch["features_lens"].to(device), cut_ids, replay)


def flow_matching_loss(
    model: nn.Module,
    batch: Batch,
    *,
    condition_drop_ratio: float,
    noise: Tensor | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """The model's flow-matching loss; noise and t are drawn from the global RNG if not given."""
    features = batch.features
    if noise is None:
        noise = torch.randn_like(features)
    if t is None:
        t = torch.rand(features.size(0), 1, 1, device=features.device)
    return model(
        tokens=batch.tokens,
        features=features,
        features_lens=batch.features_lens,
        noise=noise,
        t=t,
        condition_drop_ratio=condition_drop_ratio,
    )


@torch.no_grad()
def backward_and_step(
    loss: Tensor,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    optimizer_kind: str,
    params: list[nn.Parameter],
    grad_clip: float,
) -> None:
    """One optimiser update. ScaledAdam clips internally; AdamW clips the gradient norm here."""
    scaler.scale(loss).backward()
    if optimizer_kind == "adamw" and grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def deterministic_loss(model: nn.Module, batch: Batch, seed: int) -> float:
    """Loss with fixed noise, t = i/B and seeded span masks, without touching global RNGs:
    the same number for the same weights in any run."""
    device = batch.features.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(batch.features.shape, generator=generator, device=device)
        size = batch.features.size(0)
        t = (torch.arange(size, device=device, dtype=torch.float32) / size).view(-1, 1, 1)
        loss = flow_matching_loss(model, batch, condition_drop_ratio=0.0, noise=noise, t=t)
    return float(loss)


@torch.no_grad()
def compute_validation_loss(
    model: nn.Module,
    dataloader: Iterable,
    *,
    tokenizer: Any,
    feat_scale: float,
    device: torch.device,
    seed: int,
    world_size: int = 1,
) -> float:
    """Frame-weighted mean loss over the dev set, deterministic (see deterministic_loss)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for index, raw in enumerate(dataloader):
        batch = prepare_batch(raw, tokenizer, feat_scale, device)
        loss = deterministic_loss(model, batch, seed + index)
        frames = float(batch.features_lens.sum())
        total += torch.tensor([loss * frames, frames], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
