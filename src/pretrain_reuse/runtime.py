"""Process-wide settings: for long CPU jobs (the command line applies them, library users may),
and the numerical precision of the interaction games on GPUs."""

from __future__ import annotations

import contextlib
import ctypes
import sys


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation up to 32 MiB from its heap and never shrink the
    heap below 1 GiB of free memory, so that each training step reuses the memory of the last
    instead of faulting it in anew.

    By its default heuristics glibc hands the memory of a step's activations back to the OS or
    not depending on the process's allocation history; measured on the 2-core development
    machine, 0 to 3400 page faults per step made a CPU training step up to 2x slower, and the
    demo's pre-training stage took 24-26 s with this setting against 32-34 s without. The cost is
    that the process keeps its peak heap. Returns False (and changes nothing) where the C library
    is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


@contextlib.contextmanager
def full_float32():
    """Float32 convolutions and matrix products in full float32 inside the block (also as a
    decorator). cuDNN's default on Ampere and later GPUs is TF32, whose 10-bit mantissa errs by
    about 1e-3; an interaction is a signed sum of up to 2^n game values, which adds such errors
    up (about 32x at n = 10) into spurious salient interactions."""
    import torch

    # torch >= 2.9 has two APIs for TF32, the legacy allow_tf32 flags and fp32_precision, and
    # refuses a mix of them (every cuBLAS call raises): both are switched, the legacy flags first
    # (their setters update the new API), then the new API's own flags, which a caller may have
    # set apart. A flag whose reading raises (the caller's own mix) is left alone.
    cudnn = torch.backends.cudnn
    flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (cudnn, "allow_tf32", False),
             (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
             *((getattr(cudnn, kind), "fp32_precision", "ieee") for kind in ("conv", "rnn")
               if hasattr(cudnn, kind))]
    settings = []  # (owner, attribute, value before, value inside)
    for owner, name, inside in flags:
        try:
            settings.append((owner, name, getattr(owner, name), inside))
        except (AttributeError, RuntimeError):
            continue
    for owner, name, _, inside in settings:
        setattr(owner, name, inside)
    try:
        yield
    finally:
        for owner, name, before, _ in settings:  # a legacy setter overwrites the new API: first
            setattr(owner, name, before)
