"""One run at a time per output folder: an exclusive lock on `<folder>/.zipvoice.lock`.

Two identical training commands started seconds apart into one exp-dir would both train and
rewrite the same checkpoints. `FolderLock` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on a lock
file in the folder and writes who holds it (PID, host, start time, command); a second run
fails at once with a one-line error naming the first run's PID and start time.

A stale lock needs no clean-up: the kernel releases a flock when its holder's file descriptor
closes, which includes the process dying (kill -9, a crash, the machine rebooting). The next
run simply gets the lock; if it finds the dead holder's description still in the file (a
clean release empties it), it logs that it takes over from that run.

flock locks are per host on some network file systems (older NFS): two machines sharing one
exp-dir over such a mount are not kept apart.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOCK_FILE = ".zipvoice.lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder_text(info: dict) -> str:
    parts = [f"PID {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    text = " ".join(parts)
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


class FolderLock:
    """`with FolderLock(exp_dir, "training"):` holds `exp_dir` for this process.

    The folder is created if needed. Raises FolderLockedError when another process holds it.
    Child processes (DDP workers spawned inside the block) need no lock of their own.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "a run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read_info(fd))
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder} is in use by another {self.purpose}: {holder}; wait for it to "
                "finish or use another folder"
            ) from None
        except OSError:
            os.close(fd)
            raise
        previous = _read_info(fd)
        if previous:
            logger.warning(
                "%s: taking over the lock of a run that ended without releasing it (%s)",
                self.folder,
                _holder_text(previous),
            )
        self._write_info(fd)
        self._fd = fd
        return self

    def _write_info(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "purpose": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        os.fsync(fd)

    def release(self) -> None:
        """Empty the description (a clean end) and unlock; the file itself stays, since
        removing it could let two runs lock two different files of the same name."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
