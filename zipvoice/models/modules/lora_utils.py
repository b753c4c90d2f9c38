"""LoRA / DoRA adapters on the flow-matching decoder, through PEFT.

Full fine-tuning on a small corpus makes the decoder forget how to clone unseen speakers;
freezing it never learns the new language. Low-rank adapters on the decoder's projections sit
in between: a few percent extra parameters learn the accent while the frozen base keeps the
speaker space, and they merge into the base weights for inference at no cost.

Every function takes either the whole ZipVoice model (adapters live on `model.fm_decoder`) or
the decoder itself, wrapped or not, and module names are always relative to the decoder, so the
names one function returns are accepted by the others and by PEFT.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from zipvoice.models.modules.lora_config import (
    ATTENTION_SUFFIXES,
    FF_CONV_SUFFIXES,
    PRESETS,
    LoraSettings,
    init_mutates_base,
)
from zipvoice.utils.validate import ValidationError, check_fits_in_memory

FM_DECODER_PREFIX = "fm_decoder."


def _decoder_of(model: nn.Module) -> nn.Module:
    """The flow-matching decoder of a ZipVoice model, or the module itself if it is one."""
    decoder = getattr(model, "fm_decoder", None)
    if decoder is None:
        if isinstance(model, nn.ModuleDict) or not hasattr(model, "encoders"):
            raise TypeError(
                f"expected a ZipVoice model or its fm_decoder, got {type(model).__name__}"
            )
        decoder = model
    return decoder


def is_lora_model(model: nn.Module) -> bool:
    """True when the model's decoder is wrapped by PEFT (adapters attached, not merged)."""
    return isinstance(_decoder_of(model), PeftModel)


def unwrap_decoder(model: nn.Module) -> nn.Module:
    """The plain decoder module under any PEFT wrapper: module names match the checkpoint's."""
    decoder = _decoder_of(model)
    if isinstance(decoder, PeftModel):
        return decoder.get_base_model()
    return decoder


def get_peft_decoder(model: nn.Module) -> PeftModel:
    decoder = _decoder_of(model)
    if not isinstance(decoder, PeftModel):
        raise ValueError("the model has no LoRA adapters (fm_decoder is not a PeftModel)")
    return decoder


def _linear_names(decoder: nn.Module) -> list[str]:
    """Names of the decoder's nn.Linear modules, skipping modules PEFT itself inserted."""
    names = []
    for name, module in decoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(part in ("lora_A", "lora_B", "base_layer") for part in name.split(".")):
            continue
        names.append(name)
    return names


def get_lora_target_modules(model: nn.Module, preset: str = "attention") -> list[str]:
    """Full decoder-relative names of the nn.Linear modules that get adapters.

    `preset` is a comma-separated list whose entries are preset names (PRESETS), suffixes
    ("self_attn1.in_proj") or full names ("encoders.0.layers.0.self_attn1.in_proj",
    "fm_decoder." prefix allowed); the union is adapted ("attention,feed_forward1.in_proj").
    Every entry must select at least one nn.Linear, so that a typo fails instead of training
    nothing.
    """
    linear_names = _linear_names(unwrap_decoder(model))
    if not linear_names:
        raise ValueError("the decoder has no nn.Linear modules to adapt")
    entries = [entry.strip() for entry in preset.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"empty LoRA target list {preset!r}")
    if any(PRESETS.get(entry, ()) is None for entry in entries):
        return linear_names  # all_linear among them: the union is everything
    suffixes: list[str] = []
    for entry in entries:
        preset_suffixes = PRESETS.get(entry)
        suffixes.extend(preset_suffixes if preset_suffixes is not None else [entry])
    all_module_names = {name for name, _ in unwrap_decoder(model).named_modules()}
    selected: list[str] = []
    for raw in suffixes:
        suffix = raw.removeprefix(FM_DECODER_PREFIX)
        matches = [n for n in linear_names if n == suffix or n.endswith("." + suffix)]
        if not matches:
            is_module = any(n == suffix or n.endswith("." + suffix) for n in all_module_names)
            reason = "is not an nn.Linear" if is_module else "matches no module"
            raise ValueError(
                f"LoRA target {raw!r} {reason} in fm_decoder; presets: {', '.join(PRESETS)}; "
                f"adaptable names end in e.g. {', '.join(ATTENTION_SUFFIXES + FF_CONV_SUFFIXES)}"
            )
        selected.extend(matches)
    # Keep decoder order and drop duplicates (an entry may repeat another's matches).
    chosen = set(selected)
    return [n for n in linear_names if n in chosen]


