"""``embed`` throughput vs a bare forward loop of the same model on the same decoded batches.

For each model: a folder of ``--n`` random PNG images is embedded with
:func:`pretrain_reuse.embed.embed` (decode with PIL, the backbone's eval preprocessing, forward,
safetensors shards, index), timed after a warm-up run. The anchor is the same backbone's
``features`` called under ``torch.no_grad`` on the same images, decoded and preprocessed once
beforehand and batched the same way: the cost of the model alone. The ratio of the two throughputs
is what ``embed`` keeps of the model's speed (goal: >= 85 %). Decoding + preprocessing alone is
timed too, since on a CPU it competes with the forward pass for the same cores unless workers
overlap it. Run by hand, not in CI:

    .venv/bin/python benchmarks/embed.py --models smallcnn torchvision:resnet18 --n 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretrain_reuse.data.catalog import open_dataset
from pretrain_reuse.embed import EmbedConfig, embed, preprocessed
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.models import create_backbone


def write_folder(root: Path, n: int, side: int, seed: int) -> Path:
    """``n`` smooth random RGB images of ``side`` px in 4 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (side // 8 + 2, side // 8 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.png")
    return root


def embed_once(cfg: EmbedConfig, out: Path) -> tuple[float, float, FeatureStore]:
    """Wall time of a complete ``embed`` call into a fresh ``out``, and of its shard loop alone
    (the ``seconds`` embed records, which start after model creation)."""
    t0 = time.perf_counter()
    store = embed(cfg, out, progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(out)
    return wall, store.meta["seconds"], store


@torch.no_grad()
def bare_once(backbone, batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    feats = [backbone.features(x) for x in batches]
    return time.perf_counter() - t0, torch.cat(feats).numpy()


def as_layout(backbone, batches: list[torch.Tensor], layout: str):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    backbone.to(memory_format=fmt)
    return [x.contiguous(memory_format=fmt) for x in batches]


def decode_direct(paths: list[Path], preprocess) -> float:
    """Seconds to decode with PIL and preprocess, without embed's tensor -> PIL round trip."""
    t0 = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            preprocess(im.convert("RGB"))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smallcnn", "torchvision:resnet18"])
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--side", type=int, default=64, help="side of the generated images (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings "
                   "on a shared machine)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench_embed."))
    try:
        data = write_folder(work / "data", args.n, args.side, args.seed)
        print(f"{args.n} images of {args.side} px, batch {args.batch_size}, workers {args.workers}, "
              f"torch threads {args.threads}, cpus {os.cpu_count()}, load "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; median of {args.repeats}")
        header = (f"{'model':<22} {'input':>7} {'embed img/s':>11} {'loop img/s':>10} "
                  f"{'bare fwd img/s':>14} {'bare layout':>13} {'ratio':>6} {'loop ratio':>10} "
                  f"{'decode+prep img/s':>17} {'PIL direct img/s':>16} {'max |diff|':>10}")
        print(header)
        print("-" * len(header))
        for name in args.models:
            cfg = EmbedConfig(model=name, data=str(data), batch_size=args.batch_size,
                              workers=args.workers, shard_size=max(args.n, 1), seed=args.seed)
            # the same decoded, preprocessed images, batched the same way
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                backbone = create_backbone(name)
            dataset = preprocessed(open_dataset(str(data)), backbone.preprocess)
            t0 = time.perf_counter()
            items = [dataset[i][0] for i in range(len(dataset))]
            prep = time.perf_counter() - t0
            direct = decode_direct(dataset.dataset.paths, backbone.preprocess)
            batches = [torch.stack(items[i:i + args.batch_size])
                       for i in range(0, len(items), args.batch_size)]
            embed_once(cfg, work / "warmup")
            layouts = {name: as_layout(backbone, batches, name)
                       for name in ("contiguous", "channels_last")}
            for layout, xs in layouts.items():  # warm-up
                as_layout(backbone, [], layout)
                bare_once(backbone, xs[:1])
            walls, loops = [], []
            bares: dict[str, list[float]] = {k: [] for k in layouts}
            for r in range(args.repeats):  # interleaved, so that load changes hit all alike
                wall, loop, store = embed_once(cfg, work / f"store{r}")
                walls.append(wall)
                loops.append(loop)
                for layout, xs in layouts.items():
                    as_layout(backbone, [], layout)
                    seconds, feats = bare_once(backbone, xs)
                    bares[layout].append(seconds)
            wall, loop = statistics.median(walls), statistics.median(loops)
            # the anchor is the faster plain loop of the two memory layouts
            best = min(bares, key=lambda k: statistics.median(bares[k]))
            bare = statistics.median(bares[best])
            diff = float(np.abs(feats - store.features).max())
            size = "x".join(map(str, backbone.spec.input_size))
            print(f"{name:<22} {size:>7} {args.n / wall:11.1f} {args.n / loop:10.1f} "
                  f"{args.n / bare:14.1f} {best:>13} {bare / wall:6.1%} {bare / loop:10.1%} "
                  f"{args.n / prep:17.1f} {args.n / direct:16.1f} {diff:10.2e}")
        print("ratio = embed img/s (whole call: model creation, decode, preprocess, forward, "
              "shards, index) / bare forward img/s; loop ratio = the same for embed's shard loop "
              "alone; decode+prep = embed's path (PIL -> float tensor -> PIL -> preprocess), "
              "serial; PIL direct = PIL -> preprocess")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
