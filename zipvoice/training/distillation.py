"""The training objective against forgetting: flow matching on mixed batches, plus
distillation from the start weights ("learning without forgetting", `--kd-weight`).

    loss = flow-matching loss over every cut of the batch (fine-tuning + replay)
           + kd_weight * mean (v_student - v_teacher)^2 over the `--kd-on` region

The teacher is the model as training started: the same modules evaluated with the start
values of the trainable parameters (`torch.func.functional_call`), everything frozen staying
shared. For full fine-tuning that is a frozen copy of the start weights; with LoRA it is the
start values of the adapters, embedding and text encoder only (PEFT's `disable_adapter()`
would not give the start model: the embedding and text encoder train beside the adapters,
PiSSA/OLoRA rewrite the base weights, and the adapters' dropout would draw different random
numbers). The teacher sees exactly the student's inputs: the same noise, t, xt, condition
drop, masked span, and the same dropout and skip draws (the RNGs are rewound between the two
passes, and the teacher's tensors require grad like the student's so the modules take the
same random branches). So the distillation term is exactly zero at step 0 when the adapters
start as a no-op, and its gradient reaches only the student's trainable parameters (the
teacher's output is detached; its graph is freed before the student's pass).

Regions (`--kd-on`): `replay`, the generated span of replay cuts; `prompt`, that plus the
prompt frames (outside the span, where the flow-matching loss gives no signal) of the
fine-tuning cuts; `all`, every frame of every cut.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from zipvoice.training.distributed import unwrap_ddp


def _rng_state(device: torch.device) -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(state: tuple[Any, ...], device: torch.device) -> None:
    cpu, cuda, python = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(python)


def start_weights(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the trainable parameters as they are now (the teacher's weights)."""
    return {
        name: param.detach().clone().requires_grad_(True)
        for name, param in unwrap_ddp(model).named_parameters()
        if param.requires_grad
    }


def kd_region(outputs: Any, replay: Tensor, kd_on: str) -> Tensor:
    """(B, T) bool: the frames the distillation term covers (module docstring)."""
    span, padding = outputs.loss_mask, outputs.padding_mask
    replay = replay.to(span.device).unsqueeze(1)
    if kd_on == "all":
        return ~padding
    region = span & replay
    if kd_on == "prompt":
        region = region | (~span & ~padding & ~replay)
    return region


def masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean of (a - b)^2 over the masked frames and all features; 0 (still in the graph)
    when the mask is empty."""
    weight = mask.unsqueeze(-1).to(a.dtype)
    count = weight.sum() * a.size(-1)
    return ((a - b) ** 2 * weight).sum() / count.clamp(min=1.0)


class ForgettingObjective:
    """Flow matching with per-cut bookkeeping, and optional distillation (module docstring)."""

    def __init__(self, kd_weight: float, kd_on: str, teacher: Mapping[str, Tensor] | None):
        self.kd_weight = kd_weight
        self.kd_on = kd_on
        self.teacher = teacher

    def _teacher_to(self, device: torch.device) -> None:
        """The snapshot is taken before the model moves to its device; follow it once."""
        if any(t.device != device for t in self.teacher.values()):
            self.teacher = {
                name: t.detach().to(device).requires_grad_(True) for name, t in self.teacher.items()
            }

    def _forward(self, model: nn.Module, batch: Any, noise, t, drop: float, params=None):
        kwargs = dict(
            tokens=batch.tokens, features=batch.features, features_lens=batch.features_lens,
            noise=noise, t=t, condition_drop_ratio=drop, return_outputs=True,
        )  # fmt: skip
        if params is None:
            return model(**kwargs)
        return torch.func.functional_call(unwrap_ddp(model), dict(params), (), kwargs)

    def __call__(
        self, model: nn.Module, batch: Any, condition_drop_ratio: float
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss to minimise, scalars to log)."""
        fm_loss, kd, scalars = self.terms(model, batch, condition_drop_ratio)
        if kd is None:
            return fm_loss, scalars
        return fm_loss + self.kd_weight * kd, scalars

    def terms(
        self, model: nn.Module, batch: Any, condition_drop_ratio: float
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        """(flow-matching loss, distillation term or None, scalars to log)."""
        features = batch.features
        # Drawn in flow_matching_loss's order: without distillation the run is the plain one.
        noise = torch.randn_like(features)
        t = torch.rand(features.size(0), 1, 1, device=features.device)
        teacher_velocity = None
        if self.kd_weight > 0 and self.teacher is not None:
            self._teacher_to(features.device)
            state = _rng_state(features.device)
            with torch.enable_grad():
                out = self._forward(model, batch, noise, t, condition_drop_ratio, self.teacher)
            teacher_velocity = out.velocity.detach()
            del out
            _set_rng_state(state, features.device)
        outputs = self._forward(model, batch, noise, t, condition_drop_ratio)
        replay = _replay_flags(batch, features)
        scalars = _per_domain_losses(outputs, replay)
        if teacher_velocity is None:
            return outputs.loss, None, scalars
        kd = masked_mse(outputs.velocity, teacher_velocity, kd_region(outputs, replay, self.kd_on))
        scalars["train/kd_loss"] = float(kd.detach())
        scalars["train/fm_loss"] = float(outputs.loss.detach())
        return outputs.loss, kd, scalars


def _replay_flags(batch: Any, features: Tensor) -> Tensor:
    replay = getattr(batch, "replay", None)
    if replay is None:
        return torch.zeros(features.size(0), dtype=torch.bool, device=features.device)
    return replay.to(features.device)


@torch.no_grad()
def _per_domain_losses(outputs: Any, replay: Tensor) -> dict[str, float]:
    """The flow-matching loss of the replay and the fine-tuning cuts, and the replay share
    of the batch's frames (what --replay-ratio asked for)."""
    if not bool(replay.any()):
        return {}
    se = ((outputs.velocity - outputs.target) ** 2).mean(-1)
    span = outputs.loss_mask
    frames = (~outputs.padding_mask).sum(1).float()
    scalars = {"train/replay_share": float(frames[replay].sum() / frames.sum())}
    for name, cuts in (("train/replay_loss", replay), ("train/finetune_loss", ~replay)):
        mask = span & cuts.unsqueeze(1)
        if bool(mask.any()):
            scalars[name] = float(se[mask].mean())
    return scalars


def build_objective(config: Any, model: nn.Module) -> ForgettingObjective | None:
    """None for a plain run (the trainer's flow_matching_loss path, unchanged)."""
    kd_weight = float(config.model.kd_weight)
    if not config.data.replay_manifest and kd_weight <= 0:
        return None
    teacher = start_weights(model) if kd_weight > 0 else None
    return ForgettingObjective(kd_weight, config.model.kd_on, teacher)
