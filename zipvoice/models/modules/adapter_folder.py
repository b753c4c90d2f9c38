"""Saving and loading trained adapters as self-describing folders.

An adapter folder holds what is needed to turn the ORIGINAL base checkpoint into the
fine-tuned model, and nothing of the base itself:

- `adapter_config.json`, `adapter_model.safetensors`: PEFT's own files (decoder adapters);
- `text_side.safetensors`: the token embedding (with any new rows) and, when it was trained,
  the text encoder;
- `tokens.txt`: the token file the adapter was trained with; `model.json`: the model config;
- `zipvoice_adapter.json`: the fingerprint of the base state dict plus vocabulary, LoRA and
  tokenizer settings, so that an adapter is never silently applied to another base.

Adapters trained with a base-rewriting initialisation (PiSSA, OLoRA) are converted by PEFT on
save into ordinary LoRA adapters of twice the rank that apply to the original base. The rank in
zipvoice_adapter.json is read back from the adapter_config.json PEFT wrote, so the two files
always agree (2r for those adapters; `init` still says how it was trained).

The settings' typed home is `zipvoice.models.modules.lora_config.LoraSettings`; PEFT wrapping
lives in `zipvoice.models.modules.lora_utils`; this module only reads and writes folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zipvoice.models.modules.lora_utils import (
    get_peft_decoder,
    is_lora_model,
    lora_init_name,
    lora_layers,
    merge_lora_weights,
    scale_unmerged_adapters,
)
from zipvoice.tokenizer.tokenizer import frontend_language
from zipvoice.utils.fileio import atomic_replace_dir, atomic_write_json
from zipvoice.utils.manifest import verify_folder, write_manifest
from zipvoice.utils.validate import check_finite_tensors

ADAPTER_META_FILE = "zipvoice_adapter.json"
TEXT_SIDE_FILE = "text_side.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TOKENS_FILE = "tokens.txt"
MODEL_CONFIG_FILE = "model.json"
REQUIRED_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TEXT_SIDE_FILE, ADAPTER_META_FILE)
FORMAT_NAME = "zipvoice-adapter"
FORMAT_VERSION = 1
# Sub-folder holding PEFT's snapshot of a PiSSA/OLoRA adapter before training, which PEFT needs
# to convert the trained adapter back onto the original base.
INITIAL_ADAPTER_DIR = "adapter-init"


class AdapterError(ValueError):
    """An adapter folder that is incomplete, malformed or meant for another model."""


def fingerprint_state_dict(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's tensors: names, dtypes, shapes and bytes, keys sorted.

    Independent of how the checkpoint was serialised (pickle, safetensors, extra entries), so
    it identifies the weights themselves. A `module.` prefix (from DDP) is ignored.
    """
    digest = hashlib.sha256()
    items = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    if not items:
        raise ValueError("cannot fingerprint an empty state dict")
    for key in sorted(items):
        tensor = items[key].detach().to("cpu").contiguous()
        digest.update(key.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _text_side_state(model: nn.Module, include_text_encoder: bool) -> dict[str, Tensor]:
    state = {"embed.weight": model.embed.weight.detach().cpu().contiguous()}
    if include_text_encoder:
        for name, tensor in model.text_encoder.state_dict().items():
            state[f"text_encoder.{name}"] = tensor.detach().cpu().contiguous()
    return state


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_fingerprint: str,
    token_file: str | os.PathLike,
    model_config: Mapping[str, Any] | str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    include_text_encoder: bool | None = None,
    initial_adapter_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the adapter folder atomically (built beside `out_dir`, then renamed into place).

    `include_text_encoder` None means: include it when any of its parameters is trainable.
    `initial_adapter_dir` is the PEFT snapshot taken before training, required for PiSSA/OLoRA.
    `extra` entries (step, lang, tokenizer, ...) are stored in zipvoice_adapter.json.
    """
    out_dir = Path(out_dir)
    peft_decoder = get_peft_decoder(model)
    token_file = Path(token_file)
    if not token_file.is_file():
        raise FileNotFoundError(f"token file {token_file} not found")
    if include_text_encoder is None:
        include_text_encoder = any(p.requires_grad for p in model.text_encoder.parameters())
    lora_config = peft_decoder.peft_config["default"]
    check_finite_tensors(
        {name: p for name, p in model.named_parameters() if p.requires_grad},
        f"refusing to write the adapter {out_dir}",
        hint="training diverged (lower the learning rate, check --base-lr and the data)",
    )

    def build(tmp_dir: Path) -> None:
        save_kwargs: dict[str, Any] = {}
        if initial_adapter_dir is not None:
            save_kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter_dir)
        with warnings.catch_warnings():
            # PEFT loads the initial PiSSA snapshot beside the trained adapter to convert it,
            # and warns about exactly the combination the conversion resolves.
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            peft_decoder.save_pretrained(str(tmp_dir), **save_kwargs)
        readme = tmp_dir / "README.md"  # PEFT's model card template says nothing useful here
        if readme.exists():
            readme.unlink()
        save_file(_text_side_state(model, include_text_encoder), str(tmp_dir / TEXT_SIDE_FILE))
        shutil.copyfile(token_file, tmp_dir / TOKENS_FILE)
        if isinstance(model_config, Mapping):
            atomic_write_json(tmp_dir / MODEL_CONFIG_FILE, model_config)
        else:
            shutil.copyfile(model_config, tmp_dir / MODEL_CONFIG_FILE)
        saved_rank = json.loads((tmp_dir / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))["r"]
        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "base_fingerprint": base_fingerprint,
            "vocab_size": int(model.embed.weight.shape[0]),
            "text_encoder_included": bool(include_text_encoder),
            "lora": {
                "rank": int(saved_rank),
                "alpha": float(lora_config.lora_alpha),
                "use_dora": bool(lora_config.use_dora),
                "use_rslora": bool(lora_config.use_rslora),
                "dropout": float(lora_config.lora_dropout),
                "init": lora_init_name(lora_config.init_lora_weights),
                "target_modules": [name for name, _ in lora_layers(model)],
            },
        }
        meta.update(dict(extra or {}))
        if "tokenizer" in meta:  # --lang is espeak's voice; record the language really read
            meta["lang"] = frontend_language(str(meta["tokenizer"]), meta.get("lang"))
        atomic_write_json(tmp_dir / ADAPTER_META_FILE, meta)
        write_manifest(tmp_dir, "adapter", base_fingerprint=base_fingerprint)

    return atomic_replace_dir(out_dir, build)


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the folder holds every required file and return zipvoice_adapter.json."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} not found")
    for name in REQUIRED_FILES:
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"adapter folder {adapter_dir} lacks {name}")
    meta_path = adapter_dir / ADAPTER_META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise AdapterError(f"{meta_path} is not a ZipVoice adapter description")
    for key in ("base_fingerprint", "vocab_size"):
        if key not in meta:
            raise AdapterError(f"{meta_path} lacks the field {key!r}")
    try:
        peft_config = json.loads((adapter_dir / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{adapter_dir / PEFT_CONFIG_FILE} is not valid JSON: {err}") from err
    if not isinstance(peft_config, dict):
        raise AdapterError(f"{adapter_dir / PEFT_CONFIG_FILE} is not a PEFT adapter config")
    check_peft_files(adapter_dir, meta, peft_config)
    verify_folder(adapter_dir)  # sizes, and sha256s on first use: a flipped bit is named
    return meta


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file: {err}") from err


def _module_matches(module: str, pattern: str) -> bool:
    """PEFT's rule for a list entry or a pattern key: the full name or a dotted suffix."""
    return module == pattern or module.endswith(f".{pattern}")


def _is_targeted(module: str, targets: Any) -> bool:
    if isinstance(targets, str):  # PEFT matches a string as a regex on the full name
        return re.fullmatch(targets, module) is not None
    if isinstance(targets, (list, tuple, set)):
        return any(_module_matches(module, str(t)) for t in targets)
    return False


def check_peft_files(
    adapter_dir: Path, meta: Mapping[str, Any], peft_config: Mapping[str, Any]
) -> None:
    """adapter_config.json, adapter_model.safetensors and zipvoice_adapter.json must describe
    one adapter. PEFT itself fails on another rank with a size error from deep in torch, and
    silently skips the weights of modules that the config does not target."""
    config_path, weights_path = adapter_dir / PEFT_CONFIG_FILE, adapter_dir / PEFT_WEIGHTS_FILE
    peft_type = str(peft_config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":  # e.g. an IA3 or LoHa config: would load as nothing, silently
        raise AdapterError(
            f"{config_path}: peft_type {peft_config.get('peft_type')!r} is not a LoRA/DoRA "
            "adapter; this toolkit trains and merges LoRA (DoRA) adapters only"
        )
    ranks: dict[str, int] = {}
    dora_modules: set[str] = set()
    for key, shape in _weight_shapes(weights_path).items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".lora_A.weight") and shape:
            ranks[name.removesuffix(".lora_A.weight")] = shape[0]
        elif name.endswith(".lora_magnitude_vector"):
            dora_modules.add(name.removesuffix(".lora_magnitude_vector"))
    if not ranks:
        raise AdapterError(f"{weights_path} holds no LoRA weights (no lora_A tensors)")
    check_finite_tensors(load_file(str(weights_path)), weights_path)
    rank_pattern = peft_config.get("rank_pattern") or {}
    for module, found in sorted(ranks.items()):
        expected = next(
            (int(r) for key, r in rank_pattern.items() if _module_matches(module, key)),
            peft_config.get("r"),
        )
        if found != expected:
            raise AdapterError(
                f"{config_path} says rank {expected} but {weights_path} holds rank {found} "
                f"(module {module}): the config was edited or belongs to another adapter"
            )
    targets = peft_config.get("target_modules")
    uncovered = [module for module in sorted(ranks) if not _is_targeted(module, targets)]
    if uncovered:
        more = f" and {len(uncovered) - 3} more" if len(uncovered) > 3 else ""
        raise AdapterError(
            f"{config_path}: target_modules does not cover {', '.join(uncovered[:3])}{more}, "
            f"whose weights {weights_path} holds (PEFT would silently drop them)"
        )
    use_dora = bool(peft_config.get("use_dora", False))
    if use_dora != bool(dora_modules):
        holds = "holds DoRA magnitude vectors" if dora_modules else "holds no DoRA magnitudes"
        raise AdapterError(
            f"{config_path} says use_dora {str(use_dora).lower()} but {weights_path} {holds}"
        )
    declared = (meta.get("lora") or {}).get("target_modules")
    if declared is not None and set(declared) != set(ranks):
        missing = sorted(set(declared) - set(ranks))
        extra = sorted(set(ranks) - set(declared))
        detail = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
        raise AdapterError(
            f"{weights_path} does not hold the modules {adapter_dir / ADAPTER_META_FILE} "
            f"lists: it {detail}"
        )


def _load_text_side(model: nn.Module, path: Path, expected_vocab: int) -> None:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file: {err}") from err
    check_finite_tensors(state, path)
    embed = state.pop("embed.weight", None)
    if embed is None:
        raise AdapterError(f"{path} lacks embed.weight")
    current = model.embed.weight
    if embed.shape[1] != current.shape[1]:
        raise AdapterError(
            f"{path}: embedding width {embed.shape[1]} does not match "
            f"the model's {current.shape[1]}"
        )
    if embed.shape[0] != expected_vocab:
        raise AdapterError(
            f"{path}: embedding has {embed.shape[0]} rows but the adapter declares "
            f"vocab_size {expected_vocab}"
        )
    if embed.shape[0] != current.shape[0]:
        # The adapter extended the vocabulary (new language tokens): grow the embedding.
        new_embed = nn.Embedding(embed.shape[0], embed.shape[1], device=current.device)
        new_embed.weight.requires_grad_(current.requires_grad)
        model.embed = new_embed
        if hasattr(model, "vocab_size"):
            model.vocab_size = int(embed.shape[0])
    with torch.no_grad():
        model.embed.weight.copy_(embed.to(model.embed.weight.dtype))
    if state:
        text_encoder_state = {}
        for key, tensor in state.items():
            if not key.startswith("text_encoder."):
                raise AdapterError(f"{path}: unexpected tensor {key}")
            text_encoder_state[key.removeprefix("text_encoder.")] = tensor
        try:
            model.text_encoder.load_state_dict(text_encoder_state, strict=True)
        except RuntimeError as err:
            raise AdapterError(f"{path}: text encoder weights do not fit the model: {err}") from err


def load_adapter(
    model_base: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    base_state_dict_fingerprint: str | None,
    scale: float = 1.0,
    merge: bool = True,
    base_weights: dict[str, Tensor] | None = None,
) -> nn.Module:
    """Apply an adapter folder to a base ZipVoice model in place and return it.

    `base_state_dict_fingerprint` is `fingerprint_state_dict` of the base checkpoint the model
    was loaded from; None skips the check (not recommended). `scale` weighs the adapter: 0 gives
    the base decoder exactly, 1 the trained one (see `merge_lora_weights`). With merge=False the
    PEFT wrapper stays (useful to compare or to train further), scaled with the same meaning
    (`scale_unmerged_adapters`).
    The text side (embedding, text encoder) is always the trained one. `base_weights` (merge
    only) receives the adapted modules' base weights, for a time gate.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    expected = meta["base_fingerprint"]
    if base_state_dict_fingerprint is not None and expected != base_state_dict_fingerprint:
        raise AdapterError(
            f"adapter was trained on a different base checkpoint: expected sha256 {expected}, "
            f"got sha256 {base_state_dict_fingerprint} ({adapter_dir})"
        )
    if is_lora_model(model_base):
        raise AdapterError("the model already carries adapters; load a fresh base model")
    _load_text_side(model_base, adapter_dir / TEXT_SIDE_FILE, int(meta["vocab_size"]))
    try:
        model_base.fm_decoder = PeftModel.from_pretrained(
            model_base.fm_decoder, str(adapter_dir), is_trainable=False
        )
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
        raise AdapterError(f"cannot apply the PEFT adapter in {adapter_dir}: {err}") from err
    if merge:
        return merge_lora_weights(model_base, scale=scale, base_weights=base_weights)
    scale_unmerged_adapters(model_base, scale)
    return model_base
