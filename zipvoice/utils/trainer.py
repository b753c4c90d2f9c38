"""Training loop for ZipVoice: full fine-tuning, or LoRA/DoRA adapters on the decoder.

`run_training(args)` is the whole program behind `zipvoice.bin.train_zipvoice`; the pieces it is
made of (model set-up, optimiser choice, loss, validation, checkpoints) are public so that tests
and notebooks can drive them directly.

Files in `--exp-dir`:
- `run_config.json`: the settings that define this run (see `RUN_IDENTITY_KEYS`);
- `checkpoint-{step}.pt`: trainable weights only, optimizer, scheduler, grad scaler, sampler
  and RNG states, and the step; written atomically, the newest `--keep-last-k` kept;
- `adapter-{step}/` and the final `adapter/` (LoRA runs, see `zipvoice.utils.adapter_io`), or
  `finetuned/` (`model.pt`, `model.json`, `tokens.txt`) for full fine-tuning;
- `log/`, `tensorboard/`, `wandb/`.

Resuming (`--resume`):
- `auto` (default): continue from the newest checkpoint in exp-dir when its run_config.json
  describes the same run (same model, base checkpoint, tokens, adapter and optimiser settings);
  a different run there is refused with the list of differences. Settings that only say how
  long or how verbosely to train (num-iters, save-every-n, logging, ...) may change.
- `never`: start from scratch; refused when exp-dir already holds checkpoints or adapters.
- a path to a checkpoint: continue from it deliberately, even if the settings changed (shapes
  must still fit); run_config.json is rewritten.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from zipvoice.models.loader import load_model_config
from zipvoice.models.modules.lora_utils import (
    apply_lora_to_model,
    count_parameters,
    create_lora_config,
    get_lora_target_modules,
    get_peft_decoder,
    is_lora_model,
    mutates_base_weights,
)
from zipvoice.utils.adapter_io import INITIAL_ADAPTER_DIR, fingerprint_state_dict, save_adapter
from zipvoice.utils.cli import LOG_FORMAT, fix_random_seed, setup_logging
from zipvoice.utils.fileio import atomic_copy, atomic_replace_dir, atomic_write_json
from zipvoice.utils.optim import Eden, LRScheduler, ScaledAdam, WarmupCosine

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
)


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def set_batch_count(model: nn.Module, batch_count: float) -> None:
    """Drive the model's ScheduledFloat schedules (dropout, skip rates, balancer probs)."""
    for module in model.modules():
        if hasattr(module, "batch_count"):
            module.batch_count = batch_count


def adjusted_batch_count(step: int, max_duration: float, world_size: int, ref_duration: float):
    """Batch count in units of `ref_duration` seconds of audio, as upstream's schedules expect."""
    return step * (max_duration * world_size) / ref_duration


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


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def _is_main(rank: int) -> bool:
    return rank == 0


# --------------------------------------------------------------------------------------------
# Model set-up
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSetup:
    model: nn.Module
    base_fingerprint: str
    base_vocab_size: int
    vocab_size: int
    pad_id: int
    lora_targets: list[str] = field(default_factory=list)
    lora_config: Any = None


def use_flow_matching_loss(model: nn.Module) -> None:
    """Make a ZipVoice-Distill model train with the plain flow-matching loss.

    The distilled decoder also takes a guidance scale; the conditional velocity that the loss
    targets is its output at guidance scale 0, so the scale is fed as 0. `model(...)` (also
    under DDP) then computes ZipVoice's loss instead of the distillation step.
    """
    from zipvoice.models.zipvoice import ZipVoice

    zero = torch.zeros(())
    base_forward_fm_decoder = type(model).forward_fm_decoder

    def forward_fm_decoder(self, *args: Any, **kwargs: Any) -> Tensor:
        kwargs.setdefault("guidance_scale", zero.to(kwargs.get("xt", args[1] if args else zero)))
        return base_forward_fm_decoder(self, *args, **kwargs)

    model.forward_fm_decoder = types.MethodType(forward_fm_decoder, model)
    model.forward = types.MethodType(ZipVoice.forward, model)


