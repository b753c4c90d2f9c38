"""What a run needs from the machine, reported as one clear line when it is missing: disk
space for a save, and a free TCP port for the DDP rendezvous."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

# Text of torch's serializer failures when the underlying write fails (torch.save raises
# RuntimeError, not OSError: "[enforce fail at inline_container.cc:672] . unexpected pos 576
# vs 534", "PytorchStreamWriter failed writing file data/0: file write failed").
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


class PortInUseError(OSError):
    """The DDP master port is already bound by another process."""


def _free_space(folder: Path) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""


def write_failure(err: BaseException, folder: str | os.PathLike) -> OSError | None:
    """`err` as an OSError when it means a write into `folder` failed, else None (a bug to
    re-raise). OSErrors pass through with the free space added; torch's serializer
    RuntimeErrors become OSError(ENOSPC or EIO) with torch's first line kept."""
    folder = Path(folder)
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        return OSError(err.errno, f"{reason} ({_free_space(folder)} in {folder})")
    if isinstance(err, RuntimeError):
        text = (str(err).strip().splitlines() or [""])[0]
        if any(marker in text for marker in _TORCH_WRITE_FAILURES):
            return OSError(
                errno.ENOSPC,
                f"the file could not be written, most likely no space left on the device "
                f"({_free_space(folder)} in {folder} after the failed write; torch: {text})",
            )
    return None


def check_port_free(port: int, host: str = "localhost") -> None:
    """Raise PortInUseError when `host:port` cannot be bound, before DDP workers start.

    The rendezvous (TCPStore on rank 0) binds this port; when it is taken, every worker ends
    in a multi-process DistNetworkError traceback instead. SO_REUSEADDR is set like TCPStore
    does, so a port left in TIME_WAIT by an earlier run counts as free.
    """
    if not 0 < port < 65536:
        raise ValueError(f"--master-port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve the DDP master address {host!r}: {err}") from err
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortInUseError(
                        f"--master-port {port} is in use on {host} (another training run or "
                        "program holds it): pass a free port with --master-port",
                    ) from None
                if err.errno == errno.EADDRNOTAVAIL:  # e.g. ::1 on a host without IPv6
                    continue
                raise


# ---------------------------------------------------------------- cores, threads, workers


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or `taskset` limit counts,
    unlike os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_num_threads(requested: int, processes: int = 1) -> int:
    """Intra-op threads for one of `processes` processes sharing the cores: `requested` if > 0;
    0 (auto): OMP_NUM_THREADS when set to a number (the user chose), else cores // processes,
    at least 1. More threads than cores spin against each other (measured 30x slower)."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, available_cores() // max(1, processes))


def apply_num_threads(requested: int, processes: int = 1) -> int:
    """torch.set_num_threads(choose_num_threads(...)); returns that count."""
    import torch

    threads = choose_num_threads(requested, processes)
    torch.set_num_threads(threads)
    return threads


def choose_num_workers(requested: int, processes: int = 1) -> int:
    """Data-loader worker processes: `requested` if >= 0; -1 (auto): min(2, cores per process
    - 1), so that the training process keeps a core (0 workers on a single core)."""
    if requested >= 0:
        return requested
    per_process = max(1, available_cores() // max(1, processes))
    return max(0, min(2, per_process - 1))
