"""Upstream's `zipvoice.utils.common` names, for scripts written against upstream.

Each delegates to this project's implementation where one exists (the training steps live in
`zipvoice.training`); only what upstream's train script imports is here.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import nn
from torch.amp import GradScaler

from zipvoice.utils.cli import str2bool

__all__ = [
    "AttributeDict", "GradScaler", "MetricsTracker", "cleanup_dist", "create_grad_scaler",
    "get_adjusted_batch_count", "get_env_info", "prepare_input", "set_batch_count",
    "setup_dist", "setup_logger", "str2bool", "torch_autocast",
]  # fmt: skip


class AttributeDict(dict):
    """A dict whose keys read and write as attributes (`params.exp_dir`), upstream's params."""

    def __getattr__(self, key: str) -> Any:
        if key in self:
            return self[key]
        raise AttributeError(f"No such attribute '{key}'")

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        if key not in self:
            raise AttributeError(f"No such attribute '{key}'")
        del self[key]

    def __str__(self) -> str:
        plain = {k: str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v
                 for k, v in self.items()}  # fmt: skip
        return json.dumps(plain, indent=2, sort_keys=True, default=str)


class MetricsTracker(collections.defaultdict):
    """Sums of metrics plus `frames` (and `utterances`); values print divided by them."""

    def __init__(self) -> None:
        super().__init__(int)

    def __add__(self, other: Mapping[str, float]) -> MetricsTracker:
        out = MetricsTracker()
        out.update(self)
        for key, value in other.items():
            if value - value == 0:  # skips inf/nan, as upstream
                out[key] = out[key] + value
        return out

    def __mul__(self, alpha: float) -> MetricsTracker:
        out = MetricsTracker()
        for key, value in self.items():
            out[key] = value * alpha
        return out

    def norm_items(self) -> list[tuple[str, float]]:
        frames = self["frames"] if "frames" in self else 1
        utterances = self["utterances"] if "utterances" in self else 1
        return [
            (key, float(value) / (utterances if "utt_" in key else frames))
            for key, value in self.items()
            if key not in ("frames", "utterances")
        ]

    def __str__(self) -> str:
        parts = ", ".join(f"{key}={value:.4g}" for key, value in self.norm_items())
        return f"{parts}, over {float(self['frames']):.2f} frames."

    def reduce(self, device: torch.device) -> None:
        """Sum every entry over the DDP ranks."""
        keys = sorted(self.keys())
        values = torch.tensor([float(self[key]) for key in keys], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        for key, value in zip(keys, values.cpu().tolist(), strict=True):
            self[key] = value

    def write_summary(self, tb_writer: Any, prefix: str, batch_idx: int) -> None:
        for key, value in self.norm_items():
            tb_writer.add_scalar(prefix + key, value, batch_idx)


@contextlib.contextmanager
def torch_autocast(device_type: str = "cuda", **kwargs: Any) -> Iterator[None]:
    with torch.amp.autocast(device_type=device_type, **kwargs):
        yield


def create_grad_scaler(device: str = "cuda", **kwargs: Any) -> GradScaler:
    return GradScaler(device=device, **kwargs)


def setup_dist(
    rank: int | None = None,
    world_size: int | None = None,
    master_port: int | None = None,
    use_ddp_launch: bool = False,
    master_addr: str | None = None,
) -> None:
    """Join the process group (NCCL on CUDA, else gloo); with `use_ddp_launch` the rank and
    world size come from the launcher's environment (torchrun)."""
    os.environ.setdefault("MASTER_ADDR", master_addr or "localhost")
    os.environ.setdefault("MASTER_PORT", str(master_port or 12354))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_ddp_launch:
        dist.init_process_group(backend)
        return
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(rank or 0) % torch.cuda.device_count())


def cleanup_dist() -> None:
    dist.destroy_process_group()


def prepare_input(
    params: Mapping[str, Any],
    batch: Mapping[str, Any],
    device: torch.device,
    return_tokens: bool = True,
    return_feature: bool = True,
    return_audio: bool = False,
) -> list[Any]:
    """[tokens], [features * feat_scale, features_lens], [audio, audio_lens] of a batch."""
    out: list[Any] = []
    if return_tokens:
        out.append(batch["tokens"])
    if return_feature:
        out += [batch["features"].to(device) * params["feat_scale"],
                batch["features_lens"].to(device)]  # fmt: skip
    if return_audio:
        out += [batch["audio"], batch["audio_lens"]]
    return out


def get_adjusted_batch_count(params: Mapping[str, Any]) -> float:
    from zipvoice.training.steps import adjusted_batch_count

    return adjusted_batch_count(
        params["batch_idx_train"], params["max_duration"], params["world_size"],
        params["ref_duration"],
    )  # fmt: skip


def set_batch_count(model: nn.Module, batch_count: float) -> None:
    from zipvoice.training.steps import set_batch_count as set_count

    set_count(model.module if hasattr(model, "module") else model, batch_count)


def get_env_info() -> dict[str, Any]:
    return {
        "torch-version": torch.__version__,
        "torch-cuda-available": torch.cuda.is_available(),
        "python-version": platform.python_version(),
        "hostname": platform.node(),
    }


def setup_logger(log_filename: str | Path, log_level: str = "info", use_console: bool = True):
    """Log to `{log_filename}-{date}` (plus `-{rank}` under DDP) and, optionally, the console."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    name = f"{log_filename}-{stamp}"
    fmt = "%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
    if dist.is_available() and dist.is_initialized():
        name += f"-{dist.get_rank()}"
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    level = getattr(logging, log_level.upper(), logging.ERROR)
    logging.basicConfig(filename=name, format=fmt, level=level, filemode="w", force=True)
    if use_console:
        console = logging.StreamHandler()
        console.setLevel(level)
        console.setFormatter(logging.Formatter(fmt))
        logging.getLogger("").addHandler(console)
