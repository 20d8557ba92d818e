"""Small distributed helpers that also work without a process group (one process, no torchrun)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); returns (rank, world, local rank).

    NCCL on CUDA, gloo on the CPU. Without torchrun: (0, 1, 0) and no process group.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 writes logs and checkpoints."""
    return get_rank() == 0


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average scalar tensors over processes (identity without a process group)."""
    if not is_distributed():
        return values
    stacked = torch.stack([values[k].detach().float() for k in sorted(values)])
    dist.all_reduce(stacked)
    return {k: v / get_world_size() for k, v in zip(sorted(values), stacked, strict=True)}


def all_gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's (M_r, ...) array concatenated in rank order, on every rank (identity without a process group)."""
    if not is_distributed():
        return rows
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, rows)
    return np.concatenate(gathered)


def broadcast_object(obj: object) -> object:
    """Rank 0's Python object on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()
