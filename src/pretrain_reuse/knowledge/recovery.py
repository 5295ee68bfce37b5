r"""Ground-truth recovery: do a model's salient interactions find the rule its classes follow?

Reviewer 4 of Jiang, Cheng & Li (arXiv 2410.08455) asked whether the interactions are real;
docs/knowledge.md (§5) answers with models trained on a world whose class rules are known. In the
package's image world (:mod:`pretrain_reuse.data.world`) a class is an AND of terms, each an OR
of parts, and each part sits in one slot of the image, the slot being a player
(``players="parts"``). On one image, with T_t the slots whose part satisfies term t, the rule is
the Boolean game

.. math:: v^*(S) = \prod_t [S \cap T_t \neq \emptyset] \qquad (S \subseteq N)

(:func:`rule_game`), and its Harsanyi interactions I* = Möbius(v*) are the ground truth: unique,
and, when the terms' slot sets are disjoint (as the world's rules are), nonzero exactly on the
unions of one non-empty subset of slots per term, with sign (-1)^{|S| - #terms} (e.g.
``a AND (b OR c)`` gives +1 on {a,b} and {a,c}, -1 on {a,b,c}); overlapping terms merge
(``[(0,), (0, 1)]`` is the game of slot 0 alone).

Matching rule of :func:`ground_truth_recovery` (our definition [recon]):

* truth T*(x) = {(S, sign I*(S)) : S ≠ ∅, I*(S) ≠ 0};
* prediction Ω(x) = {(S, sign I(S)) : S salient}, where I is the model's Harsanyi interactions and
  S is salient if |I(S)| > τ max_{S'≠∅} |I(S')| (τ relative, per sample, as for knowledge). For
  AND-OR interactions I is the Harsanyi transform of the game v + q they reproduce exactly: the
  split into AND and OR parts is not unique, the Harsanyi transform of the denoised game is;
* ``support`` matching compares S only, ``signed`` matching S and the sign;
* precision = |Ω ∩ T*| / |Ω|, recall = |Ω ∩ T*| / |T*|, per sample, then over samples as mean
  (with std, quartiles) and pooled, like the knowledge ratios; by order k both sets are restricted
  to |S| = k.

Magnitudes are not compared: the model's output is a log-odds, the rule a 0/1 game.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PretrainReuseError, is_integer
from .interactions import MAX_PLAYERS, harsanyi_and
from .metrics import RatioStats
from .values import Interactions, check_interactions, check_tau

__all__ = ["Recovery", "ground_truth_recovery", "rule_game"]


def rule_game(term_slots: Iterable[Iterable[int]], n: int) -> np.ndarray:
    r"""The 0/1 game of an AND-of-ORs rule over ``n`` players, in bitmask layout.

    .. math:: v^*(S) = \prod_t [S \cap T_t \neq \emptyset]

    Args:
        term_slots: T_t for every AND term t: the players (slots) any of which satisfies it
            (:attr:`~pretrain_reuse.data.world.Scene.term_slots`); at least one term, none empty.
        n: number of players, 1 <= n <= 24.

    Returns:
        (2^n,) float64 game.
    """
    if not is_integer(n) or not 1 <= n <= MAX_PLAYERS:
        raise PretrainReuseError(f"n={n!r} must be an integer number of players in 1..{MAX_PLAYERS}")
    # materialised: the checks below and the game both go over the terms (iterators run out)
    try:
        term_slots = [tuple(term) for term in term_slots]
    except TypeError:
        raise PretrainReuseError(f"term_slots={term_slots!r:.60} must be a list of terms, each a list "
                                 "of player indices") from None
    if not term_slots or any(not term for term in term_slots):
        raise PretrainReuseError(
            f"term_slots={term_slots!r}: a rule needs at least one term, and every term at least "
            "one player that satisfies it")
    masks = np.arange(1 << n, dtype=np.int64)
    v = np.ones(1 << n)
    for term in term_slots:
        bad = [p for p in term if not (is_integer(p) and 0 <= p < n)]
        if bad:
            raise PretrainReuseError(f"term {tuple(term)} has player(s) {bad} outside 0..{n - 1}")
        t = int(sum(1 << int(p) for p in set(term)))
        v *= (masks & t) != 0
    return v


@dataclass(frozen=True)
class Recovery:
    """Precision and recall of salient interactions against a planted rule, over samples.

    Attributes:
        overall: ``{"precision", "recall", "signed_precision", "signed_recall"}`` -> RatioStats.
        by_order: the same for every order k = 1..n (a sample without items of order k on the
            side of the denominator skips that ratio).
        n_samples: number of samples; tau: the salience threshold.
    """

    overall: dict[str, RatioStats]
    by_order: dict[int, dict[str, RatioStats]]
    n_samples: int
    tau: float

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every order's statistics
        means = ", ".join(f"{k}={v.mean:.3g}" for k, v in self.overall.items())
        return (f"Recovery(n_samples={self.n_samples}, tau={self.tau:g}, "
                f"orders={len(self.by_order)}, means over samples: {means})")

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (NaN as None)."""
        return {
            "n_samples": self.n_samples, "tau": self.tau,
            "matching": "truth: nonzero Harsanyi interactions of the rule game; prediction: "
                        "salient Harsanyi interactions of the model (of v + q for AND-OR)",
            "overall": {k: s.to_dict() for k, s in self.overall.items()},
            "by_order": {str(o): {k: s.to_dict() for k, s in r.items()}
                         for o, r in self.by_order.items()},
        }


