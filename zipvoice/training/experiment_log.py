"""What a run reports: the console and log file, tensorboard and wandb scalars."""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zipvoice.training.distributed import is_main
from zipvoice.utils.cli import LOG_FORMAT, setup_logging

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False


class ExperimentLog:
    """Scalars to tensorboard and wandb (rank 0 only); wandb runs offline unless logged in."""

    def __init__(
        self,
        exp_dir: Path,
        rank: int,
        run_id: str,
        *,
        tensorboard: bool,
        wandb_project: str | None,
        settings: Mapping[str, Any],
    ) -> None:
        self.tb = None
        self.wandb_run = None
        if not is_main(rank):
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(exp_dir / "tensorboard"))
        if wandb_project:
            os.environ.setdefault("WANDB_SILENT", "true")
            if "WANDB_MODE" not in os.environ and not wandb_logged_in():
                os.environ["WANDB_MODE"] = "offline"
                logger.info("wandb: not logged in, logging offline to %s/wandb", exp_dir)
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_project,
                dir=str(exp_dir),
                id=run_id,
                name=exp_dir.name,
                resume="allow",
                config={k: v for k, v in settings.items() if is_plain(v)},
            )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)

    def audio(
        self,
        clips: Mapping[str, np.ndarray],
        step: int,
        sample_rate: int,
        captions: Mapping[str, str] | None = None,
    ) -> None:
        """Mono float clips in [-1, 1] by tag, to listen to beside the curves."""
        import torch

        captions = captions or {}
        if self.tb is not None:
            for tag, wave in clips.items():
                self.tb.add_audio(tag, torch.from_numpy(wave).view(1, -1), step, sample_rate)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log(
                {
                    tag: wandb.Audio(wave, sample_rate=sample_rate, caption=captions.get(tag))
                    for tag, wave in clips.items()
                },
                step=step,
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def is_plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def setup_run_logging(exp_dir: Path, rank: int) -> logging.Handler | None:
    setup_logging()
    root = logging.getLogger()
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    # Other DDP ranks only report problems: the console shows one copy of the progress.
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log_dir = exp_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    handler = logging.FileHandler(log_dir / f"log-train-{stamp}-rank{rank}.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return handler


def log_model_summary(
    model: Any, setup: Any, use_lora: bool, use_dora: bool = False
) -> tuple[int, int]:
    """Log the parameter counts (and a vocabulary extension); return (trainable, total)."""
    from zipvoice.models.modules.lora_utils import count_parameters

    trainable, total = count_parameters(model)
    logger.info(
        "model: %s parameters, %s trainable (%.2f%%)%s",
        f"{total:,}",
        f"{trainable:,}",
        100.0 * trainable / total,
        f"; {'DoRA' if use_dora else 'LoRA'} on {len(setup.lora_targets)} decoder projections"
        if use_lora
        else "",
    )
    if setup.base_vocab_size and setup.vocab_size != setup.base_vocab_size:
        logger.info(
            "vocabulary extended from %d to %d tokens", setup.base_vocab_size, setup.vocab_size
        )
    return trainable, total


def log_progress(trainer: Trainer, total_steps: int | None) -> None:
    """The trainer's progress line (loss, running average, lr, steps/s, ETA) and, on rank 0,
    the same scalars in the experiment log (tensorboard/wandb)."""
    state = trainer.state
    start_time, start_step = trainer._start
    rate = (state.step - start_step) / max(time.monotonic() - start_time, 1e-9)
    remaining = (total_steps - state.step) / rate if total_steps and rate > 0 else 0
    lr = trainer.scheduler.get_last_lr()[0]
    logger.info(
        "epoch %d step %d%s | loss %.5f (avg %.5f) | lr %.2e | %.2f steps/s | ETA %s",
        state.epoch, state.step, f"/{total_steps}" if total_steps else "",
        trainer.last_loss, trainer._running_loss, lr, rate,
        format_eta(remaining) if total_steps else "-",
    )  # fmt: skip
    if is_main(trainer.rank):
        values = {"train/loss": trainer.last_loss, "train/lr": lr, **trainer.last_terms}
        if trainer.use_amp:
            values["train/grad_scale"] = trainer.scaler.get_scale()
        trainer.experiment.scalars(values, state.step)
