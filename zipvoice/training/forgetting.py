"""Where the Trainer picks up the options against forgetting (docs/lora.md): replay
(zipvoice.dataset.replay), distillation (distillation.py), partial freezing (freezing.py)
and best-checkpoint selection (selection.py). Each function is one call in the Trainer, so
the loop itself stays as it was for a run that uses none of them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zipvoice.training.callbacks import Callback
from zipvoice.training.config import TrainingConfig
from zipvoice.training.distillation import ForgettingObjective, build_objective
from zipvoice.training.freezing import ModulePatterns, combine
from zipvoice.training.selection import BestCheckpoint

if TYPE_CHECKING:
    from lhotse import CutSet

    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


def trainable_predicate(config: TrainingConfig, trainable: Any) -> Any:
    """A recipe's `trainable` predicate narrowed further by --trainable/--freeze-modules."""
    model = config.model
    patterns = ModulePatterns.from_flags(model.trainable_modules, model.freeze_modules)
    return combine(trainable, patterns)


def _patterns_of(predicate: Any) -> list[ModulePatterns]:
    if isinstance(predicate, ModulePatterns):
        return [predicate]
    return [p for p in getattr(predicate, "predicates", ()) if isinstance(p, ModulePatterns)]


def setup_forgetting(trainer: Trainer) -> ForgettingObjective | None:
    """After the model is built: check the freezing patterns against its parameter names,
    then snapshot the teacher's weights (before any resume checkpoint is loaded)."""
    names = [name for name, _ in trainer.model.named_parameters()]
    for patterns in _patterns_of(trainer.trainable):
        patterns.check_matches(names)
    objective = build_objective(trainer.config, trainer.model)
    model = trainer.config.model
    if objective is not None and objective.teacher is not None:
        size = sum(t.numel() for t in objective.teacher.values())
        logger.info(
            "distillation: weight %g on the %s region; teacher = start values of %d trainable "
            "tensors (%.2f M parameters)",
            model.kd_weight, model.kd_on, len(objective.teacher), size / 1e6,
        )  # fmt: skip
    return objective


def replay_cuts(datamodule: Any, tokenizer: Any) -> CutSet | None:
    """The --replay-manifest cuts, tokenised and marked; None without replay."""
    if not datamodule.args.replay_manifest:
        return None
    from zipvoice.dataset.replay import load_replay_cuts

    token2id = tokenizer.token2id or {}
    return load_replay_cuts(datamodule.args, token2id, datamodule.check_first_cut)


def selection_callbacks(config: TrainingConfig) -> list[Callback]:
    metric = config.run.select_metric
    return [BestCheckpoint(metric)] if metric else []


def resume_selection(trainer: Trainer) -> None:
    for callback in trainer.callbacks:
        if isinstance(callback, BestCheckpoint):
            callback.restore(trainer.exp_dir, trainer.state.step)
