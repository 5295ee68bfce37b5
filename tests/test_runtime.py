"""keep_freed_memory: repeated large allocations stop page-faulting (glibc only); full_float32's
TF32 switches in either of torch's APIs."""

import re
import subprocess
import sys

import pytest

# In a fresh process (glibc's adaptive thresholds depend on the allocation history): allocate,
# touch and free 8 MiB (2048 pages, above glibc's initial mmap threshold of 128 KiB and below
# ours of 32 MiB) five times, and count the page faults after the first.
PROBE = """
import resource, sys
import numpy as np
from pretrain_reuse.runtime import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print(-1); sys.exit()
np.ones(8 << 20, np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    np.ones(8 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_lets_a_step_reuse_the_last_steps_memory():
    kept = faults("keep")
    if kept == -1:
        pytest.skip("the C library is not glibc")
    assert kept < 64  # the heap's memory is reused: no page is faulted in again
    # without the setting a fresh process gives the first freed block back and faults it in anew
    assert faults("default") > 256


def test_full_float32_turns_tf32_off_inside_and_restores_the_callers_settings():
    # through torch's fp32_precision settings: the legacy allow_tf32 flags raised a RuntimeError
    # once anything (transformers' tf32 option) had used the new API
    import torch

    from pretrain_reuse.runtime import full_float32

    matmul, conv, glob = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends
    before = glob.fp32_precision, matmul.fp32_precision, conv.fp32_precision
    try:
        glob.fp32_precision = "tf32"
        matmul.fp32_precision = conv.fp32_precision = "tf32"

        @full_float32()
        def inside():
            return matmul.fp32_precision, conv.fp32_precision

        assert inside() == ("ieee", "ieee")
        with pytest.raises(RuntimeError, match="inside"), full_float32():
            raise RuntimeError("inside")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        glob.fp32_precision, matmul.fp32_precision, conv.fp32_precision = before


LEGACY_TF32 = """
import torch
from pretrain_reuse.runtime import full_float32
torch.set_float32_matmul_precision("high")  # the legacy API, as most training scripts set it
torch.backends.cudnn.allow_tf32 = True
before = torch._C._get_cublas_allow_tf32(), torch._C._get_cudnn_allow_tf32()
with full_float32():
    # what every cuBLAS and cuDNN call asks on a GPU: it raised on the mix of the two APIs
    inside = torch._C._get_cublas_allow_tf32(), torch._C._get_cudnn_allow_tf32()
print(before, inside, (torch._C._get_cublas_allow_tf32(), torch._C._get_cudnn_allow_tf32()))
"""


def test_full_float32_after_the_legacy_tf32_api_leaves_gpu_calls_working():
    # setting only the new API after a caller's set_float32_matmul_precision("high") made every
    # cuBLAS matmul inside the block raise "mix of the legacy and new APIs" (on GPUs only)
    import torch

    if not hasattr(torch._C, "_get_cublas_allow_tf32"):
        pytest.skip("this torch has no TF32 query")
    done = subprocess.run([sys.executable, "-c", LEGACY_TF32], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(True, True) (False, False) (True, True)"


def test_the_host_group_waits_as_long_as_the_default_group(tmp_path):
    # it waited torch's 30 minutes for a new group: under torchrun the other processes wait in
    # it while rank 0 alone evaluates, which the default group allows 2 hours for
    import torch
    import torch.distributed as dist

    from pretrain_reuse.distributed import COLLECTIVE_TIMEOUT, new_host_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=COLLECTIVE_TIMEOUT)
    try:
        group = new_host_group()
        assert group._get_backend(torch.device("cpu")).options._timeout == COLLECTIVE_TIMEOUT
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_rank, asked, expected", [
    ("2", "cuda", "cuda:2"), ("2", "cuda:1", "cuda:2"),  # torchrun: the local rank's GPU
    # a group started without torchrun (mp.spawn, srun) sets no local rank: every process was
    # put on GPU 0; the launcher's current device, or the GPU asked, is kept
    (None, "cuda", "cuda:3"), (None, "cuda:1", "cuda:1"),
])
def test_each_process_of_a_group_keeps_its_gpu(monkeypatch, local_rank, asked, expected):
    import torch

    import pretrain_reuse.distributed as distributed

    monkeypatch.setattr(distributed, "rank_world", lambda: (1, 2))
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert distributed.process_device(asked) == torch.device(expected)
    assert chosen == [torch.device(expected)]


AGREE_BF16 = """
import torch, torch.distributed as dist
from pretrain_reuse.distributed import uses_bf16
dist.init_process_group("gloo")
rank = dist.get_rank()
# rank 0's GPU computes in bf16 natively, rank 1's (a V100, say) does not
torch.cuda.is_bf16_supported = lambda including_emulation=True: rank == 0
first = uses_bf16("auto", torch.device("cuda"))
torch.cuda.is_bf16_supported = lambda including_emulation=True: True
again = uses_bf16("auto", torch.device("cuda"))  # the agreement is kept: no second collective
print(f"rank {rank}: {first} {again} {uses_bf16('bf16', torch.device('cuda'))}", flush=True)
dist.destroy_process_group()
"""


def test_the_processes_of_a_run_agree_on_auto_precision(tmp_path):
    # each process decided by its own GPU: on a host of two GPU generations DDP averaged the
    # gradients of bf16 and float32 processes, and embed mixed shards of both in one store
    from _helpers import torchrun

    script = tmp_path / "agree.py"
    script.write_text(AGREE_BF16)
    done = torchrun([script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two processes' lines may reach torchrun's stdout run together
    assert sorted(re.findall(r"rank \d: (?:True|False) (?:True|False) (?:True|False)",
                             done.stdout)) == [
        "rank 0: False False True", "rank 1: False False True"]
