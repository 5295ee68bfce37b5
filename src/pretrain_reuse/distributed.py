"""Where this process stands in a ``torchrun`` job (rank, world size, its GPU), how small
tensors made on the CPU reach that GPU, and whether it computes in bf16 there."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

#: How long a process waits in a collective: the others wait in their next one while rank 0
#: alone evaluates, checkpoints or writes the feature index, and NCCL's default of 10 minutes
#: (gloo's, and a new group's, 30) is too short for a large test set.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def new_host_group():
    """A gloo group of all the processes, for small agreements between their CPUs: through
    NCCL, reading the result would make the host wait for the GPU. It waits as long as the
    default group (:data:`COLLECTIVE_TIMEOUT`; a new group's own default is 30 minutes)."""
    return dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_device(device: str) -> torch.device:
    """``device``, except that under ``torchrun`` each process takes the GPU of its local rank
    (``LOCAL_RANK``). A process group started otherwise (``mp.spawn``, ``srun`` without
    torchrun) sets no local rank: there ``cuda`` is the current CUDA device, which the launcher
    chose, and ``cuda:N`` stays GPU N, never GPU 0 for every process.

    A GPU named by its index becomes the current CUDA device: pinned memory and any context
    created without an explicit device go to the current one, GPU 0 unless set, which would
    then hold memory of (or fail for, in exclusive mode) a run on ``cuda:3``."""
    if rank_world()[1] > 1 and device.startswith("cuda"):
        local = os.environ.get("LOCAL_RANK")
        if local is not None:
            device = f"cuda:{int(local)}"
        elif device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the copy.

    A copy to a CUDA device from ordinary (pageable) CPU memory blocks the host until the GPU
    has finished all the work queued before it, so a training step that moves its labels or its
    augmentations' random draws to the GPU would drain the queue several times per step. From
    page-locked (pinned) memory the copy is queued like a kernel: the CPU tensor is pinned first
    (torch's caching host allocator keeps the pinned block until the copy has run), then copied
    with ``non_blocking=True``. Anywhere else (the CPU, or a tensor already on ``device``) this
    is ``tensor.to(device)``: pinning needs CUDA, and the values are the same either way."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a computation on ``device`` at ``precision`` (a config's ``auto``, ``fp32`` or
    ``bf16``) runs under bf16 autocast: ``bf16`` always, ``fp32`` never, and ``auto`` on a CUDA
    GPU that computes in bf16 natively (``torch.cuda.is_bf16_supported(including_emulation=
    False)``: NVIDIA's compute capability 8.0 (Ampere) and later, and AMD's GPUs). Older GPUs
    (V100, T4) only emulate bf16, slower than float32, so ``auto`` is float32 there, as on the
    CPU. The GPU asked is the current CUDA device, which :func:`process_device` makes ``device``.

    Embedding and fine-tuning both decide by this function. In a process group every process
    must compute alike (DDP averages their gradients, embed's shards form one store), so for
    ``auto`` on GPUs the processes agree, on their first call, to bf16 only if every GPU has it
    natively (a host of A100s and V100s computes in float32), and keep that answer."""
    if precision != "auto":
        return precision == "bf16"
    if device.type != "cuda":
        return False
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if rank_world()[1] == 1:
        return native
    if device.type not in _AGREED_BF16:  # every process calls it first at the same point
        flag = torch.tensor([int(native)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=new_host_group())
        _AGREED_BF16[device.type] = bool(flag.item())
    return _AGREED_BF16[device.type]


#: The processes' agreement on ``auto`` precision (:func:`uses_bf16`), made once per process.
_AGREED_BF16: dict[str, bool] = {}


def bf16_autocast(device: torch.device, use_bf16: bool):
    """bf16 autocast on ``device``, or nothing (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