def ground_truth_recovery(interactions: Iterable[Interactions], truths: Iterable[np.ndarray], *,
                          tau: float = 0.05) -> Recovery:
    """Precision / recall of each sample's salient interactions against its rule game.

    See the module docstring for the matching rule (support and signed).

    Args:
        interactions: one model's :class:`Interactions` per sample.
        truths: the ground-truth game v* (2^n,) of each sample, e.g. :func:`rule_game` of its
            scene; same players and order as the interactions.
        tau: salience threshold relative to each sample's largest interaction (∅ excluded).
    """
    check_tau(tau)
    interactions, truths = list(interactions), list(truths)
    if len(interactions) != len(truths) or not interactions:
        raise PretrainReuseError(
            f"got {len(interactions)} interactions and {len(truths)} ground-truth games; pass one "
            "of each per sample (at least one)")
    terms: list[dict[int | None, dict[str, tuple[int, int]]]] = []
    for i, (x, truth) in enumerate(zip(interactions, truths, strict=True)):
        check_interactions(f"interactions[{i}]", x)
        try:
            truth = np.asarray(truth, dtype=np.float64)
        except (TypeError, ValueError):
            raise PretrainReuseError(f"truths[{i}] must be a game: an array of 2^n numbers") from None
        if truth.shape != (1 << x.n,):
            raise PretrainReuseError(
                f"a ground-truth game has shape {truth.shape} but the interactions have n={x.n} "
                f"players; pass games of {1 << x.n} values over the same players")
        predicted = _signed_items(_harsanyi(x), tau)
        true = _signed_items(harsanyi_and(truth), 0.0)
        terms.append({k: _counts(predicted, true, k) for k in (None, *range(1, x.n + 1))})
    n = interactions[0].n

    def stats(order: int | None) -> dict[str, RatioStats]:
        return {name: RatioStats.of([t[order][name] for t in terms])
                for name in ("precision", "recall", "signed_precision", "signed_recall")}

    return Recovery(stats(None), {k: stats(k) for k in range(1, n + 1)}, len(terms), float(tau))


def _harsanyi(x: Interactions) -> np.ndarray:
    """The model's Harsanyi interactions: its AND values, or Möbius(v + q) for AND-OR."""
    return x.and_values if x.kind == "and" else harsanyi_and(x.v + x.noise)


def _signed_items(values: np.ndarray, tau: float) -> dict[int, int]:
    """{mask: sign} of the entries above tau * max |I| (∅ excluded); tau = 0 keeps all nonzero."""
    mag = np.abs(values[1:])
    scale = mag.max() if mag.size else 0.0
    if scale == 0.0:
        return {}
    hits = np.flatnonzero(mag > tau * scale) + 1
    return {int(m): 1 if values[m] > 0 else -1 for m in hits}


def _counts(predicted: dict[int, int], true: dict[int, int], order: int | None
            ) -> dict[str, tuple[int, int]]:
    if order is not None:
        predicted = {m: s for m, s in predicted.items() if m.bit_count() == order}
        true = {m: s for m, s in true.items() if m.bit_count() == order}
    support = len(predicted.keys() & true.keys())
    signed = sum(1 for m, s in predicted.items() if true.get(m) == s)
    return {"precision": (support, len(predicted)), "recall": (support, len(true)),
            "signed_precision": (signed, len(predicted)), "signed_recall": (signed, len(true))}
