r"""Spatial contiguity: do salient interactions join neighbouring players more often than chance?

Reviewer 5 of Jiang, Cheng & Li (arXiv 2410.08455) asked whether interactions between image
patches merely reflect correlated, neighbouring patches (docs/knowledge.md §5). Two players are
adjacent when their pixel regions touch along an edge (:func:`player_adjacency`; cells of a grid
that meet at a corner only are not adjacent), and a coalition S is *contiguous* when its players
induce a connected subgraph of that graph (:func:`contiguous_coalitions`). An image region the
interaction reads as one piece (an object part spanning two cells) is contiguous; a rule that
combines parts anywhere in the image is not, except by chance.

For a knowledge set K (preserved, discarded, new, exclusive) and its items of order |S| >= 2 on
every sample x (a single player is contiguous by definition), :func:`contiguity` reports

* the observed share c = (1/m) Σ_x Σ_{S ∈ K(x)} [S contiguous], m the number of those items;
* the chance share e = (1/m) Σ_x Σ_{S ∈ K(x)} p_x(|S|), where p_x(k) is the share of all k-subsets
  of x's players that are contiguous: the share that coalitions drawn uniformly at random with
  the same orders would have on the same players;
* the enrichment c / e, and z = Σ ([S contiguous] − p_x(|S|)) / sqrt(Σ p_x(|S|) (1 − p_x(|S|))),
  the excess in standard deviations under that null. It treats the items as independent draws,
  which the overlapping coalitions of one sample are not: a guide to the size of the excess, not
  a significance test.

The null is exact for the players of each sample (a 3x3 grid, or n cells drawn from a larger grid,
some of them isolated); it says nothing about which contiguous coalitions a model should prefer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PretrainReuseError
from .interactions import MAX_PLAYERS, orders
from .metrics import PAPER_RATIOS, KnowledgeReport

__all__ = ["Contiguity", "contiguity", "contiguous_coalitions", "player_adjacency"]


def player_adjacency(masks: np.ndarray) -> np.ndarray:
    """(n, n) bool: players ``i != j`` are adjacent when a pixel of one is an edge neighbour (up,
    down, left or right) of a pixel of the other, or they share a pixel.

    Args:
        masks: (n, H, W) bool pixel masks of the players (:attr:`~.games.Players.masks`).
    """
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3 or not 1 <= len(m) <= MAX_PLAYERS:
        raise PretrainReuseError(f"masks must be (n, H, W) player masks with 1 <= n <= {MAX_PLAYERS}, "
                                 f"got shape {m.shape}")
    grown = m.copy()  # each mask and its edge neighbours
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    grown[:, :, 1:] |= m[:, :, :-1]
    grown[:, :, :-1] |= m[:, :, 1:]
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
    touch = (flat(grown) @ flat(m).T) > 0
    touch |= touch.T
    np.fill_diagonal(touch, False)
    return touch


def contiguous_coalitions(adjacency: np.ndarray) -> np.ndarray:
    r"""(2^n,) bool in bitmask layout: whether the players of each coalition S induce a connected
    subgraph of the graph ``adjacency`` (the empty coalition is not contiguous; one player is).

    By the recursion: S with |S| >= 2 is connected iff some player v of S leaves S \ {v}
    connected and is adjacent to a player of S \ {v} (if S is connected, any leaf of a spanning
    tree of S is such a v; the converse is immediate). Computed order by order, n vector
    operations over the coalitions of each order: O(n 2^n).

    Args:
        adjacency: (n, n) symmetric bool matrix, False on the diagonal (:func:`player_adjacency`).
    """
    a = np.asarray(adjacency, dtype=bool)
    n = len(a)
    if a.shape != (n, n) or not 1 <= n <= MAX_PLAYERS:
        raise PretrainReuseError(f"adjacency must be an (n, n) matrix with 1 <= n <= {MAX_PLAYERS}, "
                                 f"got shape {a.shape}")
    if (a != a.T).any() or a.diagonal().any():
        raise PretrainReuseError("adjacency must be symmetric with a False diagonal (a player is "
                                 "not its own neighbour)")
    neighbours = a.astype(np.int64) @ (1 << np.arange(n, dtype=np.int64))  # bitmask per player
    masks = np.arange(1 << n, dtype=np.int64)
    order = orders(n)
    out = order == 1
    for k in range(2, n + 1):
        s = masks[order == k]
        ok = np.zeros(len(s), bool)
        for v in range(n):
            bit = 1 << v
            ok |= ((s & bit) != 0) & out[s ^ bit] & ((s & int(neighbours[v])) != 0)
        out[s] = ok
    return out


@dataclass(frozen=True)
class Contiguity:
    """How often each knowledge set's interactions join neighbouring players (:func:`contiguity`).

    Attributes (each ``{set: (samples,) array}``, the set's items of order >= 2 on every sample):
        items: how many there are.
        contiguous: how many of them are contiguous.
        expected: Σ p_x(|S|) over them, their expected number of contiguous ones under the null.
        variance: Σ p_x(|S|) (1 − p_x(|S|)), the variance of that number under the null.
    """

    items: dict[str, np.ndarray]
    contiguous: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    variance: dict[str, np.ndarray]

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every sample's counts
        shown = ", ".join(f"{name}={self.share(name):.2f} (chance {self.chance(name):.2f})"
                          for name in self.items)
        return f"Contiguity(samples={len(next(iter(self.items.values())))}, contiguous: {shown})"

    def _totals(self, name: str) -> tuple[int, float, float, float]:
        if name not in self.items:
            raise PretrainReuseError(f"no set {name!r}; the sets are {list(self.items)}")
        return (int(self.items[name].sum()), float(self.contiguous[name].sum()),
                float(self.expected[name].sum()), float(self.variance[name].sum()))

    def share(self, name: str) -> float:
        """c: the share of the set's items of order >= 2 that are contiguous (NaN if none)."""
        m, c, _, _ = self._totals(name)
        return c / m if m else math.nan

    def chance(self, name: str) -> float:
        """e: the share random coalitions of the same orders would have (NaN if no items)."""
        m, _, e, _ = self._totals(name)
        return e / m if m else math.nan

    def enrichment(self, name: str) -> float:
        """c / e (NaN when no item could be contiguous by chance)."""
        _, c, e, _ = self._totals(name)
        return c / e if e > 0 else math.nan

    def z(self, name: str) -> float:
        """The excess of contiguous items over chance in standard deviations of the null (NaN
        when the null has no spread)."""
        _, c, e, w = self._totals(name)
        return (c - e) / math.sqrt(w) if w > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Per set: items of order >= 2, the contiguous and chance shares, the enrichment and z
        (NaN as None), as ``knowledge.json`` holds it."""
        def number(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {name: {"items": self._totals(name)[0], "contiguous_share": number(self.share(name)),
                       "chance_share": number(self.chance(name)),
                       "enrichment": number(self.enrichment(name)), "z": number(self.z(name))}
                for name in self.items}


def contiguity(report: KnowledgeReport, adjacency: Sequence[np.ndarray]) -> Contiguity:
    """The contiguity of each knowledge set of ``report`` against chance (module docstring).

    Args:
        report: a :class:`~.metrics.KnowledgeReport`; its sets preserve, discard, new and (with
            a scratch model) exclusive are measured.
        adjacency: one (n, n) adjacency matrix per sample of the report, in its order, over that
            sample's players (:func:`player_adjacency` of its player masks).
    """
    if not isinstance(report, KnowledgeReport):
        raise PretrainReuseError(f"report must be a KnowledgeReport, got {type(report).__name__}")
    adjacency = list(adjacency)
    if len(adjacency) != len(report.samples):
        raise PretrainReuseError(f"got {len(adjacency)} adjacency matrices for a report of "
                                 f"{len(report.samples)} samples; pass one per sample, in its order")
    names = [n for n in PAPER_RATIOS if getattr(report.samples[0], n) is not None]
    counts = {name: np.zeros((len(adjacency), 4)) for name in names}
    for i, (sample, a) in enumerate(zip(report.samples, adjacency, strict=True)):
        if np.shape(a) != (sample.n, sample.n):
            raise PretrainReuseError(f"adjacency[{i}] has shape {np.shape(a)} but sample {i} has "
                                     f"{sample.n} players; pass an ({sample.n}, {sample.n}) matrix")
        connected = contiguous_coalitions(a)
        order = orders(sample.n)
        p = np.bincount(order, weights=connected, minlength=sample.n + 1) / \
            np.bincount(order, minlength=sample.n + 1)
        for name in names:
            masks = np.array(sorted(int(item[1]) for item in getattr(sample, name)), dtype=np.int64)
            masks = masks[order[masks] >= 2]
            q = p[order[masks]]
            counts[name][i] = len(masks), connected[masks].sum(), q.sum(), (q * (1 - q)).sum()
    return Contiguity(*({name: c[:, j] for name, c in counts.items()} for j in range(4)))
