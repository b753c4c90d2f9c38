"""Loading and saving model weights safely.

Checkpoints are read only with ``torch.load(weights_only=True)`` or safetensors, so a file
from the internet cannot run code. Writes go through `zipvoice.utils.fileio`
(temporary sibling, fsync, rename), so an interrupted save never leaves a torn file.

Upstream ZipVoice's training checkpoints (``epoch-N.pt``, ``checkpoint-N.pt``,
``best-valid-loss.pt``) hold, beside the state dicts, the run's parameters spread as top-level
entries; ``exp_dir`` (and any other path-valued flag) is a ``pathlib`` path, which plain
weights-only unpickling refuses. `safe_torch_load` allows exactly the path classes (a path
object is data: building one runs no code), nothing else, so a malicious pickle is still
refused.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zipvoice.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

_MAX_LISTED_KEYS = 5


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model."""


def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the ``module.`` prefix that DistributedDataParallel adds to every key."""
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def _unpickling_refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """One line out of torch's multi-line weights_only error: what the file asked for."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    asks = [line for line in lines if "GLOBAL " in line]
    if asks:
        # "... Unsupported global: GLOBAL io.open was not ..." / "... unsupported GLOBAL
        # posix.system whose module posix is blocked."
        wanted = asks[0].split("GLOBAL ", 1)[1].split()[0].rstrip(".,")
        return (
            f"{path}: refused to load: unpickling it would call {wanted}, which weights_only "
            "loading forbids (the file may be malicious, or saved with custom classes); "
            "nothing in it was run"
        )
    details = [line for line in lines if not line.startswith(boilerplate)]
    detail = details[0] if details else type(exc).__name__
    return (
        f"{path}: not a readable PyTorch checkpoint (weights_only unpickling failed: {detail}); "
        "nothing in it was run"
    )


# Where the path classes live in pickles: Python 3.13 moved them to pathlib._local, and a
# checkpoint saved on the other OS family names a concrete class that cannot be instantiated
# here (WindowsPath on Linux), so foreign concrete paths load as their pure counterparts.
_PATH_CLASS_NAMES = ("PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath",
                     "WindowsPath")  # fmt: skip
_PATH_MODULES = ("pathlib", "pathlib._local")


def _path_stand_in(name: str) -> type:
    """The class that unpickles a path saved as `name` on this machine."""
    if name == "PosixPath" and os.name == "nt":
        return pathlib.PurePosixPath
    if name == "WindowsPath" and os.name != "nt":
        return pathlib.PureWindowsPath
    return getattr(pathlib, name)


def path_safe_globals() -> list[tuple[type, str]]:
    """The allow-list for upstream checkpoints: every pathlib path class under each module
    name a pickle may use, mapped to a class that can be built here."""
    return [
        (_path_stand_in(name), f"{module}.{name}")
        for module in _PATH_MODULES
        for name in _PATH_CLASS_NAMES
    ]


@contextmanager
def _allow_paths() -> Iterator[None]:
    with torch.serialization.safe_globals(path_safe_globals()):
        yield


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU that also accepts pathlib paths (upstream
    training checkpoints store ``exp_dir`` and path flags as such). Anything else a pickle asks
    for is refused by torch: pickle.UnpicklingError, nothing run."""
    with _allow_paths():
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """The model state dict of a ``model.pt`` (``{"model": ...}`` or a bare state dict) or a
    ``.safetensors`` file, with any ``module.`` prefix removed.

    Raises CheckpointError for files that need arbitrary unpickling (refused, nothing is run)
    or that hold no state dict, and FileNotFoundError for a missing file.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = safe_torch_load(path)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(_unpickling_refusal(path, exc)) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint: truncated or corrupt "
                f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})"
            ) from exc
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: holds no state dict (expected {{'model': state_dict}})")
    non_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{path}: entries that are not tensors, e.g. {non_tensors[:_MAX_LISTED_KEYS]}"
        )
    return _strip_module_prefix(state)


def _extend_embedding(
    model: nn.Module, state: dict[str, Tensor], path: str | Path
) -> dict[str, Tensor]:
    """Grows a checkpoint's ``embed.weight`` to the model's (extended) vocabulary: old rows
    are kept, new rows start at the mean of the old ones so new tokens begin as an
    'average token' rather than noise."""
    key = "embed.weight"
    if key not in state or not hasattr(model, "embed"):
        return state
    target = model.embed.weight
    old = state[key]
    if old.ndim != 2 or old.shape[1] != target.shape[1] or old.shape[0] == target.shape[0]:
        return state
    if old.shape[0] > target.shape[0]:
        raise CheckpointError(
            f"{path}: checkpoint vocabulary has {old.shape[0]} tokens but the model only "
            f"{target.shape[0]}; the token file must keep every token of the base model "
            f"(a smaller vocabulary cannot reuse the embedding)"
        )
    new_rows = target.shape[0] - old.shape[0]
    mean_row = old.float().mean(dim=0, keepdim=True).to(old.dtype)
    extended = torch.cat([old, mean_row.expand(new_rows, -1)], dim=0)
    logger.info(
        "Extended embed.weight from %d to %d tokens; the %d new rows start at the mean "
        "embedding of the old ones",
        old.shape[0],
        target.shape[0],
        new_rows,
    )
    state = dict(state)
    state[key] = extended
    return state


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: str | Path = "<state dict>",
    extend_embed: bool = True,
) -> None:
    """Strictly loads ``state`` into ``model``; on mismatch raises CheckpointError naming the
    first missing, unexpected and shape-mismatched keys (usually a model.json that does not
    match the checkpoint). With ``extend_embed`` a larger model vocabulary is accepted."""
    state = _strip_module_prefix(state)
    if extend_embed:
        state = _extend_embedding(model, state, path)
    model_state = model.state_dict()
    missing = [key for key in model_state if key not in state]
    unexpected = [key for key in state if key not in model_state]
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in model_state.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                more = (
                    f" (+{len(keys) - _MAX_LISTED_KEYS} more)"
                    if len(keys) > _MAX_LISTED_KEYS
                    else ""
                )
                problems.append(f"{len(keys)} {label}: {keys[:_MAX_LISTED_KEYS]}{more}")
        raise CheckpointError(
            f"{path} does not fit the model (check that model.json matches the checkpoint): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (temp file in the same folder, fsync, rename); the folder is
    created if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Saves tensors as safetensors atomically. Tensors are made contiguous and shared
    storage is cloned, which safetensors requires."""
    from safetensors.torch import save_file

    prepared = {key: value.detach().contiguous().clone() for key, value in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=meta))
