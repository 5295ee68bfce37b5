r"""Knowledge sets and the metrics comparing pre-trained, fine-tuned and scratch models.

Definitions follow docs/knowledge.md (§2-3), itself a reconstruction [recon] of Jiang, Cheng & Li
(arXiv 2410.08455) from the SJTU group's conventions. On one sample x, a model's knowledge is its
salient set Ω(x) (:meth:`Interactions.salient`, ∅ excluded), whose items are matched by

* ``match="support"`` (default): (type, S), type ∈ {AND, OR}; the sign is ignored;
* ``match="signed"``: (type, S, sign I(S)).

With Ω_pre, Ω_ft, Ω_sc the sets of the pre-trained (linear probe), fine-tuned and scratch models:

* K_preserve = Ω_pre ∩ Ω_ft, K_discard = Ω_pre \\ Ω_ft, K_new = Ω_ft \\ Ω_pre;
* count ratios r_preserve = |K_preserve|/|Ω_pre|, r_discard = |K_discard|/|Ω_pre|,
  r_new = |K_new|/|Ω_ft|, r_inherit = |K_preserve|/|Ω_ft|;
* strength ratios, the same with Σ|I| of the model the set belongs to, e.g.
  r_preserve^w = Σ_{K_preserve}|I_pre| / Σ_{Ω_pre}|I_pre|, r_new^w = Σ_{K_new}|I_ft| / Σ_{Ω_ft}|I_ft|;
* with a scratch model: r_excl = |K_preserve \\ Ω_sc|/|K_preserve|,
  learnability ℓ = |K_preserve ∩ Ω_sc|/|K_preserve|, scratch-only |Ω_sc \\ Ω_ft|/|Ω_sc|, and
  |K_new ∩ Ω_sc|/|K_new|.

Chance levels (:meth:`SampleKnowledge.chance_terms`, an addition of this package): each ratio's
expected value if the other model's salient items were drawn at random, as many of each type,
order (and sign, for ``"signed"``) as it has, among the C(n, k) coalitions of that order. E.g.
r_preserve's chance level is Σ_k |Ω_pre,k| |Ω_ft,k| / C(n, k) / |Ω_pre|: with dense salient sets,
most of a large preserve ratio is what any two models would share. Compare a ratio with its
chance level before reading it as knowledge handed over.

Other-image control (:func:`other_image_control`, an addition of this package): each ratio with
the model it compares against replaced by that model's game of another image (of another class
wherever the classes allow, :func:`other_sample_partners`). Chance keeps nothing of the model;
this control keeps the models and the players and changes the image, with it the class whose
output is explained: what any image's knowledge would share (cells salient for every image, a
sparsification that pulls supports together). A ratio is knowledge of the image (or of its
class) only by its distance from this level.

Every ratio also exists per order k = |S|. Over samples, ratios are averaged (mean, std, quartiles;
the group's ρ(k) = E_x[...] form) and pooled (Σ numerators / Σ denominators); samples whose
denominator is empty are skipped and counted. Which samples enter (docs/knowledge.md §2: those
every compared model classifies correctly) is the caller's choice.

How discriminative each set is (:func:`set_discrimination`): the discrimination power β(S) of
Li & Zhang (ICML 2023) over the samples of a class, computed on the set's items.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    ValueEquality,
    check_output_file,
    make_meta,
    read_json,
    require_keys,
    write_json,
)
from ..errors import PretrainReuseError, check_choice, check_seed, is_integer, is_number
from .games import LOG_ODDS_OUTPUTS
from .interactions import orders, players_of
from .values import Interactions, check_interactions

__all__ = [
    "ABLATION_MEASURES",
    "ABLATION_MODELS",
    "ABLATION_SETS",
    "MATCHES",
    "MEASURES",
    "PRETRAINED_ABLATION_SETS",
    "SET_EFFECTS",
    "AccuracyCorrelation",
    "Convergence",
    "Discrimination",
    "KnowledgeReport",
    "RatioStats",
    "SampleKnowledge",
    "SetAblation",
    "SetDiscrimination",
    "accuracy_correlation",
    "cover_ratio",
    "discrimination_power",
    "knowledge_convergence",
    "knowledge_report",
    "knowledge_set",
    "other_image_control",
    "other_sample_partners",
    "sample_knowledge",
    "set_ablation",
    "set_discrimination",
    "transferability",
    "weighted_overlap",
]

#: How items of two models are matched.
MATCHES = ("support", "signed")
#: The ratios of Jiang, Cheng & Li that the command lines and tables show first (a report holds
#: more: by strength, learnability, ...).
PAPER_RATIOS = ("preserve", "discard", "new", "exclusive")
#: The ratios that compare with the scratch model (the others compare the pre-trained and
#: fine-tuned models).
SCRATCH_RATIOS = ("exclusive", "learnability", "scratch_only", "new_in_scratch")
#: Similarity of a checkpoint's knowledge to the final model's (convergence).
MEASURES = ("iou", "coverage", "weighted")

#: A knowledge item: (type, mask) for "support", (type, mask, sign) for "signed".
Item = tuple


def knowledge_set(x: Interactions, *, tau: float = 0.05, match: str = "support") -> dict[Item, float]:
    """Ω(x): the salient items of one model on one sample, each with its effect I(S).

    Keys are (type, mask) for ``match="support"`` and (type, mask, ±1) for ``match="signed"``.
    """
    check_choice("match", match, MATCHES)
    salient = x.salient(tau)
    if match == "support":
        return salient
    return {(type, mask, 1 if value > 0 else -1): value for (type, mask), value in salient.items()}


def _order(item: Item) -> int:
    return int(item[1]).bit_count()


def _stratum(item: Item) -> tuple:
    """The stratum of an item among which chance draws: (type, order[, sign])."""
    return (item[0], _order(item), *item[2:])


def _stratum_shares(omega: dict[Item, float], n: int) -> dict[tuple, float]:
    """{stratum: |Ω in it| / C(n, order)}: the probability that a coalition of that type and
    order is in Ω (with that sign), were Ω's items of each stratum drawn uniformly."""
    counts = Counter(_stratum(k) for k in omega)
    return {s: c / math.comb(n, s[1]) for s, c in counts.items()}


def _restrict(omega: dict[Item, float], order: int | None) -> dict[Item, float]:
    return omega if order is None else {k: e for k, e in omega.items() if _order(k) == order}


def _strength(omega: dict[Item, float], items) -> float:
    """Σ |I| over ``items``, exactly rounded: the same whatever the order of a set (which varies
    with the hash seed of the strings in the items)."""
    return math.fsum(abs(omega[k]) for k in items)


def _item_json(item: Item) -> list:
    return [item[0], list(players_of(item[1])), *item[2:]]


