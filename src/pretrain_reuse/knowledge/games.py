r"""Masked games of a classifier on one input: players, baselines and ``v(x_S)`` for all 2^n S.

A sample ``x`` (already in the model's input space: resized, normalised) is split into ``n``
players, pixel regions of the input. For a coalition ``S`` (a bitmask, bit i = player i present,
the layout of :mod:`~pretrain_reuse.knowledge.interactions`) the masked input keeps the players
in ``S`` and replaces the others by a baseline:

.. math:: x_S = m_S \odot x + (1 - m_S) \odot b, \qquad m_S = \min(1, \textstyle\sum_{i\in S} P_i)

(pixels of no player follow ``background``: always the baseline, always the original, or
averaged over blends of the two), and
``v(x_S)`` is the network's log-odds of the ground-truth class ``y``, ``v = z_y - \log\sum_{c\ne y}
e^{z_c}`` (the output of Jiang, Cheng & Li's group in their code; which output arXiv 2410.08455
itself used is not stated, docs/knowledge.md §1). All 2^n masked inputs are built on the model's device
in chunks and evaluated in large batches, which is where the time of an interaction analysis goes.

The baseline is fixed (zero, mean, blur, shrink: :func:`baseline_input`) or learned per sample and model
so that the AND interactions are as sparse as possible (:func:`learn_baseline`, Ren et al.,
CVPR 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import PretrainReuseError, check_choice, is_integer, is_number
from ..runtime import full_float32
from .interactions import MAX_PLAYERS, harsanyi_and, superset_sum_

#: What the pixels of no player show in every masked input (:attr:`Players.background`).
BACKGROUNDS = ("baseline", "original", "integrated")
#: The blends a of the "integrated" background: its pixels show a x + (1 - a) b, the game's v
#: averaged over them (Li & Zhang's part players).
INTEGRATED_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 11))
#: Fixed baselines of :func:`baseline_input`.
FIXED_BASELINES = ("zero", "mean", "blur", "shrink")
#: How far the "shrink" baseline moves each normalised input value toward 0 (Liu et al. 2023).
SHRINK_TAU = 2.0
#: Image baselines of an explanation: the fixed ones, or learned by :func:`learn_baseline`.
BASELINES = (*FIXED_BASELINES, "learned")
#: The outputs of :func:`class_output` that are the log-odds of the class, so their sign is the
#: model's decision (p(y) > 1/2).
LOG_ODDS_OUTPUTS = ("log-odds", "log-odds-clipped")
#: What :func:`class_output` computes as ``v`` from the logits.
OUTPUTS = (*LOG_ODDS_OUTPUTS, "logit")


@dataclass(frozen=True)
class Players:
    """``n`` players as pixel masks over the model input.

    Attributes:
        masks: (n, H, W) bool; player ``i`` covers the pixels where ``masks[i]`` is True.
        background: what pixels outside every player show: ``"baseline"`` (always masked, the
            group's default), ``"original"`` (always present) or ``"integrated"`` (v averaged
            over the blends a x + (1 - a) b of those pixels, a in :data:`INTEGRATED_LEVELS`; Li
            & Zhang's "integrated background" of part players; 10 times the forward passes).
        names: a name per player (``"cell 2,3"``, a part name, ...).
        meta: how the players were chosen (rule, seed), so the choice is reproducible.
    """

    masks: np.ndarray
    background: str = "baseline"
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every mask
        n, h, w = np.shape(self.masks)
        names = "" if self.names is None else f", names={self.names!r}"
        return f"Players(n={n}, masks of {h}x{w}, background={self.background!r}{names})"

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
        """The number of players."""
        return len(self.masks)


def grid_players(size: tuple[int, int], grid: tuple[int, int], *, n: int | None = None,
                 seed: int | Sequence[int] = 0, margin: int = 1,
                 background: str = "baseline") -> Players:
    """A ``grid`` of equal cells over an input of ``size`` = (H, W); each cell is a player.

    When the grid has more cells than ``n``, the ``n`` players are drawn at random by numpy's
    ``default_rng(seed)`` from the cells at least ``margin`` cells away from the border, as Liu,
    Deng, Cheng et al. (NeurIPS 2023) draw 12 of the central 6x6 cells of an 8x8 grid, seeded per
    sample (their code seeds ``RandomState(seed=i)`` for sample i); the other cells are
    background, shown as :attr:`Players.background` says (their default: the baseline). The
    explanation passes ``seed=[seed, sample index]``: other cells for every sample, the same
    cells for every model. Choosing players independently of the models keeps comparisons
    between models unbiased (choosing them by one model's saliency would not).
    """
    (h, w), (gh, gw) = size, grid
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise PretrainReuseError(f"grid {gh}x{gw} does not fit an input of {h}x{w} pixels; use "
                                 f"1..{h} rows and 1..{w} columns (players='grid:RxC')")
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
    return Players(masks, background=background, names=[f"cell {r},{c}" for r, c in chosen],
                   meta={"players": "grid", "grid": [gh, gw], "n": len(chosen), "seed": seed_json(seed),
                         "margin": margin, "rule": rule})


def seed_json(seed: int | Sequence[int]) -> int | list[int]:
    """A seed (or seed sequence) of ``default_rng`` as it is recorded in JSON."""
    return [int(s) for s in seed] if isinstance(seed, Sequence) else int(seed)


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
                   sigma: float | None = None, tau: float = SHRINK_TAU) -> torch.Tensor:
    """The baseline ``b`` that absent players are replaced with (model input space).

    - ``zero``: all zeros, i.e. the normalisation's mean colour for normalised inputs;
    - ``mean``: ``mean``, a (C,) or (C, H, W) mean of the data in input space;
    - ``blur``: ``x`` blurred by a Gaussian of std ``sigma`` pixels (default: 1/8 of the side);
    - ``shrink``: every value of ``x`` moved toward 0 by at most ``tau`` (soft thresholding,
      ``b = sign(x) max(|x| - tau, 0)``; Liu et al. 2023's baseline of the authors' group, tau =
      2 normalisation stds): values within ``tau`` of the mean colour take it, the image's
      strongest contrasts keep their excess.
    """
    check_choice("baseline", kind, FIXED_BASELINES)
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "shrink":
        if not (is_number(tau) and 0 <= tau < float("inf")):
            raise PretrainReuseError(f"shrink baseline tau={tau!r} must be a number >= 0")
        return torch.sign(x) * (x.abs() - tau).clamp_min(0)
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


def coalitions(n: int, device: torch.device | str = "cpu", start: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """(stop - start, n) 0/1 matrix of the coalitions ``start..stop-1`` (all 2^n by default):
    row ``S`` has bit ``i`` of ``S`` in column ``i``."""
    s = torch.arange(start, 2**n if stop is None else stop, device=device)
    return ((s[:, None] >> torch.arange(n, device=device)) & 1).float()


def class_output(logits: torch.Tensor, label: int, kind: str = "log-odds") -> torch.Tensor:
    """``v`` from logits (B, C): ``log-odds`` = z_y - logsumexp_{c != y} z_c (exact, no clipping);
    ``log-odds-clipped`` = log(p/(1-p+1e-7)+1e-7), the group's formula (saturates near ±16);
    ``logit`` = z_y. Raises when the logits are not (B, C) with class ``label`` among them."""
    if logits.ndim != 2 or not 0 <= label < logits.shape[1]:
        raise PretrainReuseError(
            f"the model's output has shape {tuple(logits.shape)}; it must give logits with "
            f"class {label} among them")
    z = logits.double()
    if kind == "logit":
        return z[:, label]
    if kind == "log-odds":
        others = torch.cat([z[:, :label], z[:, label + 1:]], dim=1)
        return z[:, label] - torch.logsumexp(others, dim=1)
    p = torch.softmax(z, dim=1)[:, label]
    return torch.log(p / (1 - p + 1e-7) + 1e-7)


#: ``values(baseline, bits)``: v of the coalitions whose 0/1 rows are ``bits`` (B, n), float64,
#: differentiable in ``baseline``.
ChunkValues = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def image_values(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, label: int,
                 players: Players, output: str) -> ChunkValues:
    """The chunk evaluator of the image game (validated inputs)."""
    n = players.n
    p = torch.from_numpy(players.masks).to(x.device, x.dtype).reshape(n, -1)
    outside = (p.sum(0) == 0).to(x.dtype)
    # how much of the image the pixels of no player show: one level, or the integrated blends
    levels = {"baseline": (0.0,), "original": (1.0,),
              "integrated": INTEGRATED_LEVELS}[players.background]

    def blend(baseline: torch.Tensor, shown: torch.Tensor, a: float) -> torch.Tensor:
        m = (shown + a * outside).view(-1, 1, *x.shape[-2:])
        return class_output(model(m * x + (1 - m) * baseline), label, output)

    def values(baseline: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        shown = (bits.to(x.dtype) @ p).clamp_(max=1.0)
        if len(levels) == 1:
            return blend(baseline, shown, levels[0])
        if not torch.is_grad_enabled():
            return sum(blend(baseline, shown, a) for a in levels) / len(levels)
        # a learned baseline's gradient would hold the graphs of all the blends at once: each
        # is recomputed in the backward pass instead, so memory holds one batch's graph
        return sum(checkpoint(blend, baseline, shown, a, use_reentrant=False)
                   for a in levels) / len(levels)

    return values


def _check_image_game(x: torch.Tensor, players: Players, output: str, baseline: torch.Tensor,
                      name: str = "baseline") -> None:
    """The checks of an image game's inputs; ``baseline`` is called ``name`` in errors."""
    check_choice("output", output, OUTPUTS)
    for what, t in (("x", x), (name, baseline)):
        if not isinstance(t, torch.Tensor):
            raise PretrainReuseError(f"{what} must be a torch tensor (C, H, W), got "
                                     f"{type(t).__name__}; convert it with torch.as_tensor")
    if x.ndim != 3:
        raise PretrainReuseError(f"x must be one input (C, H, W), got shape {tuple(x.shape)}")
    if baseline.shape != x.shape:
        raise PretrainReuseError(f"{name} is {tuple(baseline.shape)} but the input is "
                                 f"{tuple(x.shape)}; pass one shaped like the input (baseline_input)")
    if tuple(players.masks.shape[1:]) != tuple(x.shape[-2:]):
        raise PretrainReuseError(
            f"players are {players.masks.shape[1]}x{players.masks.shape[2]} but the input is "
            f"{x.shape[-2]}x{x.shape[-1]}; resize the players (resize_players) to the input size")


@torch.no_grad()
def game_values(values: ChunkValues, baseline: torch.Tensor, n: int, batch_size: int
                ) -> torch.Tensor:
    """(2^n,) float64 on the CPU: ``values`` on every coalition, ``batch_size`` at a time."""
    out = torch.empty(2**n, dtype=torch.float64)
    for s in range(0, 2**n, batch_size):
        bits = coalitions(n, baseline.device, s, min(s + batch_size, 2**n))
        out[s:s + len(bits)] = values(baseline, bits).cpu()
    return out


@torch.no_grad()
def coalition_values(values: ChunkValues, baseline: torch.Tensor, n: int,
                     masks: Sequence[int]) -> np.ndarray:
    """(k,) float64: ``values`` on the coalitions ``masks`` (bitmasks) only, in one batch; e.g.
    v(N) and v(∅), to check a stored game against its model with two forward passes."""
    s = torch.as_tensor(list(masks), device=baseline.device)
    bits = ((s[:, None] >> torch.arange(n, device=baseline.device)) & 1).float()
    return values(baseline, bits).cpu().numpy()


@full_float32()  # as explain computes games: no TF32 on GPUs
def masked_game(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, label: int,
                players: Players, baseline: torch.Tensor, *, output: str = "log-odds",
                batch_size: int = 256) -> np.ndarray:
    """``v(x_S)`` for all ``2^n`` coalitions, float64, in bitmask layout.

    Args:
        model: maps a batch of inputs (B, C, H, W) to logits (B, classes); on ``x``'s device.
        x: one input (C, H, W) in the model's input space.
        label: the class whose output is explained.
        players: masks at the input's (H, W).
        baseline: (C, H, W), see :func:`baseline_input` and :func:`learn_baseline`.
        output: one of :data:`OUTPUTS`.
        batch_size: masked inputs per forward pass; memory holds one batch, never all 2^n.
    """
    _check_image_game(x, players, output, baseline)
    values = image_values(model, x, label, players, output)
    return game_values(values, baseline, players.n, batch_size).numpy()


@dataclass(frozen=True)
class LearnedBaseline:
    """A baseline learned for sparse interactions, with its optimisation record.

    Attributes:
        baseline: the learned b (shape of the initial value), on its device.
        game: (2^n,) float64 v of the coalitions under ``baseline``.
        loss: (steps + 1,) Σ_S |I_and(S)| at every iterate; entry 0 is the initial value.
        best_step: the iterate returned (the one with the lowest loss).
        params: lr, steps, momentum.
    """

    baseline: torch.Tensor
    game: np.ndarray
    loss: np.ndarray
    best_step: int
    params: dict[str, Any]


@full_float32()  # as explain computes games: no TF32 on GPUs
def learn_baseline(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, label: int,
                   players: Players, init: torch.Tensor, lower: torch.Tensor,
                   upper: torch.Tensor, *, lr: float = 1e-3, steps: int = 50,
                   output: str = "log-odds", batch_size: int = 256) -> LearnedBaseline:
    r"""The baseline b in a box that makes the AND interactions of one sample sparsest.

    .. math::

        \min_{b_{min} \le b \le b_{max}} \sum_{S \subseteq N} |I_b(S)|, \qquad
        I_b(S) = \sum_{T \subseteq S} (-1)^{|S|-|T|} v(x_T^{(b)})

    with x_T^{(b)} the input whose absent players show b (Ren, Li, Chen, Deng & Zhang, CVPR 2023,
    arXiv 2111.06206; docs/knowledge.md §1; ∅ included, as in the group's sparsification loss).
    Our choices where the source is silent: projected SGD with momentum 0.9 (the group's optimiser
    for baselines and sparsification), projection onto the box after every step, and the iterate
    with the lowest loss is returned (the initial value included, so the result is never worse
    than ``init``). Gradient: dL/db = Σ_S g_S dv_S/db with g = Mᵀ sign(I) (the superset
    butterfly), accumulated over batches of coalitions, so memory holds one batch. Each step costs
    2^n forward and 2^n backward passes; deterministic for a given device.

    Args:
        model, x, label, players, output, batch_size: as for :func:`masked_game`.
        init: (C, H, W) starting baseline, e.g. :func:`baseline_input` ``"zero"``.
        lower, upper: the box (b_min, b_max), shaped like ``init``, ``lower <= init <= upper``.
        lr: learning rate (1e-3 as in the group's example).
        steps: iterations (50 as in the group's example).
    """
    _check_image_game(x, players, output, init, "init")
    return _descend(image_values(model, x, label, players, output), init, lower, upper,
                    players.n, lr=lr, steps=steps, batch_size=batch_size)


def _descend(values: ChunkValues, init: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
             n: int, *, lr: float, steps: int, batch_size: int) -> LearnedBaseline:
    """Projected SGD on Σ|Möbius(v_b)|; validates the box and the settings."""
    if not (is_integer(steps) and steps >= 0):
        raise PretrainReuseError(f"baseline steps={steps!r} must be an integer >= 0")
    if not (is_number(lr) and 0 < lr < float("inf")):
        raise PretrainReuseError(f"baseline lr={lr!r} must be a positive number")
    if not (init.shape == lower.shape == upper.shape):
        raise PretrainReuseError(
            f"init {tuple(init.shape)}, lower {tuple(lower.shape)} and upper "
            f"{tuple(upper.shape)} must have the same shape")
    if bool((lower > init).any() or (init > upper).any()):
        raise PretrainReuseError("the initial baseline must lie inside [lower, upper]")
    b = init.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([b], lr=lr, momentum=0.9)
    losses, best = [], None
    for step in range(steps + 1):
        v = game_values(values, b.detach(), n, batch_size)
        interactions = harsanyi_and(v)
        losses.append(float(interactions.abs().sum()))
        if best is None or losses[-1] < losses[best[0]]:
            best = (step, b.detach().clone(), v)
        if step == steps:
            break
        g = superset_sum_(torch.sign(interactions), n, -1.0).to(b.device)  # dL/dv = Mᵀ sign(Mv)
        grad = torch.zeros_like(b)
        for s in range(0, 2**n, batch_size):
            bits = coalitions(n, b.device, s, min(s + batch_size, 2**n))
            with torch.enable_grad():  # the gradient of b only: the model's .grad stay untouched
                chunk = (values(b, bits) * g[s:s + len(bits)]).sum()
                grad += torch.autograd.grad(chunk, b)[0]
        b.grad = grad
        opt.step()
        with torch.no_grad():
            b.copy_(torch.minimum(torch.maximum(b, lower), upper))
    step, baseline, v = best
    return LearnedBaseline(baseline=baseline, game=v.numpy(), loss=np.array(losses),
                           best_step=step, params={"lr": lr, "steps": steps, "momentum": 0.9})
