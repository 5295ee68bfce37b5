"""Select the pre-training units closest to a target task (Liu et al., NeurIPS 2022, §3).

Methods (registry :data:`SELECTORS`), each scoring every source unit, higher = more similar:

- ``uot``: ``log(P 1)`` of the entropic unbalanced OT plan between source units and target classes
  (problem (5) of the paper, cost ``(1 - cos)/eps_c``, ``eps=1, tau_a=1, tau_b=100``).
- ``greedy-ot``: the domain-similarity baseline of Cui et al. (CVPR 2018) as Liu et al. use it:
  every source unit scored alone by ``-sum_i w_i d(s_j, t_i)``, the transport cost from a point
  mass to the target class means weighted by class size (``l2`` on raw means or ``cosine``).
- ``random``: a seeded uniform ranking of the units.
- ``label``: the units a user names (ids, or a regular expression over the unit names).

The top ``k`` units are selected; ``k`` may also be a fraction of the source *samples* (clusters
differ in size, so "10% of the pool" is not "10% of the clusters").
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import (
    ValueEquality,
    check_output_file,
    hash_array,
    make_meta,
    read_json,
    write_json,
)
from .errors import (
    PretrainReuseError,
    as_array,
    check_choice,
    check_device,
    check_positive,
    check_seed,
    frozen_copy,
    is_integer,
    is_number,
    lookup,
    parse_ids,
    preview,
    refuse_path,
    user_stacklevel,
)
from .features import FeatureStore
from .transport import METRICS, check_solver_params, cost_matrix, unbalanced_sinkhorn_batched
from .units import KINDS as UNIT_KINDS
from .units import Units, class_means

__all__ = ["SelectConfig", "Selection", "select", "select_many"]

#: Units selected when no k is given (Liu et al. select the 100 closest ImageNet classes).
DEFAULT_K = 100


@dataclass(frozen=True)
class SelectConfig:
    """Parameters of a selection; defaults are those of Liu et al. (NeurIPS 2022).

    ``k``: number of units (an int >= 1) or, as a float in (0, 1], the fraction of source samples
    to cover (``1`` is one unit, ``1.0`` all samples); None (default): the paper's 100 units, or
    with ``method="label"`` every named unit. ``unit_ids`` (ids, or text such as ``"3,7-9"``) /
    ``name_pattern`` name the units of ``method="label"`` (only). NumPy numbers are accepted and
    stored as Python ones.
    """

    method: str = "uot"
    k: int | float | None = None
    metric: str = "cosine"
    eps_c: float = 0.01
    eps: float = 1.0
    tau_a: float = 1.0
    tau_b: float = 100.0
    max_iter: int = 1000
    tol: float = 1e-6
    dtype: str = "float64"
    device: str = "cpu"
    seed: int = 0
    unit_ids: tuple[int, ...] = ()
    name_pattern: str | None = None

    def __post_init__(self):
        check_choice("method", self.method, SELECTORS)
        check_choice("metric", self.metric, METRICS)
        check_choice("dtype", self.dtype, ("float32", "float64"))
        eps, tau_a, tau_b, max_iter, tol = check_solver_params(self.eps, self.tau_a, self.tau_b,
                                                               self.max_iter, self.tol)
        unit_ids = (parse_ids(self.unit_ids, "unit_ids") if isinstance(self.unit_ids, str)
                    else tuple(_integer_ids("unit_ids", self.unit_ids)))
        checked = {"eps_c": check_positive("eps_c", self.eps_c), "eps": eps, "tau_a": tau_a,
                   "tau_b": tau_b, "max_iter": max_iter, "tol": tol,
                   "seed": check_seed("seed", self.seed), "unit_ids": unit_ids,
                   "k": _check_k(self.k) if self.k is not None else
                   None if self.method == "label" else DEFAULT_K}
        for name, value in checked.items():  # frozen: set once, here
            object.__setattr__(self, name, value)
        if self.tau_a == float("inf"):
            raise PretrainReuseError(
                "tau_a=inf holds every source unit's mass at its weight, so all UOT scores tie; "
                "use a finite tau_a (the paper's 1.0)")
        # the solver's sums and results are float64 whatever dtype it iterates in
        check_device(self.device, float64="selection")
        if self.method == "label" and not self.unit_ids and not self.name_pattern:
            raise PretrainReuseError("method 'label' needs unit_ids (--ids) or a name_pattern (--names)")
        if self.name_pattern is not None:
            try:  # here, not when the units are read: a typo must not wait for the selection
                re.compile(self.name_pattern)
            except re.error as e:
                raise PretrainReuseError(f"name pattern {self.name_pattern!r} is not a valid "
                                         f"regular expression ({e}); fix it or escape it") from None
        if self.method != "label" and (self.unit_ids or self.name_pattern):
            raise PretrainReuseError(
                f"unit_ids and name_pattern (--ids, --names) name the units of method 'label', "
                f"not of {self.method!r}; pass method='label' (--method label), or drop them")


def _check_k(k) -> int | float:
    """``k`` as an int (a number of units >= 1) or a float (a share of the source samples in
    (0, 1]), NumPy numbers included."""
    if is_integer(k) and k >= 1:
        return int(k)
    if is_number(k) and not is_integer(k) and 0 < k <= 1:
        return float(k)
    if is_number(k) and not is_integer(k) and k > 1 and float(k).is_integer():
        raise PretrainReuseError(
            f"k={k!r}: a float is a share of the source samples, in (0, 1] (1.0: all of them); "
            f"pass the integer {int(k)} for {int(k)} units")
    raise PretrainReuseError(
        f"k={k!r} must be a whole number of units >= 1 or a sample fraction in (0, 1]")


def _integer_ids(name: str, ids) -> list[int]:
    """``ids`` (a list, tuple, set, NumPy array or torch tensor of integers) as a list of ints."""
    if hasattr(ids, "tolist"):  # an array or tensor: its elements as Python numbers
        ids = ids.tolist()
    if isinstance(ids, str) or not isinstance(ids, Iterable):
        raise PretrainReuseError(f"{name} must be a list of integer ids, got {ids!r}")
    ids = list(ids)
    bad = [i for i in ids if not is_integer(i)]
    if bad:
        raise PretrainReuseError(f"{name} must be integer ids, got {bad[0]!r}")
    return [int(i) for i in ids]


@dataclass(frozen=True, eq=False)
class Selection(ValueEquality):
    """The ranked choice of source units for one target task.

    Attributes:
        selected: source unit ids, most similar first.
        scores: one score per source unit (higher = more similar); for ``uot`` it is
            ``log(P 1)``, kept in log space because ``P 1`` underflows for distant units.
        params: the :class:`SelectConfig` used, as a dict.
        meta: metadata block (inputs, seed, version, solver diagnostics).
        unit_names: names of the source units, if known.
        counts: samples per source unit, if known.
        unit_kind: what the source units are (``"class"``, ``"cluster"``, or ``"prototypes"``
            for a bare matrix), if known: fine-tuning maps the ids of classes to samples by
            their labels, those of clusters by a units file, so it refuses a selection of
            clusters without that file.
    """

    selected: list[int]
    scores: np.ndarray
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    unit_names: list[str] | None = None
    counts: np.ndarray | None = None
    unit_kind: str | None = None

    def __post_init__(self):
        if self.unit_kind is not None:
            check_choice("unit_kind", self.unit_kind, UNIT_KINDS)
        scores = as_array("scores", self.scores)
        if scores.ndim != 1 or scores.dtype.kind not in "biuf" or np.isnan(scores).any():
            raise PretrainReuseError(
                f"scores must be one real number per source unit, without NaN; got "
                f"{'NaN' if scores.dtype.kind in 'biuf' and scores.ndim == 1 else scores.dtype} "
                f"in shape {scores.shape}")
        # a copy of its own: the caller's array changed later would unmake the ranking
        object.__setattr__(self, "scores", frozen_copy(scores, np.float64))
        object.__setattr__(self, "selected", _integer_ids("selected", self.selected))
        n = len(self.scores)
        edited = "a selection file that says so was edited or is corrupt: run select again"
        for name in ("params", "meta"):
            if not isinstance(getattr(self, name), dict):
                raise PretrainReuseError(f"{name} must be a dict, got "
                                         f"{type(getattr(self, name)).__name__}; {edited}")
        if self.unit_names is not None:
            names = self.unit_names
            if isinstance(names, str) or not all(isinstance(x, str) for x in names) \
                    or len(names) != n:
                raise PretrainReuseError(f"unit_names must be one name (a string) per source unit "
                                         f"({n}); {edited}")
            object.__setattr__(self, "unit_names", list(names))
        if self.counts is not None:
            counts = as_array("counts", self.counts)
            if counts.shape != (n,) or counts.dtype.kind not in "iu" or (counts < 0).any():
                raise PretrainReuseError(f"counts must be one sample count (an integer >= 0) per "
                                         f"source unit ({n}); {edited}")
            object.__setattr__(self, "counts", frozen_copy(counts, np.int64))
        if not len(self.selected):  # select keeps k >= 1 units
            raise PretrainReuseError("the selection selects no unit (an empty 'selected'); a "
                                     "selection file that says so was edited or is corrupt: run "
                                     "select again")
        outside = [u for u in self.selected if not 0 <= u < n]
        if outside or len(set(self.selected)) < len(self.selected):
            raise PretrainReuseError(
                "the selection " + (f"names unit {outside[0]}, outside the {n} units it ranks"
                                    if outside else "names a unit twice")
                + "; a selection file that says so was edited or is corrupt: run select again")

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every score and name
        top = [f"{u} {self.unit_names[u]!r}" if self.unit_names else str(u)
               for u in self.selected[:5]]
        more = ", ..." if len(self.selected) > 5 else ""
        return (f"Selection(method={self.params.get('method')!r}, selected={len(self.selected)} "
                f"of {len(self.scores)} units, top=[{', '.join(top)}{more}])")

    def ranking(self) -> np.ndarray:
        """All source units, most similar first (ties broken by unit id)."""
        return np.argsort(-self.scores, kind="stable")

    def top(self, k: int | float) -> Selection:
        """The same ranking with a different ``k`` (count or sample fraction, as in SelectConfig);
        of a ``label`` selection, among the named units only."""
        k = _check_k(k)
        ranking = self.ranking()
        if self.params.get("method") == "label":  # the named units (score > 0) only
            ranking = ranking[:int((self.scores > 0).sum())]
            _check_named_k(k, ranking, self.counts)
        meta = {**self.meta, "params": {**self.meta["params"], "k": k}} if "params" in self.meta \
            else self.meta
        return Selection(selected=_take(ranking, k, self.counts),
                         scores=self.scores, params={**self.params, "k": k}, meta=meta,
                         unit_names=self.unit_names, counts=self.counts, unit_kind=self.unit_kind)

    def recall(self, relevant) -> float:
        """Fraction of the ``relevant`` unit ids that were selected (Liu et al., Table 4)."""
        relevant = self._relevant_units(relevant)
        return len(relevant & set(self.selected)) / len(relevant)

    def _relevant_units(self, relevant) -> set[int]:
        """``relevant`` as a set of unit ids, each checked to be one of the scored units."""
        relevant = set(_integer_ids("relevant", relevant))
        if not relevant:
            raise PretrainReuseError("recall needs at least one relevant unit id")
        outside = sorted(r for r in relevant if not 0 <= r < len(self.scores))
        if outside:
            raise PretrainReuseError(
                f"relevant unit id {outside[0]} is out of range for {len(self.scores)} units; "
                f"pass ids 0..{len(self.scores) - 1}")
        return relevant

    def sample_recall(self, units: Units, labels, relevant) -> float:
        """Share of the samples of the ``relevant`` classes that the selected ``units`` bring:
        the recall of unlabelled units (clusters), whose ids are not classes. ``labels`` are the
        pool's class labels, in the order of ``units.assignment``."""
        if not isinstance(units, Units):  # recall takes relevant first: an easy slip
            raise PretrainReuseError(f"units must be the Units the selection was made on, got "
                                     f"{type(units).__name__}; call sample_recall(units, labels, "
                                     "relevant)")
        if units.assignment is None:
            raise PretrainReuseError("sample recall needs units that record their members "
                                     "(a Units file from class means or k-means)")
        if len(units) != len(self.scores):
            raise PretrainReuseError(
                f"the selection scores {len(self.scores)} units but units has {len(units)}; pass "
                "the units the selection was made on")
        labels, relevant = as_array("labels", labels), _integer_ids("relevant", relevant)
        if len(labels) != len(units.assignment):
            raise PretrainReuseError(
                f"{len(labels)} labels for the {len(units.assignment)} samples of the units; pass "
                "one class label per sample, in the order of units.assignment")
        if not relevant:
            raise PretrainReuseError("sample recall needs at least one relevant class id")
        # every class of a labelled pool has samples: a relevant id without any is a wrong id,
        # which would leave the recall over the other ids looking complete
        absent = sorted(set(relevant) - set(np.unique(labels).tolist()))
        if absent:
            raise PretrainReuseError(
                f"sample recall: no pool sample has the relevant label {absent[0]}; pass labels "
                f"the pool has (0..{int(labels.max())})")
        in_relevant = np.isin(labels, relevant)
        taken = np.isin(units.assignment, self.selected)
        return float((taken & in_relevant).sum() / in_relevant.sum())

    def save(self, path: str | Path) -> Path:
        """Write ``sel.json`` atomically."""
        path = check_output_file(path, ".json", "selection")  # load() opens it by its suffix
        obj = {"kind": "selection", "selected": [int(s) for s in self.selected],
               "scores": [float(s) for s in self.scores], "params": self.params,
               "meta": self.meta}
        if self.unit_names is not None:
            obj["selected_names"] = [self.unit_names[s] for s in self.selected]
            obj["unit_names"] = list(self.unit_names)
        if self.counts is not None:
            obj["counts"] = [int(c) for c in self.counts]
        if self.unit_kind is not None:
            obj["unit_kind"] = self.unit_kind
        write_json(path, obj)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a ``sel.json`` written by :meth:`save` (or by ``pretrain-reuse select``)."""
        obj = read_json(path, "selection")
        if obj.get("kind") != "selection" or "selected" not in obj or "scores" not in obj:
            raise PretrainReuseError(f"{str(path)!r} is not a selection file written by select")
        counts, selected = obj.get("counts"), obj["selected"]
        edited = f"{str(path)!r} was edited or is corrupt: run select again"
        # int(3.5) would silently name unit 3
        if not isinstance(selected, list) or not all(
                isinstance(u, int) and not isinstance(u, bool) for u in selected):
            raise PretrainReuseError(f"'selected' must be a list of unit ids (integers); {edited}")
        try:
            scores = np.asarray(obj["scores"], dtype=np.float64)
            counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        except (TypeError, ValueError):
            raise PretrainReuseError(f"'scores' and 'counts' must be lists of numbers; {edited}") from None
        if scores.ndim != 1:
            raise PretrainReuseError(f"'scores' must be a flat list, one per unit; {edited}")
        kind = obj.get("unit_kind")  # absent from files of earlier versions
        if kind is not None and kind not in UNIT_KINDS:
            raise PretrainReuseError(f"'unit_kind' is {str(kind)[:40]!r}, not one of "
                                     f"{', '.join(UNIT_KINDS)}; {edited}")
        return cls(selected=selected, scores=scores, params=obj.get("params", {}),
                   meta=obj.get("meta", {}), unit_names=obj.get("unit_names"), counts=counts,
                   unit_kind=kind)

    def plot(self, ax=None, *, relevant=None):
        """The sorted score vector (Liu et al., Fig. 2b); ``relevant`` units are highlighted."""
        import matplotlib.pyplot as plt

        relevant = None if relevant is None else self._relevant_units(relevant)
        ax = ax or plt.gca()
        order = self.ranking()
        ax.plot(np.arange(len(order)), self.scores[order], lw=1, color="0.3")
        if relevant is not None:
            rel = np.isin(order, list(relevant))
            ax.scatter(np.flatnonzero(rel), self.scores[order][rel], s=6, color="C3",
                       label="related units", zorder=3)
            ax.legend(loc="upper right")
        ax.axvline(len(self.selected) - 0.5, ls="--", color="C0", lw=1)
        ax.set_xlabel("source units, ranked")
        ax.set_ylabel("score" + (" (log P1)" if self.params.get("method") == "uot" else ""))
        return ax


# --------------------------------------------------------------------------------------------
# Scoring functions: (source, targets, cfg) -> one (scores, diagnostics) per target
# --------------------------------------------------------------------------------------------


def _device_dtype(cfg: SelectConfig) -> tuple[torch.device, torch.dtype]:
    return torch.device(cfg.device), getattr(torch, cfg.dtype)


def _tensor(prototypes: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a copy: torch warns of a read-only array (a memory-mapped .npy) that as_tensor would share
    return torch.tensor(prototypes, device=device, dtype=dtype)


def _score_uot(source: Units, targets: list[Units], cfg: SelectConfig):
    dev, dtype = _device_dtype(cfg)
    s = _tensor(source.prototypes, dev, dtype)
    m = max(len(t) for t in targets)
    costs = torch.zeros(len(targets), len(s), m, device=dev, dtype=dtype)
    b = torch.zeros(len(targets), m, device=dev, dtype=dtype)
    for k, t in enumerate(targets):  # pad smaller target sets with zero-weight columns
        tt = _tensor(t.prototypes, dev, dtype)
        costs[k, :, : len(t)] = cost_matrix(s, tt, metric=cfg.metric, eps_c=cfg.eps_c)
        b[k, : len(t)] = 1.0
    a = torch.ones(len(s), device=dev, dtype=dtype)
    res = unbalanced_sinkhorn_batched(a, b, costs, cfg.eps, cfg.tau_a, cfg.tau_b,
                                      max_iter=cfg.max_iter, tol=cfg.tol)
    out = []
    for k in range(len(targets)):
        # stopped by itself (not by max_iter: an unfinished solve is warned of, below) with the
        # optimality conditions off by more nats than the dtype's exponent range (88 in float32):
        # masses wrong by more than it can represent, the ranking is noise
        off = max(float(res.marginal_error_a[k]), float(res.marginal_error_b[k]))
        unresolved = int(res.n_iter[k]) < cfg.max_iter and off > math.log(torch.finfo(dtype).max)
        if unresolved or not (np.isfinite(float(res.objective[k]))
                              and torch.isfinite(res.log_row_mass[k]).all()):
            raise PretrainReuseError(
                f"UOT broke down numerically in {cfg.dtype} at eps={cfg.eps:g}, eps_c={cfg.eps_c:g} "
                f"(optimality conditions off by {off:.3g} nats); {_range_fix(cfg)}")
        diag = {"converged": bool(res.converged[k]), "n_iter": int(res.n_iter[k]),
                "objective": float(res.objective[k]),
                "marginal_error_a": float(res.marginal_error_a[k]),
                "marginal_error_b": float(res.marginal_error_b[k]),
                "transported_mass": float(res.log_row_mass[k].double().exp().sum())}
        out.append((res.log_row_mass[k].double().cpu().numpy(), diag))
    return out


def _score_greedy_ot(source: Units, targets: list[Units], cfg: SelectConfig):
    dev, dtype = _device_dtype(cfg)
    s = _tensor(source.prototypes, dev, dtype)
    out = []
    for t in targets:
        counts = t.counts if t.counts is not None else np.ones(len(t))
        w = torch.as_tensor(counts / counts.sum(), device=dev, dtype=dtype)
        tt = _tensor(t.prototypes, dev, dtype)
        dist = METRICS[cfg.metric](s, tt)
        out.append(((-(dist @ w)).double().cpu().numpy(), {"weights": "target class sizes"
                                                            if t.counts is not None else "uniform"}))
    return out


def _score_random(source: Units, targets: list[Units], cfg: SelectConfig):
    # one draw for every target: a target's random units must not depend on which other
    # targets share the call (select_many), only on the seed
    scores = np.random.default_rng(cfg.seed).permutation(len(source)).astype(np.float64)
    return [(scores, {}) for _ in targets]


def _score_label(source: Units, targets: list[Units], cfg: SelectConfig):
    chosen = list(dict.fromkeys(cfg.unit_ids))  # dedupe, keep the given order
    bad = [i for i in chosen if not 0 <= i < len(source)]
    if bad:
        raise PretrainReuseError(
            f"unit id {bad[0]} is out of range for {len(source)} source units; ids are 0-based"
        )
    if cfg.name_pattern:
        if source.names is None:
            raise PretrainReuseError(
                "name_pattern (--names) needs unit names, which k-means clusters do not have: "
                "select them by id (unit_ids, --ids)" if source.kind == "cluster" else
                "name_pattern (--names) needs unit names; build the units with class names "
                "(class_names, --class-names)"
            )
        pattern = re.compile(cfg.name_pattern)  # checked by SelectConfig
        matched = [i for i, n in enumerate(source.names) if pattern.search(n)]
        if not matched:  # even beside --ids: a pattern that names nothing is a typo
            raise PretrainReuseError(
                f"name pattern {cfg.name_pattern!r} (--names) matches none of the unit names "
                f"({preview(source.names)}); it is a regular expression searched in each name, "
                "e.g. 'bird|owl'")
        chosen += [i for i in matched if i not in chosen]
    _check_named_k(cfg.k, chosen, source.counts)
    scores = np.zeros(len(source))
    scores[chosen] = len(chosen) - np.arange(len(chosen))  # keep the given order
    return [(scores, {"n_named": len(chosen)}) for _ in targets]


def _check_named_k(k: int | float | None, named: list[int], counts: np.ndarray | None) -> None:
    """Refuse a ``k`` that the ``named`` units of a label selection cannot fill: the rest would
    be units nobody named, in id order."""
    if is_integer(k) and k > len(named):
        raise PretrainReuseError(
            f"k={k} but only {len(named)} units were named (unit_ids/name_pattern, "
            f"--ids/--names); pass k={len(named)} (--k {len(named)})")
    if isinstance(k, float) and counts is not None and (
            counts[named].sum() < k * counts.sum() * (1 - 1e-12)):
        raise PretrainReuseError(
            f"k={k} asks for {k:.0%} of the source samples, but the named units hold "
            f"{counts[named].sum() / counts.sum():.1%}; pass a smaller k, or none for every named unit")


SELECTORS: dict[str, Callable] = {
    "uot": _score_uot,
    "greedy-ot": _score_greedy_ot,
    "random": _score_random,
    "label": _score_label,
}


def _take(ranking: np.ndarray, k: int | float, counts: np.ndarray | None) -> list[int]:
    """The top units of ``ranking`` for a checked ``k`` (:func:`_check_k`)."""
    if isinstance(k, int):
        if k > len(ranking):
            raise PretrainReuseError(
                f"k={k} exceeds the {len(ranking)} source units; pass k <= {len(ranking)} (--k)")
        return [int(u) for u in ranking[:k]]
    if counts is None:
        raise PretrainReuseError(
            "k as a fraction of samples needs unit sizes, which a bare prototype matrix lacks; "
            "pass Units that record their members (a units file, not a .npy matrix) or an "
            "integer k"
        )
    covered = np.cumsum(counts[ranking])
    # the fewest units whose samples reach the share; the slack absorbs 0.07 * 100 = 7.000000000000001
    n = int(np.searchsorted(covered, k * counts.sum() * (1 - 1e-12))) + 1
    return [int(u) for u in ranking[: min(n, len(ranking))]]


def select_many(source: Units | FeatureStore | np.ndarray, targets: list[Units | FeatureStore | np.ndarray],
                cfg: SelectConfig | Mapping[str, Any] | None = None) -> list[Selection]:
    """Rank the source units for several target tasks at once (one batched UOT solve).

    A labelled FeatureStore stands for its class means (:func:`~.units.class_means`), a 2-d
    array (NumPy, torch or nested lists) for a prototype matrix (one unit per row), as a ``.npy``
    file does on the command line. ``cfg`` is a :class:`SelectConfig`, a dict of its fields, or
    None for the defaults.

    Each selection's ``meta["inputs"]`` records what its source and its target units were made
    of, the samples included where the units know them (``target.data``:
    :func:`~.units.data_of`), so that ``finetune`` can tell a selection made for other target
    data than it trains on.
    """
    cfg = _as_config(cfg)
    if isinstance(targets, Units | FeatureStore | np.ndarray | torch.Tensor):
        raise PretrainReuseError(f"targets must be a list of target units, got one "
                                 f"{type(targets).__name__}; pass [targets], or use select()")
    if not targets:
        raise PretrainReuseError("pass at least one target")
    source = _as_units(source)
    targets = [_as_units(t) for t in targets]
    for t in targets:
        if t.prototypes.shape[1] != source.prototypes.shape[1]:
            raise PretrainReuseError(
                f"source units have dimension {source.prototypes.shape[1]} but target units have "
                f"{t.prototypes.shape[1]}; embed both with the same backbone and layer"
            )
        _warn_other_embedding(source, t)
    scored = lookup(SELECTORS, cfg.method, "method")(source, targets, cfg)
    counts = source.counts
    out = []
    for t, (scores, diag) in zip(targets, scored, strict=True):
        ranking = np.argsort(-scores, kind="stable")
        k = diag["n_named"] if cfg.k is None else cfg.k
        # the units' own hashes: k-means runs of one store with other seeds share its inputs
        meta = make_meta(f"selection.{cfg.method}", asdict(cfg),
                         inputs={"source": {**source.meta.get("inputs", {}),
                                            "units": hash_array(source.prototypes)},
                                 "target": {**t.meta.get("inputs", {}),
                                            "units": hash_array(t.prototypes)}},
                         seed=cfg.seed)
        meta["solver"] = diag
        if "data_class_names" in source.meta:  # the pool's own names of renamed units
            meta["data_class_names"] = source.meta["data_class_names"]
        if diag.get("converged") is False:
            _warn_unconverged(diag, cfg, f" (target {len(out) + 1} of {len(targets)})"
                              if len(targets) > 1 else "")
        out.append(Selection(selected=_take(ranking, k, counts), scores=scores,
                             params=meta["params"], meta=meta, unit_names=source.names,
                             counts=counts, unit_kind=source.kind))
    return out


def _range_fix(cfg: SelectConfig) -> str:
    """What brings a UOT solve whose costs over eps exceed the dtype's precision back in range."""
    return ("use a larger eps (--eps)" + (" or dtype='float64' (--dtype float64)"
                                          if cfg.dtype == "float32" else "")
            + ", or a larger eps_c (--eps-c; it rescales the cost only)")