def create_lora_config(
    rank: int = 32,
    alpha: float = 64,
    dropout: float = 0.05,
    use_dora: bool = True,
    target_modules: list[str] | None = None,
    init: str = "default",
    use_rslora: bool = False,
) -> LoraConfig:
    """A PEFT LoraConfig for the decoder.

    `target_modules` are exact decoder-relative names (as get_lora_target_modules returns);
    None means the "attention" preset.
    """
    LoraSettings(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_dora=use_dora,
        init=init,
        use_rslora=use_rslora,
    ).validate()
    # PEFT matches a list entry against every module whose name ends with it, so the top-level
    # "in_proj" would also catch every layer's in_proj. A full-match regex over the exact names
    # selects precisely the modules asked for.
    if target_modules:
        targets = "|".join(re.escape(name) for name in target_modules)
    else:
        targets = r".*\.(?:" + "|".join(re.escape(s) for s in ATTENTION_SUFFIXES) + ")"
    init_lora_weights: bool | str = True if init == "default" else init
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=use_dora,
        use_rslora=use_rslora,
        target_modules=targets,
        init_lora_weights=init_lora_weights,
        bias="none",
    )


def peft_config_from_settings(settings: LoraSettings, target_modules: list[str]) -> LoraConfig:
    """The PEFT LoraConfig for validated settings and resolved (exact) target names."""
    return create_lora_config(
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        use_dora=settings.use_dora,
        target_modules=target_modules,
        init=settings.init,
        use_rslora=settings.use_rslora,
    )


def lora_init_name(init_lora_weights: bool | str) -> str:
    """The `--lora-init` name of a LoraConfig's init_lora_weights (PEFT spells the default
    initialisation True, and False means B random too, no longer an identity start)."""
    if init_lora_weights is True:
        return "default"
    if init_lora_weights is False:
        return "random"
    return str(init_lora_weights)


def mutates_base_weights(config: LoraConfig) -> bool:
    """Whether PEFT rewrites the base weights when attaching this config (PiSSA, OLoRA)."""
    init = config.init_lora_weights
    return isinstance(init, str) and init_mutates_base(init)


