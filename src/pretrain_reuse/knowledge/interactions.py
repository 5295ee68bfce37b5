r"""Harsanyi (AND) and OR interactions of a game on n players, by fast butterfly transforms.

A *game* is the vector of the 2^n values v(S) of every coalition S ⊆ N = {0..n-1}, stored by
bitmask: entry ``m`` holds v(S) for S = {i : bit i of m is set} (DESIGN.md). Interactions use the
same layout, entry ``m`` belonging to the coalition ``m``.

* AND (Harsanyi dividend, Möbius transform; Harsanyi 1963; Ren et al., CVPR 2023):
  I_and(S) = Σ_{T⊆S} (-1)^{|S|-|T|} v(T), and v(S) = Σ_{T⊆S} I_and(T) (zeta transform).
* OR (Li & Zhang, arXiv 2304.13312): I_or(∅) = v(∅) and, for S ≠ ∅,
  I_or(S) = -Σ_{L⊆S} (-1)^{|S|-|L|} v(N\L), with v(S) = I_or(∅) + Σ_{T≠∅, T∩S≠∅} I_or(T).

Each transform is the in-place butterfly: for every player i and every mask m with bit i set,
``a[m] ±= a[m ^ (1 << i)]``, i.e. O(n·2^n) work instead of the 3^n of the defining sums or the 4^n
of a dense matrix. The array is viewed as (batch, 2^(n-1-i), 2, 2^i) so that the middle axis is
player i, and one vectorised update per player does the whole transform.

All transforms compute in float64 (alternating sums of up to 2^n terms lose float32 precision),
so devices without float64 (Apple MPS) need the games moved to the CPU first. NumPy in gives
NumPy out; a torch tensor in gives a torch tensor out on the same device. Leading dimensions are
batch dimensions; the last one must have length 2^n.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import PretrainReuseError, is_integer

__all__ = [
    "MAX_PLAYERS",
    "harsanyi_and",
    "harsanyi_or",
    "mask_of",
    "orders",
    "players_of",
    "reconstruct_and",
    "reconstruct_or",
]

#: Largest number of players the transforms accept: one float64 game of 2^24 coalitions is 128 MiB,
#: and computing it takes 16.7 million model evaluations, far beyond any practical explanation.
MAX_PLAYERS = 24


# --------------------------------------------------------------------------------------------
# The bitmask layout
# --------------------------------------------------------------------------------------------


def mask_of(players, n: int) -> int:
    """Bitmask of a coalition given as an iterable of player indices in ``0..n-1``."""
    mask = 0
    for p in players:
        if not is_integer(p) or not 0 <= p < n:
            raise PretrainReuseError(
                f"player {p!r} is not an index in 0..{n - 1}; coalitions list player indices"
            )
        mask |= 1 << int(p)
    return mask


def players_of(mask: int) -> tuple[int, ...]:
    """The players (sorted indices) of the coalition with bitmask ``mask``."""
    if not (is_integer(mask) and mask >= 0):
        raise PretrainReuseError(f"mask={mask!r} must be a non-negative integer bitmask of a coalition")
    mask = int(mask)
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def orders(n: int) -> np.ndarray:
    """(2^n,) int64: the size |S| of every coalition in bitmask order."""
    if not (is_integer(n) and 0 <= n <= MAX_PLAYERS):
        raise PretrainReuseError(f"n={n!r} must be a number of players in 0..{MAX_PLAYERS}")
    masks = np.arange(1 << n, dtype=np.int64)
    return sum(((masks >> i) & 1 for i in range(n)), np.zeros(1 << n, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Validation and the butterflies (private helpers take validated float64 tensors)
# --------------------------------------------------------------------------------------------


def as_games(v: Any, name: str = "v") -> tuple[torch.Tensor, int, Callable[[torch.Tensor], Any]]:
    """Validate games ``v`` (..., 2^n): a fresh contiguous float64 tensor, n, and a converter back.

    The converter turns a result tensor into the caller's array type (numpy for numpy or lists,
    torch on the input's device for torch). The shape is checked before anything is copied.
    """
    if isinstance(v, torch.Tensor):
        raw = v.detach()

        def to_user(x: torch.Tensor) -> Any:
            return x
    else:
        try:
            raw = np.asarray(v)
            if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
                raise TypeError(f"dtype {raw.dtype}")
        except (TypeError, ValueError) as e:
            raise PretrainReuseError(
                f"{name} must be a numeric array or tensor of game values, got {type(v).__name__} ({e})"
            ) from None

        def to_user(x: torch.Tensor) -> Any:
            return x.cpu().numpy()
    if raw.ndim == 0:
        raise PretrainReuseError(f"{name} must have a last dimension of length 2^n, got a scalar")
    length = raw.shape[-1]
    n = length.bit_length() - 1
    if length < 2 or length != 1 << n:
        raise PretrainReuseError(
            f"{name} has last dimension {length}, which is not 2^n for n >= 1; pass the values of "
            "all 2^n coalitions in bitmask order (entry m = coalition of the players whose bits are set)"
        )
    if n > MAX_PLAYERS:
        raise PretrainReuseError(
            f"{name} describes n={n} players; at most {MAX_PLAYERS} are supported "
            f"(2^n values per game); choose fewer players"
        )
    if isinstance(raw, torch.Tensor):
        t = raw.to(torch.float64).clone(memory_format=torch.contiguous_format)
    else:
        t = torch.from_numpy(np.array(raw, dtype=np.float64, order="C", copy=True))
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise PretrainReuseError(
            f"{name} has {int(bad.sum())} NaN/inf values (first at index {first}); "
            "recompute those coalition values"
        )
    return t, n, to_user


def pairs(a: torch.Tensor, n: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the entries without (``lo``) and with (``hi``) player i, pairwise aligned."""
    x = a.view(a.numel() >> n, 1 << (n - 1 - i), 2, 1 << i)
    return x[:, :, 0, :], x[:, :, 1, :]


