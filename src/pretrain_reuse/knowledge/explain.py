"""``explain``: interactions of a classifier on a set of samples, computed the same way for every
model that is compared (same samples, same players, same baseline).

For each sample: the backbone's eval preprocessing, the players (a grid of patches or the parts of
the synthetic world), the baseline, the masked game ``v(x_S)`` over all 2^n coalitions
(:func:`~pretrain_reuse.knowledge.games.masked_game`), then the AND (default, the paper's
Harsanyi interactions) or AND-OR decomposition, batched over samples. Games are cached in the
output folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_path, make_meta
from ..data.datasets import ImageDataset
from ..embed import preprocessed
from ..errors import PretrainReuseError, check_choice, check_device
from ..models import Backbone
from .games import (
    BASELINES,
    OUTPUTS,
    Players,
    baseline_input,
    grid_players,
    learn_baseline,
    mask_players,
    masked_game,
    resize_players,
)
from .sparsify import and_interactions, and_or_interactions
from .values import Interactions

DECOMPOSITIONS = ("and", "and-or")


@dataclass(frozen=True)
class ExplainConfig:
    """How games are built and decomposed.

    ``players``: ``"grid:RxC"`` (a grid of patches; with ``n`` set, ``n`` cells drawn by the
    documented rule of :func:`~.games.grid_players`) or ``"parts"`` (the slots of the synthetic
    world, the ground-truth players). ``qthres``: bound of the noise the sparsification may remove,
    relative to |v(N) - v(∅)|; None = 0 for ``and`` (the exact Harsanyi transform) and 0.04 for
    ``and-or`` (the group's setting).

    ``baseline="learned"`` learns each sample's baseline for each model
    (:func:`~.games.learn_baseline`, Ren et al., CVPR 2023): it starts from ``zero`` (the data's
    mean colour) and stays within ``baseline_radius`` (input units, i.e. data standard deviations)
    of it and inside the valid pixel range; ``baseline_lr`` and ``baseline_steps`` are the
    optimiser's settings (the group's example: 1e-3, 50). A learned baseline differs between the
    compared models, so their games differ in the baseline as well as in the network.
    """

    players: str = "grid:3x3"
    n: int | None = None
    baseline: str = "zero"
    baseline_lr: float = 1e-3
    baseline_steps: int = 50
    baseline_radius: float = 0.5
    output: str = "log-odds"
    decomposition: str = "and"
    qthres: float | None = None
    samples: int = 20
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self):
        check_choice("baseline", self.baseline, (*BASELINES,))
        check_choice("output", self.output, OUTPUTS)
        check_choice("decomposition", self.decomposition, DECOMPOSITIONS)
        check_device(self.device)
        if not (self.players == "parts" or re.fullmatch(r"grid:\d+x\d+", self.players)):
            raise PretrainReuseError(f"players={self.players!r}: use grid:RxC (e.g. grid:4x4) or parts")
        if self.samples < 1:
            raise PretrainReuseError(f"samples must be >= 1, got {self.samples}")
        if not (self.baseline_lr > 0 and self.baseline_radius > 0 and self.baseline_steps >= 0):
            raise PretrainReuseError(
                f"baseline_lr={self.baseline_lr} and baseline_radius={self.baseline_radius} must "
                f"be > 0 and baseline_steps={self.baseline_steps} >= 0")

    @property
    def noise_bound(self) -> float:
        if self.qthres is not None:
            return self.qthres
        return 0.0 if self.decomposition == "and" else 0.04


def sample_players(dataset: ImageDataset, index: int, cfg: ExplainConfig,
                   size: tuple[int, int]) -> Players:
    """The players of one sample at the model's input ``size``."""
    if cfg.players == "parts":
        if not hasattr(dataset, "scene"):
            raise PretrainReuseError(
                "players='parts' needs data with part annotations (the synthetic world); use "
                "players='grid:RxC' for other images")
        scene = dataset.scene(index)
        players = mask_players(scene.player_masks(),
                               names=[f"slot {k}" for k in range(len(scene.cells))])
        return resize_players(players, size)
    rows, cols = (int(v) for v in cfg.players[5:].split("x"))
    return grid_players(size, (rows, cols), n=cfg.n, seed=cfg.seed)


