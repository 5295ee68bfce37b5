r"""The :class:`Interactions` value object: one model's interactions on one sample.

It holds the AND and OR interactions (bitmask layout, float64), the game v they explain and the
bounded noise q of the sparsification, so that every derived quantity (salient set, strength by
order, faithfulness error, Shapley values) can be recomputed and checked:

.. math::

    v(S) + q_S = \sum_{T \subseteq S} I_{and}(T) + I_{or}(\emptyset)
                 + \sum_{T \neq \emptyset,\, T \cap S \neq \emptyset} I_{or}(T)
    \quad \text{for every } S \subseteq N.

File format (``.safetensors``): float64 tensors ``and_values``, ``or_values``, ``v``, ``noise``
(each (2^n,)); header metadata ``artifact="interactions"``, ``n``, ``kind``, ``info`` and ``meta``
(JSON).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from ..artifacts import ValueEquality, atomic_path, check_output_file, read_safetensors, to_json
from ..errors import PretrainReuseError, check_choice, is_integer, is_number
from .interactions import MAX_PLAYERS, mask_of, or_reconstruct_, orders, players_of, subset_sum_

__all__ = ["KINDS", "TYPES", "Interactions", "Key"]

#: ``"and"``: Harsanyi interactions only (``or_values`` is zero); ``"and-or"``: both.
KINDS = ("and", "and-or")
#: Interaction types; an AND and an OR interaction on the same S are different items.
TYPES = ("and", "or")
#: An interaction's identity: (type, bitmask of S).
Key = tuple[str, int]


@dataclass(frozen=True, eq=False)
class Interactions(ValueEquality):
    """AND/OR interactions of one model on one sample (compare with shapiq's ``InteractionValues``).

    Attributes:
        n: number of players.
        and_values: (2^n,) float64 I_and by bitmask.
        or_values: (2^n,) float64 I_or by bitmask (all zero for ``kind="and"``).
        v: (2^n,) float64 the game that was explained.
        noise: (2^n,) float64 q, the bounded noise removed from v (zero without sparsification);
            the interactions reproduce v + q exactly on every coalition.
        kind: ``"and"`` or ``"and-or"``.
        info: what the game is about (players, baseline, sample id, label, model), free form.
        meta: how the interactions were computed (producer, parameters, solver diagnostics).
    """

    n: int
    and_values: np.ndarray
    or_values: np.ndarray
    v: np.ndarray
    noise: np.ndarray
    kind: str = "and"
    info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not is_integer(self.n) or not 1 <= self.n <= MAX_PLAYERS:
            raise PretrainReuseError(f"n={self.n!r} must be an integer number of players in 1..{MAX_PLAYERS}")
        object.__setattr__(self, "n", int(self.n))
        check_choice("kind", self.kind, KINDS)
        for name in ("and_values", "or_values", "v", "noise"):
            # an own read-only copy: the object is a value, nobody may change it afterwards
            try:
                arr = np.array(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError):
                raise PretrainReuseError(
                    f"{name} must be an array of numbers, got {type(getattr(self, name)).__name__}"
                ) from None
            arr.flags.writeable = False
            if arr.shape != (1 << self.n,):
                raise PretrainReuseError(
                    f"{name} must have shape ({1 << self.n},) for n={self.n} players, got {arr.shape}"
                )
            if not np.isfinite(arr).all():
                raise PretrainReuseError(f"{name} has NaN/inf values; recompute the interactions")
            object.__setattr__(self, name, arr)
        if self.kind == "and" and self.or_values.any():
            raise PretrainReuseError(
                "kind='and' interactions must have all-zero or_values; use kind='and-or'"
            )
        # checked here, not in save: an unsavable info found only when writing loses the computation
        if not isinstance(self.info, dict):
            raise PretrainReuseError(f"info must be a dict, got {type(self.info).__name__}")
        for key, value in self.info.items():
            try:
                to_json(value)
            except PretrainReuseError:
                raise PretrainReuseError(
                    f"info[{key!r}] = {value!r:.60} cannot be saved as JSON; pass numbers (not NaN), "
                    "strings, lists or dicts"
                ) from None

    # ----------------------------------------------------------------------------------------
    # Lookup
    # ----------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        # a summary: the four (2^n,) arrays would fill a notebook cell
        sample = f", sample={self.info['sample']!r}" if "sample" in self.info else ""
        salient = sum(len(hits) for hits in self._salient_hits(0.05).values())
        return f"Interactions(kind={self.kind!r}, n={self.n}, salient={salient} (tau=0.05){sample})"

    def get(self, players, type: str = "and") -> float:
        """The interaction of the coalition ``players`` (iterable of indices) of the given type."""
        check_choice("type", type, TYPES)
        if isinstance(players, str) or not isinstance(players, Iterable):
            raise PretrainReuseError(
                f"players={players!r} is not a coalition; pass its player indices, e.g. get((3,)) "
                "for player 3 alone or get((0, 2)), and a salient() key (type, mask) as "
                "get(players_of(mask), type)")
        return float(self._values(type)[mask_of(players, self.n)])

    def _values(self, type: str) -> np.ndarray:
        return self.and_values if type == "and" else self.or_values

    def salient(self, tau: float = 0.05) -> dict[Key, float]:
        r"""The knowledge Ω: salient interactions and their effects, ∅ excluded.

        S is salient if :math:`|I(S)| > \tau \max_{S' \neq \emptyset} |I(S')|`, the maximum taken
        over all AND and OR entries of this sample (Ren et al., ICLR 2024: ``0.05 * max|I|``;
        docs/knowledge.md §2). ∅ is the bias v(∅) and is neither knowledge nor part of the maximum
        [recon: the group subtracts v(∅) from the game, which makes I(∅) ≈ 0 anyway].

        Args:
            tau: relative threshold in [0, 1).

        Returns:
            ``{(type, mask): I(S)}`` with type ``"and"`` or ``"or"``; empty if all are zero.
        """
        check_tau(tau)
        return {(type, int(m)): float(self._values(type)[m])
                for type, hits in self._salient_hits(tau).items() for m in hits}

    def _salient_hits(self, tau: float) -> dict[str, np.ndarray]:
        """Per type, the masks of the salient interactions (∅ excluded; none if all are zero)."""
        scale = self._max_abs()
        return {type: np.flatnonzero(np.abs(self._values(type)[1:]) > tau * scale) + 1
                for type in TYPES}

    def _max_abs(self) -> float:
        return float(max(np.abs(self.and_values[1:]).max(), np.abs(self.or_values[1:]).max()))

    def top_k(self, k: int) -> list[tuple[str, tuple[int, ...], float]]:
        """The ``k`` strongest interactions (∅ excluded) as (type, players, value), strongest first."""
        if not is_integer(k) or k < 1:
            raise PretrainReuseError(f"k={k!r} must be a positive integer")
        vals = np.concatenate([self.and_values[1:], self.or_values[1:]])
        order = np.argsort(-np.abs(vals), kind="stable")[:k]
        size = (1 << self.n) - 1
        return [(TYPES[i // size], players_of(i % size + 1), float(vals[i])) for i in order]

    # ----------------------------------------------------------------------------------------
    # Summaries
    # ----------------------------------------------------------------------------------------

    def by_order(self, tau: float | None = None) -> dict[str, np.ndarray]:
        r"""Strength histogram by order: ``{"and": h, "or": h}``, each (n+1,).

        h_type[k] = Σ_{|S|=k} |I_type(S)| / Σ_{type, S≠∅} |I_type(S)| (docs/knowledge.md §3), so the
        two histograms together sum to 1 over k = 1..n; entry 0 (∅, the bias) is 0. With ``tau``,
        only the salient interactions count. All zero if there is no interaction.
        """
        keep = self._salient_masks(tau)
        order = orders(self.n)
        out = {}
        for type in TYPES:
            strength = np.abs(self._values(type)) * keep[type]
            strength[0] = 0.0
            out[type] = np.bincount(order, weights=strength, minlength=self.n + 1)
        total = out["and"].sum() + out["or"].sum()
        return {t: h / total if total > 0 else h for t, h in out.items()}

    def _salient_masks(self, tau: float | None) -> dict[str, np.ndarray]:
        """Per type, a (2^n,) 0/1 float vector of the kept entries (all, or the salient ones)."""
        if tau is None:
            return {t: np.ones(1 << self.n) for t in TYPES}
        return self._key_masks(self.salient(tau))

    def _key_masks(self, keys: Iterable[Key]) -> dict[str, np.ndarray]:
        """Per type, a (2^n,) 0/1 float vector of the entries ``keys`` name ((type, mask) pairs,
        checked: ∅ is no interaction)."""
        if not isinstance(keys, Iterable):
            raise PretrainReuseError(f"keep must be (type, mask) keys as salient() returns them, got "
                                     f"{type(keys).__name__}")
        masks = {t: np.zeros(1 << self.n) for t in TYPES}
        for key in keys:
            if not (isinstance(key, tuple) and len(key) == 2 and key[0] in TYPES
                    and is_integer(key[1]) and 0 < key[1] < 1 << self.n):
                raise PretrainReuseError(
                    f"{key!r:.60} is no interaction of {self.n} players; pass (type, mask) keys "
                    f"as salient() returns them, type in {TYPES}, mask in 1..{(1 << self.n) - 1}")
            masks[key[0]][key[1]] = 1.0
        return masks

    def surrogate(self, keep: Iterable[Key]) -> np.ndarray:
        r"""ŵ(S) on every coalition, (2^n,): the game rebuilt from v(∅) and the interactions
        ``keep`` alone (docs/knowledge.md §5: faithfulness; with ``keep`` a knowledge set, each
        knowledge set alone).

        .. math::

            \hat w(S) = v(\emptyset) + \sum_{(and, T) \in keep,\, T \subseteq S} I_{and}(T)
                        + \sum_{(or, T) \in keep,\, T \cap S \neq \emptyset} I_{or}(T)

        Args:
            keep: (type, mask) keys, as :meth:`salient` returns; ∅ (mask 0, the bias) is no
                interaction and is refused.
        """
        return self._rebuilt(self._key_masks(keep))

    def _rebuilt(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`surrogate` of the entries that the 0/1 ``masks`` keep (entry 0, ∅, is 0 there)."""
        parts = {t: torch.from_numpy(self._values(t) * masks[t]) for t in TYPES}
        return self.v[0] + (subset_sum_(parts["and"], self.n, 1.0)
                            + or_reconstruct_(parts["or"], self.n)).numpy()

    def _mean_error(self, w_hat: np.ndarray) -> float:
        r"""mean_S |v(S) - ŵ(S)| / |v(N) - v(∅)| of a rebuilt game ``w_hat`` (2^n,), as
        :meth:`surrogate` returns it: the faithfulness check's mean error (docs/knowledge.md §5),
        also :func:`~.metrics.set_ablation`'s; NaN when v(N) = v(∅)."""
        span = abs(self.v[-1] - self.v[0])
        return float(np.abs(self.v - w_hat).mean() / span) if span > 0 else float("nan")

    def faithfulness_error(self, tau: float = 0.05) -> dict[str, float]:
        r"""How well the salient interactions alone reproduce the game (docs/knowledge.md §5):
        the :meth:`surrogate` ŵ of the salient set Ω against v.

        Returns:
            ``max``: max_S |v(S) - ŵ(S)| / |v(N) - v(∅)| over all 2^n coalitions;
            ``mean``: the same error averaged over S;
            ``outside_share``: Σ|I| outside Ω / Σ|I| (∅ excluded);
            ``noise``: max_S |q_S| / |v(N) - v(∅)|.
            The normalised entries are NaN when v(N) = v(∅).
        """
        keep = self._salient_masks(tau)
        w_hat = self._rebuilt(keep)
        span = abs(self.v[-1] - self.v[0])
        strength = np.abs(np.concatenate([self.and_values[1:], self.or_values[1:]]))
        kept = np.concatenate([keep["and"][1:], keep["or"][1:]])
        total = strength.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "max": float(np.abs(self.v - w_hat).max() / span) if span > 0 else float("nan"),
                "mean": self._mean_error(w_hat),
                "outside_share": float((strength * (1 - kept)).sum() / total) if total > 0 else 0.0,
                "noise": float(np.abs(self.noise).max() / span) if span > 0 else float("nan"),
            }

    def shapley_values(self) -> np.ndarray:
        r"""(n,) Shapley values from the interactions: φ_i = Σ_{S∋i} (I_and(S) + I_or(S)) / |S|.

        For AND-only interactions without noise this is exactly the Shapley value of v
        (Harsanyi 1963). An OR term on T is the game [S ∩ T ≠ ∅], whose Shapley value is 1/|T| for
        each member of T (symmetry and efficiency), so for AND-OR interactions the formula gives the
        Shapley value of the denoised game v + q (equal to that of v when q = 0). Efficiency:
        Σ_i φ_i = v(N) + q_N - v(∅) - q_∅.
        """
        size = orders(self.n).astype(np.float64)
        size[0] = np.inf  # ∅ carries no attribution
        share = (self.and_values + self.or_values) / size
        return np.array([
            share.reshape(1 << (self.n - 1 - i), 2, 1 << i)[:, 1, :].sum() for i in range(self.n)
        ])

    def to_shapiq(self):
        """The AND interactions as shapiq's ``InteractionValues`` (index ``"Moebius"``, every
        coalition from ∅ to N; ``baseline_value`` is I(∅)), for shapiq's plots and converters.

        Only for ``kind="and"``, whose values are the Möbius transform of v (of v + q with noise
        removed), which is what shapiq's "Moebius" index means; the AND part of an AND-OR
        decomposition is the transform of another game, for which shapiq has no index.
        """
        if self.kind != "and":
            raise PretrainReuseError(
                f"to_shapiq exports AND (Möbius) interactions, but these are {self.kind!r}: the "
                "AND part of an AND-OR split is not the Möbius transform of the game; explain with "
                "decomposition='and' to export")
        try:
            import shapiq
        except ImportError:
            raise PretrainReuseError("to_shapiq needs shapiq; install it with `pip install "
                                     "shapiq`") from None
        return shapiq.InteractionValues(
            self.and_values.copy(), index="Moebius", max_order=self.n, n_players=self.n,
            min_order=0, interaction_lookup={players_of(m): m for m in range(1 << self.n)},
            estimated=False, baseline_value=float(self.and_values[0]))

    def with_info(self, **items: Any) -> Interactions:
        """A copy whose ``info`` has ``items`` added (e.g. sample id, label, players, baseline)."""
        return dataclasses.replace(self, info={**self.info, **items})

    # ----------------------------------------------------------------------------------------
    # Files and plots
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file atomically (arrays + JSON header); returns the path. An
        existing file there is replaced only if it holds interactions too (units or a model's
        weights are refused)."""
        path = check_output_file(path, ".safetensors", "interactions")
        tensors = {name: np.array(getattr(self, name))
                   for name in ("and_values", "or_values", "v", "noise")}
        header = {"artifact": "interactions", "n": str(self.n), "kind": self.kind,
                  "info": to_json(self.info), "meta": to_json(self.meta)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Interactions:
        """Read a file written by :meth:`save`."""
        fix = "recompute the interactions"
        arrays, header = read_safetensors(path, "interactions file", fix, artifact="interactions")
        p = Path(path)
        try:
            return cls(n=int(header["n"]), kind=header["kind"], info=json.loads(header["info"]),
                       meta=json.loads(header["meta"]), **arrays)
        except (ValueError, KeyError, TypeError) as e:
            raise PretrainReuseError(f"interactions file {str(p)!r} is corrupt ({e}); {fix}") from None

    def plot_orders(self, ax=None, tau: float | None = None):
        """Bar chart of :meth:`by_order` (AND and OR stacked) on ``ax`` (None: the current axes,
        as every plot of the package); returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        ax = ax or plt.gca()
        h = self.by_order(tau)
        k = np.arange(1, self.n + 1)
        ax.bar(k, h["and"][1:], label="AND")
        ax.bar(k, h["or"][1:], bottom=h["and"][1:], label="OR")
        ax.set_xlabel("order |S|")
        ax.set_ylabel("share of Σ|I|")
        ax.set_xticks(k)
        ax.legend()
        return ax


def check_interactions(name: str, x: Any) -> None:
    """Check that the argument ``name`` is an :class:`Interactions` object."""
    if not isinstance(x, Interactions):
        raise PretrainReuseError(f"{name} must be an Interactions object, got {type(x).__name__}")


def check_tau(tau: float) -> None:
    if not is_number(tau) or not 0 <= tau < 1:
        raise PretrainReuseError(f"tau={tau!r} must be a relative threshold in [0, 1), e.g. 0.05")