def _warn_unconverged(solver: dict[str, Any], cfg: SelectConfig, which: str) -> None:
    """Warn that the UOT solve stopped before its tolerance, with the fix for why it stopped."""
    fix = ("raise max_iter (--max-iter) or tol (--tol)" if solver["n_iter"] >= cfg.max_iter else
           f"the potentials stopped moving at {cfg.dtype}'s rounding error: {_range_fix(cfg)}")
    off = max(solver["marginal_error_a"], solver["marginal_error_b"])
    warnings.warn(f"UOT did not converge in {solver['n_iter']} iterations{which} (optimality "
                  f"conditions off by {off:.3g} nats); the ranking may be unsettled: {fix}",
                  stacklevel=user_stacklevel())


def _warn_other_embedding(source: Units, target: Units) -> None:
    """Warn when the units summarise features of different networks (another backbone, layer
    or weights of the layers that compute the features, as ``embed`` recorded them: not the head
    above the penultimate layer), of images of another size or computed in another precision
    (bf16 vs fp32): a dimension that
    agrees hides it, and the ranking then compares unrelated feature spaces. A warning, not an
    error: units from ``.npy`` files or made elsewhere record no network, and a user may know
    better."""
    a, b = source.meta.get("embedding"), target.meta.get("embedding")
    if not (a and b):
        return
    # the network is its layer and parameters: one model named two ways (a relative and an
    # absolute hf: path) is the same network. Units made before the input size was recorded
    # are compared on the rest.
    # precision: bf16 features (a GPU's embedding) are rounded where fp32 ones are not
    differ = [k for k in ("layer", "state", "input_size", "precision")
              if a.get(k) is not None and b.get(k) is not None and a[k] != b[k]]
    if differ:
        shown = [f"{k}: {a[k]} vs {b[k]}" for k in differ]
        # the names as context: one name with other weights or image sizes is common
        models = (f"models {a['model']} vs {b['model']}" if a["model"] != b["model"]
                  else f"both model {a['model']}")
        warnings.warn(
            f"source and target units come from features of different networks, image sizes "
            f"or precisions "
            f"({'; '.join(shown)}; {models}); embed both with the same --model, --weights, "
            "--layer, --image-size and --precision", stacklevel=user_stacklevel())