def _image_game(model: Backbone, x: torch.Tensor, label: int, players: Players,
                cfg: ExplainConfig, mean: torch.Tensor | None) -> np.ndarray:
    """v(x_S) of one sample under the configured (fixed or learned) baseline."""
    if cfg.baseline != "learned":
        b = baseline_input(x, cfg.baseline, mean=mean)
        return masked_game(model, x, label, players, b, output=cfg.output,
                           batch_size=cfg.batch_size)
    init = baseline_input(x, "zero")
    spec = model.spec
    mean_c = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_c = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    # the box: within the radius of the mean colour, and a valid image ((0 - mean)/std..(1 - mean)/std)
    lower = torch.maximum(init - cfg.baseline_radius, (0 - mean_c) / std_c).expand_as(x)
    upper = torch.minimum(init + cfg.baseline_radius, (1 - mean_c) / std_c).expand_as(x)
    learned = learn_baseline(model, x, label, players, init, lower.contiguous(),
                             upper.contiguous(), lr=cfg.baseline_lr, steps=cfg.baseline_steps,
                             output=cfg.output, batch_size=cfg.batch_size)
    return learned.game


def choose_samples(dataset: ImageDataset, k: int, seed: int,
                   keep: np.ndarray | None = None) -> np.ndarray:
    """``k`` sample positions drawn evenly over classes (seeded), among ``keep`` if given."""
    if dataset.labels is None:
        raise PretrainReuseError("explaining needs labelled samples (the class to explain)")
    candidates = np.arange(len(dataset)) if keep is None else np.flatnonzero(keep)
    rng = np.random.default_rng([seed, 11])
    order = candidates[rng.permutation(len(candidates))]
    # round-robin over classes, so that every class is represented before any repeats
    labels = dataset.labels[order]
    rank = np.zeros(len(order), int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return np.sort(order[np.argsort(rank, kind="stable")][:k])


def explain(model: Backbone, dataset: ImageDataset, indices: np.ndarray, cfg: ExplainConfig,
            out: str | Path | None = None, *, role: str = "model",
            progress: bool = True) -> list[Interactions]:
    """Interactions of ``model`` (a classifier over ``dataset``'s classes) on the samples at
    ``indices``; with ``out``, games and interactions are saved there (and reused on rerun)."""
    if model.num_classes is None or model.layer != "penultimate":
        raise PretrainReuseError(
            f"{role}: the model must be a classifier with a head (got num_classes="
            f"{model.num_classes}); pass the weights of a fine-tuned or linear-probe model")
    n_classes = len(dataset.class_names or []) or int(dataset.labels.max()) + 1
    if model.num_classes != n_classes:
        raise PretrainReuseError(
            f"{role}: the model outputs {model.num_classes} classes but the data has {n_classes}; "
            "pass a model trained on this data's classes")
    device = torch.device(cfg.device)
    model = model.to(device).eval()
    data = preprocessed(dataset, model.preprocess)
    size = tuple(model.spec.input_size)
    folder = Path(out) if out is not None else None
    if folder is not None:
        (folder / "games").mkdir(parents=True, exist_ok=True)
    xs = [data.load(int(i)) for i in indices]
    if any(x is None for x in xs):
        raise PretrainReuseError("some chosen samples are unreadable images; pick other samples")
    mean = torch.stack(xs).mean(dim=0).to(device) if cfg.baseline == "mean" else None
    games, infos = [], []
    for i, x in tqdm(list(zip(indices, xs, strict=True)), desc=f"explain {role}", unit="sample",
                     disable=not progress):
        players = sample_players(dataset, int(i), cfg, size)
        cache = None if folder is None else folder / "games" / f"{int(i):07d}.npy"
        label = int(dataset.labels[i])
        if cache is not None and cache.exists():
            v = np.load(cache)
        else:
            x = x.to(device)
            v = _image_game(model, x, label, players, cfg, mean)
            if cache is not None:
                with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, v)
        games.append(v)
        infos.append({"sample": dataset.ids[int(i)], "index": int(i), "label": label,
                      "class": (dataset.class_names or [str(label)] * (label + 1))[label],
                      "players": players.meta, "player_names": players.names, "role": role,
                      "model": model.spec.name, "baseline": cfg.baseline, "output": cfg.output})
    decompose = and_interactions if cfg.decomposition == "and" else and_or_interactions
    results = decompose(np.stack(games), qthres=cfg.noise_bound)
    meta = make_meta("knowledge.explain", asdict(cfg), seed=cfg.seed)
    out_list = []
    for k, (res, info) in enumerate(zip(results, infos, strict=True)):
        res = Interactions(n=res.n, and_values=res.and_values, or_values=res.or_values, v=res.v,
                           noise=res.noise, kind=res.kind, info=info, meta={**res.meta, **meta})
        if folder is not None:
            res.save(folder / f"interactions-{k:04d}.safetensors")
        out_list.append(res)
    return out_list