def subset_sum_(a: torch.Tensor, n: int, sign: float) -> torch.Tensor:
    """In place: a(S) <- Σ_{T⊆S} sign^{|S|-|T|} a(T). sign=+1: zeta, sign=-1: Möbius."""
    for i in range(n):
        lo, hi = pairs(a, n, i)
        hi.add_(lo, alpha=sign)
    return a


def superset_sum_(a: torch.Tensor, n: int, sign: float) -> torch.Tensor:
    """In place: a(T) <- Σ_{S⊇T} sign^{|S|-|T|} a(S), the transpose of :func:`subset_sum_`."""
    for i in range(n):
        lo, hi = pairs(a, n, i)
        lo.add_(hi, alpha=sign)
    return a


def or_transform_(a: torch.Tensor, n: int) -> torch.Tensor:
    """In place: the OR interactions of validated games ``a`` (see :func:`harsanyi_or`)."""
    empty = a[..., 0].clone()
    # u(L) = v(N \ L): the complement of mask m is (2^n - 1) - m, i.e. the reversed vector.
    a.copy_(a.flip(-1))
    subset_sum_(a, n, -1.0).neg_()
    a[..., 0] = empty
    return a


def or_reconstruct_(a: torch.Tensor, n: int) -> torch.Tensor:
    """In place: the game whose OR interactions are ``a`` (see :func:`reconstruct_or`)."""
    empty = a[..., 0].clone()
    a[..., 0] = 0.0
    subset_sum_(a, n, 1.0)  # a(U) = Σ_{∅≠T⊆U} I(T); a(N) is the sum of all of them
    # Σ_{T≠∅, T∩S≠∅} I(T) = a(N) - a(N \ S)
    a.copy_(a[..., -1:] - a.flip(-1) + empty[..., None])
    return a


# --------------------------------------------------------------------------------------------
# Public transforms
# --------------------------------------------------------------------------------------------


def harsanyi_and(v):
    r"""Harsanyi (AND) interactions: the Möbius transform of a game.

    .. math::

        I_{and}(S) = \sum_{T \subseteq S} (-1)^{|S|-|T|} v(T) \qquad (S \subseteq N)

    so that v(S) = Σ_{T⊆S} I_and(T) for every S ("universal matching") and
    Σ_{S≠∅} I_and(S) = v(N) - v(∅). Computed by the butterfly, O(n·2^n) (Harsanyi 1963; used as
    the interaction of Ren et al., CVPR 2023, and of Jiang, Cheng & Li, arXiv 2410.08455, eq. 2).

    Args:
        v: game values, shape (..., 2^n), bitmask layout (bit i set = player i present),
            1 <= n <= :data:`MAX_PLAYERS`; numpy array, list or torch tensor; finite.

    Returns:
        I_and, same shape, float64; numpy for numpy input, torch (same device) for torch input.
    """
    a, n, to_user = as_games(v)
    return to_user(subset_sum_(a, n, -1.0))


def reconstruct_and(interactions):
    r"""The game of given AND interactions (zeta transform, inverse of :func:`harsanyi_and`).

    .. math::

        v(S) = \sum_{T \subseteq S} I_{and}(T)

    Args:
        interactions: (..., 2^n) AND interactions in bitmask layout.

    Returns:
        v, same shape, float64, in the input's array type and device.
    """
    a, n, to_user = as_games(interactions, "interactions")
    return to_user(subset_sum_(a, n, 1.0))


def harsanyi_or(v):
    r"""OR interactions of a game (Li & Zhang, arXiv 2304.13312; group code ``get_reward2Ior_mat``).

    .. math::

        I_{or}(\emptyset) = v(\emptyset), \qquad
        I_{or}(S) = -\sum_{L \subseteq S} (-1)^{|S|-|L|} v(N \setminus L) \quad (S \neq \emptyset)

    i.e. minus the Möbius transform of u(L) = v(N\L), with entry ∅ replaced by v(∅). Universal
    matching: v(S) = I_or(∅) + Σ_{T≠∅, T∩S≠∅} I_or(T). In terms of shapiq's "Co-Moebius"
    C(S) = Σ_{L⊆S} (-1)^{|S|-|L|} v((N\S)∪L): I_or(S) = (-1)^{|S|+1} C(S) for S ≠ ∅.

    Args:
        v: game values (..., 2^n), bitmask layout, as for :func:`harsanyi_and`.

    Returns:
        I_or, same shape, float64, in the input's array type and device.
    """
    a, n, to_user = as_games(v)
    return to_user(or_transform_(a, n))


def reconstruct_or(interactions):
    r"""The game of given OR interactions (inverse of :func:`harsanyi_or`).

    .. math::

        v(S) = I_{or}(\emptyset) + \sum_{T \neq \emptyset,\, T \cap S \neq \emptyset} I_{or}(T)

    computed as I_or(∅) + Z(N) - Z(N\S) with Z the zeta transform of I_or without its ∅ entry.

    Args:
        interactions: (..., 2^n) OR interactions in bitmask layout.

    Returns:
        v, same shape, float64, in the input's array type and device.
    """
    a, n, to_user = as_games(interactions, "interactions")
    return to_user(or_reconstruct_(a, n))
