"""Fine-tuning step cost: ``reuse`` vs ``vanilla``, and the training loop vs a bare loop.

For each model, in one run, on the same in-memory data (random uint8 images at the backbone's input
size, so no resize is needed):

- the library's loop (:func:`pretrain_reuse.finetune.train`) in ``vanilla`` and ``reuse`` mode
  with the same batch size; the time of every optimiser step is taken from an optimiser-step
  hook, so evaluation and checkpointing are not counted. ``reuse`` pushes a target batch and an
  equally sized source batch through the backbone, so about 2x is expected (goal: <= 2.2x);
- a bare loop on the same model and optimiser (SGD, Nesterov, the same parameter groups): fixed
  pre-stacked, normalised batches, ``zero_grad``, forward, cross-entropy, ``backward``, ``step``:
  the cost of the model alone. Training-loop images/s over bare images/s is what the loop keeps
  (goal: >= 85 %). The loop is timed with its default augmentation (RandomResizedCrop + flip,
  batched on the device, :mod:`pretrain_reuse.finetune.augment`) and with ``augment="none"``
  (centre crop only), to show what the augmentation costs.

All runs are interleaved over rounds, so that load changes hit all alike. Each run's time is its
fastest timed step (after warm-up steps) over all rounds: the cost of the code itself, as
``timeit`` reasons. On a shared machine the speed changes in phases of 0.1 to 1 s: measured here,
steps of one run at 16 and at 25 ms, thread CPU time equal to wall time, no page faults, no
preemption; so the median step of a round (``--statistic median``: the best round's median, the
earlier measure) depends on which phases the round met, and its ratios moved by 10 points from
one run of the benchmark to the next, the fastest step's by 4.

glibc's malloc is set to keep freed memory (:func:`pretrain_reuse.runtime.keep_freed_memory`, as
the command line does): by its default heuristics, whether the memory of a step's activations
goes back to the OS, to be page-faulted in again by the next step, depends on the process's
allocation history; measured here, 0 to 3400 page faults per step, in the bare loop as much as in
the library's, made a step up to 2x slower and the ratios swing by 20 points from run to run.
``--malloc default`` leaves it alone. Run by hand, not in CI:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune.py --models smallcnn-s smallcnn --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from pretrain_reuse.data.datasets import ArrayDataset
from pretrain_reuse.finetune import FinetuneConfig, train
from pretrain_reuse.finetune.data import SourceData
from pretrain_reuse.finetune.model import FinetuneModel
from pretrain_reuse.models import create_backbone
from pretrain_reuse.runtime import keep_freed_memory

N_CLASSES, N_SOURCE_CLASSES = 10, 20
STATISTICS = {"fastest": "the fastest step over the rounds", "median": "the best round's median"}


def arrays(n: int, side: int, n_classes: int, seed: int, name: str) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n) % n_classes,
                        class_names=[f"{name}{c}" for c in range(n_classes)], name=name)


def make_model(name: str, seed: int, source_classes: int | None) -> FinetuneModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(name)
    return FinetuneModel(backbone, N_CLASSES, source_classes=source_classes, seed=seed)


def time_loop(name: str, mode: str, augment: str, data: dict, args, work: Path) -> list[float]:
    """Seconds of each optimiser step of the library's training loop (after warm-up)."""
    cfg = FinetuneConfig(mode=mode, max_steps=args.warmup + args.steps, batch_size=args.batch_size,
                         eval_every=10**6, checkpoint_every=10**6, augment=augment,
                         seed=args.seed)
    source = None
    if mode == "reuse":
        ds = data["source"]
        source = SourceData(ds, ds.labels.copy(), ds.labels.copy(), N_SOURCE_CLASSES)
    model = make_model(name, args.seed, N_SOURCE_CLASSES if mode == "reuse" else None)
    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        train(cfg, model, data["train"], data["val"], data["test"], source, work,
              progress=False)
    finally:
        handle.remove()
    return list(np.diff(stamps))[args.warmup - 1:]


