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
    """``device``, except that under ``torchrun`` each process takes the GPU of its local rank."""
    if rank_world()[1] > 1 and device.startswith("cuda"):
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device(device)
