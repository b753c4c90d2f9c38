"""Hugging Face hub downloads that behave well offline.

`hf_hub_download` on a machine without network retries with back-off for about 25 s, logs
each attempt, and ends with a generic "check your connection" naming no file. The published
files never change, so here the local cache is tried first (no network at all when the files
are there), then the hub is asked once, with a short timeout; when it cannot be reached (or
HF_HUB_OFFLINE is set) the caller gets one HubUnavailableError that names the file, says
where to put it instead, and what works without it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Seconds to wait for the hub's answer before calling it unreachable.
PROBE_TIMEOUT_S = 5.0
_TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y", "t"})


class HubUnavailableError(OSError):
    """A file is neither in the local hub cache nor downloadable right now."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_WORDS


def _cached(repo_id: str, filename: str, local_dir: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = hf_hub_download(
            repo_id=repo_id, filename=filename, local_files_only=True, local_dir=local_dir
        )
    except LocalEntryNotFoundError:
        return None
    return Path(path)


def _probe(repo_id: str, filename: str) -> str | None:
    """None when the hub answers for the file, else why it cannot be reached (one attempt)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=PROBE_TIMEOUT_S)
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise FileNotFoundError(f"the hub has no {repo_id}/{filename} ({err})") from None
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, timeout, proxy, 5xx
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"{type(err).__name__}: {first_line}"
    return None


def hub_file(
    repo_id: str, filename: str, *, instead: str, local_dir: str | os.PathLike | None = None
) -> Path:
    """The local path of `repo_id/filename`: from the cache, else downloaded.

    `instead` completes the error message: where to place the file by hand (the flag and the
    folder layout) and the offline alternative, if there is one. With `local_dir` the file
    lands at `local_dir/filename` (the recipe's download/ folder) instead of the hub cache.
    """
    local = None if local_dir is None else str(local_dir)
    if local is not None and (Path(local) / filename).is_file():
        return Path(local) / filename  # placed by hand or downloaded before
    cached = _cached(repo_id, filename, local)
    if cached is not None:
        return cached
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    else:
        reason = _probe(repo_id, filename)
    if reason is not None:
        raise HubUnavailableError(
            f"cannot download {filename} of {repo_id} from the Hugging Face hub ({reason}); "
            f"{instead}"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=local))


def hub_files(repo_id: str, filenames: tuple[str, ...] | list[str], *, instead: str) -> list[Path]:
    """`hub_file` for several files of one release: the first one that cannot be had stops."""
    return [hub_file(repo_id, name, instead=instead) for name in filenames]
