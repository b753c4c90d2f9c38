"""Checkpoints, resuming and the identity of a run (see `zipvoice.training.trainer`).

A run's identity (`RUN_IDENTITY_KEYS`) is what it computes; `choose_resume_checkpoint` applies
the `--resume` policy with it:
- `auto` (default): continue from the newest checkpoint in exp-dir when its run_config.json
  describes the same run; a different run there is refused with the list of differences.
  Settings that only say how long or how verbosely to train (num-iters, save-every-n, logging,
  ...) may change.
- `never`: start from scratch; refused when exp-dir already holds checkpoints or adapters.
- a path to a checkpoint: continue from it deliberately, even if the settings changed (shapes
  must still fit); run_config.json is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zipvoice.training.config import TrainingConfig, TrainingError
from zipvoice.utils.fileio import atomic_copy, atomic_write_json
from zipvoice.utils.manifest import write_manifest

logger = logging.getLogger("zipvoice.train")

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
RUN_CONFIG_FILE = "run_config.json"
# Settings that define what a run computes; a resume with any of them changed would silently
# mix two different trainings.
RUN_IDENTITY_KEYS = (
    "model_config_content",
    "base_fingerprint",
    "token_file_sha256",
    "tokenizer",
    "lang",
    "distill",
    "finetune",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "use_dora",
    "lora_dropout",
    "lora_targets",
    "lora_init",
    "use_rslora",
    "train_text_encoder",
    "optimizer_kind",
    "base_lr",
    "seed",
    "feat_scale",
    "condition_drop_ratio",
    "train_manifest",
    "replay_manifest",
    "replay_ratio",
    "replay_tokenizer",
    "kd_weight",
    "kd_on",
    "trainable_modules",
    "freeze_modules",
)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def get_rng_state() -> dict[str, Any]:
    """All RNG states in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 1
    batches_in_epoch: int = 0  # consumed from the sampler this epoch, skipped ones included
    bad_batches: int = 0
    best_valid_loss: float = float("inf")

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainState:
        return cls(
            step=int(checkpoint["step"]),
            epoch=int(checkpoint.get("epoch", 1)),
            batches_in_epoch=int(checkpoint.get("batches_in_epoch", 0)),
            bad_batches=int(checkpoint.get("bad_batches", 0)),
            best_valid_loss=float(checkpoint.get("best_valid_loss", float("inf"))),
        )


def save_run_adapter(
    model: nn.Module,
    out_dir: Path,
    config: TrainingConfig,
    setup: Any,
    model_config: Mapping,
    *,
    step: int,
    initial_adapter_dir: Path | None,
) -> None:
    """The adapter folder of this run at `step` (see zipvoice.models.modules.adapter_folder),
    with the run's text front end and base recorded beside the adapter settings."""
    from zipvoice.models.modules.adapter_folder import save_adapter

    model_cfg = config.model
    save_adapter(
        model,
        out_dir,
        base_fingerprint=setup.base_fingerprint,
        token_file=model_cfg.token_file,
        model_config=model_config,
        extra={
            "tokenizer": model_cfg.tokenizer,
            "lang": model_cfg.lang,
            "base_vocab_size": setup.base_vocab_size,
            "pad_id": setup.pad_id,
            "base_checkpoint": str(model_cfg.checkpoint),
            "distill": bool(model_cfg.distill),
            "step": step,
        },
        initial_adapter_dir=initial_adapter_dir,
    )


def save_failure(exp_dir: Path, step: int, err: OSError) -> TrainingError:
    """The error for a save that failed (a full disk): what is still intact to resume from."""
    newest = list_checkpoints(exp_dir)
    intact = (
        f"the newest complete checkpoint, {newest[-1][1]}, is intact"
        if newest
        else "no checkpoint was written yet"
    )
    return TrainingError(
        f"saving step {step} (checkpoint-{step}.pt and its adapter) in {exp_dir} "
        f"failed: {err}. Nothing was half-written: {intact}; free some space "
        "and rerun the same command to resume"
    )


