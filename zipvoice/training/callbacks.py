"""Observe or stop a training run from outside the loop.

A callback gets the Trainer after each optimiser step (`trainer.state.step`, `trainer.model`,
`trainer.last_loss`) and after each validation (the logged values). Returning True from
`on_step_end` stops the run right there, as if the process were killed: no final validation and
no final save, so the exp-dir holds exactly what a crash would leave (what resume tests need).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


class Callback:
    """Base class: override what you need; the defaults do nothing."""

    def on_step_end(self, trainer: Trainer) -> bool:
        """Called after every optimiser step; True stops the run at once (no final save)."""
        return False

    def on_validation(self, trainer: Trainer, values: Mapping[str, float]) -> None:
        """Called on every rank after each validation with the scalars it logged."""


class StopAfterSteps(Callback):
    """Stop the run right after step `steps`, as if it were killed there."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer: Trainer) -> bool:
        if trainer.state.step >= self.steps:
            logger.info("stopping after step %d (StopAfterSteps)", trainer.state.step)
            return True
        return False


class RecordLosses(Callback):
    """Keep every step's training loss and every validation's scalars (for notebooks/tests)."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.valid: list[tuple[int, dict[str, float]]] = []

    def on_step_end(self, trainer: Trainer) -> bool:
        self.train.append((trainer.state.step, trainer.last_loss))
        return False

    def on_validation(self, trainer: Trainer, values: Mapping[str, float]) -> None:
        self.valid.append((trainer.state.step, dict(values)))
