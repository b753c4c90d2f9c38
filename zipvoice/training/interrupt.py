"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM without losing the steps since the last save.

The first signal only sets a flag: the loop finishes the step it is in, every rank agrees to
stop at that same step, a checkpoint is written (atomically, as every save), and
`TrainingInterrupted` is raised; the entry point turns it into one line saying how to continue
and exit status 128 + the signal (130 for SIGINT, 143 for SIGTERM). A second signal stops at
once (`HardStop`, also one line): the newest complete checkpoint stays intact.

With DDP, the parent of the spawned ranks takes the signal (a terminal's Ctrl-C reaches the
whole process group, so the ranks ignore SIGINT/SIGTERM themselves, else one Ctrl-C would count
twice) and passes each one on to every rank as SIGUSR1.

Per-step random seeds (`seed_step`) make the resumed run draw what the uninterrupted run drew,
whatever the data loaders did to the global generators in between.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

FORWARDED = signal.SIGUSR1 if hasattr(signal, "SIGUSR1") else signal.SIGTERM
HARD_STOP_MESSAGE = "stopped at once on a second signal; the newest complete checkpoint is intact"
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class HardStop(KeyboardInterrupt):
    """A second interrupt: stop now. `signum` sets the exit status (128 + signum)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving; rerunning the same command continues it."""

    resume_hint = True

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (run seed, rank, step): independent streams, no arithmetic overlap."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed Python's, numpy's and torch's (all devices') generators for one training step, so
    its noise, time steps, masks and dropout depend only on (seed, rank, step)."""
    import numpy as np
    import torch

    value = step_seed(seed, rank, step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


class StopRequest:
    """Signal handlers for one rank's run, installed for the duration of a `with` block.

    `role` "single": SIGINT/SIGTERM request the stop; "rank": a DDP rank, which ignores them and
    obeys FORWARDED from the parent instead. `signum` is the first signal seen (None: none).
    Outside the main thread (handlers cannot be installed) it never requests a stop.
    """

    def __init__(self, role: str = "single") -> None:
        self.role = role
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        try:
            if self.role == "rank":
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._previous[sig] = signal.signal(sig, signal.SIG_IGN)
                self._previous[FORWARDED] = signal.signal(FORWARDED, self._handle)
            else:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals to whoever owns them
            self._previous.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # After a signal the process is on its way out (TrainingInterrupted / HardStop):
            # one more Ctrl-C must not raise inside the clean-up or at exit.
            signal.signal(sig, handler if self.signum is None else signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.role == "rank":
            # Only the parent knows which signal the user sent; it reports the exit status.
            signum = signal.SIGINT
        if self.signum is not None:
            for sig in self._previous:  # a third signal must not interrupt the unwinding
                signal.signal(sig, signal.SIG_IGN)
            raise HardStop(self.signum, HARD_STOP_MESSAGE)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def interrupted_message(step: int, checkpoint: str, signum: int) -> str:
    name = SIGNAL_NAMES.get(signum, f"signal {signum}")
    return (
        f"stopped on {name} after step {step}, saved {checkpoint}; "
        "run the same command again to continue from there"
    )


class ForwardToRanks:
    """The DDP parent's handlers: each SIGINT/SIGTERM is passed on to the ranks as FORWARDED;
    `signum` keeps the first one (the exit status), `count` how many arrived."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> ForwardToRanks:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        self.count += 1
        for pid in self.pids():
            try:
                os.kill(pid, FORWARDED)
            except ProcessLookupError:
                pass


def spawn_ranks(fn: Callable[..., Any], trainer: Any, world_size: int) -> None:
    """mp.spawn(fn, (world_size, trainer)) with the parent forwarding signals to the ranks;
    raises TrainingInterrupted (or HardStop after a second signal) once they have stopped."""
    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=(world_size, trainer), nprocs=world_size, join=False)
    with ForwardToRanks(lambda: [p.pid for p in context.processes if p.pid]) as forward:
        try:
            while not context.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if forward.count < 2:
                raise
    if forward.signum is None:
        return
    if forward.count >= 2:
        raise HardStop(forward.signum, HARD_STOP_MESSAGE)
    from zipvoice.training.checkpoints import list_checkpoints

    saved = list_checkpoints(trainer.exp_dir)
    step, path = saved[-1] if saved else (0, "no checkpoint")
    message = interrupted_message(step, str(path), forward.signum)
    raise TrainingInterrupted(forward.signum, message)