def check_tokens_extend_base(checkpoint: Path, token_file: Path) -> None:
    """A released model folder keeps tokens.txt beside model.pt: the training token file must
    give each of those tokens the same id, or the pretrained embedding rows change meaning
    (a token file made without --base-token-file)."""
    from zipvoice.tokenizer.token_file import check_token_prefix, read_token_file

    base_tokens = checkpoint.parent / "tokens.txt"
    if not base_tokens.is_file() or base_tokens.resolve() == token_file.resolve():
        return
    check_token_prefix(
        read_token_file(base_tokens), read_token_file(token_file), base_tokens, token_file
    )


def setup_model(
    args: argparse.Namespace, vocab_size: int, pad_id: int, model_config: Mapping[str, Any]
) -> ModelSetup:
    """Build the model, load the base checkpoint, attach adapters, choose what trains."""
    from zipvoice.models.loader import build_model
    from zipvoice.utils.checkpoint import load_checkpoint_state, load_model_state

    model = build_model(model_config, vocab_size, pad_id, distill=bool(args.distill))
    if args.checkpoint:
        state = load_checkpoint_state(args.checkpoint)
        base_fingerprint = fingerprint_state_dict(state)
        base_vocab_size = int(state["embed.weight"].shape[0]) if "embed.weight" in state else 0
        load_model_state(model, state, args.checkpoint, extend_embed=True)
        del state
        check_tokens_extend_base(Path(args.checkpoint), Path(args.token_file))
    else:
        if args.use_lora:
            raise TrainingError("--use-lora 1 needs the pretrained base model: pass --checkpoint")
        base_fingerprint = "none"
        base_vocab_size = vocab_size
    if args.distill:
        use_flow_matching_loss(model)

    setup = ModelSetup(model, base_fingerprint, base_vocab_size, vocab_size, pad_id)
    if args.use_lora:
        setup.lora_targets = get_lora_target_modules(model, args.lora_target_modules)
        setup.lora_config = create_lora_config(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            use_dora=bool(args.use_dora),
            target_modules=setup.lora_targets,
            init=args.lora_init,
            use_rslora=bool(args.use_rslora),
        )
        apply_lora_to_model(model, setup.lora_config)
        model.embed.weight.requires_grad_(True)
        for param in model.text_encoder.parameters():
            param.requires_grad_(bool(args.train_text_encoder))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
        if not args.train_text_encoder:
            for param in model.text_encoder.parameters():
                param.requires_grad_(False)
    return setup


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint must hold to restore the model: trainable weights only, plus the base
    weights that PiSSA/OLoRA rewrote (they are no longer the checkpoint's)."""
    model = unwrap_ddp(model)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    if is_lora_model(model) and mutates_base_weights(
        get_peft_decoder(model).peft_config["default"]
    ):
        for name, tensor in model.state_dict().items():
            if ".base_layer." in name:
                state[name] = tensor.detach().cpu().clone()
    return state


# Plain-Python attributes that modules change while training (Whiten switches its probability
# after each backward); they are part of the exact training state.
TRAINING_STATE_ATTRS = ("prob",)


def module_training_state(model: nn.Module) -> dict[str, dict[str, float]]:
    state: dict[str, dict[str, float]] = {}
    for name, module in unwrap_ddp(model).named_modules():
        values = {
            attr: float(getattr(module, attr))
            for attr in TRAINING_STATE_ATTRS
            if isinstance(getattr(module, attr, None), float)
        }
        if values:
            state[name] = values
    return state


def load_module_training_state(model: nn.Module, state: Mapping[str, Mapping[str, float]]) -> None:
    modules = dict(unwrap_ddp(model).named_modules())
    for name, values in state.items():
        module = modules.get(name)
        if module is None:
            continue
        for attr, value in values.items():
            setattr(module, attr, float(value))


def load_trainable_state(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    model = unwrap_ddp(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    if missing:
        raise TrainingError(
            f"{source} does not hold these trainable weights (different adapter settings?): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise TrainingError(f"{source} holds weights this model lacks: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise TrainingError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------


def resolve_optimizer_kind(args: argparse.Namespace) -> str:
    if args.optimizer != "auto":
        return args.optimizer
    return "adamw" if args.use_lora else "scaledadam"


# AdamW moves zero-initialised adapters at 1e-3; ScaledAdam's updates are relative to each
# parameter's RMS, so upstream's 0.02 is its scale.
DEFAULT_BASE_LR = {"adamw": 1e-3, "scaledadam": 0.02}


def resolve_base_lr(args: argparse.Namespace) -> float:
    """--base-lr when given, else the sane value for the optimiser in use."""
    if args.base_lr is not None:
        return args.base_lr
    return DEFAULT_BASE_LR[resolve_optimizer_kind(args)]


def resolve_warmup_steps(args: argparse.Namespace) -> int:
    if args.warmup_steps >= 0:
        return args.warmup_steps
    if args.num_iters > 0:
        return min(500, args.num_iters // 20)
    return 500


def build_optimizer(
    model: nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, LRScheduler, str]:
    """AdamW + warm-up + cosine for adapters; upstream's ScaledAdam + Eden for full training."""
    kind = resolve_optimizer_kind(args)
    params = [p for p in unwrap_ddp(model).parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen")
    lr = resolve_base_lr(args)
    if kind == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay
        )
        total = args.num_iters if (args.num_iters > 0 and args.lr_schedule == "cosine") else 0
        scheduler: LRScheduler = WarmupCosine(
            optimizer, warmup_steps=resolve_warmup_steps(args), total_steps=total
        )
    elif kind == "scaledadam":
        optimizer = ScaledAdam(params, lr=lr, clipping_scale=2.0)
        lr_epochs = args.lr_hours if args.lr_hours > 0 else args.lr_epochs
        scheduler = Eden(optimizer, args.lr_batches, lr_epochs)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return optimizer, scheduler, kind


# --------------------------------------------------------------------------------------------
# Loss and validation
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: list[list[int]]
    features: Tensor
    features_lens: Tensor
    cut_ids: list[str]


def prepare_batch(batch: Mapping[str, Any], tokenizer: Any, feat_scale: float, device) -> Batch:
    tokens = batch["tokens"]
    if tokens and tokens[0] and isinstance(tokens[0][0], str):
        tokens = tokenizer.tokens_to_token_ids(tokens)
    features = batch["features"].to(device) * feat_scale
    cut_ids = list(batch.get("cut_ids") or [])
    if not cut_ids and "cuts" in batch:
        cut_ids = [c.id for c in batch["cuts"]]
    return Batch(tokens, features, batch["features_lens"].to(device), cut_ids)


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


# --------------------------------------------------------------------------------------------
# Checkpoints and run identity
# --------------------------------------------------------------------------------------------


def list_checkpoints(exp_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in exp_dir.glob("checkpoint-*.pt"):
        match = CHECKPOINT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
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


def run_identity(args: argparse.Namespace, setup: ModelSetup, model_config: Mapping) -> dict:
    return {
        "model_config_content": model_config,
        "base_fingerprint": setup.base_fingerprint,
        "token_file_sha256": sha256_file(args.token_file),
        "tokenizer": args.tokenizer,
        "lang": args.lang,
        "distill": bool(args.distill),
        "finetune": bool(args.finetune),
        "use_lora": bool(args.use_lora),
        "lora_rank": args.lora_rank if args.use_lora else None,
        "lora_alpha": args.lora_alpha if args.use_lora else None,
        "use_dora": bool(args.use_dora) if args.use_lora else None,
        "lora_dropout": args.lora_dropout if args.use_lora else None,
        "lora_targets": setup.lora_targets,
        "lora_init": args.lora_init if args.use_lora else None,
        "use_rslora": bool(args.use_rslora) if args.use_lora else None,
        "train_text_encoder": bool(args.train_text_encoder),
        "optimizer_kind": resolve_optimizer_kind(args),
        "base_lr": args.base_lr,
        "seed": args.seed,
        "feat_scale": args.feat_scale,
        "condition_drop_ratio": args.condition_drop_ratio,
        "train_manifest": str(Path(args.train_manifest).resolve()) if args.train_manifest else None,
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


def choose_resume_checkpoint(
    args: argparse.Namespace, exp_dir: Path, identity: Mapping
) -> Path | None:
    """Apply the --resume policy (see module docstring); None means start fresh."""
    config_path = exp_dir / RUN_CONFIG_FILE
    old = None
    if config_path.is_file():
        try:
            old = json.loads(config_path.read_text(encoding="utf-8")).get("identity")
        except json.JSONDecodeError as err:
            raise TrainingError(f"{config_path} is not valid JSON: {err}") from err
    checkpoints = list_checkpoints(exp_dir)
    adapters = sorted(p.name for p in exp_dir.glob("adapter*") if p.is_dir())
    if args.resume not in ("auto", "never"):
        path = Path(args.resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume checkpoint {path} not found")
        return path
    if args.resume == "never":
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


# --------------------------------------------------------------------------------------------
# Experiment logging (console, tensorboard, wandb)
# --------------------------------------------------------------------------------------------


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

    def __init__(self, args: argparse.Namespace, exp_dir: Path, rank: int, run_id: str) -> None:
        self.tb = None
        self.wandb_run = None
        if not _is_main(rank):
            return
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(exp_dir / "tensorboard"))
        if args.wandb_project:
            os.environ.setdefault("WANDB_SILENT", "true")
            if "WANDB_MODE" not in os.environ and not wandb_logged_in():
                os.environ["WANDB_MODE"] = "offline"
                logger.info("wandb: not logged in, logging offline to %s/wandb", exp_dir)
            import wandb

            self.wandb_run = wandb.init(
                project=args.wandb_project,
                dir=str(exp_dir),
                id=run_id,
                name=exp_dir.name,
                resume="allow",
                config={k: v for k, v in vars(args).items() if _is_plain(v)},
            )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _is_plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, tuple))


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


# --------------------------------------------------------------------------------------------
# The training run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 1
    batches_in_epoch: int = 0  # consumed from the sampler this epoch, skipped ones included
    bad_batches: int = 0
    best_valid_loss: float = float("inf")


def run_training(
    args: argparse.Namespace, *, stop_after_step: int | None = None
) -> nn.Module | None:
    """Train on one process, or spawn `--world-size` DDP processes.

    Returns the trained model (adapters unmerged) for a single process, None for DDP.
    `stop_after_step` ends the run right after that step as if it were killed (no final save):
    a test hook for resuming.
    """
    validate_args(args)
    if args.world_size > 1:
        mp.spawn(
            _train_worker,
            args=(args.world_size, args, stop_after_step),
            nprocs=args.world_size,
            join=True,
        )
        return None
    return _train_worker(0, 1, args, stop_after_step)


def validate_args(args: argparse.Namespace) -> None:
    args.base_lr = resolve_base_lr(args)
    if args.base_lr <= 0:
        raise ValueError(f"--base-lr must be positive, got {args.base_lr}")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {args.world_size}")
    if args.num_iters <= 0 and args.num_epochs <= 0:
        raise ValueError("give a positive --num-iters or --num-epochs")
    for name in ("model_config", "token_file", "checkpoint"):
        value = getattr(args, name)
        if name == "checkpoint" and not value:
            continue
        if value and Path(value).is_dir():
            raise FileNotFoundError(
                f"--{name.replace('_', '-')} {value} is a directory, expected a file"
            )
        if not value or not Path(value).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {value} not found")
    # Train/dev manifests may be relative to --manifest-dir: the data module checks them.
    if args.forgetting_manifest and not Path(args.forgetting_manifest).is_file():
        raise FileNotFoundError(f"--forgetting-manifest {args.forgetting_manifest} not found")
    if args.max_bad_batches < 0:
        raise ValueError("--max-bad-batches must not be negative")


def _setup_logging(exp_dir: Path, rank: int) -> logging.Handler | None:
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


def _setup_distributed(rank: int, world_size: int, args: argparse.Namespace) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ["MASTER_PORT"] = str(args.master_port)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cpu":
            # Every process would otherwise start one thread per core: oversubscribed spinning.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // world_size))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return device


def sampler_state_after(sampler: Any, consumed: int) -> dict[str, Any]:
    """The sampler's state as if exactly `consumed` batches of this epoch had been drawn.

    DataLoader workers prefetch, so the sampler itself is a few batches ahead of training;
    lhotse restores a position by replaying the epoch's recorded batch count, so that count is
    set to what training actually consumed.
    """
    state = copy.deepcopy(sampler.state_dict())
    epoch = state.get("epoch")
    stats = state.get("diagnostics", {}).get("stats_per_epoch", {}).get(epoch)
    if stats is not None:
        stats["kept_batches"] = consumed
        stats["discarded_batches"] = 0
    return state


def _forgetting_loader(datamodule: Any, path: str | None):
    if not path:
        return None
    from lhotse import CutSet

    cuts = CutSet.from_file(path)
    datamodule._check_first_cut(cuts, path)  # noqa: SLF001 - same start-up check as dev cuts
    return datamodule.dev_dataloaders(cuts)


def _train_worker(
    rank: int, world_size: int, args: argparse.Namespace, stop_after_step: int | None
) -> nn.Module:
    exp_dir = Path(args.exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(exp_dir, rank)
    device = _setup_distributed(rank, world_size, args)
    opened: list[ExperimentLog] = []
    try:
        return _train(rank, world_size, args, device, exp_dir, stop_after_step, opened)
    finally:
        for experiment in opened:
            experiment.close()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()


def _all_ranks_agree(flag: bool, world_size: int, device: torch.device) -> bool:
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _train(
    rank: int,
    world_size: int,
    args: argparse.Namespace,
    device: torch.device,
    exp_dir: Path,
    stop_after_step: int | None,
    opened: list[ExperimentLog],
) -> nn.Module:
    from zipvoice.dataset.datamodule import TtsDataModule
    from zipvoice.tokenizer.tokenizer import get_tokenizer
    from zipvoice.utils.checkpoint import save_checkpoint

    fix_random_seed(args.seed)
    model_config = load_model_config(args.model_config)
    tokenizer = get_tokenizer(args.tokenizer, args.token_file, args.lang)
    vocab_size, pad_id = tokenizer.vocab_size, tokenizer.pad_id
    setup = setup_model(args, vocab_size, pad_id, model_config)
    model = setup.model
    trainable, total = count_parameters(model)
    logger.info(
        "model: %s parameters, %s trainable (%.2f%%)%s",
        f"{total:,}",
        f"{trainable:,}",
        100.0 * trainable / total,
        f"; {'DoRA' if args.use_dora else 'LoRA'} on {len(setup.lora_targets)} decoder projections"
        if args.use_lora
        else "",
    )
    if setup.base_vocab_size and vocab_size != setup.base_vocab_size:
        logger.info("vocabulary extended from %d to %d tokens", setup.base_vocab_size, vocab_size)

    identity = run_identity(args, setup, model_config)
    resume_path = None
    if _is_main(rank):
        resume_path = choose_resume_checkpoint(args, exp_dir, identity)
        remove_unfinished_saves(exp_dir)
    if world_size > 1:
        shared = [str(resume_path) if resume_path else None]
        dist.broadcast_object_list(shared, src=0)
        resume_path = Path(shared[0]) if shared[0] else None
    checkpoint = load_training_checkpoint(resume_path) if resume_path else None

    initial_adapter_dir = None
    if args.use_lora and mutates_base_weights(setup.lora_config):
        initial_adapter_dir = exp_dir / INITIAL_ADAPTER_DIR
        if _is_main(rank) and checkpoint is None:
            atomic_replace_dir(
                initial_adapter_dir, lambda tmp: get_peft_decoder(model).save_pretrained(str(tmp))
            )

    use_amp = bool(args.use_fp16) and device.type == "cuda"
    if args.use_fp16 and not use_amp:
        logger.info("--use-fp16 1 ignored: fp16 autocast needs CUDA; training in float32")

    state = TrainState()
    model_avg: dict[str, Tensor] | None = None
    if checkpoint is not None:
        load_trainable_state(model, checkpoint["model"], str(resume_path))
        load_module_training_state(model, checkpoint.get("module_state") or {})
        state = TrainState(
            step=int(checkpoint["step"]),
            epoch=int(checkpoint.get("epoch", 1)),
            batches_in_epoch=int(checkpoint.get("batches_in_epoch", 0)),
            bad_batches=int(checkpoint.get("bad_batches", 0)),
            best_valid_loss=float(checkpoint.get("best_valid_loss", float("inf"))),
        )
        logger.info("resuming from %s at step %d", resume_path, state.step)
    if _is_main(rank):
        if checkpoint is not None and checkpoint.get("model_avg") is not None:
            model_avg = {k: v.clone() for k, v in checkpoint["model_avg"].items()}
        else:
            model_avg = {
                n: p.detach().to("cpu", torch.float64).clone()
                for n, p in model.named_parameters()
                if p.requires_grad
            }

    model.to(device)
    if world_size > 1:
        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    optimizer, scheduler, optimizer_kind = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("grad_scaler"):
            scaler.load_state_dict(checkpoint["grad_scaler"])
    logger.info(
        "optimizer %s, base lr %g%s", optimizer_kind, args.base_lr, ", fp16" if use_amp else ""
    )
    if optimizer_kind == "adamw":
        logger.info(
            "AdamW schedule: %d warm-up steps, then %s (--lr-hours/--lr-batches/--lr-epochs "
            "apply to ScaledAdam + Eden only)",
            resolve_warmup_steps(args),
            "cosine decay" if getattr(scheduler, "total_steps", 0) else "constant",
        )

    datamodule = TtsDataModule(args, tokenizer=tokenizer)
    train_cuts, dev_cuts = datamodule.train_cuts(), datamodule.dev_cuts()
    sampler_state = checkpoint.get("sampler") if checkpoint is not None else None
    train_dl = datamodule.train_dataloaders(train_cuts, sampler_state_dict=sampler_state)
    dev_dl = datamodule.dev_dataloaders(dev_cuts)
    forgetting_dl = _forgetting_loader(datamodule, args.forgetting_manifest)

    run_id = hashlib.sha1(str(exp_dir.resolve()).encode()).hexdigest()[:12]
    if _is_main(rank):
        atomic_write_json(
            exp_dir / RUN_CONFIG_FILE,
            {"identity": identity, "args": {k: v for k, v in vars(args).items() if _is_plain(v)}},
        )
        atomic_copy(args.model_config, exp_dir / "model.json")
        atomic_copy(args.token_file, exp_dir / "tokens.txt")
    experiment = ExperimentLog(args, exp_dir, rank, run_id)
    opened.append(experiment)
    if _is_main(rank) and trainable:
        experiment.scalars({"params/trainable": trainable, "params/total": total}, state.step)

    rng_to_restore = None
    if checkpoint is not None:
        rng_states = checkpoint.get("rng") or []
        if len(rng_states) == world_size:
            rng_to_restore = rng_states[rank]
        else:
            fix_random_seed(args.seed + 1000 * rank + state.step)
    else:
        fix_random_seed(args.seed + 1000 * rank)
    del checkpoint

    adapter_extra = {
        "tokenizer": args.tokenizer,
        "lang": args.lang,
        "base_vocab_size": setup.base_vocab_size,
        "pad_id": pad_id,
        "base_checkpoint": str(args.checkpoint),
        "distill": bool(args.distill),
    }

    def save_point(final: bool) -> None:
        """Like write_save_point, but a failed write (a full disk) stops the run with a message
        that says which checkpoint is still intact to resume from."""
        try:
            write_save_point(final)
        except OSError as err:
            newest = list_checkpoints(exp_dir)
            intact = (
                f"the newest complete checkpoint, {newest[-1][1]}, is intact"
                if newest
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"saving step {state.step} (checkpoint-{state.step}.pt and its adapter) in "
                f"{exp_dir} failed: {err}. Nothing was half-written: {intact}; free some space "
                "and rerun the same command to resume"
            ) from err

    def write_save_point(final: bool) -> None:
        """Checkpoint + adapter (or full model) at the current step; rank 0 writes."""
        rng = get_rng_state()
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if not _is_main(rank):
            return
        raw = unwrap_ddp(model)
        checkpoint_path = exp_dir / f"checkpoint-{state.step}.pt"
        save_checkpoint(
            {
                "model": trainable_state_dict(raw),
                "model_avg": model_avg,
                "module_state": module_training_state(raw),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict() if use_amp else None,
                "sampler": sampler_state_after(train_dl.sampler, state.batches_in_epoch),
                "rng": gathered,
                "step": state.step,
                "epoch": state.epoch,
                "batches_in_epoch": state.batches_in_epoch,
                "bad_batches": state.bad_batches,
                "best_valid_loss": state.best_valid_loss,
                "identity": identity,
            },
            checkpoint_path,
        )
        prune_checkpoints(exp_dir, args.keep_last_k)
        name = "adapter" if final else f"adapter-{state.step}"
        if is_lora_model(raw):
            save_adapter(
                raw,
                exp_dir / name,
                base_fingerprint=setup.base_fingerprint,
                token_file=args.token_file,
                model_config=model_config,
                extra={**adapter_extra, "step": state.step},
                initial_adapter_dir=initial_adapter_dir,
            )
        elif final:
            _save_full_model(raw, exp_dir / "finetuned", args, model_config)
        logger.info(
            "saved %s%s", checkpoint_path.name, f" and {name}/" if is_lora_model(raw) else ""
        )

    def validate() -> None:
        valid_loss = compute_validation_loss(
            model,
            dev_dl,
            tokenizer=tokenizer,
            feat_scale=args.feat_scale,
            device=device,
            seed=args.seed,
            world_size=world_size,
        )
        values = {"valid/loss": valid_loss}
        state.best_valid_loss = min(state.best_valid_loss, valid_loss)
        message = f"step {state.step}: validation loss {valid_loss:.5f}"
        if forgetting_dl is not None:
            forgetting_loss = compute_validation_loss(
                model,
                forgetting_dl,
                tokenizer=tokenizer,
                feat_scale=args.feat_scale,
                device=device,
                seed=args.seed,
                world_size=world_size,
            )
            values["valid/forgetting_loss"] = forgetting_loss
            message += f", forgetting-set loss {forgetting_loss:.5f}"
        logger.info(message)
        if _is_main(rank):
            experiment.scalars(values, state.step)

    total_steps = args.num_iters if args.num_iters > 0 else None
    num_epochs = args.num_epochs if args.num_iters <= 0 else sys.maxsize
    lr_hours_mode = optimizer_kind == "scaledadam" and args.lr_hours > 0
    trainable_params = [p for p in unwrap_ddp(model).parameters() if p.requires_grad]
    model.train()
    start_time = time.monotonic()
    start_step = state.step
    running_loss: float | None = None
    if state.step == 0 and args.valid_interval > 0:
        validate()
    finished = total_steps is not None and state.step >= total_steps

    restored_mid_epoch = sampler_state is not None
    while not finished and state.epoch <= num_epochs:
        if not restored_mid_epoch:
            # lhotse counts epochs from 0; a restored sampler already sits in its epoch.
            train_dl.sampler.set_epoch(state.epoch - 1)
            state.batches_in_epoch = 0
        # A checkpoint saved on an epoch's last batch restores a sampler with nothing left.
        may_be_empty, restored_mid_epoch = restored_mid_epoch, False
        saw_batch = False
        batches = iter(train_dl)
        if rng_to_restore is not None:
            # Starting the DataLoader draws from the global RNG; the saved state was taken
            # after that draw, so restore it only now.
            set_rng_state(rng_to_restore)
            rng_to_restore = None
        for raw_batch in batches:
            saw_batch = True
            state.batches_in_epoch += 1
            batch = prepare_batch(raw_batch, tokenizer, args.feat_scale, device)
            count = adjusted_batch_count(
                state.step, args.max_duration, world_size, args.ref_duration
            )
            set_batch_count(model, count + (100000 if args.finetune else 0))
            scheduler.step_batch(state.step)
            if lr_hours_mode:
                scheduler.step_epoch(state.step * args.max_duration * world_size / 3600)

            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = flow_matching_loss(
                    model, batch, condition_drop_ratio=args.condition_drop_ratio
                )
            if not _all_ranks_agree(bool(torch.isfinite(loss)), world_size, device):
                state.bad_batches += 1
                logger.warning(
                    "non-finite loss (%s) at step %d, skipping batch; cuts: %s (%d/%d bad)",
                    float(loss.detach()),
                    state.step,
                    ", ".join(batch.cut_ids) or "?",
                    state.bad_batches,
                    args.max_bad_batches,
                )
                optimizer.zero_grad(set_to_none=True)
                if state.bad_batches > args.max_bad_batches:
                    raise TrainingError(
                        f"stopping: {state.bad_batches} batches with non-finite loss exceed "
                        f"--max-bad-batches {args.max_bad_batches}; the last checkpoint in "
                        f"{exp_dir} is intact"
                    )
                continue
            backward_and_step(
                loss, scaler, optimizer, optimizer_kind, trainable_params, args.grad_clip
            )
            state.step += 1

            loss_value = float(loss.detach())
            running_loss = (
                loss_value if running_loss is None else 0.9 * running_loss + 0.1 * loss_value
            )
            if _is_main(rank) and model_avg is not None and state.step % args.average_period == 0:
                _update_average(model_avg, unwrap_ddp(model), state.step, args.average_period)
            if state.step % args.log_interval == 0 or state.step == total_steps:
                elapsed = time.monotonic() - start_time
                rate = (state.step - start_step) / max(elapsed, 1e-9)
                remaining = (total_steps - state.step) / rate if total_steps and rate > 0 else 0
                lr = scheduler.get_last_lr()[0]
                logger.info(
                    "epoch %d step %d%s | loss %.5f (avg %.5f) | lr %.2e | %.2f steps/s | ETA %s",
                    state.epoch,
                    state.step,
                    f"/{total_steps}" if total_steps else "",
                    loss_value,
                    running_loss,
                    lr,
                    rate,
                    _format_eta(remaining) if total_steps else "-",
                )
                if _is_main(rank):
                    values = {"train/loss": loss_value, "train/lr": lr}
                    if use_amp:
                        values["train/grad_scale"] = scaler.get_scale()
                    experiment.scalars(values, state.step)
            if args.valid_interval > 0 and state.step % args.valid_interval == 0:
                validate()
            finished = total_steps is not None and state.step >= total_steps
            if args.save_every_n > 0 and state.step % args.save_every_n == 0 and not finished:
                save_point(final=False)
            if stop_after_step is not None and state.step >= stop_after_step:
                logger.info("stopping after step %d (test hook)", state.step)
                return unwrap_ddp(model)
            if finished:
                break
        if not saw_batch and not may_be_empty:
            raise TrainingError("the training set yielded no batches (check --max-duration)")
        if not finished:
            state.epoch += 1

    if args.valid_interval <= 0 or state.step % args.valid_interval != 0:
        validate()
    save_point(final=True)
    logger.info("training finished at step %d", state.step)
    return unwrap_ddp(model)


@torch.no_grad()
def _update_average(avg: dict[str, Tensor], model: nn.Module, step: int, period: int) -> None:
    """avg = cur * period/step + avg * (step-period)/step, for trainable weights only."""
    weight_cur = period / step
    weight_avg = 1.0 - weight_cur
    for name, param in model.named_parameters():
        if name in avg:
            avg[name].mul_(weight_avg).add_(
                param.detach().to("cpu", torch.float64), alpha=weight_cur
            )


def _save_full_model(
    model: nn.Module, out_dir: Path, args: argparse.Namespace, model_config: Mapping
) -> None:
    """A released-format folder (model.pt, model.json, tokens.txt) from full fine-tuning."""
    from zipvoice.utils.checkpoint import save_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint({"model": state}, out_dir / "model.pt")
    atomic_write_json(out_dir / "model.json", dict(model_config))
    atomic_copy(args.token_file, out_dir / "tokens.txt")
