"""How a `Trainer` is run: one process, spawned DDP ranks, or one rank of a launcher's job.

`Trainer.fit()` calls `fit`. The exp-dir lock (`zipvoice.utils.lock.FolderLock`: two runs in
one exp-dir would overwrite each other's checkpoints) is held by the process that writes: the
single process, the parent of the spawned ranks, or rank 0 of a torchrun job. Before spawning,
the master port is checked to be free, so a clash is one line instead of a hung gloo rendezvous.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from torch import nn

from zipvoice.training.distributed import launcher_ranks
from zipvoice.training.interrupt import spawn_ranks

if TYPE_CHECKING:
    from zipvoice.training.trainer import Trainer

logger = logging.getLogger("zipvoice.train")


def _fit_rank(rank: int, world_size: int, trainer: Trainer) -> nn.Module:
    """The function each spawned rank runs (module level: mp.spawn pickles it)."""
    return trainer.fit_rank(rank, world_size)


def fit(trainer: Trainer) -> nn.Module | None:
    """Train on one process, or spawn `run.world_size` DDP processes (returns None then)."""
    from zipvoice.utils.lock import FolderLock
    from zipvoice.utils.resources import check_port_free

    launched = launcher_ranks()
    if launched is not None:
        return fit_launched(trainer, *launched)
    run = trainer.config.run
    with FolderLock(trainer.exp_dir, "training run"):
        if run.world_size > 1:
            check_port_free(run.master_port, os.environ.get("MASTER_ADDR", "localhost"))
            spawn_ranks(_fit_rank, trainer, run.world_size)
            return None
        return trainer.fit_rank(0, 1)


def fit_launched(trainer: Trainer, rank: int, local_rank: int, world_size: int) -> nn.Module | None:
    """One rank of a launcher's (torchrun's) job: rank 0 holds the exp-dir lock and writes;
    --world-size is the launcher's WORLD_SIZE, not a number of processes to spawn."""
    from zipvoice.utils.lock import FolderLock

    logger.info("rank %d/%d (local %d) from the launcher", rank, world_size, local_rank)
    if rank != 0:
        trainer.fit_rank(rank, world_size)
        return None
    with FolderLock(trainer.exp_dir, "training run"):
        model = trainer.fit_rank(rank, world_size)
    return model if world_size == 1 else None
