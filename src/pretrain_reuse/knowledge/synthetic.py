"""Synthetic games with known AND/OR interactions, for tests, benchmarks and the demo."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from ..errors import PretrainReuseError, is_integer, is_number
from .interactions import MAX_PLAYERS, mask_of

__all__ = ["planted_game"]


def planted_game(n: int, and_terms: Mapping[Iterable[int], float] | None = None,
                 or_terms: Mapping[Iterable[int], float] | None = None, *, bias: float = 0.0,
                 noise: float = 0.0, seed: int = 0) -> np.ndarray:
    r"""The 2^n values of a game built from planted AND and OR terms plus Gaussian noise.

    .. math::

        v(S) = \mathrm{bias} + \sum_{T \in \mathrm{AND}} c_T [T \subseteq S]
               + \sum_{T \in \mathrm{OR}} c_T [T \cap S \neq \emptyset] + \mathrm{noise}\cdot\epsilon_S,
        \qquad \epsilon_S \sim N(0, 1) \text{ i.i.d.}

    Without noise its Harsanyi interactions are exactly the AND terms (plus the Möbius expansion of
    the OR terms), and its AND-OR decomposition with zero noise bound has the planted terms as a
    feasible solution (docs/knowledge.md §5, recovery of planted rules).

    Args:
        n: number of players, 1 <= n <= 24.
        and_terms: ``{players: value}``, e.g. ``{(0, 1): 2.0}``; a coalition is any iterable of
            player indices (∅ allowed: it adds a constant).
        or_terms: ``{players: value}`` with non-empty coalitions.
        bias: v(∅) without noise.
        noise: standard deviation of the i.i.d. noise, >= 0.
        seed: seed of the noise (numpy ``default_rng``).

    Returns:
        (2^n,) float64 game in bitmask layout.
    """
    if not is_integer(n) or not 1 <= n <= MAX_PLAYERS:
        raise PretrainReuseError(f"n={n!r} must be an integer number of players in 1..{MAX_PLAYERS}")
    if not (is_number(noise) and noise >= 0 and math.isfinite(noise)):
        raise PretrainReuseError(f"noise={noise!r} must be a finite standard deviation >= 0")
    masks = np.arange(1 << n, dtype=np.int64)
    v = np.full(1 << n, float(bias))
    for players, value in (and_terms or {}).items():
        t = mask_of(players, n)
        v += float(value) * ((masks & t) == t)
    for players, value in (or_terms or {}).items():
        t = mask_of(players, n)
        if t == 0:
            raise PretrainReuseError("or_terms has the empty coalition, which never fires; use bias instead")
        v += float(value) * ((masks & t) != 0)
    if noise > 0:
        v += noise * np.random.default_rng(seed).standard_normal(1 << n)
    return v
