"""Shared pieces of the cost benchmarks: the released configuration, peak memory, one fresh
process per measured method, and plain-text tables.

Each method runs in its own subprocess so that one method's allocations (optimizer state, a
float64 averaged copy, ONNX Runtime arenas) cannot raise the next one's peak memory, and so
that the peak read from the kernel (VmHWM) belongs to that method alone.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHECKOUT = Path(__file__).resolve().parents[1]
PARITY = CHECKOUT / "tests" / "fixtures" / "upstream_parity"
RELEASED_CONFIG = PARITY / "zipvoice" / "base_model.json"
RELEASED_VOCAB_SIZE = 360  # the released tokens.txt (emilia); the Japanese file is close
RESULT_PREFIX = "BENCHMARK_RESULT "
MIB = 1024 * 1024


def released_model_config(path: Path | None) -> tuple[dict[str, Any], str]:
    """({"model": constructor arguments}, where they came from).

    Without a path, the released base_model.json from the shared fixtures is used when present;
    otherwise ZipVoice's constructor defaults, which are the released configuration.
    """
    if path is None:
        if RELEASED_CONFIG.is_file():
            path = RELEASED_CONFIG
        else:
            from zipvoice.models.zipvoice import ZipVoice

            params = inspect.signature(ZipVoice.__init__).parameters
            skip = ("self", "vocab_size", "pad_id")
            defaults = {k: p.default for k, p in params.items() if k not in skip}
            return {"model": defaults}, "ZipVoice constructor defaults (the released config)"
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f'model config {path} lacks the "model" section')
    return config, str(path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch build")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so that the resident set
    before a measurement holds live data only, not e.g. a checkpoint already loaded and freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


class PeakMemory:
    """Peak memory since the last reset().

    CUDA: torch.cuda.max_memory_allocated (tensors only, no caching slack). CPU: the process's
    peak resident set (VmHWM); reset() rewinds it to the current RSS through
    /proc/self/clear_refs, so setup transients (checkpoint loading) do not count. If the kernel
    refuses the rewind, the peak covers the whole process and `whole_process` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.whole_process = False

    @property
    def label(self) -> str:
        return "CUDA max allocated" if self.device.type == "cuda" else "peak RSS (VmHWM)"

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
        except OSError:
            self.whole_process = True

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kib("VmHWM") * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit_result(result: dict[str, Any]) -> None:
    """A worker's answer to run_worker: one marked JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(
    script: Path, argv: Sequence[str], label: str, code_root: Path | None = None
) -> dict[str, Any]:
    """Run `script argv` in a fresh interpreter and return the JSON it emitted.

    ``code_root``: the tree whose ``zipvoice`` package the worker imports (PYTHONPATH points
    there only); by default this checkout's.
    """
    root = CHECKOUT if code_root is None else code_root
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, str(script), *argv, f"--code-root={root}"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"{label}: worker exited with {proc.returncode} and no result:\n{tail}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too); numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(row[i]) for row in cells[1:]) if rows else False
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if is_num else cell.ljust(width)
            for cell, width, is_num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if is_num else ("-" * (w + 2))
            for w, is_num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("×", "").replace("%", "").strip()
    if stripped in ("-", "n/a"):
        return True
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def describe_machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        where = f"CUDA {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    return f"torch {torch.__version__}, {where}, {threads} torch threads"


# --------------------------------------------------------------------------------------------
# Side by side with another revision (--baseline REF)
# --------------------------------------------------------------------------------------------


def export_revision(ref: str, dest: Path) -> str:
    """Write git revision ``ref`` of this checkout into ``dest`` (git archive, nothing of the
    working tree); returns its short hash. The worker then imports that tree's ``zipvoice``."""
    try:
        short = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "--short", f"{ref}^{{commit}}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"--baseline {ref}: not a revision of {CHECKOUT} ({err})") from err
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "-C", str(CHECKOUT), "archive", "--format=tar", short], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"--baseline {ref}: git archive failed")
    return short


def check_code_root(code_root: Path | None) -> None:
    """In a worker: fail loudly if ``zipvoice`` was imported from another tree than asked
    (e.g. an installed copy shadowing the baseline), which would make the comparison void."""
    if code_root is None:
        return
    import zipvoice

    where = Path(zipvoice.__file__).resolve()
    if code_root.resolve() not in where.parents:
        raise SystemExit(f"worker imported zipvoice from {where}, expected under {code_root}")


def add_side_by_side_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both benchmarks share for `--baseline REF` runs; `--worker`, `--code-root` and
    `--lockstep` are internal (the parent passes them to the worker processes it starts)."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="also run git revision REF's code side by side (interleaved) and print ratios",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --baseline: worker processes per revision"
    )
    parser.add_argument("--code-root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)


def interleaved(rounds: int, labels: Sequence[str]) -> list[str]:
    """ABBA order over ``rounds`` (A B, B A, A B, ...) so that a drift in the machine's load
    falls on both revisions alike."""
    order: list[str] = []
    for i in range(rounds):
        order.extend(labels if i % 2 == 0 else list(reversed(labels)))
    return order


def max_abs_difference(a_path: Path, b_path: Path) -> float:
    """Largest |a - b| between two saved float arrays of the same shape (inf when shapes
    differ)."""
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


READY_MARK = "BENCHMARK_READY"


def lockstep_wait(enabled: bool) -> None:
    """In a worker run with --lockstep: say it is ready for its next timed unit and wait for
    the parent's go (one line on stdin), so that two revisions' units alternate one by one."""
    if enabled:
        print(READY_MARK, flush=True)
        sys.stdin.readline()


def run_lockstep(
    script: Path,
    argv: Sequence[str],
    roots: dict[str, Path],
    turns: int,
    label: str,
    per_tree_argv: dict[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """One worker per tree, all set up at once, then their timed units strictly alternating
    (A B, B A, ...): a change in the machine's load falls on every revision alike, which
    separate processes one after the other cannot promise on a shared machine. Each worker
    waits in lockstep_wait() before each of its ``turns`` units; only the one given the go
    runs, so they never compete for the cores."""
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}
    for name, root in roots.items():
        logs[name] = tempfile.TemporaryFile(mode="w+")
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                str(script),
                *argv,
                *(per_tree_argv or {}).get(name, ()),
                f"--code-root={root}",
                "--lockstep",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logs[name],
            text=True,
            env=dict(os.environ, PYTHONPATH=str(root)),
        )
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in procs:  # the set-ups may overlap: nothing is timed yet
            _read_until_ready(procs[name], logs[name], f"{label} ({name})")
        for name in interleaved(turns, list(procs)):
            procs[name].stdin.write("\n")
            procs[name].stdin.flush()
            answer = _read_until_ready(procs[name], logs[name], f"{label} ({name})")
            if answer:  # after its last unit a worker answers with its result
                results[name] = answer
        for name, proc in procs.items():
            proc.stdin.close()
            if name not in results:
                results[name] = _read_until_ready(proc, logs[name], f"{label} ({name})", True)
            proc.wait()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def _read_until_ready(
    proc: subprocess.Popen, log: Any, label: str, final: bool = False
) -> dict[str, Any]:
    """Consume the worker's stdout up to its next READY mark or, at the end, its result."""
    for line in proc.stdout:
        if line.startswith(READY_MARK) and not final:
            return {}
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    proc.wait()
    log.seek(0)
    tail = "\n".join(log.read().strip().splitlines()[-15:])
    raise RuntimeError(f"{label}: worker exited with {proc.returncode} before its result:\n{tail}")
