"""What every part of inference shares: the output rate, per-model sampling defaults, and
the error for inputs the pipeline cannot turn into speech."""

from __future__ import annotations

SAMPLING_RATE = 24000
MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    "zipvoice": {"num_step": 16, "guidance_scale": 1.0},
    "zipvoice_distill": {"num_step": 8, "guidance_scale": 3.0},
}


class InferenceError(ValueError):
    """Inputs the pipeline cannot turn into speech (empty text, bad test list, ...)."""
