"""The recipes: an :class:`~.config.ExperimentConfig` -> the rows of a paper's table or figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import PretrainReuseError
from .config import ExperimentConfig


@dataclass(frozen=True)
class Pick:
    """Which selection a row uses. ``k`` None: the experiment's ``k`` (classes) or ``cluster_k``
    (clusters); ``group`` (i, n): the i-th of n equal slices of the full UOT ranking."""

    units: str = "classes"  # "classes" or "clusters-<K>"
    method: str = "uot"
    k: int | float | None = None
    metric: str | None = None
    eps_c: float | None = None
    group: tuple[int, int] | None = None


@dataclass(frozen=True)
class Row:
    """One row of an experiment's table: a fine-tuning ``mode`` (None: selection only) on an
    optional selection, with ``settings`` (FinetuneConfig fields) fixed by the swept value ``x``."""

    method: str
    x: Any = None
    mode: str | None = None
    pick: Pick | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    pretraining: str | None = None  # a key of ExperimentConfig.pretrainings; None: ``weights``


def _clusters(cfg: ExperimentConfig) -> str:
    return f"clusters-{cfg.clusters}"


#: The distance of each method's Table 1 row: Greedy-OT is Cui et al.'s baseline on the l2
#: distance ("In Greedy-OT, C_ij is the l2 distance", Liu et al. §4.1); UOT takes ``metric``.
_TABLE1_METRIC = {"greedy-ot": "l2"}


def _table1(cfg: ExperimentConfig) -> list[Row]:
    rows = [Row("vanilla", mode="vanilla"), Row("co-tuning", mode="co-tuning")]
    for m in ("random", "greedy-ot", "uot"):
        rows.append(Row(f"reuse {m} classes", mode="reuse",
                        pick=Pick("classes", m, metric=_TABLE1_METRIC.get(m))))
    for m in ("random", "greedy-ot", "uot"):
        rows.append(Row(f"reuse-unlabeled {m} clusters", mode="reuse-unlabeled",
                        pick=Pick(_clusters(cfg), m, metric=_TABLE1_METRIC.get(m))))
    return rows


def _table2(cfg: ExperimentConfig) -> list[Row]:
    return [Row("reuse-unlabeled uot clusters", x=int(k), mode="reuse-unlabeled",
                pick=Pick(f"clusters-{int(k)}")) for k in cfg.values("clusters")]


def _vanilla_vs_uot(name: str, values) -> list[Row]:
    rows = []
    for v in values:
        rows += [Row("vanilla", x=v, mode="vanilla", settings=((name, v),)),
                 Row("reuse uot classes", x=v, mode="reuse", pick=Pick(), settings=((name, v),))]
    return rows


def _table3(cfg: ExperimentConfig) -> list[Row]:
    return _vanilla_vs_uot("long_tail_ratio", [float(v) for v in cfg.values("long_tail_ratio")])


def _table4(cfg: ExperimentConfig) -> list[Row]:
    eps_c = {"l2": cfg.eps_c_l2, "cosine": cfg.eps_c}
    return [Row(f"reuse {m} {metric}", mode="reuse",
                pick=Pick("classes", m, metric=metric, eps_c=eps_c[metric]))
            for m in ("greedy-ot", "uot") for metric in ("l2", "cosine")]


def _fig3a(cfg: ExperimentConfig) -> list[Row]:
    rows = [Row(f"reuse {m} classes", x=int(k), mode="reuse", pick=Pick("classes", m, k=int(k)))
            for k in cfg.values("k") for m in ("uot", "random")]
    if cfg.relevant:
        rows.append(Row("reuse label classes", x=len(cfg.relevant), mode="reuse",
                        pick=Pick("classes", "label", k=len(cfg.relevant))))
    return rows


def _fig3b(cfg: ExperimentConfig) -> list[Row]:
    return _vanilla_vs_uot("train_fraction", [float(v) for v in cfg.values("train_fraction")])


def _fig4a(cfg: ExperimentConfig) -> list[Row]:
    if not cfg.relevant:
        raise PretrainReuseError("fig4a measures recall; give the related pool classes (relevant)")
    return [Row(f"{m} {cfg.metric}", x=float(e), pick=Pick("classes", m, eps_c=float(e)))
            for e in cfg.values("eps_c") for m in ("uot", "greedy-ot")]


def _fig4b(cfg: ExperimentConfig) -> list[Row]:
    n = int(cfg.values("groups")[0])
    return [Row("vanilla", mode="vanilla")] + [
        Row("reuse uot group", x=i + 1, mode="reuse", pick=Pick("classes", group=(i, n)))
        for i in range(n)]


def _knowledge(cfg: ExperimentConfig) -> list[Row]:
    rows = []
    for label in cfg.weights_of():
        rows += [Row(f"{label} fine-tuned", mode="vanilla", pretraining=label),
                 Row(f"{label} linear probe", mode="linear-probe", pretraining=label)]
    return [*rows, Row("scratch", mode="scratch")]


#: name -> (rows, label of the swept variable or None, what the recipe reproduces)
RECIPES: dict[str, tuple[Callable[[ExperimentConfig], list[Row]], str | None, str]] = {
    "table1": (_table1, None, "Table 1: selection methods, labelled and unlabelled reuse"),
    "table2": (_table2, "k-means clusters K", "Table 2: number of clusters"),
    "table3": (_table3, "long-tail ratio", "Table 3: long-tailed target data"),
    "table4": (_table4, None, "Table 4: distance ablation"),
    "fig3a": (_fig3a, "selected classes", "Figure 3a: number of selected classes"),
    "fig3b": (_fig3b, "target training fraction", "Figure 3b: amount of target data"),
    "fig4a": (_fig4a, "eps_c", "Figure 4a: recall vs the cost scale eps_c"),
    "fig4b": (_fig4b, "score group (1 = most similar)", "Figure 4b: similarity groups"),
    "knowledge": (_knowledge, None, "Knowledge handed over by each pre-training (Jiang et al.)"),
}