def select(source: Units | FeatureStore | np.ndarray, target: Units | FeatureStore | np.ndarray,
           cfg: SelectConfig | Mapping[str, Any] | None = None) -> Selection:
    """Rank the source units by similarity to one target task and keep the top ``cfg.k``.

    Inputs and ``cfg`` as for :func:`select_many`.
    """
    return select_many(source, [target], cfg)[0]


def _as_config(cfg: SelectConfig | Mapping[str, Any] | None) -> SelectConfig:
    if cfg is None:
        return SelectConfig()
    if isinstance(cfg, Mapping):
        for key in cfg:  # SelectConfig(**cfg) would raise a TypeError
            check_choice("SelectConfig field", key, [f.name for f in fields(SelectConfig)])
        return SelectConfig(**cfg)
    if not isinstance(cfg, SelectConfig):
        raise PretrainReuseError(f"cfg must be a SelectConfig or a dict of its fields, got "
                                 f"{type(cfg).__name__}; build it with SelectConfig(**fields)")
    return cfg


def _as_units(x: Units | FeatureStore | np.ndarray) -> Units:
    if isinstance(x, Units):
        return x
    if isinstance(x, FeatureStore):
        return class_means(x)
    refuse_path(x, "units")
    return Units(prototypes=x, kind="prototypes")  # Units converts and checks the array
