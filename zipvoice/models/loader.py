"""Building ZipVoice models from model.json and loading the published checkpoints."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zipvoice.models.zipvoice import ZipVoice
from zipvoice.models.zipvoice_distill import ZipVoiceDistill
from zipvoice.tokenizer.token_file import PAD_TOKEN, read_token_file
from zipvoice.utils.checkpoint import load_checkpoint_state, load_model_state
from zipvoice.utils.manifest import verify_folder
from zipvoice.utils.validate import check_finite_tensors, check_fits_in_memory

HUB_REPO_ID = "k2-fsa/ZipVoice"
MODEL_NAMES = ("zipvoice", "zipvoice_distill")

# Constructor arguments that model.json provides (vocab_size and pad_id come from tokens.txt).
_CONFIG_KEYS = tuple(
    name
    for name in inspect.signature(ZipVoice.__init__).parameters
    if name not in ("self", "vocab_size", "pad_id")
)


class ModelConfigError(ValueError):
    """model.json does not describe a ZipVoice model."""


def build_model(
    model_config: Mapping[str, Any], vocab_size: int, pad_id: int, distill: bool = False
) -> ZipVoice:
    """A randomly initialised ZipVoice (or ZipVoiceDistill) from a model.json dict, with or
    without its ``"model"`` wrapper. Unknown or missing keys raise ModelConfigError."""
    config = model_config["model"] if "model" in model_config else model_config
    if not isinstance(config, Mapping):
        raise ModelConfigError('model.json: "model" must be an object of constructor arguments')
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = sorted(set(_CONFIG_KEYS) - set(config))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown}")
        if missing:
            parts.append(f"missing keys {missing}")
        raise ModelConfigError(f'model.json ["model"]: {"; ".join(parts)}')
    if vocab_size < 1 or not 0 <= pad_id < vocab_size:
        raise ModelConfigError(f"bad vocabulary: vocab_size={vocab_size}, pad_id={pad_id}")
    cls = ZipVoiceDistill if distill else ZipVoice
    try:
        model = cls(**dict(config), vocab_size=vocab_size, pad_id=pad_id)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelConfigError(f"model.json: invalid model configuration: {exc}") from exc
    # The constructor arguments travel with the model, for exports that write model.json.
    model.model_config = {"model": dict(config)}
    return model


def resolve_model_dir(
    model_name: str = "zipvoice",
    model_dir: str | Path | None = None,
    checkpoint_name: str = "model.pt",
) -> Path:
    """The folder holding the checkpoint (model.pt), model.json and tokens.txt.

    Given ``model_dir``, checks that the files are there. Otherwise takes
    ``{model_name}/{file}`` of the hub repository k2-fsa/ZipVoice from the hub cache, or
    downloads it; offline, fails at once naming the file (`zipvoice.utils.hub`).
    """
    files = (checkpoint_name, "model.json", "tokens.txt")
    if model_dir is not None:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        for name in files:
            if (folder / name).is_dir():
                raise FileNotFoundError(f"{folder / name} is a directory, expected a file")
            if not (folder / name).is_file():
                raise FileNotFoundError(f"model folder {folder} has no {name}")
        return folder
    if model_name not in MODEL_NAMES:
        raise ValueError(f"model_name must be one of {MODEL_NAMES}, got {model_name!r}")
    from zipvoice.utils.hub import hub_files

    instead = (
        f"download {', '.join(files)} from {HUB_REPO_ID} (folder {model_name}/) into one "
        "folder and pass it as --model-dir, or run once with network to fill the hub cache"
    )
    paths = hub_files(HUB_REPO_ID, [f"{model_name}/{name}" for name in files], instead=instead)
    return paths[0].parent


def load_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A model.json as a dict, checked to have its "model" section (the constructor
    arguments; `build_model` checks those)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ModelConfigError(f'{path}: expected {{"model": {{...}}, "feature": {{...}}}}')
    return config


@dataclass(frozen=True)
class LoadedModel:
    """What `load_released` read: the model (eval mode), its model.json, the token file and
    checkpoint it came from, and (when asked for) the fingerprint of the checkpoint's state
    dict, computed from the tensors already in memory (adapters are checked against it)."""

    model: ZipVoice
    config: dict[str, Any]
    token_file: Path
    checkpoint: Path
    fingerprint: str | None = None


def load_released(
    model_name: str = "zipvoice",
    model_dir: str | Path | None = None,
    checkpoint_name: str = "model.pt",
    token_file: str | Path | None = None,
    *,
    fingerprint: bool = False,
) -> LoadedModel:
    """Builds and loads a released model in eval mode, reading model.pt once: the folder's
    manifest, model.json's sizes and the weights' finiteness are checked on the way.

    ``token_file`` overrides the folder's tokens.txt (e.g. an extended vocabulary: extra
    embedding rows start at the mean embedding).
    """
    folder = resolve_model_dir(model_name, model_dir, checkpoint_name=checkpoint_name)
    verify_folder(folder, only=(checkpoint_name, "model.json", "tokens.txt"))
    checkpoint_path = folder / checkpoint_name
    config = load_model_config(folder / "model.json")
    token_path = Path(token_file) if token_file is not None else folder / "tokens.txt"
    token2id = read_token_file(token_path)
    vocab_size = len(token2id)
    pad_id = token2id[PAD_TOKEN]
    check_model_config(config["model"], vocab_size, pad_id, source=str(folder / "model.json"))
    state = load_checkpoint_state(checkpoint_path)
    check_finite_tensors(state, checkpoint_path)
    # The checkpoint itself says which model it is: only the distilled one embeds the
    # guidance scale.
    distill = "fm_decoder.guidance_scale_embed.weight" in state
    model = build_model(config["model"], vocab_size=vocab_size, pad_id=pad_id, distill=distill)
    load_model_state(model, state, checkpoint_path, extend_embed=True)
    digest = None
    if fingerprint:
        from zipvoice.models.modules.adapter_folder import fingerprint_state_dict

        digest = fingerprint_state_dict(state)
    return LoadedModel(model.eval(), config, token_path, checkpoint_path, digest)


def load_pretrained(
    model_name: str = "zipvoice",
    model_dir: str | Path | None = None,
    checkpoint_name: str = "model.pt",
    token_file: str | Path | None = None,
) -> tuple[ZipVoice, dict[str, Any], Path, Path]:
    """`load_released` as a tuple: (model, model.json dict, token file path, checkpoint path)."""
    loaded = load_released(model_name, model_dir, checkpoint_name, token_file)
    return loaded.model, loaded.config, loaded.token_file, loaded.checkpoint


def model_config_bytes(
    model_config: Mapping[str, Any], vocab_size: int, pad_id: int = 0, source: str = "model.json"
) -> int:
    """Bytes of the float32 parameters of the model `model_config` describes, counted on the
    meta device (nothing allocated). Sizes torch refuses (negative, zero) name `source`."""
    try:
        with torch.device("meta"):
            model = build_model(model_config, vocab_size=vocab_size, pad_id=pad_id)
    except ModelConfigError as err:
        raise ModelConfigError(f"{source}: {err}") from None
    except (RuntimeError, OverflowError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelConfigError(f"{source}: sizes that cannot make a model ({first})") from None
    return 4 * sum(p.numel() for p in model.parameters())


def check_model_config(
    model_config: Mapping[str, Any], vocab_size: int, pad_id: int = 0, source: str = "model.json"
) -> int:
    """`model_config_bytes`, refused when it cannot fit in memory; returns the bytes."""
    num_bytes = model_config_bytes(model_config, vocab_size, pad_id, source)
    check_fits_in_memory(num_bytes, f"the model described by {source}")
    return num_bytes
