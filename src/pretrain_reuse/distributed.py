"""Where this process stands in a ``torchrun`` job (rank, world size, its GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_device(device: str) -> torch.device:
    """``device``, except that under ``torchrun`` each process takes the GPU of its local rank.

    A GPU named by its index becomes the current CUDA device: pinned memory and any context
    created without an explicit device go to the current one, GPU 0 unless set, which would
    then hold memory of (or fail for, in exclusive mode) a run on ``cuda:3``."""
    if rank_world()[1] > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev
