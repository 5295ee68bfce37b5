r"""Masked games of a classifier on one input: players, baselines and ``v(x_S)`` for all 2^n S.

A sample ``x`` (already in the model's input space: resized, normalised) is split into ``n``
players, pixel regions of the input. For a coalition ``S`` (a bitmask, bit i = player i present,
the layout of :mod:`~pretrain_reuse.knowledge.interactions`) the masked input keeps the players
in ``S`` and replaces the others by a baseline:

.. math:: x_S = m_S \odot x + (1 - m_S) \odot b, \qquad m_S = \min(1, \textstyle\sum_{i\in S} P_i)

(pixels of no player follow ``background``: always the baseline, or always the original), and
``v(x_S)`` is the network's log-odds of the ground-truth class ``y``,
``v = z_y - \log\sum_{c\ne y} e^{z_c}`` (Jiang, Cheng & Li, arXiv 2410.08455; the group's
convention). All 2^n masked inputs are built on the model's device in chunks and evaluated in
large batches, which is where the time of an interaction analysis goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PretrainReuseError, check_choice
from .interactions import MAX_PLAYERS

BACKGROUNDS = ("baseline", "original")
BASELINES = ("zero", "mean", "blur")
OUTPUTS = ("log-odds", "log-odds-clipped", "logit")


@dataclass(frozen=True)
class Players:
    """``n`` players as pixel masks over the model input.

    Attributes:
        masks: (n, H, W) bool; player ``i`` covers the pixels where ``masks[i]`` is True.
        background: what pixels outside every player show: ``"baseline"`` (always masked, the
            group's default) or ``"original"`` (always present).
        names: a name per player (``"cell 2,3"``, a part name, ...).
        meta: how the players were chosen (rule, seed), so the choice is reproducible.
    """

    masks: np.ndarray
    background: str = "baseline"
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_choice("background", self.background, BACKGROUNDS)
        m = np.asarray(self.masks, dtype=bool)
        if m.ndim != 3 or not 1 <= len(m) <= MAX_PLAYERS:
            raise PretrainReuseError(
                f"players must be (n, H, W) masks with 1 <= n <= {MAX_PLAYERS}, got shape {m.shape}")
        empty = np.flatnonzero(~m.reshape(len(m), -1).any(axis=1))
        if len(empty):
            raise PretrainReuseError(f"player {empty[0]} covers no pixel; every player needs pixels")
        object.__setattr__(self, "masks", m)

    @property
    def n(self) -> int:
        return len(self.masks)


def grid_players(size: tuple[int, int], grid: tuple[int, int], *, n: int | None = None,
                 seed: int = 0, margin: int = 1) -> Players:
    """A ``grid`` of equal cells over an input of ``size`` = (H, W); each cell is a player.

    When the grid has more cells than ``n``, the ``n`` players are drawn at random (seeded, the
    same for every model) from the cells at least ``margin`` cells away from the border, as Liu,
    Deng, Cheng et al. (NeurIPS 2023) draw 12 of the central 6x6 cells of an 8x8 grid; the other
    cells are background. Choosing players independently of the models keeps comparisons between
    models unbiased (choosing them by one model's saliency would not).
    """
    (h, w), (gh, gw) = size, grid
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise PretrainReuseError(f"grid {gh}x{gw} does not fit an input of {h}x{w} pixels")
    ys, xs = np.linspace(0, h, gh + 1).round().astype(int), np.linspace(0, w, gw + 1).round().astype(int)
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    chosen = cells
    rule = "all cells"
    if n is not None and n < len(cells):
        inner = [(r, c) for r, c in cells
                 if margin <= r < gh - margin and margin <= c < gw - margin]
        pool = inner if len(inner) >= n else cells
        pick = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
        chosen = [pool[i] for i in pick]
        rule = f"{n} random cells of the {'central' if pool is inner else 'whole'} grid"
    elif n is not None and n > len(cells):
        raise PretrainReuseError(f"n={n} players but the {gh}x{gw} grid has {len(cells)} cells")
    masks = np.zeros((len(chosen), h, w), bool)
    for k, (r, c) in enumerate(chosen):
        masks[k, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = True
    return Players(masks, names=[f"cell {r},{c}" for r, c in chosen],
                   meta={"players": "grid", "grid": [gh, gw], "n": len(chosen), "seed": seed,
                         "margin": margin, "rule": rule})


def mask_players(masks: np.ndarray, *, names: list[str] | None = None,
                 background: str = "baseline") -> Players:
    """Players from user-given masks (segments, annotated parts), at the model's input size."""
    return Players(np.asarray(masks, bool), background=background, names=names,
                   meta={"players": "masks", "n": len(masks)})


def resize_players(players: Players, size: tuple[int, int]) -> Players:
    """The same players at another resolution (nearest neighbour), e.g. the model's input size."""
    m = torch.from_numpy(players.masks).float()[:, None]
    resized = F.interpolate(m, size=size, mode="nearest")[:, 0].numpy() > 0.5
    return Players(resized, background=players.background, names=players.names, meta=players.meta)


def baseline_input(x: torch.Tensor, kind: str, *, mean: torch.Tensor | None = None,
                   sigma: float | None = None) -> torch.Tensor:
    """The baseline ``b`` that absent players are replaced with (model input space).

    - ``zero``: all zeros, i.e. the dataset-mean colour for normalised inputs;
    - ``mean``: ``mean``, a (C,) or (C, H, W) mean of the data in input space;
    - ``blur``: ``x`` blurred by a Gaussian of std ``sigma`` pixels (default: 1/8 of the side).
    """
    check_choice("baseline", kind, BASELINES)
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        if mean is None:
            raise PretrainReuseError("baseline 'mean' needs the data mean (pass mean=...)")
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
        return (mean.view(-1, 1, 1) if mean.ndim == 1 else mean).expand_as(x).clone()
    sigma = sigma or max(x.shape[-2:]) / 8
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    row, col = k.view(1, 1, 1, -1).expand(c, 1, 1, -1), k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    y = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="replicate"), row, groups=c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), col, groups=c)
    return y[0]


def coalitions(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^n, n) 0/1 matrix: row ``S`` has bit ``i`` of ``S`` in column ``i``."""
    s = torch.arange(2**n, device=device)
    return ((s[:, None] >> torch.arange(n, device=device)) & 1).float()


def class_output(logits: torch.Tensor, label: int, kind: str = "log-odds") -> torch.Tensor:
    """``v`` from logits (B, C): ``log-odds`` = z_y - logsumexp_{c != y} z_c (exact, no clipping);
    ``log-odds-clipped`` = log(p/(1-p+1e-7)+1e-7), the group's formula (saturates near ±16);
    ``logit`` = z_y."""
    z = logits.double()
    if kind == "logit":
        return z[:, label]
    if kind == "log-odds":
        others = torch.cat([z[:, :label], z[:, label + 1:]], dim=1)
        return z[:, label] - torch.logsumexp(others, dim=1)
    p = torch.softmax(z, dim=1)[:, label]
    return torch.log(p / (1 - p + 1e-7) + 1e-7)


@torch.no_grad()
def masked_game(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, label: int,
                players: Players, baseline: torch.Tensor, *, output: str = "log-odds",
                batch_size: int = 256) -> np.ndarray:
    """``v(x_S)`` for all ``2^n`` coalitions, float64, in bitmask layout.

    Args:
        model: maps a batch of inputs (B, C, H, W) to logits (B, classes); on ``x``'s device.
        x: one input (C, H, W) in the model's input space.
        label: the class whose output is explained.
        players: masks at the input's (H, W).
        baseline: (C, H, W), see :func:`baseline_input`.
        output: one of :data:`OUTPUTS`.
        batch_size: masked inputs per forward pass.
    """
    check_choice("output", output, OUTPUTS)
    if tuple(players.masks.shape[1:]) != tuple(x.shape[-2:]):
        raise PretrainReuseError(
            f"players are {players.masks.shape[1]}x{players.masks.shape[2]} but the input is "
            f"{x.shape[-2]}x{x.shape[-1]}; resize the players (resize_players) to the input size")
    n, device = players.n, x.device
    p = torch.from_numpy(players.masks).to(device, x.dtype).reshape(n, -1)
    rest = 1.0 if players.background == "original" else 0.0
    outside = (p.sum(0) == 0).to(x.dtype) * rest
    values = torch.empty(2**n, dtype=torch.float64)
    bits = coalitions(n, device).to(x.dtype)
    for s in range(0, 2**n, batch_size):
        m = ((bits[s:s + batch_size] @ p).clamp_(max=1.0) + outside).view(-1, 1, *x.shape[-2:])
        xs = m * x + (1 - m) * baseline
        logits = model(xs)
        if logits.ndim != 2 or not 0 <= label < logits.shape[1]:
            raise PretrainReuseError(
                f"the model's output has shape {tuple(logits.shape)}; it must give logits with "
                f"class {label} among them")
        values[s:s + batch_size] = class_output(logits, label, output).cpu()
    return values.numpy()
