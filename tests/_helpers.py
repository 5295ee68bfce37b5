"""Helpers shared by several test files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pretrain_reuse.models import SmallCNN


def kill_when(cmd: list[str], ready, *, env: dict, timeout: float = 180.0,
              sig: int = signal.SIGKILL, group: bool = False) -> tuple[int, str]:
    """Start ``cmd``; send it ``sig`` (SIGKILL) as soon as ``ready()`` holds, to its whole
    process group with ``group`` (as a terminal's Ctrl-C reaches a command's child processes);
    fail if it ends first. Returns its exit status and stderr."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=group)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the run ended (rc={proc.returncode}) before the kill point: "
                            f"{err.decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was never reached")
            time.sleep(0.005)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        return proc.returncode, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def torchrun(argv: list, tmp: Path, *, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``argv`` (a script or ``-m module``, and its arguments) under ``torchrun --standalone
    --nproc_per_node 2``, one thread per process, ``env`` added to the environment. torchrun's
    temporary folders go under ``tmp``: it leaves one in the system's /tmp per run otherwise."""
    scratch = tmp / "torchrun-tmp"
    scratch.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(scratch),
             **(env or {})},
        capture_output=True, text=True, timeout=timeout)


def smallcnn_from_file(path: Path) -> SmallCNN:
    """The raw SmallCNN architecture (sizes read off the file), loaded strictly."""
    state = load_file(str(path))
    net = SmallCNN(width=state["blocks.0.weight"].shape[0],
                   num_classes=state["fc.weight"].shape[0])
    net.load_state_dict(state, strict=True)
    return net.eval()


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so eval-mode features depend on the loaded buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def tiny_bert(folder: Path, words: list[str], model_class: str = "BertModel", **config) -> Path:
    """``hf:<folder>`` of a tiny BERT ``model_class`` (a transformers class name), randomly
    initialised with seed 0, and a word-level tokenizer over ``words``; ``config``: further
    ``BertConfig`` fields."""
    import inspect

    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    else:  # transformers < 5 reads the vocabulary from a file
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tok = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=64, **config)
    getattr(transformers, model_class)(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def colour_folder(root, classes: int, per_class: int, seed: int) -> None:
    """An image folder of ``classes`` classes of small images, one colour per class plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 * c, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
