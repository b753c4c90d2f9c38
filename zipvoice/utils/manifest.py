"""Folder manifests: the files of a folder the toolkit wrote belong together, and stay whole.

Every folder a command writes (a model folder, an exp-dir, an adapter folder, an ONNX export)
gets `zipvoice_manifest.json` once its files are complete. It records:

- `kind`: "model", "exp-dir", "adapter" or "onnx";
- `producer`: the command line, the zipvoice version, the UTC time and the host;
- `base_model`: the state-dict sha256 (`fingerprint_state_dict`) of the model the folder was
  made from or holds, so that folders of different models cannot be mixed up;
- `files`: every file (path relative to the folder) with its size in bytes and sha256;
- `complete`: true when the folder must hold exactly these files (ONNX exports, adapters,
  model folders): a file present but not listed, such as a `*_int8.onnx` left over from
  another export, makes the folder mixed. An exp-dir is a live folder (logs, pruned
  checkpoints), so there only the listed files are checked.

Readers call `verify_folder`: sizes are always compared (cheap); sha256s are compared when
asked (`hashes=True`, `--verify`) or, by default, once per file version: a successful check is
remembered in a cache under ~/.cache/zipvoice (keyed by path, size, mtime and expected hash;
`ZIPVOICE_VERIFY_CACHE` moves it), never inside the folder, which is an input and is not
written. So the first use of a damaged file (a flipped bit in a weight) names it; later uses
of unchanged files cost a stat each. A folder without a manifest (a checkpoint downloaded
from the hub, a run from before manifests) loads as before.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zipvoice.utils.fileio import atomic_write_json

MANIFEST_FILE = "zipvoice_manifest.json"
FORMAT_NAME = "zipvoice-manifest"
FORMAT_VERSION = 1
KINDS = ("model", "exp-dir", "adapter", "onnx")
# Names never listed nor counted as strays: the manifest itself, the run lock, the temporary
# siblings of atomic writes (`.tmp-*`), and an exp-dir's ever-growing logs.
_IGNORED_PREFIXES = (".tmp-", ".zipvoice")
_LIVE_FOLDERS = ("log", "tensorboard", "wandb")
_WHAT = {
    "model": "this model folder",
    "exp-dir": "this run",
    "adapter": "this adapter",
    "onnx": "this export",
}
HashMode = bool | Literal["auto"]
# Unlisted files that a reader could pick up (weights, graphs, configs, token files) make a
# complete folder mixed; others (a result.wav, notes.md) are the user's and are left alone.
_LOADABLE_SUFFIXES = frozenset({".onnx", ".data", ".pt", ".safetensors", ".bin", ".json", ".txt"})


class ManifestError(ValueError):
    """A folder whose files do not match its manifest: damaged, mixed, or incomplete."""


@dataclass(frozen=True)
class Verified:
    """What `verify_folder` checked: the manifest, and how many files were hashed now."""

    manifest: dict[str, Any]
    hashed: int
    cached: int


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zipvoice")
    except PackageNotFoundError:
        return "unknown"


def _ignored(rel: Path) -> bool:
    return rel.name == MANIFEST_FILE or any(
        part.startswith(_IGNORED_PREFIXES) for part in rel.parts
    )


def folder_files(folder: Path, kind: str) -> list[str]:
    """Every file under `folder` a manifest of this kind would list, as sorted POSIX paths."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if _ignored(rel) or not path.is_file():
            continue
        if kind == "exp-dir" and rel.parts[0] in _LIVE_FOLDERS:
            continue
        found.append(rel.as_posix())
    return sorted(found)


