"""What every entry point under `zipvoice.bin` shares: boolean flags, the console log format,
seeding, and reporting a user's mistake as one line instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import random
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import ParamSpec

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})
# Errors a user can cause (bad paths, bad files, bad values, a missing optional package). Any
# exception class defined in the package itself counts too (TrainingError, CheckpointError...).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)

P = ParamSpec("P")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that keeps the description's line breaks (the usage examples stay runnable
    commands, continuation backslashes included) and shows each flag's default."""


def str2bool(value: str | bool) -> bool:
    """argparse type for upstream-style boolean flags (`--use-lora 1`, `--shuffle false`)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean (1/0, true/false, yes/no, y/n, on/off, t/f), got {value!r}"
    )


# Libraries that log every HTTP request at INFO (huggingface_hub's client): a user sees them
# only when something goes wrong, through our own message.
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")


def setup_logging(level: int | str = logging.INFO) -> None:
    """Console logging in one format for every command. Leaves an existing set-up alone (a
    caller that configured logging, or pytest's capture), so commands can run in-process."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _DropLibraryInfo(logging.Filter):
    """Drops records below WARNING logged from files inside one package's folder (for
    libraries that log through the root logger, where no logger name tells them apart)."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.package_dir)


@contextlib.contextmanager
def quiet_info_logs(package: str) -> Iterator[None]:
    """Within the block, `package`'s INFO/DEBUG records are dropped, its warnings kept:
    onnxruntime's quantiser logs one INFO line per tensor (about 190 for ZipVoice) through
    the root logger."""
    module = sys.modules.get(package) or importlib.import_module(package)
    package_dir = os.path.dirname(os.path.abspath(module.__file__ or ""))
    drop = _DropLibraryInfo(package_dir)
    root = logging.getLogger()
    named = logging.getLogger(package)
    old_level = named.level
    root.addFilter(drop)
    named.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(drop)
        named.setLevel(old_level)


def fix_random_seed(seed: int) -> None:
    """Seed every generator training and inference draw from, so a run is reproducible."""
    random.seed(seed)
    import numpy as np  # here, so that importing this module (for --help) stays light
    import torch

    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ignore_interrupts() -> None:
    """Initializer of worker pools: Ctrl-C reaches the whole process group, and the parent alone
    should answer it (one line, see exit_on_error), not every worker with its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def is_expected_error(err: BaseException) -> bool:
    return isinstance(err, EXPECTED_ERRORS) or type(err).__module__.startswith("zipvoice.")


def current_command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran this entry point (`python -m zipvoice.bin.X ...`), to print
    for "run the same command again"; `argv` when main was called with one."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else sys.argv[0]
    words = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *map(str, words)])


def interrupt_report(
    err: KeyboardInterrupt, module: str, argv: Sequence[str] | None = None
) -> tuple[int, str]:
    """(exit status, the one line to print) for Ctrl-C or SIGTERM: 128 + the signal number
    (130, 143), and for a run that saved its state (`resume_hint`), the command to continue."""
    signum = int(getattr(err, "signum", signal.SIGINT))
    message = str(err) or "stopped at once (Ctrl-C)"
    if getattr(err, "resume_hint", False):
        message += f": {current_command(module, argv)}"
    return 128 + signum, f"interrupted: {message}"


def exit_on_error(
    main: Callable[P, int | None] | None = None,
    *,
    also: tuple[type[BaseException], ...] = (),
    logger: logging.Logger | None = None,
    system_exit: bool = False,
) -> Callable[P, int] | Callable[[Callable[P, int | None]], Callable[P, int]]:
    """Decorates an entry point's `main`: an expected error (see EXPECTED_ERRORS; `also` adds
    more) becomes `error: <message>` on stderr and exit code 1, anything else keeps its
    traceback (a bug). Ctrl-C or SIGTERM (KeyboardInterrupt, see zipvoice.training.interrupt)
    becomes one `interrupted: ...` line and 128 + the signal. `main` returning None means
    success (0).

    How the message leaves differs only for in-process callers (run as a command, all give
    `error: ...` on stderr and status 1): by default it is printed and 1 returned; with
    `logger` it is logged there at ERROR level (training: beside the run's own log lines);
    with `system_exit` SystemExit("error: ...") is raised (the data-preparation commands)."""

    def decorate(fn: Callable[P, int | None]) -> Callable[P, int]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                code = fn(*args, **kwargs)
            except KeyboardInterrupt as err:
                if fn.__module__ == "__main__":  # a command on its way out: no more tracebacks
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                code, line = interrupt_report(err, fn.__module__, args[0] if args else None)
                if logger is not None:
                    logger.error("%s", line)
                else:
                    print(line, file=sys.stderr)
                if system_exit:
                    raise SystemExit(code) from None
                return code
            except Exception as err:
                if not (is_expected_error(err) or isinstance(err, also)):
                    raise
                if system_exit:
                    raise SystemExit(f"error: {err}") from None
                if logger is not None:
                    logger.error("error: %s", err)
                else:
                    print(f"error: {err}", file=sys.stderr)
                return 1
            return 0 if code is None else code

        return wrapper

    return decorate if main is None else decorate(main)
