"""Skipping data-preparation work that is already done, as upstream's scripts do.

Upstream skips a step whose output exists. Here an output is skipped only when it is the
finished result of the same inputs and settings: each step writes `{output}.done.json` beside
its output (the inputs' and the output's sha256, and the settings), and a rerun that finds a
matching record skips; an output without a record, or with another record (other inputs,
settings, or an output changed since), is still refused unless --overwrite is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zipvoice.utils.fileio import atomic_write_json

logger = logging.getLogger(__name__)


def record_path(output: Path) -> Path:
    return output.with_name(output.name + ".done.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record(output: Path, inputs: Sequence[Path], settings: Mapping[str, Any]) -> dict:
    return {
        "inputs": {str(Path(p).resolve()): _sha256(Path(p)) for p in inputs},
        "settings": {k: str(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()},
        "output": _sha256(output) if output.is_file() else None,
    }


def already_done(
    output: Path, inputs: Sequence[Path], settings: Mapping[str, Any], overwrite: bool
) -> bool:
    """True (skip the step) when `output` is the recorded result of these inputs and settings;
    False when the step should run; FileExistsError for an output that would be overwritten
    unasked (no record, or a record of other work)."""
    if overwrite or not output.exists():
        return False
    record = record_path(output)
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if saved == _record(output, inputs, settings):
            logger.info("%s is already done from the same inputs and settings: skipping", output)
            return True
        raise FileExistsError(
            f"{output} already exists from other inputs or settings (see {record.name}); "
            "pass --overwrite to replace it"
        )
    raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")


def mark_done(output: Path, inputs: Sequence[Path], settings: Mapping[str, Any]) -> None:
    """Record `output` as the finished result of `inputs` with `settings`."""
    atomic_write_json(record_path(output), _record(output, inputs, settings))
