"""Atomic file and folder writes: every writer in the package goes through here.

A write lands in a temporary sibling of the target, is fsynced, then renamed over the target,
so an interrupted run (Ctrl-C, a full disk, a crash) never leaves a torn checkpoint, manifest
or WAV, and the old file stays whole until the new one is complete. The temporary name ends
with the target's name, because some writers pick the format from the suffix (lhotse:
`.jsonl.gz` is gzipped jsonl; torch.onnx, soundfile). Every written file gets the usual
permissions (0666 less the umask: 0644 under the common umask), also from writers that create
0600 files themselves (safetensors, PEFT's adapter files).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _temp_sibling(path: Path) -> Path:
    """A hidden, unique name beside `path` that still ends with `path`'s name."""
    return path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_default_mode(path: Path) -> None:
    """rw for everyone the umask allows, as open() would create it."""
    os.chmod(path, 0o666 & ~_umask())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames inside `folder` durable; a no-op where folders cannot be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` for a temporary sibling of `path`, fsyncs it, renames it over `path`
    and fsyncs the folder; the temporary file is removed if anything fails."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        _set_default_mode(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 with "\\n" line ends on every platform: tsv and token-file readers split on them."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented, non-ASCII kept readable; values JSON lacks (paths, ...) are written as str."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src`'s content to `dst` atomically (a reader never sees half a file)."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_replace_dir(out_dir: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Calls `build(tmp_dir)` for a new empty folder beside `out_dir`, fsyncs the files it
    wrote, then moves it into place; an older `out_dir` is replaced whole (a reader sees the
    old folder or the new one, never a mix). The temporary folder is removed on failure."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = _temp_sibling(out_dir)
    tmp_dir.mkdir()
    try:
        build(tmp_dir)
        for file in tmp_dir.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _set_default_mode(file)
                _fsync_file(file)
        fsync_dir(tmp_dir)
        if out_dir.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            trash = _temp_sibling(out_dir.with_name(f"old-{out_dir.name}"))
            os.replace(out_dir, trash)
            try:
                os.replace(tmp_dir, out_dir)
            except BaseException:
                os.replace(trash, out_dir)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    return out_dir
