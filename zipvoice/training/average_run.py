"""Averaging a finished (or running) exp-dir: what `zipvoice.bin.generate_averaged_model` runs.

Upstream's layout (`epoch-N.pt` / `checkpoint-N.pt` holding the whole model) gives
`epoch-E-avg-A.pt` / `iter-I-avg-A.pt` (`{"model": state_dict}`), as upstream writes them. This
project's checkpoints hold the trainable weights only, so the run is rebuilt from its
`run_config.json` (base model + adapters) and the average written as the run would write it:
an adapter folder `iter-I-avg-A/` for LoRA runs, `iter-I-avg-A.pt` for full fine-tuning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from zipvoice.utils.averaging import (
    AveragingError,
    average_checkpoints,
    checkpoint_step,
    epoch_checkpoints,
    iteration_checkpoints,
)

logger = logging.getLogger("zipvoice.train")

MODEL_NAMES = ("zipvoice", "zipvoice_distill")


def generate_averaged_model(
    exp_dir: str | Path,
    *,
    epoch: int = 11,
    iteration: int = 0,
    avg: int = 4,
    model_name: str = "zipvoice",
    use_averaged_model: bool = True,
) -> Path:
    """Average `avg` checkpoints ending at `checkpoint-{iteration}.pt` (if > 0) or at
    `epoch-{epoch}.pt`; returns the written file or folder. With `use_averaged_model` (upstream's
    way) the running averages of the range's two ends give the mean over every
    --average-period step in between; else the `avg` checkpoints' weights are averaged."""
    from zipvoice.utils.checkpoint import read_checkpoint_file

    exp_dir = Path(exp_dir)
    if avg < 1:
        raise AveragingError(f"--avg must be at least 1, got {avg}")
    if model_name not in MODEL_NAMES:
        raise AveragingError(f"--model-name {model_name}: this project has {MODEL_NAMES}")
    count = avg + 1 if use_averaged_model else avg
    if iteration > 0:
        paths = iteration_checkpoints(exp_dir, iteration, count)
        name = f"iter-{iteration}-avg-{avg}"
    else:
        paths = epoch_checkpoints(exp_dir, epoch, count)
        name = f"epoch-{epoch}-avg-{avg}"
    checkpoints = [read_checkpoint_file(path) for path in paths]
    for path, checkpoint in zip(paths, checkpoints, strict=True):
        logger.info("averaging %s (step %d)", path.name, checkpoint_step(checkpoint))
    averaged = average_checkpoints(checkpoints, use_averaged_model)
    if "identity" in checkpoints[-1]:
        return _write_project_average(exp_dir, name, averaged, checkpoint_step(checkpoints[-1]))
    return _write_upstream_average(exp_dir, name, averaged, model_name == "zipvoice_distill")


def _write_upstream_average(
    exp_dir: Path, name: str, averaged: dict[str, Tensor], distill: bool
) -> Path:
    """Whole-model checkpoints: check the average fits exp-dir's model.json, write it."""
    from zipvoice.models.loader import build_model, load_model_config
    from zipvoice.tokenizer.tokenizer import SimpleTokenizer
    from zipvoice.utils.checkpoint import load_model_state, save_checkpoint

    # Only the vocabulary's size and padding id matter here, as upstream notes.
    tokens = SimpleTokenizer(exp_dir / "tokens.txt")
    model = build_model(
        load_model_config(exp_dir / "model.json"), tokens.vocab_size, tokens.pad_id, distill
    )
    load_model_state(model, averaged, exp_dir / name, extend_embed=False)
    out = exp_dir / f"{name}.pt"
    save_checkpoint({"model": model.state_dict()}, out)
    logger.info("wrote %s", out)
    return out


def _write_project_average(
    exp_dir: Path, name: str, averaged: dict[str, Tensor], step: int
) -> Path:
    """Trainable-weights checkpoints: rebuild the run (base + adapters), load the average into
    it and write the run's product from it."""
    from zipvoice.models.modules.adapter_folder import INITIAL_ADAPTER_DIR
    from zipvoice.models.modules.lora_utils import is_lora_model
    from zipvoice.tokenizer.tokenizer import SimpleTokenizer
    from zipvoice.training import checkpoints as ckpt
    from zipvoice.training.config import TrainingConfig
    from zipvoice.training.model_setup import load_trainable_state, setup_model
    from zipvoice.utils.checkpoint import save_checkpoint

    run_file = exp_dir / ckpt.RUN_CONFIG_FILE
    if not run_file.is_file():
        raise AveragingError(f"{run_file} not found: cannot rebuild the run's model")
    args: dict[str, Any] | None = ckpt.read_run_config(run_file).get("args")
    if args is None:
        raise AveragingError(f'{run_file} has no "args": cannot rebuild the run\'s model')
    config = TrainingConfig.from_flags(args)
    model_config = json.loads((exp_dir / "model.json").read_text(encoding="utf-8"))
    tokens = SimpleTokenizer(config.model.token_file)
    setup = setup_model(config, tokens.vocab_size, tokens.pad_id, model_config)
    load_trainable_state(setup.model, averaged, f"average of {exp_dir}")
    if is_lora_model(setup.model):
        initial = exp_dir / INITIAL_ADAPTER_DIR
        out = exp_dir / name
        ckpt.save_run_adapter(
            setup.model, out, config, setup, model_config, step=step,
            initial_adapter_dir=initial if initial.is_dir() else None,
        )  # fmt: skip
    else:
        out = exp_dir / f"{name}.pt"
        save_checkpoint({"model": setup.model.state_dict()}, out)
    logger.info("wrote %s", out)
    return out