def write_manifest(
    folder: str | os.PathLike,
    kind: str,
    *,
    base_fingerprint: str | None = None,
    files: Iterable[str | os.PathLike] | None = None,
    command: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Hash the folder's files and write its manifest atomically; call it last, once every
    file is complete. `files` (paths inside `folder`) limits the listing, e.g. to what an
    export wrote; by default every file is listed (see `folder_files`)."""
    folder = Path(folder)
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}; one of {', '.join(KINDS)}")
    if files is None:
        names = folder_files(folder, kind)
    else:
        names = sorted({_relative(folder, Path(f)) for f in files})
    listing = {}
    for name in names:
        path = folder / name
        listing[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "complete": kind != "exp-dir",
        "producer": {
            "command": command if command is not None else " ".join(sys.argv),
            "zipvoice_version": _version(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
        },
        "base_model": {"state_dict_sha256": base_fingerprint},
        "files": listing,
    }
    manifest.update(dict(extra or {}))
    path = folder / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path


def _relative(folder: Path, path: Path) -> str:
    """`path` (absolute, or relative to `folder`) as a POSIX path inside `folder`."""
    if not path.is_absolute() and path.parts[: len(folder.parts)] == folder.parts:
        full = path  # given as the folder's own (relative) path plus the name: cwd-relative
    else:
        full = path if path.is_absolute() else folder / path
    try:
        return full.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside {folder}") from None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, None when it has none; a malformed one is an error."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path} is not a ZipVoice manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise ManifestError(f'{path}: "files" must map names to {{size, sha256}}')
    return manifest


def manifest_base_fingerprint(folder: str | os.PathLike) -> str | None:
    """The base model's state-dict sha256 the folder's manifest records, if any."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    return (manifest.get("base_model") or {}).get("state_dict_sha256")


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """Where successful hash checks are remembered (outside every folder that is checked)."""
    override = os.environ.get("ZIPVOICE_VERIFY_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zipvoice" / "verified-files.json"


def _load_cache() -> dict[str, str]:
    try:
        cache = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(cache: dict[str, str]) -> None:
    """Best effort: a read-only home only means hashing again next time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load_cache(), **cache}  # keep what a concurrent reader recorded
        atomic_write_json(path, merged)
    except OSError:
        pass


def _cache_key(path: Path, stat: os.stat_result) -> str:
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"


def _mismatch(folder: Path, name: str, what: str, detail: str) -> ManifestError:
    return ManifestError(
        f"{folder / name} does not belong to {what} ({detail} {MANIFEST_FILE} lists): "
        "the file was damaged or replaced; restore it or write the folder again"
    )


def default_hash_mode() -> HashMode:
    """The readers' hash mode: `ZIPVOICE_VERIFY=full` hashes every file on every use,
    `sizes` compares sizes only, anything else (the default) is "auto"."""
    value = os.environ.get("ZIPVOICE_VERIFY", "auto").strip().lower()
    if value in ("full", "1", "true", "yes"):
        return True
    if value in ("sizes", "0", "false", "no"):
        return False
    return "auto"


def verify_folder(
    folder: str | os.PathLike,
    *,
    hashes: HashMode | None = None,
    only: Iterable[str] | None = None,
) -> Verified | None:
    """Check `folder` against its manifest; None when it has none (nothing to check).

    Raises ManifestError naming the first odd file: listed but missing, of another size or
    sha256, or (complete folders) present but not listed. `hashes`: True hashes every file,
    False none, "auto" those not yet verified in this version (see the module docstring).
    `only` restricts the checks to some listed files, the ones a reader is about to use (a
    model loader reads model.pt, model.json and tokens.txt); strays are then not looked for.
    None takes the mode from `default_hash_mode()`.
    """
    folder = Path(folder)
    if hashes is None:
        hashes = default_hash_mode()
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    what = _WHAT.get(str(manifest.get("kind")), "this folder")
    listed: dict[str, dict[str, Any]] = manifest["files"]
    if manifest.get("complete", True) and only is None:
        unlisted = set(folder_files(folder, str(manifest.get("kind")))) - set(listed)
        strays = sorted(name for name in unlisted if Path(name).suffix in _LOADABLE_SUFFIXES)
        if strays:
            more = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
            raise ManifestError(
                f"{folder / strays[0]}{more} does not belong to {what} (not listed in "
                f"{MANIFEST_FILE}): the folder mixes files of two writes; remove the stray "
                "files or write the folder anew"
            )
    names = sorted(listed) if only is None else [n for n in only if n in listed]
    stats = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{folder} lacks {name}, which {MANIFEST_FILE} lists")
        stats[name] = path.stat()
        if stats[name].st_size != listed[name]["size"]:
            detail = f"its size, {stats[name].st_size} bytes, is not the {listed[name]['size']}"
            raise _mismatch(folder, name, what, detail)
    if hashes is False:
        return Verified(manifest, 0, 0)
    cache = _load_cache() if hashes == "auto" else {}
    hashed = cached = 0
    newly: dict[str, str] = {}
    for name in names:
        path, expected = folder / name, listed[name]["sha256"]
        key = _cache_key(path, stats[name])
        if cache.get(key) == expected:
            cached += 1
            continue
        hashed += 1
        if sha256_file(path) != expected:
            raise _mismatch(folder, name, what, "its sha256 is not the one")
        newly[key] = expected
    if newly and hashes == "auto":
        _save_cache(newly)
    return Verified(manifest, hashed, cached)


def verify_file(path: str | os.PathLike, *, hashes: HashMode | None = None) -> Verified | None:
    """`verify_folder` for one file given on its own (e.g. `--checkpoint dir/model.pt`): its
    folder's manifest, this file's entry only (nothing when the manifest does not list it)."""
    path = Path(path)
    return verify_folder(path.parent, hashes=hashes, only=[path.name])
