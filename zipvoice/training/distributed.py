"""Device and DDP set-up for one training process, and the collective helpers the loop uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def is_main(rank: int) -> bool:
    """Rank 0 writes files and logs scalars; the other ranks only compute."""
    return rank == 0


def launcher_ranks() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when a launcher (torchrun) started this process: it sets
    RANK, LOCAL_RANK and WORLD_SIZE, and MASTER_ADDR/MASTER_PORT for the rendezvous."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), world_size


def setup_distributed(rank: int, world_size: int, master_port: int) -> torch.device:
    """This rank's device; with several processes, the process group (NCCL or gloo). Under a
    launcher the GPU is the local rank's and the rendezvous the launcher's MASTER_ADDR/PORT."""
    launched = launcher_ranks()
    local_rank = launched[1] if launched is not None else rank
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        os.environ.setdefault("MASTER_ADDR", "localhost")
        if launched is None:
            os.environ["MASTER_PORT"] = str(master_port)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return device


def teardown_distributed(world_size: int) -> None:
    """Leave the process group cleanly. A barrier first, then a moment without the GIL: gloo's
    worker thread frees each finished collective (it needs the GIL to drop the Python tensors
    it held). Destroying the group, or the DDP reducer that owns it, while such a free is
    pending deadlocks in ~ProcessGroupGloo (seen with torchrun: one rank never exits)."""
    if world_size > 1 and dist.is_initialized():
        import time

        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


def all_ranks_agree(flag: bool, world_size: int, device: torch.device) -> bool:
    """True only when `flag` is true on every rank (so all ranks skip a batch together)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(value: object, world_size: int) -> object:
    """Rank 0's `value` on every rank."""
    if world_size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather_objects(value: object, world_size: int) -> list[object]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size == 1:
        return [value]
    gathered: list[object] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered
