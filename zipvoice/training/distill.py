"""Distilling ZipVoice into ZipVoice-Distill (upstream's `train_zipvoice_distill`), also from
a LoRA-adapted teacher, so that a fine-tuned (e.g. Japanese) model becomes a few-step one.

The student takes the guidance scale as an input and learns to jump from t to a later t_dest in
one step where the teacher takes two guided steps (t -> t + d1 -> t_dest). Two stages, as
upstream: `first` with the fixed teacher (ZipVoice, optionally with its adapter merged) and
guidance scales in [0, 2); `second` with an exponential moving average of the student
(`--ema-decay`) as the teacher and scales in [1, 3). The loss compares velocities
(x_dest - x_t) / (t_dest - t) on the hidden (not prompt, not padding) frames.
"""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zipvoice.training.distill_config import STAGES, DistillConfig  # noqa: F401 - re-exported
from zipvoice.training.steps import Batch

logger = logging.getLogger("zipvoice.train")

MAX_JUMP = 0.3  # upstream: each teacher step spans at most 0.3 of the time axis


def sample_jump(rng: random.Random) -> tuple[float, float, float]:
    """(t, t_mid, t_dest): the student's start, the teacher's middle point and the end."""
    while True:
        t = rng.random()
        d1 = rng.uniform(0.0, min(MAX_JUMP, 1.0 - t))
        d2 = rng.uniform(0.0, min(MAX_JUMP, 1.0 - t - d1))
        if d1 + d2 > 1e-3:  # the velocity divides by the jump
            return t, t + d1, t + d1 + d2


def distillation_loss(
    student: nn.Module, teacher: nn.Module, batch: Batch, stage: str, rng: random.Random
) -> Tensor:
    """Mean squared difference of the student's one-step and the teacher's two-step velocity
    over the hidden frames."""
    from zipvoice.models.zipvoice import condition_time_mask, make_pad_mask

    features, lens = batch.features, batch.features_lens
    size, frames = features.shape[0], features.shape[1]
    noise = torch.randn_like(features)
    t, t_mid, t_dest = sample_jump(rng)
    low = 0.0 if stage == "first" else 1.0
    guidance = torch.rand(size, 1, 1, device=features.device) * 2 + low
    x_t = features * t + noise * (1 - t)
    hidden = condition_time_mask(lens, (0.7, 1.0), max_len=frames)
    common = dict(tokens=batch.tokens, features=features, features_lens=lens,
                  speech_condition_mask=hidden, num_step=1, guidance_scale=guidance)  # fmt: skip
    with torch.no_grad():
        x_mid, _ = teacher.sample_intermediate(noise=x_t, t_start=t, t_end=t_mid, **common)
        target, _ = teacher.sample_intermediate(noise=x_mid, t_start=t_mid, t_end=t_dest, **common)
    pred, _ = student.sample_intermediate(noise=x_t, t_start=t, t_end=t_dest, **common)
    keep = hidden & ~make_pad_mask(lens, max_len=frames)
    jump = t_dest - t
    return torch.mean(((pred[keep] - target[keep]) / jump) ** 2)


def load_teacher(config: DistillConfig) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The teacher (eval mode, frozen) with its adapter merged; its token file and model.json."""
    from zipvoice.inference.torch_backend import load_model_for_inference
    from zipvoice.models.loader import load_model_config

    checkpoint = Path(config.teacher_model)
    model_dir = checkpoint.parent
    model_json = Path(config.model_config) if config.model_config else model_dir / "model.json"
    teacher, token_file, _ = load_model_for_inference(
        model_name="zipvoice_distill" if config.distill_stage == "second" else "zipvoice",
        model_dir=model_dir,
        checkpoint_name=checkpoint.name,
        lora_path=config.teacher_lora,
        merge_lora=True,
        token_file=config.token_file,
    )
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval(), Path(token_file), load_model_config(model_json)


def build_student(teacher: nn.Module, model_config: dict, vocab_size: int, pad_id: int):
    """ZipVoice-Distill starting from the teacher's weights (the guidance-scale embedding, which
    the teacher lacks in the first stage, starts fresh)."""
    from zipvoice.models.loader import build_model

    student = build_model(model_config, vocab_size, pad_id, distill=True)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    unexpected = list(result.unexpected_keys)
    fresh = [k for k in result.missing_keys if "guidance_scale_embed" not in k]
    if unexpected or fresh:
        raise ValueError(f"teacher does not fit the student: {(unexpected + fresh)[:5]}")
    return student


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student (the second stage's moving target)."""
    own = teacher.state_dict()
    for key, value in student.state_dict().items():
        if torch.is_floating_point(value):
            own[key].mul_(decay).add_(value, alpha=1.0 - decay)


def second_stage_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher
