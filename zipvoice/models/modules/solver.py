"""Euler ODE solvers for flow-matching sampling, with classifier-free guidance (CFG)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def get_time_steps(
    t_start: float = 0.0,
    t_end: float = 1.0,
    num_step: int = 10,
    t_shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``num_step + 1`` time points from t_start to t_end, shifted by s*t / (1 + (s-1)*t).

    s < 1 packs the steps towards t = 0, where the signal-to-noise ratio is lowest.
    """
    timesteps = torch.linspace(t_start, t_end, num_step + 1).to(device)
    return t_shift * timesteps / (1 + (t_shift - 1) * timesteps)


class DiffusionModel(nn.Module):
    """Calls the model's velocity function, applying classifier-free guidance.

    With scale g != 0 the batch runs twice, unconditional (text condition zeroed) and
    conditional: v = (1+g)*v_cond - g*v_uncond. For t > 0.5 the unconditional half also loses
    its speech condition; for t <= 0.5 it keeps it and g is doubled.
    """

    def __init__(self, model: nn.Module, func_name: str = "forward_fm_decoder") -> None:
        super().__init__()
        self.model = model
        self.func_name = func_name
        self.model_func = getattr(model, func_name)

    def forward(
        self,
        t: Tensor,
        x: Tensor,
        text_condition: Tensor,
        speech_condition: Tensor,
        padding_mask: Tensor | None = None,
        guidance_scale: float | Tensor = 0.0,
        **kwargs: Any,
    ) -> Tensor:
        if not torch.is_tensor(guidance_scale):
            guidance_scale = torch.tensor(guidance_scale, dtype=t.dtype, device=t.device)
        if bool((guidance_scale == 0.0).all()):
            return self.model_func(
                t=t,
                xt=x,
                text_condition=text_condition,
                speech_condition=speech_condition,
                padding_mask=padding_mask,
                **kwargs,
            )
        if t.dim() != 0:
            raise ValueError("classifier-free guidance needs a scalar t (one time for the batch)")
        x = torch.cat([x, x], dim=0)
        if padding_mask is not None:
            padding_mask = torch.cat([padding_mask, padding_mask], dim=0)
        text_condition = torch.cat([torch.zeros_like(text_condition), text_condition], dim=0)
        if t > 0.5:
            speech_condition = torch.cat(
                [torch.zeros_like(speech_condition), speech_condition], dim=0
            )
        else:
            guidance_scale = guidance_scale * 2
            speech_condition = torch.cat([speech_condition, speech_condition], dim=0)
        v_uncond, v_cond = self.model_func(
            t=t,
            xt=x,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
            **kwargs,
        ).chunk(2, dim=0)
        return (1 + guidance_scale) * v_cond - guidance_scale * v_uncond


class DistillDiffusionModel(DiffusionModel):
    """The distilled model takes the guidance scale as an input instead of running CFG."""

    def forward(
        self,
        t: Tensor,
        x: Tensor,
        text_condition: Tensor,
        speech_condition: Tensor,
        padding_mask: Tensor | None = None,
        guidance_scale: float | Tensor = 0.0,
        **kwargs: Any,
    ) -> Tensor:
        if not torch.is_tensor(guidance_scale):
            guidance_scale = torch.tensor(guidance_scale, dtype=t.dtype, device=t.device)
        return self.model_func(
            t=t,
            xt=x,
            text_condition=text_condition,
            speech_condition=speech_condition,
            padding_mask=padding_mask,
            guidance_scale=guidance_scale,
            **kwargs,
        )


class EulerSolver:
    """Integrates dx/dt = v(t, x) with Euler steps over shifted time points."""

    def __init__(self, model: nn.Module, func_name: str = "forward_fm_decoder") -> None:
        self.model = DiffusionModel(model, func_name=func_name)

    def sample(
        self,
        x: Tensor,
        text_condition: Tensor,
        speech_condition: Tensor,
        padding_mask: Tensor,
        num_step: int = 10,
        guidance_scale: float | Tensor = 0.0,
        t_start: float = 0.0,
        t_end: float = 1.0,
        t_shift: float = 1.0,
        **kwargs: Any,
    ) -> Tensor:
        """x: the value at t_start, (B, T, F). Returns the value at t_end."""
        if num_step < 1:
            raise ValueError(f"num_step must be >= 1, got {num_step}")
        timesteps = get_time_steps(
            t_start=float(t_start),
            t_end=float(t_end),
            num_step=num_step,
            t_shift=t_shift,
            device=x.device,
        )
        for step in range(num_step):
            v = self.model(
                t=timesteps[step],
                x=x,
                text_condition=text_condition,
                speech_condition=speech_condition,
                padding_mask=padding_mask,
                guidance_scale=guidance_scale,
                **kwargs,
            )
            x = x + v * (timesteps[step + 1] - timesteps[step])
        return x


class DistillEulerSolver(EulerSolver):
    """Euler solver for the distilled model (guidance scale fed to the network)."""

    def __init__(self, model: nn.Module, func_name: str = "forward_fm_decoder") -> None:
        self.model = DistillDiffusionModel(model, func_name=func_name)