def apply_lora_to_model(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap `model.fm_decoder` with PEFT in place and freeze every base decoder weight.

    Other parts of the model (embedding, text encoder) keep their requires_grad: the trainer
    decides about them.
    """
    if not hasattr(model, "fm_decoder"):
        raise TypeError(f"expected a ZipVoice model with fm_decoder, got {type(model).__name__}")
    if is_lora_model(model):
        raise ValueError("the model already has LoRA adapters; merge or unwrap them first")
    decoder = model.fm_decoder
    for param in decoder.parameters():
        param.requires_grad_(False)
    was_training = decoder.training
    try:
        model.fm_decoder = get_peft_model(decoder, config)
    except ValueError as err:
        raise ValueError(f"cannot attach LoRA to fm_decoder: {err}") from err
    # New adapter modules (dropout) start in training mode; follow the decoder's mode.
    model.fm_decoder.train(was_training)
    for name, param in model.fm_decoder.named_parameters():
        if param.requires_grad and "lora_" not in name:
            raise RuntimeError(f"PEFT left base decoder parameter {name} trainable")
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(decoder-relative name, layer) for every adapted module."""
    peft_decoder = get_peft_decoder(model)
    base = peft_decoder.get_base_model()
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora_weights(
    model: nn.Module, scale: float = 1.0, base_weights: dict[str, Tensor] | None = None
) -> nn.Module:
    """Merge the adapters into the decoder weights and drop PEFT: a plain ZipVoice again.

    `scale` interpolates each adapted weight between the base (0) and the trained merge (1):
    W = W0 + scale * (W_merged - W0). For plain LoRA this is exactly multiplying the adapter's
    scaling; for DoRA, whose magnitude vector is not an additive term, it is the only definition
    for which 0 gives the base model exactly.

    `base_weights`, when given, receives each adapted module's base weight W0 (the copy the
    merge takes anyway), for a time gate (`time_gate.TimeGate`) to swap back in.
    """
    if not is_lora_model(model):
        raise ValueError("the model has no LoRA adapters to merge")
    if not torch.isfinite(torch.tensor(scale)):
        raise ValueError(f"adapter scale must be finite, got {scale}")
    for name, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        original = weight.data.clone()
        if base_weights is not None:
            base_weights[name] = original
        layer.merge(safe_merge=True)
        if scale != 1.0:
            weight.data = original + scale * (weight.data - original)
        if not torch.isfinite(weight).all():
            raise ValueError(f"merging the adapter of {name} produced non-finite weights")
    model.fm_decoder = get_peft_decoder(model).unload()
    return model


class _InterpolatedOutput:
    """Forward hooks making one unmerged adapted layer compute x @ W_s^T + b with
    W_s = W0 + s * (W_merged - W0): y_s = y_base + s * (y_adapted - y_base). The base output
    is the one PEFT computes anyway (kept by a hook on the base layer), so scaling costs one
    element-wise blend per layer, and s = 0 gives the base layer's output exactly."""

    def __init__(self, layer: LoraLayer, scale: float) -> None:
        self.scale = scale
        self.base_output: Tensor | None = None
        base = layer.get_base_layer()
        self.handles = [
            base.register_forward_hook(self._keep_base),
            layer.register_forward_hook(self._blend),
        ]

    def _keep_base(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.base_output = output

    def _blend(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        base, self.base_output = self.base_output, None
        if base is None or base.shape != output.shape:
            return None
        return base + self.scale * (output - base)


def scale_unmerged_adapters(model: nn.Module, scale: float) -> None:
    """Weigh unmerged adapters by `scale` with the meaning `merge_lora_weights` gives it
    (W_s = W0 + s * (W_merged - W0)), so merged and unmerged inference agree at every s.

    LoRA: PEFT's `scale_layer` (the delta is linear in its scaling, so this is W_s exactly).
    DoRA: the merged weight is a normalised direction times a magnitude, not linear in the
    scaling, so the layer's output is blended with the base output instead (linear in W).
    """
    if not math.isfinite(scale):
        raise ValueError(f"adapter scale must be finite, got {scale}")
    if scale == 1.0:
        return
    for _, layer in lora_layers(model):
        if layer.use_dora.get("default", False):
            _InterpolatedOutput(layer, scale)
        else:
            layer.scale_layer(scale)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def log_parameter_counts(model: nn.Module, logger: logging.Logger | None = None) -> None:
    trainable, total = count_parameters(model)
    (logger or logging.getLogger(__name__)).info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )


def lora_bytes(linear_shapes: Iterable[tuple[int, int]], rank: int, copies: int = 4) -> int:
    """Bytes of float32 LoRA matrices A (rank x in) and B (out x rank) over (out, in) shapes,
    times `copies` (weights, gradients, two AdamW moments)."""
    return 4 * copies * sum(rank * (d_in + d_out) for d_out, d_in in linear_shapes)


def check_lora_rank(model: Any, target_modules: Iterable[str], rank: int) -> None:
    """Refuse a `--lora-rank` whose adapters (with their gradients and AdamW state) would not
    fit, before PEFT allocates them; also a rank above the layers' sizes (no low rank left)."""
    modules = dict(unwrap_decoder(model).named_modules())
    shapes = [tuple(modules[name].weight.shape) for name in target_modules]
    if not shapes:
        return
    smallest = min(min(shape) for shape in shapes)
    if rank > smallest:
        raise ValidationError(
            f"--lora-rank {rank} is larger than the smallest adapted layer ({smallest}); "
            "a low-rank adapter needs rank below the layer sizes"
        )
    check_fits_in_memory(lora_bytes(shapes, rank), f"--lora-rank {rank} on {len(shapes)} layers")