def _interval(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _none_to_nan(values: list) -> np.ndarray:
    """The inverse of :func:`_nan_to_none` on a list read from JSON, as float64."""
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _save_json(path: str | Path, kind: str, record: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``{"kind": kind, **record, "meta": meta}`` atomically to a ``.json`` path (the one
    suffix :func:`~pretrain_reuse.artifacts.load` opens), refusing to replace a file of another
    kind."""
    path = check_output_file(path, ".json", kind)
    write_json(path, {"kind": kind, **record, "meta": meta})
    return path


def _saved_meta(result: Any, settings: dict[str, Any], seed: int | None = None,
                inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The metadata block of a result saved alone: its class as the producer, its ``settings``,
    ``inputs`` and ``seed``, the version."""
    return make_meta(f"knowledge.{type(result).__name__}", settings, inputs=inputs, seed=seed)


def _provenance(models: dict[str, Sequence[Interactions]]) -> dict[str, str]:
    """What interactions record of their inputs (as :func:`~.explain.explain` writes them): per
    role, the model's weights file and its hash; the data; and the explained samples' ids (JSON
    text). Entries nobody recorded (interactions built by hand) are left out."""
    inputs: dict[str, str] = {}
    for role, xs in models.items():
        recorded = xs[0].meta.get("inputs", {}) if xs else {}
        for key in ("weights", "weights_hash"):
            if isinstance(recorded.get(key), str):
                inputs[f"{role}_{key}"] = recorded[key]
        if isinstance(recorded.get("data"), str):
            inputs.setdefault("data", recorded["data"])
        ids = [x.info.get("sample") for x in xs]
        if xs and all(isinstance(i, str) for i in ids):
            inputs.setdefault("samples", json.dumps(ids))
    return inputs


@contextlib.contextmanager
def _malformed(path: str | Path, what: str, owner: str):
    """Turn an entry of a saved result that cannot be read back (a file edited by hand or
    damaged) into one line naming the file, ``what`` is malformed and ``owner``'s save that
    writes it again."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PretrainReuseError(f"{str(path)!r} has malformed {what} ({exc!r}); write it again "
                                 f"with {owner}.save") from None


def _load_json(path: str | Path, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The record of a file written by :func:`_save_json`; another kind or a missing key is an error."""
    record = read_json(path, kind)
    if record.get("kind") != kind:
        raise PretrainReuseError(f"{str(path)!r} holds kind {record.get('kind')!r}, not {kind!r}; pass "
                                 "a file written by the save() of that result")
    require_keys(record, keys, path, kind)
    return record


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------


def _check_order(order: int | None, n: int) -> None:
    """Refuse an ``order`` that is neither None (all orders) nor one of n players' 1..n."""
    if order is not None and not (is_integer(order) and 1 <= order <= n):
        raise PretrainReuseError(f"order={order!r} must be an interaction order in 1..{n} (the number "
                                 "of players), or None for all orders")


@dataclass(frozen=True)
class SampleKnowledge:
    """The knowledge sets of one sample and their ratios (module docstring).

    Attributes:
        pretrained, finetuned: Ω_pre and Ω_ft as ``{item: effect}``.
        scratch: Ω_sc, or None without a scratch model.
        n: number of players.
        match: ``"support"`` or ``"signed"``.
    """

    pretrained: dict[Item, float]
    finetuned: dict[Item, float]
    scratch: dict[Item, float] | None
    n: int
    match: str = "support"

    def __repr__(self) -> str:  # a summary: the sets hold up to 2^n items each
        sizes = ", ".join(f"{role}={len(s)} items" for role, s in (
            ("pretrained", self.pretrained), ("finetuned", self.finetuned),
            ("scratch", self.scratch)) if s is not None)
        return f"SampleKnowledge(n={self.n}, match={self.match!r}, {sizes})"

    @property
    def preserve(self) -> frozenset:
        """K_preserve = Ω_pre ∩ Ω_ft."""
        return frozenset(self.pretrained.keys() & self.finetuned.keys())

    @property
    def discard(self) -> frozenset:
        """K_discard = Ω_pre \\ Ω_ft."""
        return frozenset(self.pretrained.keys() - self.finetuned.keys())

    @property
    def new(self) -> frozenset:
        """K_new = Ω_ft \\ Ω_pre."""
        return frozenset(self.finetuned.keys() - self.pretrained.keys())

    @property
    def exclusive(self) -> frozenset | None:
        """K_excl = K_preserve \\ Ω_sc (None without a scratch model)."""
        return None if self.scratch is None else self.preserve - self.scratch.keys()

    def terms(self, order: int | None = None) -> dict[str, tuple[float, float]]:
        """Every ratio as (numerator, denominator), overall or restricted to items of one order."""
        pre, ft = _restrict(self.pretrained, order), _restrict(self.finetuned, order)
        keep, gone, new = pre.keys() & ft.keys(), pre.keys() - ft.keys(), ft.keys() - pre.keys()
        out = {
            "preserve": (len(keep), len(pre)),
            "discard": (len(gone), len(pre)),
            "new": (len(new), len(ft)),
            "inherit": (len(keep), len(ft)),
            "preserve_strength": (_strength(pre, keep), _strength(pre, pre)),
            "discard_strength": (_strength(pre, gone), _strength(pre, pre)),
            "new_strength": (_strength(ft, new), _strength(ft, ft)),
            "inherit_strength": (_strength(ft, keep), _strength(ft, ft)),
        }
        if self.scratch is not None:
            sc = _restrict(self.scratch, order).keys()
            out.update({
                "exclusive": (len(keep - sc), len(keep)),
                "learnability": (len(keep & sc), len(keep)),
                "scratch_only": (len(sc - ft.keys()), len(sc)),
                "new_in_scratch": (len(new & sc), len(new)),
            })
        return out

    def chance_terms(self, order: int | None = None) -> dict[str, tuple[float, float]]:
        """Every ratio's chance level as (expected numerator, denominator): the numerator's
        expectation if the items of the model a ratio compares against (Ω_ft for preserve and
        discard, Ω_pre for new and inherit, Ω_sc for the scratch ratios) were drawn uniformly
        among the coalitions of each stratum (type, order, sign for ``"signed"``), as many as the
        model has there. The sets a ratio counts in (Ω_pre, K_preserve, K_new, ...) stay as
        observed."""
        pre, ft = _restrict(self.pretrained, order), _restrict(self.finetuned, order)
        keep, new = pre.keys() & ft.keys(), ft.keys() - pre.keys()
        in_pre, in_ft = _stratum_shares(pre, self.n), _stratum_shares(ft, self.n)

        def hits(omega: dict[Item, float], items, share: dict, weighted: bool = False) -> float:
            """Σ over ``items`` of P(item in the random set), each weighted by |I| if asked."""
            return math.fsum((abs(omega[k]) if weighted else 1.0) * share.get(_stratum(k), 0.0)
                             for k in items)

        out = {
            "preserve": (hits(pre, pre, in_ft), len(pre)),
            "discard": (len(pre) - hits(pre, pre, in_ft), len(pre)),
            "new": (len(ft) - hits(ft, ft, in_pre), len(ft)),
            "inherit": (hits(ft, ft, in_pre), len(ft)),
            "preserve_strength": (hits(pre, pre, in_ft, True), _strength(pre, pre)),
            "discard_strength": (_strength(pre, pre) - hits(pre, pre, in_ft, True),
                                 _strength(pre, pre)),
            "new_strength": (_strength(ft, ft) - hits(ft, ft, in_pre, True), _strength(ft, ft)),
            "inherit_strength": (hits(ft, ft, in_pre, True), _strength(ft, ft)),
        }
        if self.scratch is not None:
            sc = _restrict(self.scratch, order)
            in_sc = _stratum_shares(sc, self.n)
            out.update({
                "exclusive": (len(keep) - hits(ft, keep, in_sc), len(keep)),
                "learnability": (hits(ft, keep, in_sc), len(keep)),
                "scratch_only": (len(sc) - hits(sc, sc, in_ft), len(sc)),
                "new_in_scratch": (hits(ft, new, in_sc), len(new)),
            })
        return out

    def ratios(self, order: int | None = None) -> dict[str, float]:
        """Every ratio as a number; NaN where the denominator set is empty."""
        return {k: num / den if den > 0 else math.nan for k, (num, den) in self.terms(order).items()}

    def to_dict(self) -> dict[str, Any]:
        """The sample's knowledge as JSON-ready data."""
        sets = {"preserve": self.preserve, "discard": self.discard, "new": self.new}
        if self.scratch is not None:
            sets["exclusive"] = self.exclusive
        return {
            "match": self.match,
            "sets": {k: sorted(_item_json(i) for i in s) for k, s in sets.items()},
            "ratios": {k: _nan_to_none(v) for k, v in self.ratios().items()},
        }


def sample_knowledge(pretrained: Interactions, finetuned: Interactions,
                     scratch: Interactions | None = None, *, tau: float = 0.05,
                     match: str = "support", other_samples: Sequence[str] = ()) -> SampleKnowledge:
    """Knowledge sets of one sample under the pre-trained, fine-tuned and (optional) scratch model.

    All interactions must be games of the same sample, players, baseline and output (checked
    where their info records them, as explain's do), and each model's salient set uses its own
    maximum (docs/knowledge.md §2). The models named in ``other_samples`` (``"finetuned"``,
    ``"scratch"``) must instead be games of another sample than the pre-trained model's, over as
    many players, with the same baseline and output (the other-image control,
    :func:`other_image_control`; player j of one image is matched with player j of the other).
    """
    models = [("pretrained", pretrained), ("finetuned", finetuned)]
    if scratch is not None:
        models.append(("scratch", scratch))
    for name in other_samples:
        check_choice("other_samples", name, [m for m, _ in models[1:]])
    for name, x in models[1:]:
        _check_pair(pretrained, x, ("pretrained", name), same_game=name not in other_samples)
        if name in other_samples:
            _check_other_sample(pretrained, x, name)
    sets = {name: knowledge_set(x, tau=tau, match=match) for name, x in models}
    return SampleKnowledge(sets["pretrained"], sets["finetuned"], sets.get("scratch"), pretrained.n, match)


# --------------------------------------------------------------------------------------------
# Aggregation over samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioStats:
    """One ratio over samples: mean-of-ratios statistics and the pooled ratio.

    Attributes:
        mean, std, q25, median, q75: over the samples with a non-empty denominator (NaN if none).
        pooled: Σ numerators / Σ denominators over all samples.
        n_used: samples with a non-empty denominator; n_skipped: the others.
        sem: the standard error of the mean, s / √n_used with s the sample standard deviation
            (ddof 1): how far the mean would move with another draw of as many samples, the
            uncertainty of explaining a few samples (NaN for fewer than 2).
    """

    mean: float
    std: float
    q25: float
    median: float
    q75: float
    pooled: float
    n_used: int
    n_skipped: int
    sem: float = math.nan

    @classmethod
    def of(cls, terms: Sequence[tuple[float, float]]) -> RatioStats:
        """The statistics of ``numerator / denominator`` pairs, one per sample."""
        num = np.array([t[0] for t in terms], dtype=np.float64)
        den = np.array([t[1] for t in terms], dtype=np.float64)
        used = den > 0
        values = num[used] / den[used]
        if values.size:
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            mean, std = values.mean(), values.std()
        else:
            mean = std = q25 = median = q75 = math.nan
        pooled = num[used].sum() / den[used].sum() if used.any() else math.nan
        sem = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else math.nan
        return cls(float(mean), float(std), float(q25), float(median), float(q75), float(pooled),
                   int(used.sum()), int((~used).sum()), float(sem))

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready data (NaN as None)."""
        return {k: _nan_to_none(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class KnowledgeReport:
    """Knowledge ratios over a set of samples, overall and by order.

    Attributes:
        overall: ``{ratio name: RatioStats}``.
        by_order: ``{k: {ratio name: RatioStats}}`` for k = 1..n.
        n_samples: number of samples.
        tau, match: the salience threshold and matching mode used.
        samples: the per-sample :class:`SampleKnowledge`.
        inputs: what the interactions record of their inputs (:func:`_provenance`); saved as
            the ``inputs`` of the file's meta.
        chance: ``{ratio name: RatioStats}`` of every ratio's chance level
            (:meth:`SampleKnowledge.chance_terms`), overall.
    """

    overall: dict[str, RatioStats]
    by_order: dict[int, dict[str, RatioStats]]
    n_samples: int
    tau: float
    match: str
    samples: list[SampleKnowledge] = field(repr=False, default_factory=list)
    inputs: dict[str, str] = field(repr=False, default_factory=dict)
    chance: dict[str, RatioStats] = field(repr=False, default_factory=dict)

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every order's statistics
        means = ", ".join(f"{k}={v.mean:.3g}" for k, v in self.overall.items())
        return (f"KnowledgeReport(n_samples={self.n_samples}, tau={self.tau:g}, match="
                f"{self.match!r}, orders={len(self.by_order)}, means over samples: {means})")

    def per_sample(self, name: str, order: int | None = None) -> np.ndarray:
        """(n_samples,) the ratio ``name`` on every sample (NaN where its denominator is empty),
        overall or for one order; the input of :func:`accuracy_correlation`."""
        check_choice("ratio", name, self.overall.keys())
        # an order no interaction of n players has would give NaN for every sample, unsaid
        _check_order(order, max(s.n for s in self.samples))
        return np.array([s.ratios(order)[name] for s in self.samples], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (NaN as None), as ``knowledge.json`` holds it."""
        return {
            "n_samples": self.n_samples, "tau": self.tau, "match": self.match,
            "overall": {k: s.to_dict() for k, s in self.overall.items()},
            "chance": {k: s.to_dict() for k, s in self.chance.items()},
            "by_order": {str(o): {k: s.to_dict() for k, s in r.items()} for o, r in self.by_order.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON atomically: :meth:`to_dict` to read, and every sample's
        knowledge sets with their effects, from which :meth:`load` recomputes the rest."""
        def items(omega: dict[Item, float] | None) -> list | None:
            return None if omega is None else [[*k, e] for k, e in sorted(omega.items())]

        samples = [{"n": s.n, "pretrained": items(s.pretrained), "finetuned": items(s.finetuned),
                    "scratch": items(s.scratch)} for s in self.samples]
        return _save_json(path, "knowledge-sets",
                          {**self.to_dict(), "n": self.samples[0].n, "samples": samples},
                          _saved_meta(self, {"tau": self.tau, "match": self.match},
                                      inputs=self.inputs))

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeReport:
        """Read a file written by :meth:`save`."""
        d = _load_json(path, "knowledge-sets", ("tau", "match", "n", "samples"))

        def omega(rows: list | None) -> dict[Item, float] | None:
            return None if rows is None else {tuple(r[:-1]): float(r[-1]) for r in rows}

        # .get: a file of an earlier version records one n for all its samples
        return _report([SampleKnowledge(omega(s["pretrained"]), omega(s["finetuned"]),
                                        omega(s["scratch"]), int(s.get("n", d["n"])), d["match"])
                        for s in d["samples"]], float(d["tau"]), d["match"],
                       d.get("meta", {}).get("inputs", {}))

    def plot(self, ax=None):
        """Bar chart of the main ratios, mean ± std over samples, on ``ax`` (None: the current
        axes, as every plot of the package); returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        from .plots import plot_ratios  # the figure the CLI and the HTML report draw

        ax = ax or plt.gca()
        plot_ratios({"report": self.to_dict()}, ax)
        return ax


def knowledge_report(pretrained: Iterable[Interactions] | Interactions,
                     finetuned: Iterable[Interactions] | Interactions,
                     scratch: Iterable[Interactions] | Interactions | None = None, *,
                     tau: float = 0.05, match: str = "support",
                     other_samples: Sequence[str] = ()) -> KnowledgeReport:
    """Knowledge ratios of the fine-tuned vs the pre-trained (and scratch) model over samples.

    Args:
        pretrained, finetuned: one :class:`Interactions` per sample, in the same sample order
            (any iterable; a single Interactions is one sample).
        scratch: the scratch model's interactions on the same samples, or None.
        tau: salience threshold (docs/knowledge.md §2; default 0.05).
        match: ``"support"`` (default) or ``"signed"``.
        other_samples: the models (``"finetuned"``, ``"scratch"``) whose interactions are, by
            design, of other samples than the pre-trained model's at the same position: the
            pairs of the other-image control (:func:`other_image_control`).

    Returns:
        :class:`KnowledgeReport`; ratios whose denominator set is empty on a sample skip it.
    """
    pretrained, finetuned = _samples("pretrained", pretrained), _samples("finetuned", finetuned)
    scratch = None if scratch is None else _samples("scratch", scratch)
    if len(pretrained) != len(finetuned) or (scratch is not None and len(scratch) != len(pretrained)):
        raise PretrainReuseError(
            f"got {len(pretrained)} pretrained, {len(finetuned)} finetuned"
            + ("" if scratch is None else f" and {len(scratch)} scratch")
            + " interactions; pass one per sample for every model, in the same order"
        )
    if not pretrained:
        raise PretrainReuseError("no samples: pass the interactions of at least one sample")
    samples = [sample_knowledge(p, f, None if scratch is None else scratch[i], tau=tau, match=match,
                                other_samples=other_samples)
               for i, (p, f) in enumerate(zip(pretrained, finetuned, strict=True))]
    models = {"pretrained": pretrained, "finetuned": finetuned}
    if scratch is not None:
        models["scratch"] = scratch
    return _report(samples, tau, match, _provenance(models))


def other_sample_partners(labels: Sequence[int]) -> np.ndarray:
    """For each sample, the position of the sample whose games stand in for it in the
    other-image control (:func:`other_image_control`): of another class wherever the classes
    allow.

    The positions are ordered by class (stably) and each is paired with the one m places further
    along that order, cyclically, m the number of samples of the largest class. A shift is a
    permutation, so every sample stands in once; and as a class's samples are m or fewer
    consecutive places, a pair shares its class only when one class holds more than half of the
    samples. With a single class the shift is 1 (every pair shares it).

    Returns:
        (n,) int64, ``partners[i] != i``; at least two samples are needed.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size < 2:
        raise PretrainReuseError(f"the other-image control pairs samples with each other: got "
                                 f"{labels.size} sample(s), pass at least 2")
    n = labels.size
    order = np.argsort(labels, kind="stable")
    largest = int(Counter(labels.tolist()).most_common(1)[0][1])
    shift = largest if largest < n else 1
    partners = np.empty(n, dtype=np.int64)
    partners[order] = order[(np.arange(n) + shift) % n]
    return partners


def other_image_control(pretrained: Sequence[Interactions], finetuned_other: Sequence[Interactions],
                        *, scratch_other: tuple[Sequence[Interactions], Sequence[Interactions],
                                                Sequence[Interactions]] | None = None,
                        tau: float = 0.05, match: str = "support") -> dict[str, RatioStats]:
    """Every ratio of :func:`knowledge_report` with the model it compares against playing
    another image: the overlap that owes nothing to the image (module docstring).

    On sample i with partner p(i) (:func:`other_sample_partners`), the ratios of the pre-trained
    and fine-tuned models (preserve, discard, new, inherit and their strengths) compare
    Ω_pre(x_i) with Ω_ft(x_p(i)); the ratios against the scratch model (:data:`SCRATCH_RATIOS`)
    compare the pre-trained and fine-tuned knowledge of x_i with Ω_sc(x_p(i)). Each mean is over
    the samples i, so each is comparable with its same-image ratio.

    Args:
        pretrained: the pre-trained model's interactions on samples x_1..x_m.
        finetuned_other: the fine-tuned model's on x_p(1)..x_p(m).
        scratch_other: with a scratch model, ``(pretrained, finetuned, scratch)``: the first two
            models' interactions on x_1..x_m and the scratch model's on x_p(1)..x_p(m).
        tau, match: as :func:`knowledge_report`.

    Where the decomposition ties the models together (``joint-and-or``), decompose the games of
    each control pair (or triple) together, as the same-image games were: the pre-trained
    model's interactions then differ between ``pretrained`` and ``scratch_other``.

    Returns:
        ``{ratio name: RatioStats}``, overall, for the ratios the models give.
    """
    levels = dict(knowledge_report(pretrained, finetuned_other, tau=tau, match=match,
                                   other_samples=("finetuned",)).overall)
    if scratch_other is not None:
        with_scratch = knowledge_report(*scratch_other, tau=tau, match=match,
                                        other_samples=("scratch",))
        levels.update({k: with_scratch.overall[k] for k in SCRATCH_RATIOS})
    return levels


def _samples(name: str, x: Iterable[Interactions] | Interactions) -> list[Interactions]:
    """The argument ``name`` as a list of samples' interactions; a single one is one sample."""
    if isinstance(x, Interactions):
        return [x]
    if not isinstance(x, Iterable):
        raise PretrainReuseError(f"{name} must be a list of Interactions (one per sample), got "
                                 f"{type(x).__name__}")
    return list(x)


def _report(samples: list[SampleKnowledge], tau: float, match: str,
            inputs: dict[str, str]) -> KnowledgeReport:
    """The report's statistics over the samples' knowledge sets, overall and per order."""
    def stats(per_sample: list[dict[str, tuple[float, float]]]) -> dict[str, RatioStats]:
        return {name: RatioStats.of([t[name] for t in per_sample]) for name in per_sample[0]}

    n = max(s.n for s in samples)  # samples may differ in their number of players
    return KnowledgeReport(stats([s.terms() for s in samples]),
                           {k: stats([s.terms(k) for s in samples]) for k in range(1, n + 1)},
                           len(samples), tau, match, samples, inputs,
                           chance=stats([s.chance_terms() for s in samples]))


# --------------------------------------------------------------------------------------------
# Comparisons of two interaction vectors
# --------------------------------------------------------------------------------------------


def _vector(x: Interactions, order: int | None = None) -> np.ndarray:
    """AND and OR interactions without ∅ (the bias), concatenated; optionally one order only."""
    keep = slice(1, None) if order is None else orders(x.n) == order
    return np.concatenate([x.and_values[keep], x.or_values[keep]])


#: What, besides the model, defines a game in an Interactions' info (explain records them): two
#: models are compared on one sample only when these agree.
GAME_KEYS = ("sample", "players", "baseline", "output")


def _check_pair(a: Interactions, b: Interactions, names: tuple[str, str] = ("a", "b"), *,
                same_game: bool = True) -> None:
    """Both are Interactions over the same number of players; with ``same_game``, also of the
    same sample, players, baseline and output where their info records them (lists of samples
    are paired by position, so a reordered list would compare different images). ``names``
    name them in errors."""
    check_interactions(names[0], a)
    check_interactions(names[1], b)
    if a.n != b.n:
        raise PretrainReuseError(f"{names[0]} and {names[1]} have n={a.n} and n={b.n} players; "
                                 "compare interactions over the same players")
    if a.kind != b.kind:  # the OR interactions of one would never match: discard and new inflated
        raise PretrainReuseError(
            f"{names[0]} and {names[1]} are decompositions of different kinds ({a.kind!r} and "
            f"{b.kind!r}); decompose both models' games the same way")
    if not same_game:
        return
    for key in GAME_KEYS:
        if key in a.info and key in b.info and a.info[key] != b.info[key]:
            raise PretrainReuseError(
                f"{names[0]} and {names[1]} are games with a different {key} ({a.info[key]!r} and "
                f"{b.info[key]!r}); pass the models' interactions on the same samples, in the same "
                "order, with the same players and baseline")


def _check_other_sample(a: Interactions, b: Interactions, name: str) -> None:
    """``b`` is a game of another sample than ``a`` where their info records the sample, with
    the same baseline and output (an other-image pair; the players, which lie elsewhere on
    another image, are matched by position)."""
    if "sample" in a.info and a.info.get("sample") == b.info.get("sample"):
        raise PretrainReuseError(
            f"pretrained and {name} are games of the same sample ({a.info['sample']!r}) where the "
            "other-image control pairs each sample with another: pair them by "
            "other_sample_partners")
    for key in ("baseline", "output"):
        if key in a.info and key in b.info and a.info[key] != b.info[key]:
            raise PretrainReuseError(
                f"pretrained and {name} are games with a different {key} ({a.info[key]!r} and "
                f"{b.info[key]!r}); explain both models with the same players and baseline")


def transferability(a: Interactions, b: Interactions, *, tau: float = 0.05,
                    match: str = "support") -> float:
    """γ(Ω_a | Ω_b) = |Ω_a ∩ Ω_b| / |Ω_a| on one sample (NaN if Ω_a is empty); docs/knowledge.md
    §2."""
    _check_pair(a, b)
    omega_a = knowledge_set(a, tau=tau, match=match)
    omega_b = knowledge_set(b, tau=tau, match=match)
    return len(omega_a.keys() & omega_b.keys()) / len(omega_a) if omega_a else math.nan


def weighted_overlap(a: Interactions, b: Interactions, *, normalize: bool = False) -> float:
    r"""Weighted overlap of two full interaction vectors, positive and negative parts apart
    (docs/knowledge.md §2).

    .. math::

        \mathrm{sim}(I_1, I_2) = \frac{\sum_S \min(I_1^+, I_2^+) + \min(I_1^-, I_2^-)}
                                      {\sum_S \max(I_1^+, I_2^+) + \max(I_1^-, I_2^-)},
        \quad I^+ = \max(I, 0),\; I^- = \max(-I, 0)

    over all AND and OR entries except ∅. With ``normalize``, each vector is first divided by its
    L1 norm. 1 for identical vectors, 0 for disjoint supports or opposite signs; NaN if both are 0.
    """
    _check_pair(a, b)
    return _weighted_overlap(_vector(a), _vector(b), normalize)


def _weighted_overlap(x: np.ndarray, y: np.ndarray, normalize: bool) -> float:
    if normalize:
        x = x / max(np.abs(x).sum(), np.finfo(float).tiny)
        y = y / max(np.abs(y).sum(), np.finfo(float).tiny)
    xp, xn, yp, yn = np.maximum(x, 0), np.maximum(-x, 0), np.maximum(y, 0), np.maximum(-y, 0)
    den = (np.maximum(xp, yp) + np.maximum(xn, yn)).sum()
    return float((np.minimum(xp, yp) + np.minimum(xn, yn)).sum() / den) if den > 0 else math.nan


def cover_ratio(a: Interactions, b: Interactions) -> float:
    """Σ_S min(|I_a|, |I_b|) / Σ_S |I_a| over all AND and OR entries except ∅ (NaN if I_a = 0)."""
    _check_pair(a, b)
    x, y = np.abs(_vector(a)), np.abs(_vector(b))
    total = x.sum()
    return float(np.minimum(x, y).sum() / total) if total > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Convergence over checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Convergence(ValueEquality):
    """How a model's knowledge approaches that of its final checkpoint (docs/knowledge.md §4;
    Fig. 4 of Jiang, Cheng & Li, arXiv 2410.08455) [recon].

    Attributes:
        similarity: (T,) s(t), the mean over samples of the chosen measure between checkpoint t and
            the final checkpoint T (so s(T) = 1 unless no sample has knowledge).
        detour: (T,) d(t) = E_x |Ω_t \\ Ω_T| / |Ω_t|, the share of current knowledge the final
            model drops.
        n_used: (T,) samples entering s(t) (the others have an empty denominator).
        measure: ``"iou"``, ``"coverage"`` or ``"weighted"``.
        threshold: the level for ``first_at_threshold``.
        steps: (T,) the training step of each checkpoint, increasing; None: their numbers 1..T.
        tau, match, order: the knowledge sets compared (:func:`knowledge_convergence`).
    """

    similarity: np.ndarray
    detour: np.ndarray
    n_used: np.ndarray
    measure: str
    threshold: float = 0.9
    steps: np.ndarray | None = None
    tau: float = 0.05
    match: str = "support"
    order: int | None = None

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every array
        return (f"Convergence(checkpoints={len(self.similarity)}, measure={self.measure!r}, "
                f"first_at_threshold={self.first_at_threshold} (s >= {self.threshold:g}), "
                f"auc={self.auc:.3g})")

    def __post_init__(self):
        check_choice("measure", self.measure, MEASURES)
        steps = np.arange(1, len(self.similarity) + 1) if self.steps is None else self.steps
        object.__setattr__(self, "steps", np.asarray(steps, dtype=np.int64))
        shapes = {name: np.shape(getattr(self, name))
                  for name in ("similarity", "detour", "n_used", "steps")}
        if len(set(shapes.values())) > 1 or len(shapes["similarity"]) != 1:
            raise PretrainReuseError(
                "similarity, detour, n_used and steps must be (T,) arrays, one entry per "
                f"checkpoint, got shapes {shapes}; a file that says so was edited: run it again")

    @property
    def first_at_threshold(self) -> int | None:
        """The step of the first checkpoint with s(t) >= threshold (its number 1..T when the
        checkpoints' steps were not given), or None."""
        hits = np.flatnonzero(self.similarity >= self.threshold)
        return int(self.steps[hits[0]]) if hits.size else None

    @property
    def auc(self) -> float:
        """Normalised area under s(t) over the training steps: the trapezoid rule divided by the
        steps spanned (s of the only checkpoint if T = 1). Over the steps, not the checkpoints'
        numbers, so that unevenly spaced checkpoints weigh by the training they cover."""
        s, t = self.similarity, self.steps
        if len(s) == 1:
            return float(s[0])
        return float(((s[1:] + s[:-1]) / 2 * np.diff(t)).sum() / (t[-1] - t[0]))

    @property
    def n_decreases(self) -> int:
        """Number of checkpoints where s(t) drops below s(t - 1) (stability)."""
        return int((np.diff(self.similarity) < 0).sum())

    @property
    def total_detour(self) -> float:
        """Σ_t d(t)."""
        return float(np.nansum(self.detour))

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (NaN as None)."""
        return {
            "measure": self.measure, "threshold": self.threshold, "steps": self.steps.tolist(),
            "similarity": [_nan_to_none(float(s)) for s in self.similarity],
            "detour": [_nan_to_none(float(d)) for d in self.detour],
            "n_used": self.n_used.tolist(),
            "first_at_threshold": self.first_at_threshold, "auc": _nan_to_none(self.auc),
            "n_decreases": self.n_decreases, "total_detour": self.total_detour,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically (NaN as null); returns the path."""
        settings = {"measure": self.measure, "threshold": self.threshold, "tau": self.tau,
                    "match": self.match, "order": self.order}
        return _save_json(path, "knowledge-convergence", self.to_dict(), _saved_meta(self, settings))

    def plot(self, ax=None, *, run: str = "fine-tuning"):
        """s(t) (solid) and the detour d(t) (dashed) against the training step, as the report
        draws them, on ``ax`` (None: the current axes, as every plot of the package); ``run``
        names the curve (e.g. "scratch"). Returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        from .plots import draw_convergence

        ax = ax or plt.gca()
        draw_convergence(ax, self.to_dict(), run)
        return ax

    @classmethod
    def load(cls, path: str | Path) -> Convergence:
        """Read a file written by :meth:`save` (the summaries are recomputed, not read)."""
        d = _load_json(path, "knowledge-convergence",
                       ("similarity", "detour", "n_used", "measure", "threshold"))
        # .get: a file of an earlier version records no steps (its checkpoints' numbers), nor
        # the knowledge sets' settings (its defaults)
        settings = d.get("meta", {}).get("params", {})
        return cls(_none_to_nan(d["similarity"]), _none_to_nan(d["detour"]),
                   np.array(d["n_used"], dtype=np.int64), d["measure"], float(d["threshold"]),
                   d.get("steps"), float(settings.get("tau", 0.05)),
                   settings.get("match", "support"), settings.get("order"))


def knowledge_convergence(checkpoints: Iterable[Iterable[Interactions]], *, tau: float = 0.05,
                          match: str = "support", measure: str = "iou", threshold: float = 0.9,
                          order: int | None = None, steps: Sequence[int] | None = None
                          ) -> Convergence:
    r"""Convergence of knowledge over checkpoints t = 1..T towards the final checkpoint T.

    Per sample x, with Ω_t = Ω_t(x):

    * ``"iou"`` (default): |Ω_t ∩ Ω_T| / |Ω_t ∪ Ω_T|;
    * ``"coverage"``: |Ω_t ∩ Ω_T| / |Ω_T|;
    * ``"weighted"``: :func:`weighted_overlap` of the full interaction vectors (no threshold);

    s(t) is the mean over samples with a non-empty denominator; d(t) = E_x |Ω_t \\ Ω_T| / |Ω_t|.

    Args:
        checkpoints: ``checkpoints[t][i]`` = interactions of checkpoint t on sample i, oldest
            first; the last checkpoint is the final model.
        tau, match: as for :func:`knowledge_report`.
        measure: one of :data:`MEASURES`.
        threshold: level of the ``first_at_threshold`` summary, in [0, 1] like s(t).
        order: only interactions of this order |S| in 1..n (knowledge sets and vectors), or all
            (None).
        steps: the training step of each checkpoint, increasing (the step a snapshot records):
            the x of the curve, of ``first_at_threshold`` and of ``auc``; None: the checkpoints'
            numbers 1..T.
    """
    check_choice("measure", measure, MEASURES)
    check_choice("match", match, MATCHES)
    if not is_number(threshold) or not 0 <= threshold <= 1:
        raise PretrainReuseError(f"threshold={threshold!r} must be a similarity level in [0, 1], e.g. 0.9")
    checkpoints = [list(c) for c in checkpoints]
    if not checkpoints or not checkpoints[0]:
        raise PretrainReuseError("checkpoints is empty; pass checkpoints[t][sample] interactions")
    n_samples = len(checkpoints[0])
    if any(len(c) != n_samples for c in checkpoints):
        raise PretrainReuseError(
            f"checkpoints hold {sorted({len(c) for c in checkpoints})} samples; every checkpoint "
            "must be explained on the same samples"
        )
    final = checkpoints[-1]
    for t, ckpt in enumerate(checkpoints):
        for i, (x, last) in enumerate(zip(ckpt, final, strict=True)):
            _check_pair(x, last, (f"checkpoints[{t}][{i}]", f"checkpoints[-1][{i}]"))
    _check_order(order, final[0].n)
    if steps is not None:
        steps = list(steps)
        if (len(steps) != len(checkpoints) or not all(is_integer(t) for t in steps)
                or any(a >= b for a, b in itertools.pairwise(steps))):
            raise PretrainReuseError(
                f"steps={steps!r} must be {len(checkpoints)} increasing integers, the training "
                "step of each checkpoint, or None")

    def omega_of(x: Interactions) -> dict[Item, float]:
        return _restrict(knowledge_set(x, tau=tau, match=match), order)

    final_sets = [omega_of(x) for x in final]
    sims, detours, used = [], [], []
    for ckpt in checkpoints:
        s_vals, d_vals = [], []
        for x, last, omega_last in zip(ckpt, final, final_sets, strict=True):
            omega = omega_of(x)
            both = len(omega.keys() & omega_last.keys())
            if measure == "iou":
                union = len(omega.keys() | omega_last.keys())
                s_vals.append(both / union if union else math.nan)
            elif measure == "coverage":
                s_vals.append(both / len(omega_last) if omega_last else math.nan)
            else:
                s_vals.append(_weighted_overlap(_vector(x, order), _vector(last, order), False))
            d_vals.append(len(omega.keys() - omega_last.keys()) / len(omega) if omega else math.nan)
        s_arr, d_arr = np.array(s_vals), np.array(d_vals)
        ok = ~np.isnan(s_arr)
        sims.append(s_arr[ok].mean() if ok.any() else math.nan)
        detours.append(np.nanmean(d_arr) if (~np.isnan(d_arr)).any() else math.nan)
        used.append(int(ok.sum()))
    return Convergence(np.array(sims), np.array(detours), np.array(used), measure, threshold, steps,
                       tau, match, order)


# --------------------------------------------------------------------------------------------
# Discrimination power
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discrimination:
    """Sign consistency of salient interactions over the samples of one class (docs/knowledge.md
    §3).

    Attributes:
        n_samples: samples of the class.
        positive: m⁺_S, the samples where (type, S) is salient with I > 0.
        negative: m⁻_S, likewise with I < 0.
    """

    n_samples: int
    positive: dict[tuple[str, int], int]
    negative: dict[tuple[str, int], int]

    def __repr__(self) -> str:  # a summary: the dataclass repr prints both dicts whole
        return (f"Discrimination(n_samples={self.n_samples}, salient items="
                f"{len(self.positive.keys() | self.negative.keys())})")

    @property
    def alpha(self) -> dict[tuple[str, int], float]:
        """α(S) = (m⁺_S + m⁻_S) / n_samples: how often S is salient."""
        keys = self.positive.keys() | self.negative.keys()
        return {k: (self.positive.get(k, 0) + self.negative.get(k, 0)) / self.n_samples for k in keys}

    @property
    def beta(self) -> dict[tuple[str, int], float]:
        """β(S) = max(m⁺_S, m⁻_S) / (m⁺_S + m⁻_S): 1 when S always pushes the same way."""
        keys = self.positive.keys() | self.negative.keys()
        out = {}
        for k in keys:
            p, m = self.positive.get(k, 0), self.negative.get(k, 0)
            out[k] = max(p, m) / (p + m)
        return out

    def purity(self, keys=None) -> float:
        """α-weighted mean β over ``keys`` ((type, mask) pairs; default all salient ones).

        The group's ``overall_purity``; NaN if none of the keys is ever salient.
        """
        alpha, beta = self.alpha, self.beta
        keys = alpha.keys() if keys is None else [k[:2] for k in keys]
        weights = [(alpha[k], beta[k]) for k in keys if k in alpha]
        total = math.fsum(a for a, _ in weights)  # fsum: independent of the keys' set order
        return math.fsum(a * b for a, b in weights) / total if total > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (NaN as None)."""
        alpha, beta = self.alpha, self.beta
        return {
            "n_samples": self.n_samples,
            "purity": _nan_to_none(self.purity()),
            "items": [{"type": k[0], "players": list(players_of(k[1])), "alpha": alpha[k],
                       "beta": beta[k]} for k in sorted(alpha)],
        }


def discrimination_power(samples: Iterable[Interactions] | Interactions, *,
                         tau: float = 0.05) -> Discrimination:
    """Discrimination power β(S) and frequency α(S) of one model over the samples of one class.

    Li & Zhang (ICML 2023): m⁺_S = #{i : S salient on x_i and I(S|x_i) > 0}, m⁻_S likewise with
    I < 0; β(S) = max(m⁺, m⁻)/(m⁺ + m⁻), α(S) = (m⁺ + m⁻)/#samples. Call it once per class.
    """
    samples = _samples("samples", samples)
    if not samples:
        raise PretrainReuseError("samples is empty; pass the interactions of the class's samples")
    for i, x in enumerate(samples):
        _check_pair(x, samples[0], (f"samples[{i}]", "samples[0]"), same_game=False)
    return _discrimination([x.salient(tau) for x in samples])


def _discrimination(effects: Sequence[dict[Item, float]]) -> Discrimination:
    """Sign counts of the items over samples; ``effects[i]`` maps sample i's items to I(S|x_i)."""
    positive: dict[tuple[str, int], int] = {}
    negative: dict[tuple[str, int], int] = {}
    for sample in effects:
        for item, value in sample.items():
            counts = positive if value > 0 else negative
            counts[item[:2]] = counts.get(item[:2], 0) + 1
    return Discrimination(len(effects), positive, negative)


#: Samples a class needs for its purity to enter :meth:`SetDiscrimination.purity`'s mean.
MIN_CLASS_SAMPLES = 2
#: The knowledge sets of :func:`set_discrimination` and the model whose effects sign their items.
SET_EFFECTS = {"preserve": "finetuned", "discard": "pretrained", "new": "finetuned",
               "exclusive": "finetuned"}


@dataclass(frozen=True)
class SetDiscrimination:
    """Discrimination power of each knowledge set, per class (:func:`set_discrimination`).

    Attributes:
        by_set: ``{set name: {class label: Discrimination}}``.
        tau, match, inputs: those of the report the sets come from.
    """

    by_set: dict[str, dict[int, Discrimination]]
    tau: float = 0.05
    match: str = "support"
    inputs: dict[str, str] = field(repr=False, default_factory=dict)

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every class's counts
        purity = ", ".join(f"{name}={self.purity(name):.3g}" for name in self.by_set)
        return f"SetDiscrimination(purity: {purity})"

    def purity(self, name: str) -> float:
        """The mean over classes of the set's purity, over the classes of two samples or more
        where the set is not empty (NaN if no class is left). A class of one sample is left out:
        there every item has β = 1 whatever the model knows, which would pull the mean to 1."""
        values = [d.purity() for d in self.by_set[name].values() if d.n_samples >= MIN_CLASS_SAMPLES]
        values = [v for v in values if not math.isnan(v)]
        return math.fsum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (NaN as None)."""
        return {name: {"purity": _nan_to_none(self.purity(name)),
                       "by_class": {str(c): {"purity": _nan_to_none(d.purity()),
                                             "n_samples": d.n_samples}
                                    for c, d in sorted(classes.items())}}
                for name, classes in self.by_set.items()}

    def save(self, path: str | Path) -> Path:
        """Write the sign counts m⁺, m⁻ of every set and class (and :meth:`to_dict`'s purities,
        for readers of the JSON) atomically; returns the path."""
        counts = {name: {str(c): {"n_samples": d.n_samples, "positive": _count_rows(d.positive),
                                  "negative": _count_rows(d.negative)}
                         for c, d in sorted(classes.items())}
                  for name, classes in self.by_set.items()}
        return _save_json(path, "set-discrimination", {"purity": self.to_dict(), "counts": counts},
                          _saved_meta(self, {"tau": self.tau, "match": self.match},
                                      inputs=self.inputs))

    @classmethod
    def load(cls, path: str | Path) -> SetDiscrimination:
        """Read a file written by :meth:`save` (the purities are recomputed from the counts)."""
        record = _load_json(path, "set-discrimination", ("counts",))
        meta = record.get("meta", {})  # an earlier version's file records no settings
        settings = meta.get("params", {})
        with _malformed(path, "counts", "SetDiscrimination"):
            by_set = {name: {int(c): Discrimination(int(d["n_samples"]), _count_dict(d["positive"]),
                                                    _count_dict(d["negative"]))
                             for c, d in classes.items()}
                      for name, classes in record["counts"].items()}
        return cls(by_set, float(settings.get("tau", 0.05)), settings.get("match", "support"),
                   meta.get("inputs", {}))

    def plot(self, ax=None):
        """Bar chart of each set's purity, mean over classes, a dot per class, on ``ax`` (None:
        the current axes, as every plot of the package); returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        from .plots import plot_set_purity  # the figure the CLI and the HTML report draw

        ax = ax or plt.gca()
        plot_set_purity({"discrimination": self.to_dict()}, ax)
        return ax


def _count_rows(counts: dict[tuple[str, int], int]) -> list[list]:
    """``{(type, mask): count}`` as JSON rows ``[type, mask, count]``."""
    return [[kind, mask, n] for (kind, mask), n in sorted(counts.items())]


def _count_dict(rows: list[list]) -> dict[tuple[str, int], int]:
    """The inverse of :func:`_count_rows`."""
    return {(str(kind), int(mask)): int(n) for kind, mask, n in rows}


def set_discrimination(report: KnowledgeReport, labels: Iterable[int]) -> SetDiscrimination:
    r"""Discriminative knowledge: the discrimination power of each knowledge set, per class.

    Our reading [recon] (docs/knowledge.md §3; Jiang, Cheng & Li, arXiv 2410.08455, call
    discarded high-order knowledge "not discriminative" without a definition): β(S) of Li & Zhang
    (ICML 2023) computed on each set K ∈ {preserve, discard, new, exclusive} instead of the
    salient set. For a class c with samples x_i (i = 1..n_c) and the items (type, S) of K(x_i):

    .. math::

        m^\pm_S = \#\{i : (type, S) \in K(x_i),\ \pm I(S|x_i) > 0\}, \quad
        \beta_c(S) = \frac{\max(m^+_S, m^-_S)}{m^+_S + m^-_S}, \quad
        \alpha_c(S) = \frac{m^+_S + m^-_S}{n_c},

    purity_c(K) = Σ_S α_c(S) β_c(S) / Σ_S α_c(S) (the group's ``overall_purity``), reported per
    class and as the mean over the classes of at least two samples (:data:`MIN_CLASS_SAMPLES`)
    where K is not empty (undefined, None in JSON, when no class is left) [recon]. I is the effect
    of the model the set belongs to (:data:`SET_EFFECTS`: the pre-trained model's for discarded
    items, the fine-tuned model's for the others). An item found on one sample of its class has
    β = 1, which is why classes of one sample stay out of the mean, and why with few samples per
    class every purity is near 1: explain several samples per class.
    Of the other possible readings, the share of a set with a positive effect on the
    ground-truth log-odds (per sample) is not implemented; the output a set explains,
    Σ_{S∈K} I(S|x) / (v(N) - v(∅)), is :func:`set_ablation`'s ``share``.

    Args:
        report: :func:`knowledge_report` of the samples (``exclusive`` needs its scratch model).
        labels: the class of every sample, in the report's sample order.
    """
    if not isinstance(report, KnowledgeReport):
        raise PretrainReuseError(f"report must be a KnowledgeReport (from knowledge_report), got "
                                 f"{type(report).__name__}")
    labels = list(labels)
    if not all(is_integer(c) for c in labels):
        raise PretrainReuseError("labels must be integer class indices, one per sample of the report")
    if len(labels) != report.n_samples:
        raise PretrainReuseError(f"got {len(labels)} labels for {report.n_samples} samples; pass "
                                 "the class of every sample of the report, in its order")
    names = [k for k in SET_EFFECTS if k != "exclusive" or report.samples[0].scratch is not None]
    by_set = {}
    for name in names:
        by_class: dict[int, list[dict[Item, float]]] = {}
        for sample, label in zip(report.samples, labels, strict=True):
            effects = getattr(sample, SET_EFFECTS[name])
            by_class.setdefault(int(label), []).append({k: effects[k] for k in getattr(sample, name)})
        by_set[name] = {c: _discrimination(e) for c, e in by_class.items()}
    return SetDiscrimination(by_set, report.tau, report.match, report.inputs)


# --------------------------------------------------------------------------------------------
# Each knowledge set alone
# --------------------------------------------------------------------------------------------

#: The fine-tuned model's sets that :func:`set_ablation` keeps alone, in table order
#: (``salient``: all of Ω_ft, the reference; ``exclusive`` only with a scratch model).
ABLATION_SETS = ("salient", "preserve", "new", "exclusive")
#: The same for the pre-trained model (``salient``: all of Ω_pre): what fine-tuning keeps of it,
#: what it drops, and the kept part a scratch model does not learn.
PRETRAINED_ABLATION_SETS = ("salient", "preserve", "discard", "exclusive")
#: The models whose game :func:`set_ablation` rebuilds, and their sets.
ABLATION_MODELS = {"finetuned": ABLATION_SETS, "pretrained": PRETRAINED_ABLATION_SETS}
#: How the figures and reports name those models.
MODEL_NAMES = {"finetuned": "fine-tuned", "pretrained": "pre-trained"}
#: What :func:`set_ablation` measures of each set's surrogate.
ABLATION_MEASURES = ("fidelity", "error", "share", "same_decision")


@dataclass(frozen=True, eq=False)
class SetAblation(ValueEquality):
    """A model's game rebuilt from one knowledge set at a time (:func:`set_ablation`).

    Attributes:
        measures: ``{set: {measure: (samples,) float64}}``, NaN where a sample leaves it undefined.
        sizes: ``{set: (samples,) int64}``, the set's items on every sample.
        model: whose game: ``"finetuned"`` or ``"pretrained"``.
    """

    measures: dict[str, dict[str, np.ndarray]]
    sizes: dict[str, np.ndarray]
    model: str = "finetuned"

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every sample's numbers
        shown = ", ".join(f"{name}={self.mean(name, 'fidelity'):.3g}" for name in self.measures)
        return (f"SetAblation(model={self.model!r}, samples={len(next(iter(self.sizes.values())))}, "
                f"fidelity: {shown})")

    def mean(self, name: str, measure: str) -> float:
        """The mean of ``measure`` over the samples that define it (NaN if none does)."""
        values = self._defined(name, measure)
        return float(values.mean()) if values.size else math.nan

    def median(self, name: str, measure: str) -> float:
        """The median of ``measure`` over the samples that define it (NaN if none does): the
        summary to read beside the mean when a sample's v(N) - v(∅) is near 0, whose ``share``
        and R² then take extreme values that the mean follows."""
        values = self._defined(name, measure)
        return float(np.median(values)) if values.size else math.nan

    def _defined(self, name: str, measure: str) -> np.ndarray:
        check_choice("set", name, self.measures.keys())
        check_choice("measure", measure, ABLATION_MEASURES)
        values = self.measures[name][measure]
        return values[~np.isnan(values)]

    def to_dict(self) -> dict[str, Any]:
        """Per set: its mean size and each measure's mean, median and the samples that define
        it (NaN as None), as ``knowledge.json`` holds it."""
        return {name: {"items": float(self.sizes[name].mean()),
                       **{m: {"mean": _nan_to_none(self.mean(name, m)),
                              "median": _nan_to_none(self.median(name, m)),
                              "n_used": int((~np.isnan(values)).sum())}
                          for m, values in per.items()}}
                for name, per in self.measures.items()}

    def save(self, path: str | Path) -> Path:
        """Write every sample's numbers (and :meth:`to_dict`'s means, for readers of the JSON)
        atomically; returns the path."""
        per_sample = {name: {"items": self.sizes[name].tolist(),
                             **{m: [_nan_to_none(float(v)) for v in values] for m, values in per.items()}}
                      for name, per in self.measures.items()}
        return _save_json(path, "set-ablation",
                          {"summary": self.to_dict(), "per_sample": per_sample, "model": self.model},
                          _saved_meta(self, {"model": self.model}))

    @classmethod
    def load(cls, path: str | Path) -> SetAblation:
        """Read a file written by :meth:`save`."""
        record = _load_json(path, "set-ablation", ("per_sample",))
        per_sample = record["per_sample"]
        if record.get("model", "finetuned") not in ABLATION_MODELS:
            raise PretrainReuseError(f"{str(path)!r} names model {record['model']!r}, not one of "
                                     f"{', '.join(ABLATION_MODELS)}: it is damaged; save it again")
        with _malformed(path, "per-sample numbers", "SetAblation"):
            # .get: a file of an earlier version holds the fine-tuned model's
            return cls({name: {m: _none_to_nan(per[m]) for m in ABLATION_MEASURES}
                        for name, per in per_sample.items()},
                       {name: np.array(per["items"], dtype=np.int64) for name, per in per_sample.items()},
                       record.get("model", "finetuned"))

    def plot(self, ax=None):
        """Bars of each set's fidelity and share, means over samples, on ``ax`` (None: the
        current axes, as every plot of the package); returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        from .plots import plot_set_ablation  # beside the package's other knowledge figures

        ax = ax or plt.gca()
        plot_set_ablation(self.to_dict(), ax, model=self.model)
        return ax


def set_ablation(report: KnowledgeReport, interactions: Iterable[Interactions] | Interactions, *,
                 model: str = "finetuned") -> SetAblation:
    r"""How much of a model's behaviour each knowledge set carries alone.

    The check "Each knowledge set alone" of docs/knowledge.md §5: the interaction model with only
    K_preserve, or only K_new, restored, and how well that surrogate reproduces the model; not in
    Jiang, Cheng & Li (arXiv 2410.08455). On every sample, for each set A of the model's items,
    {salient (all of Ω_ft), preserve, new, exclusive} for ``model="finetuned"`` and {salient (all
    of Ω_pre), preserve, discard, exclusive} for ``"pretrained"`` (how much of the pre-trained
    model's output survives with only what fine-tuning keeps, or only what it drops: the
    reviewers' pruning of the pre-trained interactions), its surrogate
    :meth:`~.values.Interactions.surrogate` keeps v(∅) and the model's interactions in A only,

    .. math::

        \hat w_A(S) = v(\emptyset) + \sum_{(and, T) \in A,\, T \subseteq S} I_{and}(T)
                     + \sum_{(or, T) \in A,\, T \cap S \neq \emptyset} I_{or}(T),

    and is compared with the game v on all 2^n coalitions S:

    - ``fidelity``: :math:`R^2 = 1 - \sum_S (v(S) - \hat w_A(S))^2 / \sum_S (v(S) - \bar v)^2`
      (1: A reproduces the game; 0: no better than its mean; undefined when v is constant);
    - ``error``: :math:`\mathrm{mean}_S |v(S) - \hat w_A(S)| / |v(N) - v(\emptyset)|`, the unit of
      the faithfulness check;
    - ``share``: :math:`(\hat w_A(N) - v(\emptyset)) / (v(N) - v(\emptyset))
      = \sum_{T \in A} I(T) / (v(N) - v(\emptyset))`, the part of the output on the whole input that
      A accounts for (the shares of preserve and new, or of preserve and discard, add up to
      salient's);
    - ``same_decision``: 1 when :math:`\hat w_A(N)` and v(N) have the same sign, i.e. for a
      log-odds output (the default of ``explain``) the surrogate keeps the model's decision
      whether p(y) > 1/2 on the whole input; NaN for other outputs.

    The last three are undefined when v(N) = v(∅). Per sample, the salient set of
    ``interactions`` (at the report's τ and matching) must be the report's Ω of ``model``: the
    interactions must be those the report was made from.

    Args:
        report: :func:`knowledge_report` of the samples (``exclusive`` needs its scratch model).
        interactions: ``model``'s :class:`Interactions` on the report's samples, in its order.
        model: ``"finetuned"`` (default) or ``"pretrained"``: whose game is rebuilt.
    """
    if not isinstance(report, KnowledgeReport):
        raise PretrainReuseError(f"report must be a KnowledgeReport (from knowledge_report), got "
                                 f"{type(report).__name__}")
    check_choice("model", model, ABLATION_MODELS)
    interactions = _samples(model, interactions)
    if len(interactions) != report.n_samples:
        raise PretrainReuseError(f"got {len(interactions)} {model} interactions for {report.n_samples} "
                                 f"samples; pass the {MODEL_NAMES[model]} model's interactions of "
                                 "every sample of the report, in its order")
    names = [k for k in ABLATION_MODELS[model]
             if k != "exclusive" or report.samples[0].scratch is not None]
    measures = {name: {m: np.empty(report.n_samples) for m in ABLATION_MEASURES} for name in names}
    sizes = {name: np.empty(report.n_samples, dtype=np.int64) for name in names}
    for i, (sample, x) in enumerate(zip(report.samples, interactions, strict=True)):
        check_interactions(f"{model}[{i}]", x)
        omega = getattr(sample, model)
        if knowledge_set(x, tau=report.tau, match=report.match) != omega:
            raise PretrainReuseError(f"{model}[{i}] is not the {MODEL_NAMES[model]} model's interactions the "
                                     f"report was made from (sample {i}); pass those, in the "
                                     "report's sample order")
        for name in names:
            items = omega.keys() if name == "salient" else getattr(sample, name)
            sizes[name][i] = len(items)
            for m, value in _ablation_measures(x, [item[:2] for item in items]).items():
                measures[name][m][i] = value
    return SetAblation(measures, sizes, model)


def _ablation_measures(x: Interactions, keep: list[tuple[str, int]]) -> dict[str, float]:
    """:func:`set_ablation`'s measures of the surrogate of ``x`` from the interactions ``keep``."""
    w_hat = x.surrogate(keep)
    residual = np.sum((x.v - w_hat) ** 2)
    spread = np.sum((x.v - x.v.mean()) ** 2)
    span = x.v[-1] - x.v[0]
    decided = x.info.get("output") in LOG_ODDS_OUTPUTS and span != 0
    return {
        "fidelity": float(1.0 - residual / spread) if spread > 0 else math.nan,
        "error": x._mean_error(w_hat),
        "share": float((w_hat[-1] - x.v[0]) / span) if span != 0 else math.nan,
        "same_decision": float((w_hat[-1] > 0) == (x.v[-1] > 0)) if decided else math.nan,
    }


# --------------------------------------------------------------------------------------------
# Knowledge ratios against accuracy, across models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AccuracyCorrelation(ValueEquality):
    """Correlation of a knowledge ratio with test accuracy across models (docs/knowledge.md §5).

    Attributes:
        ratio: (M,) the ratio of each model, the mean over its samples.
        accuracy: (M,) the accuracy of each model.
        pearson, spearman: the correlations (NaN when either vector is constant).
        pearson_ci, spearman_ci: bootstrap percentile intervals at level ``level``.
        n_samples: (M,) samples with a defined ratio per model (the others are skipped).
        n_boot: bootstrap resamples; n_boot_dropped: resamples whose correlation was undefined
            (a constant resampled ratio vector), left out of the intervals.
        level, seed: the interval's level and the bootstrap seed.
    """

    ratio: np.ndarray
    accuracy: np.ndarray
    pearson: float
    spearman: float
    pearson_ci: tuple[float, float]
    spearman_ci: tuple[float, float]
    n_samples: np.ndarray
    n_boot: int
    n_boot_dropped: int
    level: float
    seed: int

    def __repr__(self) -> str:  # a summary: the dataclass repr prints the arrays
        return (f"AccuracyCorrelation(models={len(self.ratio)}, pearson={self.pearson:.3g} "
                f"{_interval(self.pearson_ci)}, spearman={self.spearman:.3g} "
                f"{_interval(self.spearman_ci)} at level {self.level:g})")

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (NaN as None)."""
        return {
            "ratio": self.ratio.tolist(), "accuracy": self.accuracy.tolist(),
            "pearson": _nan_to_none(self.pearson), "spearman": _nan_to_none(self.spearman),
            "pearson_ci": [_nan_to_none(v) for v in self.pearson_ci],
            "spearman_ci": [_nan_to_none(v) for v in self.spearman_ci],
            "n_samples": self.n_samples.tolist(), "n_boot": self.n_boot,
            "n_boot_dropped": self.n_boot_dropped, "level": self.level, "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically (NaN as null); returns the path."""
        return _save_json(path, "accuracy-correlation", self.to_dict(),
                          _saved_meta(self, {"n_boot": self.n_boot, "level": self.level},
                                      seed=self.seed))

    def plot(self, ax=None, *, ratio: str = "ratio"):
        """Each model's accuracy against its mean ``ratio`` (e.g. "r_preserve"), with both
        correlations and their bootstrap intervals in the title, on ``ax`` (None: the current
        axes, as every plot of the package). Returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        from .plots import literal

        def shown(r: float, ci: tuple[float, float]) -> str:
            return "n/a" if math.isnan(r) else f"{r:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"

        ax = ax or plt.gca()
        ax.scatter(self.ratio, self.accuracy, color="C0")
        ax.set_xlabel(literal(f"{ratio} (mean over samples)"))
        ax.set_ylabel("accuracy")
        ax.set_title(f"Pearson {shown(self.pearson, self.pearson_ci)}, Spearman "
                     f"{shown(self.spearman, self.spearman_ci)} ({self.level:.0%} intervals)",
                     fontsize=8)
        return ax

    @classmethod
    def load(cls, path: str | Path) -> AccuracyCorrelation:
        """Read a file written by :meth:`save`."""
        keys = ("ratio", "accuracy", "pearson", "spearman", "pearson_ci", "spearman_ci", "n_samples",
                "n_boot", "n_boot_dropped", "level", "seed")
        d = _load_json(path, "accuracy-correlation", keys)
        pearson, spearman = _none_to_nan([d["pearson"], d["spearman"]])
        return cls(
            ratio=_none_to_nan(d["ratio"]), accuracy=_none_to_nan(d["accuracy"]),
            pearson=float(pearson), spearman=float(spearman),
            pearson_ci=tuple(_none_to_nan(d["pearson_ci"]).tolist()),
            spearman_ci=tuple(_none_to_nan(d["spearman_ci"]).tolist()),
            n_samples=np.array(d["n_samples"], dtype=np.int64), n_boot=d["n_boot"],
            n_boot_dropped=d["n_boot_dropped"], level=d["level"], seed=d["seed"])


def accuracy_correlation(ratios: Iterable[Sequence[float]], accuracy: Sequence[float], *,
                         n_boot: int = 2000, level: float = 0.95, seed: int = 0
                         ) -> AccuracyCorrelation:
    r"""Pearson and Spearman correlation of a knowledge ratio with accuracy across M models.

    Model m has per-sample ratios r_{m,1..n_m} (e.g. r_preserve, r_excl or r_new from
    :meth:`KnowledgeReport.per_sample`; NaN entries, samples whose denominator set is empty, are
    skipped) and test accuracy a_m. With the model's ratio \bar r_m = mean_i r_{m,i}:

    .. math::

        \rho_P = \frac{\sum_m (\bar r_m - \bar r)(a_m - \bar a)}
                        {\sqrt{\sum_m (\bar r_m - \bar r)^2 \sum_m (a_m - \bar a)^2}},
        \qquad \rho_S = \rho_P(\mathrm{rank}(\bar r), \mathrm{rank}(a))

    (ranks average over ties). The intervals are percentile bootstrap intervals over samples: each
    resample redraws every model's samples with replacement (independently per model, so models
    explained on different samples are handled alike) and recomputes both correlations; the
    accuracies stay fixed. This answers reviewers 1 and 5 of Jiang, Cheng & Li (arXiv 2410.08455):
    does more preserved / exclusive / new knowledge go with higher accuracy (docs/knowledge.md §5)?

    Args:
        ratios: one sequence of per-sample ratios per model (models × seeds × data sets).
        accuracy: (M,) accuracy of each model, in the same order; M >= 3.
        n_boot: bootstrap resamples, >= 100.
        level: interval level in (0, 1).
        seed: seed of the resampling (numpy ``default_rng``).
    """
    ratios = [_numbers(f"ratios[{m}]", r) for m, r in enumerate(ratios)]
    acc = _numbers("accuracy", accuracy)
    if len(acc) != len(ratios):
        raise PretrainReuseError(f"got {len(ratios)} ratio sequences and accuracy of shape "
                                 f"{acc.shape}; pass one accuracy per model")
    if len(acc) < 3:
        raise PretrainReuseError(f"a correlation across {len(acc)} models is meaningless; pass "
                                 "at least 3 models (or seeds)")
    if not np.isfinite(acc).all():
        raise PretrainReuseError("accuracy has NaN/inf values; pass each model's test accuracy")
    if not (is_integer(n_boot) and n_boot >= 100):
        raise PretrainReuseError(f"n_boot={n_boot!r} must be an integer >= 100")
    if not is_number(level) or not 0 < level < 1:
        raise PretrainReuseError(f"level={level!r} must be in (0, 1), e.g. 0.95")
    check_seed("seed", seed)
    values = []
    for m, r in enumerate(ratios):
        r = r[~np.isnan(r)]
        if not r.size:
            raise PretrainReuseError(f"model {m} has no sample with a defined ratio; explain more "
                                     "samples or drop the model")
        values.append(r)
    means = np.array([r.mean() for r in values])
    rng = np.random.default_rng(seed)
    boot = np.stack([r[rng.integers(len(r), size=(n_boot, len(r)))].mean(axis=1) for r in values],
                    axis=1)  # (n_boot, M)
    pearson_b, spearman_b = _pearson(boot, acc), _pearson(_ranks(boot), _ranks(acc))
    lo, hi = 50 * (1 - level), 50 * (1 + level)

    def interval(b: np.ndarray) -> tuple[float, float]:
        b = b[~np.isnan(b)]
        return (float(np.percentile(b, lo)), float(np.percentile(b, hi))) if b.size else (
            math.nan, math.nan)

    return AccuracyCorrelation(
        ratio=means, accuracy=acc, pearson=float(_pearson(means, acc)),
        spearman=float(_pearson(_ranks(means), _ranks(acc))),
        pearson_ci=interval(pearson_b), spearman_ci=interval(spearman_b),
        n_samples=np.array([len(r) for r in values]), n_boot=int(n_boot),
        n_boot_dropped=int(np.isnan(pearson_b).sum()), level=float(level), seed=int(seed))


def _numbers(name: str, x: Any) -> np.ndarray:
    """``x`` as a 1-d float64 array; anything else is an error naming ``name``."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None  # strings, ragged nesting
    if arr is None or arr.ndim != 1:
        raise PretrainReuseError(f"{name} must be a flat sequence of numbers, got {x!r:.60}")
    return arr


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..M along the last axis, ties sharing their average rank:
    rank(x_i) = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2 (O(M log M) per row)."""
    rows = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        s = np.sort(row)
        out[r] = (np.searchsorted(s, row, "left") + np.searchsorted(s, row, "right") + 1) / 2
    return out.reshape(np.shape(x))


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of the rows of ``x`` (..., M) with ``y`` (M,); NaN for a constant row."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean()
    den = np.sqrt((xc**2).sum(axis=-1) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / den, np.nan)
