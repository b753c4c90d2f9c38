"""Building the model a run trains: base checkpoint, adapters, and which parameters train.

Which parameters train is decided in two layers: the configuration's defaults (adapters and
the embedding with `use_lora`, the text encoder when `train_text_encoder`, everything in full
fine-tuning), then an optional `trainable(name)` predicate that a recipe passes to the Trainer
to narrow that set (a parameter trains when both say so). Names are the model's own
(`fm_decoder.encoders.0...`, `text_encoder...`, `embed.weight`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zipvoice.models.modules.adapter_folder import fingerprint_state_dict
from zipvoice.models.modules.lora_utils import (
    apply_lora_to_model,
    get_lora_target_modules,
    get_peft_decoder,
    is_lora_model,
    mutates_base_weights,
    peft_config_from_settings,
)
from zipvoice.training.config import TrainingConfig, TrainingError
from zipvoice.training.distributed import unwrap_ddp

TrainablePredicate = Callable[[str], bool]


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


def _load_base(model: nn.Module, config: TrainingConfig, vocab_size: int) -> tuple[str, int]:
    """Load the base checkpoint into `model`; return (its fingerprint, its vocabulary size)."""
    from zipvoice.utils.checkpoint import load_checkpoint_state, load_model_state

    checkpoint = config.model.checkpoint
    if not checkpoint:
        if config.adapter.use_lora:
            raise TrainingError("--use-lora 1 needs the pretrained base model: pass --checkpoint")
        return "none", vocab_size
    state = load_checkpoint_state(checkpoint)
    fingerprint = fingerprint_state_dict(state)
    base_vocab_size = int(state["embed.weight"].shape[0]) if "embed.weight" in state else 0
    load_model_state(model, state, checkpoint, extend_embed=True)
    del state
    check_tokens_extend_base(Path(checkpoint), Path(config.model.token_file))
    return fingerprint, base_vocab_size


def _choose_trainable(model: nn.Module, config: TrainingConfig) -> None:
    """The configuration's default choice of trainable parameters (module docstring)."""
    train_text = bool(config.model.train_text_encoder)
    if config.adapter.use_lora:
        model.embed.weight.requires_grad_(True)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    for param in model.text_encoder.parameters():
        param.requires_grad_(train_text)


def setup_model(
    config: TrainingConfig,
    vocab_size: int,
    pad_id: int,
    model_config: Mapping[str, Any],
    trainable: TrainablePredicate | None = None,
) -> ModelSetup:
    """Build the model, load the base checkpoint, attach adapters, choose what trains."""
    from zipvoice.models.loader import build_model

    distill = bool(config.model.distill)
    model = build_model(model_config, vocab_size, pad_id, distill=distill)
    base_fingerprint, base_vocab_size = _load_base(model, config, vocab_size)
    if distill:
        use_flow_matching_loss(model)
    setup = ModelSetup(model, base_fingerprint, base_vocab_size, vocab_size, pad_id)
    if config.adapter.use_lora:
        settings = config.adapter.lora
        setup.lora_targets = get_lora_target_modules(model, settings.target_modules)
        setup.lora_config = peft_config_from_settings(settings, setup.lora_targets)
        apply_lora_to_model(model, setup.lora_config)
    _choose_trainable(model, config)
    if trainable is not None:
        for name, param in model.named_parameters():
            if param.requires_grad and not trainable(name):
                param.requires_grad_(False)
    return setup


def save_initial_adapter(model: nn.Module, exp_dir: Path, write: bool) -> Path:
    """PiSSA/OLoRA: PEFT's snapshot of the adapter before training, which saving needs to
    convert trained adapters back onto the original base (see adapter_folder). `write` is
    False on other DDP ranks and when resuming (the snapshot is already there)."""
    from zipvoice.models.modules.adapter_folder import INITIAL_ADAPTER_DIR
    from zipvoice.utils.fileio import atomic_replace_dir

    path = exp_dir / INITIAL_ADAPTER_DIR
    if write:
        decoder = get_peft_decoder(model)
        atomic_replace_dir(path, lambda tmp: decoder.save_pretrained(str(tmp)))
    return path


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
    """Copy a checkpoint's trainable weights into the model, checking names and shapes."""
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