def time_bare(name: str, mode: str, layout: str, data: dict, args, work: Path) -> list[float]:
    """Seconds of each step of a bare forward+backward loop on fixed batches (after warm-up)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = make_model(name, args.seed, N_SOURCE_CLASSES if mode == "reuse" else None).train()
    model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.param_groups(0.003, 10.0, 1e-4), momentum=0.9,
                                nesterov=True)
    spec = model.backbone.spec
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def batch(ds: ArrayDataset, step: int):
        idx = np.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(ds)
        x = torch.stack([ds.load(int(i)) for i in idx])
        return ((x - mean) / std).contiguous(memory_format=fmt), torch.as_tensor(ds.labels[idx])

    n_batches = 4
    targets = [batch(data["train"], s) for s in range(n_batches)]
    sources = [batch(data["source"], s) for s in range(n_batches)]
    times = []
    for step in range(args.warmup + args.steps):
        x, y = targets[step % n_batches]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if mode == "reuse":
            sx, sy = sources[step % n_batches]
            z = model.features(torch.cat([x, sx]))
            loss = (F.cross_entropy(model.head(z[:len(x)]), y)
                    + 0.3 * F.cross_entropy(model.source_head(z[len(x):]), sy))
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smallcnn-s", "smallcnn"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings "
                   "on a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of all runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--statistic", choices=["fastest", "median"], default="fastest",
                   help="a run's time: its fastest step over all rounds, or the best round's "
                   "median step")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: glibc malloc keeps freed memory (steady timings); default: as is")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    malloc = "keeps freed memory" if args.malloc == "keep" and keep_freed_memory() else "default"
    print(f"batch {args.batch_size} (+ {args.batch_size} source images for reuse), "
          f"{args.steps} timed steps after {args.warmup}, x {args.repeats} rounds (after a "
          f"warm-up round), s/step: {STATISTICS[args.statistic]}; torch threads "
          f"{args.threads}, cpus {os.cpu_count()}, malloc {malloc}, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'model':<12} {'input':>6} {'vanilla s/step':>14} {'reuse s/step':>12} "
              f"{'reuse/vanilla':>13} {'bare r/v':>8} | {'loop img/s':>10} {'no-aug img/s':>12} "
              f"{'bare img/s':>10} {'layout':>6} {'loop/bare':>9} {'no-aug/bare':>11} "
              f"{'reuse loop/bare':>15}")
    with tempfile.TemporaryDirectory(prefix="bench_finetune.") as tmp:
        work = Path(tmp)
        print(header)
        print("-" * len(header))
        for name in args.models:
            side = create_backbone(name).spec.input_size[0]
            n = max(4 * args.batch_size, (args.warmup + args.steps) * args.batch_size // 4)
            data = {"train": arrays(n, side, N_CLASSES, 1, "t"),
                    "val": arrays(N_CLASSES, side, N_CLASSES, 2, "v"),
                    "test": arrays(N_CLASSES, side, N_CLASSES, 3, "e"),
                    "source": arrays(n, side, N_SOURCE_CLASSES, 4, "s")}
            runs = {"vanilla": (time_loop, "vanilla", "standard"),
                    "reuse": (time_loop, "reuse", "standard"),
                    "no_aug": (time_loop, "vanilla", "none"),
                    "bare_v_cl": (time_bare, "vanilla", "channels_last"),
                    "bare_r_cl": (time_bare, "reuse", "channels_last"),
                    "bare_v_c": (time_bare, "vanilla", "contiguous"),
                    "bare_r_c": (time_bare, "reuse", "contiguous")}
            times: dict[str, list[float]] = {k: [] for k in runs}  # per round: its statistic
            # interleaved rounds, so that load changes hit all alike; round 0 only warms up
            for r in range(args.repeats + 1):
                for key, (fn, mode, variant) in runs.items():
                    t = fn(name, mode, variant, data, args,
                           work / f"{name.replace(':', '_')}-{key}-{r}")
                    if r:
                        times[key].append(min(t) if args.statistic == "fastest"
                                          else statistics.median(t))
            med = {k: min(v) for k, v in times.items()}
            vanilla, reuse, no_aug = med["vanilla"], med["reuse"], med["no_aug"]
            # the anchor is the faster plain loop of the two memory layouts
            layout = "cl" if med["bare_v_cl"] <= med["bare_v_c"] else "c"
            bare_v, bare_r = med[f"bare_v_{layout}"], med[f"bare_r_{layout}"]
            b = args.batch_size
            print(f"{name:<12} {side:>6} {vanilla:14.4f} {reuse:12.4f} {reuse / vanilla:12.2f}x "
                  f"{bare_r / bare_v:7.2f}x | {b / vanilla:10.1f} {b / no_aug:12.1f} "
                  f"{b / bare_v:10.1f} {layout:>6} {bare_v / vanilla:9.1%} {bare_v / no_aug:11.1%} "
                  f"{bare_r / reuse:15.1%}")
    print("reuse/vanilla: the loop's step time ratio (goal <= 2.2x); bare r/v: the same for the "
          "bare loop (the model's own cost of the second batch); loop/bare: vanilla loop img/s "
          "over bare img/s (goal >= 85%), with augmentation (loop) and without (no-aug); bare "
          "loops run in both memory layouts, the faster is the anchor (cl: channels_last, c: "
          "contiguous)")
    print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