def list_checkpoints(exp_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in exp_dir.glob("checkpoint-*.pt"):
        match = CHECKPOINT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    from zipvoice.utils.manifest import verify_file

    verify_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise TrainingError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(checkpoint, dict) or "step" not in checkpoint or "model" not in checkpoint:
        raise TrainingError(f"{path} is not a training checkpoint of this trainer")
    return checkpoint


def remove_unfinished_saves(exp_dir: Path) -> None:
    """Delete the temporary files and folders of saves that a kill interrupted (atomic writes
    name them `.tmp-*` beside their target); the finished files never depend on them."""
    leftovers = sorted(exp_dir.glob(".tmp-*"))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if leftovers:
        logger.warning(
            "removed %d unfinished save(s) left by an interrupted run: %s",
            len(leftovers),
            ", ".join(p.name for p in leftovers),
        )


def prune_checkpoints(exp_dir: Path, keep_last_k: int) -> None:
    if keep_last_k <= 0:
        return
    for _, path in list_checkpoints(exp_dir)[:-keep_last_k]:
        path.unlink(missing_ok=True)


def run_identity(
    config: TrainingConfig, base_fingerprint: str, lora_targets: list[str], model_config: Mapping
) -> dict:
    """The settings that define what this run computes (RUN_IDENTITY_KEYS)."""
    lora, use_lora = config.adapter.lora, config.adapter.use_lora
    manifest = config.data.train_manifest
    return {
        "model_config_content": model_config,
        "base_fingerprint": base_fingerprint,
        "token_file_sha256": sha256_file(config.model.token_file),
        "tokenizer": config.model.tokenizer,
        "lang": config.model.lang,
        "distill": bool(config.model.distill),
        "finetune": bool(config.model.finetune),
        "use_lora": bool(use_lora),
        "lora_rank": lora.rank if use_lora else None,
        "lora_alpha": lora.alpha if use_lora else None,
        "use_dora": bool(lora.use_dora) if use_lora else None,
        "lora_dropout": lora.dropout if use_lora else None,
        "lora_targets": lora_targets,
        "lora_init": lora.init if use_lora else None,
        "use_rslora": bool(lora.use_rslora) if use_lora else None,
        "train_text_encoder": bool(config.model.train_text_encoder),
        "optimizer_kind": config.optimizer_kind,
        "base_lr": config.base_lr,
        "seed": config.run.seed,
        "feat_scale": config.model.feat_scale,
        "condition_drop_ratio": config.model.condition_drop_ratio,
        "train_manifest": str(Path(manifest).resolve()) if manifest else None,
        **_forgetting_identity(config),
    }


def _forgetting_identity(config: TrainingConfig) -> dict:
    """Replay, distillation and freezing change what a run computes; None when off, so runs
    from before these options keep their identity."""
    data, model = config.data, config.model
    replay = data.replay_manifest
    return {
        "replay_manifest": str(Path(replay).resolve()) if replay else None,
        "replay_ratio": data.replay_ratio if replay else None,
        "replay_tokenizer": data.replay_tokenizer if replay else None,
        "kd_weight": model.kd_weight if model.kd_weight > 0 else None,
        "kd_on": model.kd_on if model.kd_weight > 0 else None,
        "trainable_modules": model.trainable_modules or None,
        "freeze_modules": model.freeze_modules or None,
    }


def identity_differences(old: Mapping, new: Mapping) -> list[str]:
    diffs = []
    for key in RUN_IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            if key in ("model_config_content", "lora_targets"):
                diffs.append(f"{key} differs")
            else:
                diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def read_run_config(path: Path) -> dict[str, Any]:
    """An exp-dir's run_config.json: a JSON object whose "identity" and "args", where present,
    are objects too. A hand-edited or foreign file is refused in one line naming it, before
    anything reads a key of it (a list or a number there would fail far from the cause)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise TrainingError(f"{path} is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise TrainingError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise TrainingError(
            f"{path} holds a JSON {type(content).__name__}, not the object "
            '{"identity": {...}, "args": {...}} that training writes there; move it away or use '
            "another --exp-dir"
        )
    for key in ("identity", "args"):
        if key in content and not isinstance(content[key], dict):
            raise TrainingError(
                f'{path}: "{key}" holds a JSON {type(content[key]).__name__}, not an object; '
                "move the file away or use another --exp-dir"
            )
    return content


def choose_resume_checkpoint(resume: str, exp_dir: Path, identity: Mapping) -> Path | None:
    """Apply the --resume policy (see module docstring); None means start fresh."""
    config_path = exp_dir / RUN_CONFIG_FILE
    old = read_run_config(config_path).get("identity") if config_path.is_file() else None
    checkpoints = list_checkpoints(exp_dir)
    adapters = sorted(p.name for p in exp_dir.glob("adapter*") if p.is_dir())
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume checkpoint {path} not found")
        return path
    if resume == "never":
        if checkpoints or adapters:
            raise TrainingError(
                f"{exp_dir} already holds a run ({len(checkpoints)} checkpoints, "
                f"{', '.join(adapters) or 'no adapters'}); --resume never would overwrite it: "
                "use a new --exp-dir or remove the old one"
            )
        return None
    if old is not None and old != dict(identity):
        diffs = identity_differences(old, identity)
        if diffs and (checkpoints or adapters):
            raise TrainingError(
                f"{exp_dir} holds a different run ({'; '.join(diffs)}). Use a new --exp-dir, "
                "or pass --resume <checkpoint> to continue that checkpoint with these settings"
            )
    if not checkpoints:
        return None
    # Checkpoints are written atomically, so any present file is complete; still fall back to
    # an older one if the newest cannot be read.
    for _, path in reversed(checkpoints):
        try:
            load_training_checkpoint(path)
            return path
        except TrainingError as err:
            logger.warning("skipping unreadable checkpoint: %s", err)
    raise TrainingError(f"no readable checkpoint in {exp_dir}")


@torch.no_grad()
def update_average(avg: dict[str, Tensor], model: nn.Module, step: int, period: int) -> None:
    """avg = cur * period/step + avg * (step-period)/step, for trainable weights only."""
    weight_cur = period / step
    weight_avg = 1.0 - weight_cur
    for name, param in model.named_parameters():
        if name in avg:
            avg[name].mul_(weight_avg).add_(
                param.detach().to("cpu", torch.float64), alpha=weight_cur
            )


def save_full_model(
    model: nn.Module, out_dir: Path, token_file: str, model_config: Mapping
) -> None:
    """A released-format folder (model.pt, model.json, tokens.txt) from full fine-tuning."""
    from zipvoice.models.modules.adapter_folder import fingerprint_state_dict
    from zipvoice.utils.checkpoint import save_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint({"model": state}, out_dir / "model.pt")
    atomic_write_json(out_dir / "model.json", dict(model_config))
    atomic_copy(token_file, out_dir / "tokens.txt")
    write_manifest(out_dir, "model", base_fingerprint=fingerprint_state_dict(state))


def write_run_manifest(exp_dir: Path, base_fingerprint: str) -> None:
    """The exp-dir's manifest: its checkpoints, model.json and tokens.txt (docs/integrity.md)."""
    run_files = [path.name for _, path in list_checkpoints(exp_dir)]
    run_files += ["model.json", "tokens.txt"]
    write_manifest(exp_dir, "exp-dir", base_fingerprint=base_fingerprint, files=run_files)
