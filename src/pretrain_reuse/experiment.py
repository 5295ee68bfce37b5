"""``pretrain-reuse experiment NAME``: the experiments of Liu et al. (NeurIPS 2022) as recipes that
run on any pool, target task and backbone.

=========  =====================================================================================
recipe     rows (one fine-tuning run per row, sweep value and seed)
=========  =====================================================================================
table1     vanilla, co-tuning, reuse of random / greedy-OT / UOT classes, reuse-unlabeled of
           random / greedy-OT / UOT clusters (Table 1)
table2     reuse-unlabeled of UOT clusters for each number of k-means clusters K (Table 2)
table3     vanilla vs reuse of UOT classes on long-tailed target data, per imbalance ratio (Table 3)
table4     reuse of greedy-OT / UOT classes with l2 and cosine costs, with recall (Table 4)
fig3a      reuse of UOT / random classes for each number of selected classes; label-based
           selection of the ``relevant`` classes when given (Fig. 3a)
fig3b      vanilla vs reuse of UOT classes for each fraction of the target training data (Fig. 3b)
fig4a      recall of the ``relevant`` classes against the cost scale eps_c; selection only (Fig. 4a)
fig4b      the pool's classes cut into groups by UOT score, reuse of each group, vs vanilla (Fig. 4b)
knowledge  for each pre-training in ``pretrainings`` (e.g. supervised vs self-supervised weights of
           one architecture): vanilla fine-tuning, its linear probe and a scratch model, then the
           knowledge analysis of Jiang, Cheng & Li (arXiv 2410.08455) per seed, and the correlation
           of the knowledge ratios with test accuracy across all fine-tuned models
=========  =====================================================================================

Everything an experiment computes lands in its folder and is reused by a rerun: features
(``features/``, from ``embed`` unless given), units (``units/``), selections (``selections/``)
and fine-tuning runs (``runs/<row>-seed<s>/``, skipped once ``result.json`` exists and resumed
from their checkpoint otherwise). A folder in which no fine-tuning run finished (an experiment
stopped by an error) may be rerun with other settings: what they would change is removed first.
Given feature stores must hold the samples and labels of ``source`` / ``target``'s training data.
A random selection is drawn with each run's seed, and a low-data or long-tail run (a sweep's or
the ``finetune`` settings') selects with the class means of the images it trains on. The table is
written as ``results.csv``, ``results.md``, ``results.png`` and ``experiment.json``; accuracies are
the final-step test top-1 (mean and sample standard deviation over seeds, left empty for a single
seed) next to the test top-1 at the best validation evaluation, with the number of validation
images it rests on (left empty without any) and the classes they lack. A folder is claimed with
the settings its recipe reads (:data:`READS`) and the content hashes of the weights files and
given feature stores among them, so others may change on a rerun, and a rerun rewrites a
``report.html`` it finds.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import (
    atomic_path,
    claim_folder,
    hash_array,
    hash_file,
    make_meta,
    read_json,
    require_keys,
    to_json,
    write_json,
)
from .configs import checked_values, config_values
from .data.catalog import DATASETS
from .data.datasets import ImageDataset
from .embed import EmbedConfig, embed
from .errors import PretrainReuseError, check_choice, check_positive, check_seed, parse_ids
from .features import FeatureStore
from .finetune import MODES, FinetuneConfig, RunResult, finetune_datasets, open_split, target_splits
from .finetune.config import MODE_OPTIONS
from .finetune.data import check_batch_size, selected_source
from .finetune.loop import RESUMABLE_WITH_OTHER, total_steps
from .models import create_backbone
from .selection import SelectConfig, Selection, select
from .transport import METRICS
from .units import Units, class_means, spherical_kmeans

#: Knowledge ratios the ``knowledge`` recipe reports per fine-tuned model (means over seeds).
KNOWLEDGE_RATIOS = ("preserve", "discard", "new", "exclusive")

#: The seed of what the experiment derives from the pool once for all rows (k-means clusters, the
#: clusters' image budget): not the first of ``seeds``, so that adding or dropping seeds, which
#: a rerun may do, never changes a row.
POOL_SEED = 0

#: FinetuneConfig settings that change which target images a run trains on.
REGIMES = ("train_fraction", "long_tail_ratio")

#: Values swept by the recipes, unless the config's ``sweep`` overrides them.
SWEEP_DEFAULTS: dict[str, tuple] = {
    "clusters": (1000, 2000),                       # table2: k-means K (the paper's two values)
    "long_tail_ratio": (10.0, 100.0),               # table3: largest / smallest class
    "k": (50, 100, 200, 300),                       # fig3a: selected classes
    "train_fraction": (0.2, 0.4, 0.6, 0.8),         # fig3b
    "eps_c": (0.0001, 0.001, 0.01, 0.1, 1.0),      # fig4a
    "groups": (10,),                                # fig4b: number of score groups
}

#: The variable each recipe sweeps (its values: ``ExperimentConfig.values``).
SWEPT = {"table2": "clusters", "table3": "long_tail_ratio", "fig3a": "k",
         "fig3b": "train_fraction", "fig4a": "eps_c", "fig4b": "groups"}

_SELECTS = ("weights", "source", "source_features", "target_features", "embed_batch_size",
            "relevant", "finetune")  # finetune: a low-data / long-tail regime selects for its images
_TRAINS = ("target_test", "lam")

#: The ExperimentConfig fields each recipe reads, besides model, target, its swept values and
#: seeds / skip (which add or leave out runs, never change one); see :func:`_reads`.
READS: dict[str, tuple[str, ...]] = {
    "table1": (*_SELECTS, *_TRAINS, "k", "cluster_k", "clusters", "metric", "eps_c"),
    # clusters: the default cluster share without pool labels, k / clusters
    "table2": (*_SELECTS, *_TRAINS, "k", "cluster_k", "clusters", "metric", "eps_c"),
    "table3": (*_SELECTS, *_TRAINS, "k", "metric", "eps_c"),
    "table4": (*_SELECTS, *_TRAINS, "k", "eps_c", "eps_c_l2"),  # each row sets its metric
    "fig3a": (*_SELECTS, *_TRAINS, "metric", "eps_c"),
    "fig3b": (*_SELECTS, *_TRAINS, "k", "metric", "eps_c"),
    "fig4a": (*_SELECTS, "k", "metric"),
    "fig4b": (*_SELECTS, *_TRAINS, "metric", "eps_c"),  # the groups cut the whole ranking
    "knowledge": ("weights", "finetune", *_TRAINS, "pretrainings", "explain"),
}

#: What the values of each swept variable must be: a test of one value, and its description.
#: Checked when the config is made: a recipe casts K, k and groups to int, so 0.5 would silently
#: become 0, and a bad value would otherwise fail only after the features and units are computed.
SWEEP_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "clusters": (lambda v: float(v).is_integer() and v >= 2, "whole numbers >= 2"),
    "long_tail_ratio": (lambda v: 1 <= v < math.inf, "finite numbers >= 1"),
    "k": (lambda v: float(v).is_integer() and v >= 1, "whole numbers >= 1"),
    "train_fraction": (lambda v: 0 < v <= 1, "shares in (0, 1]"),
    "eps_c": (lambda v: 0 < v < math.inf, "positive finite numbers"),
    "groups": (lambda v: float(v).is_integer() and v >= 1, "a whole number >= 1"),
}


@dataclass(frozen=True)
class ExperimentConfig:
    """Inputs and shared settings of an experiment (a YAML file maps onto the fields).

    Attributes:
        model, weights: the backbone and its local pre-trained weights.
        source, target, target_test: the pre-training pool (needed by the recipes that select
            from it: all but ``knowledge``), the target training data and the target test data
            (folders, list files or embedded names; an embedded ``target`` brings its own test
            split).
        source_features, target_features: FeatureStore folders; default: embedded by the run.
        seeds: one fine-tuning run per seed and row.
        k: selected classes; cluster_k: the share of pool images the selected clusters cover
            (default: the share that the top-``k`` UOT classes cover, as the paper matches 200
            of 2000 clusters to 100 of 1000 classes; ``k / clusters`` without labels, which is
            half the paper's 10 % at the defaults: give ``cluster_k: 0.1`` for it). One share for the whole
            experiment, so every seed and row reuses as many images: with a low-data regime, the
            share of seed 0's selection.
        clusters: k-means K for cluster units; metric, eps_c: the selection cost.
        eps_c_l2: the cost scale of table4's l2 rows (Euclidean distance between unnormalised
            class means, whose scale is the features' norm: any value in [0.05, 1] gives Liu et
            al.'s Table 4 counts, the cosine rows' 0.01 does not; methods note §2).
        relevant: pool class ids known to be related to the target (recall, label selection); in
            YAML a list or the syntax of ``--relevant`` (``"7-24,80-100"``).
        finetune: FinetuneConfig fields shared by every run, less those the recipe sets (mode,
            seed, a swept setting); lam: λ per mode on top.
        sweep: values of the swept variable (see ``SWEEP_DEFAULTS``).
        skip: row names not to run (e.g. ``co-tuning`` for a backbone without a classifier).
        pretrainings: label -> weights file, the pre-trainings the ``knowledge`` recipe compares
            (default: ``{"pretrained": weights}``).
        explain: ExplainConfig fields of the ``knowledge`` recipe (players, n, baseline, samples).
    """

    model: str
    target: str
    source: str | None = None
    weights: str | None = None
    target_test: str | None = None
    source_features: str | None = None
    target_features: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 100
    cluster_k: float | None = None
    clusters: int = 2000
    metric: str = "cosine"
    eps_c: float = 0.01
    eps_c_l2: float = 0.1
    relevant: tuple[int, ...] = ()
    finetune: dict[str, Any] = field(default_factory=dict)
    lam: dict[str, float] = field(default_factory=dict)
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    pretrainings: dict[str, str] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)
    embed_batch_size: int = 256

    def __post_init__(self):
        if not self.seeds:
            raise PretrainReuseError("seeds is empty; give at least one seed")
        for seed in self.seeds:
            check_seed("seeds", seed)
        if len(set(self.seeds)) < len(self.seeds):
            raise PretrainReuseError(f"seeds {list(self.seeds)} repeat a seed, which would count "
                                     "one run twice; give distinct seeds")
        if self.k < 1 or self.clusters < 2:
            raise PretrainReuseError(f"k must be >= 1 and clusters >= 2, got {self.k}, {self.clusters}")
        for name in ("eps_c", "eps_c_l2"):
            check_positive(name, getattr(self, name))
        if self.cluster_k is not None and not 0 < self.cluster_k <= 1:
            raise PretrainReuseError(f"cluster_k must be a share of pool images in (0, 1], got "
                                     f"{self.cluster_k}")
        for name, values in self.sweep.items():
            _check_sweep(check_choice("sweep key", name, SWEEP_DEFAULTS), values)
        if any(r < 0 for r in self.relevant) or len(set(self.relevant)) < len(self.relevant):
            raise PretrainReuseError(f"relevant {list(self.relevant)} must list distinct pool class "
                                     "ids >= 0 (a repeat would count one class twice)")
        if self.embed_batch_size < 1:
            raise PretrainReuseError(f"embed_batch_size must be >= 1, got {self.embed_batch_size}")
        check_choice("metric", self.metric, METRICS)
        _check_pretraining_labels(self.pretrainings)
        named = {f"pretrainings[{label!r}]": path for label, path in self.pretrainings.items()}
        for what, path in {"weights": self.weights, **named}.items():
            if path is not None and not Path(path).is_file():  # else found only when its rows run
                raise PretrainReuseError(f"{what} = {path!r} is not a file; give the path of the "
                                         "pre-trained weights (.safetensors or a torch state dict)")
        # the nested settings are used only when a row's run starts, after features, units and
        # selections are computed: an unknown key or a bad value must fail here, before any work
        base = self.base_finetune()
        for mode, lam in self.lam.items():
            check_choice("lam key", mode, MODES)
            if mode not in MODE_OPTIONS["lam"]:  # it would be stored and silently ignored
                raise PretrainReuseError(
                    f"lam {{{mode}: {lam}}} has no effect: mode {mode!r} has no source loss for λ "
                    f"to weigh (only {', '.join(MODE_OPTIONS['lam'])}); remove it from lam")
            replace(base, lam=lam)  # FinetuneConfig checks that λ >= 0
        if "seed" in self.explain:  # the knowledge recipe analyses each run with its own seed
            raise PretrainReuseError("explain 'seed' cannot be set: each analysis takes the seed "
                                     "of its fine-tuning run from seeds (--seeds); remove it from explain")
        self.explain_config()

    def explain_config(self):
        """The ExplainConfig of the ``knowledge`` recipe, from ``explain``."""
        from .knowledge.explain import ExplainConfig

        return ExplainConfig(**checked_values(self.explain, ExplainConfig, "explain key"))

    def weights_of(self) -> dict[str, str | None]:
        """The pre-trainings to compare: label -> weights."""
        return dict(self.pretrainings) or {"pretrained": self.weights}

    def values(self, name: str) -> tuple:
        """The values swept for ``name``: the config's ``sweep``, else the default."""
        return tuple(self.sweep.get(name, SWEEP_DEFAULTS[name]))

    def base_finetune(self) -> FinetuneConfig:
        """The FinetuneConfig shared by every run (``finetune``)."""
        return FinetuneConfig(**checked_values(self.finetune, FinetuneConfig, "finetune key"))


def _check_sweep(name: str, values: tuple[float, ...]) -> None:
    test, expected = SWEEP_RULES[name]
    if not values:
        raise PretrainReuseError(f"sweep {name} is empty; give at least one value, or leave it out "
                                 f"for the default {list(SWEEP_DEFAULTS[name])}")
    bad = [v for v in values if not test(v)]
    if bad:
        raise PretrainReuseError(f"sweep {name} must hold {expected}, got {bad[0]!r}")
    # as run folders name them (x=0.2): one folder for two values would count its runs twice
    if len({f"{float(v):g}" for v in values}) < len(values):
        raise PretrainReuseError(f"sweep {name} {list(values)} repeats a value; give distinct values")
    if name == "groups" and len(values) > 1:  # fig4b cuts the ranking once
        raise PretrainReuseError(f"sweep groups takes one number of groups, got {list(values)}")


def _check_pretraining_labels(pretrainings: dict[str, str]) -> None:
    """Each pre-training's runs live in folders named after its label: two labels with one folder
    name (``a b`` and ``a-b``) would share, and silently reuse, each other's runs."""
    folders: dict[str, str] = {}
    for label in pretrainings:
        slug = _slug(label)
        if not slug or slug in folders:
            clash = f" as {folders[slug]!r} does" if slug else ""
            raise PretrainReuseError(
                f"pretrainings label {label!r} makes the folder name {slug!r}{clash}; give labels "
                "that differ in their letters and digits")
        folders[slug] = label


def load_experiment_config(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a YAML file with ``overrides`` (None = unset) on top."""
    values = config_values(path, overrides)
    if isinstance(values.get("relevant"), str):  # the syntax of --relevant, e.g. 56-63,112-119
        values["relevant"] = parse_ids(values["relevant"], "relevant")
    if isinstance(values.get("sweep"), dict):  # a single swept value needs no list around it
        values["sweep"] = {k: v if isinstance(v, list | tuple) else [v]
                           for k, v in values["sweep"].items()}
    values = checked_values(values, ExperimentConfig, "experiment config key")
    for key in ("model", "target"):  # source: checked by the recipes that read it
        if not values.get(key):
            raise PretrainReuseError(f"the experiment needs {key!r}; pass --{key} or set it in --config")
    return ExperimentConfig(**values)


# --------------------------------------------------------------------------------------------
# Recipes: an ExperimentConfig -> the rows of the table
# --------------------------------------------------------------------------------------------


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


def _table1(cfg: ExperimentConfig) -> list[Row]:
    rows = [Row("vanilla", mode="vanilla"), Row("co-tuning", mode="co-tuning")]
    for m in ("random", "greedy-ot", "uot"):
        rows.append(Row(f"reuse {m} classes", mode="reuse", pick=Pick("classes", m)))
    for m in ("random", "greedy-ot", "uot"):
        rows.append(Row(f"reuse-unlabeled {m} clusters", mode="reuse-unlabeled",
                        pick=Pick(_clusters(cfg), m)))
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


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


COLUMNS = ("method", "x", "recall", "units", "top1_mean", "top1_std", "top1_at_best_val_mean",
           "mean_class_acc_mean", "seeds", "val_images", "val_classes_missing", "x_realised",
           *KNOWLEDGE_RATIOS)
#: The columns every row of an ``experiment.json`` has (the others came later, or are the
#: knowledge recipe's).
REQUIRED_COLUMNS = COLUMNS[:9]


@dataclass(frozen=True)
class ExperimentTable:
    """The results of one experiment: one dict per row with the keys of ``COLUMNS``
    (accuracies None for selection-only rows, recall None without ``relevant``)."""

    name: str
    rows: list[dict[str, Any]]
    x_label: str | None
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the knowledge recipe's correlations

    def save(self, out: str | Path) -> Path:
        """Write ``experiment.json``, ``results.csv``, ``results.md`` and ``results.png``."""
        out = Path(out)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in self.rows)
        for name, text in (("results.csv", buf.getvalue()), ("results.md", self.to_markdown())):
            with atomic_path(out / name) as tmp:
                tmp.write_text(text)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        self.plot(ax)
        fig.tight_layout()
        with atomic_path(out / "results.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        write_json(out / "experiment.json", {"kind": "experiment", "name": self.name,
                                             "x_label": self.x_label, "rows": self.rows,
                                             "params": self.params, "extra": self.extra,
                                             "meta": self.meta})
        return out / "experiment.json"

    @classmethod
    def load(cls, path: str | Path) -> ExperimentTable:
        """From ``experiment.json`` or the folder holding it."""
        path = Path(path)
        d = read_json(path / "experiment.json" if path.is_dir() else path, "experiment")
        if d.get("kind") != "experiment":
            raise PretrainReuseError(f"{str(path)!r} is not an experiment.json")
        require_keys(d, ("name", "rows", "x_label", "params"), path, "experiment.json")
        if d["name"] not in RECIPES:
            raise PretrainReuseError(f"{str(path)!r} names experiment {d['name']!r}, which is not "
                                     f"one of {', '.join(RECIPES)}; pass an experiment folder")
        rows = d["rows"] if isinstance(d["rows"], list) else [None]
        for i, row in enumerate(rows):
            missing = [k for k in REQUIRED_COLUMNS if not isinstance(row, dict) or k not in row]
            if missing:
                raise PretrainReuseError(
                    f"{str(path)!r} row {i} lacks {missing[0]!r}: it was written by an older "
                    "version of pretrain-reuse or edited; rerun the experiment into a new --out")
        return cls(d["name"], d["rows"], d["x_label"], d["params"], d.get("meta", {}),
                   d.get("extra", {}))

    def run_dirs(self, out: Path) -> list[Path]:
        """The folders of the fine-tuning runs in the table (rows x their seeds), under ``out``."""
        return [run_folder(out, r["method"], r["x"], s) for r in self.rows for s in r["seeds"]]

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and formatted rows of the table (shared by Markdown and the HTML report); the
        spread is shown only when there are several seeds."""
        ratios = [k for k in KNOWLEDGE_RATIOS if any(r.get(k) is not None for r in self.rows)]
        # a recipe that selects nothing (knowledge) has no recall or units column
        picks = [k for k in ("recall", "units") if any(r[k] is not None for r in self.rows)]
        # .get: a table of an earlier version records no validation sizes
        val = any(r.get("val_images") is not None for r in self.rows)
        head = ["method", *([self.x_label] if self.x_label else []), *picks,
                "test top-1 (final, mean ± std over seeds)", "test top-1 (at best val)",
                *(["validation images"] if val else []), "seeds", *ratios]
        number = {"recall": "{:.4f}", "units": "{:g}"}
        body = []
        for r in self.rows:
            acc = "" if r["top1_mean"] is None else f"{r['top1_mean']:.4f}"
            if len(r["seeds"]) > 1:
                acc += f" ± {r['top1_std']:.4f}"
            best = r["top1_at_best_val_mean"]
            body.append([r["method"], *([_x_cell(r)] if self.x_label else []),
                         *("" if r[k] is None else number[k].format(r[k]) for k in picks), acc,
                         "" if best is None else f"{best:.4f}",
                         *([_validation_cell(r)] if val else []),
                         str(len(r["seeds"])) if r["seeds"] else "",
                         *("" if r.get(k) is None else f"{r[k]:.3f}" for k in ratios)])
        return head, body

    def to_markdown(self) -> str:
        """The table as Markdown (``results.md``)."""
        head, body = self.cells()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return f"# {RECIPES[self.name][2]}\n\n" + "\n".join(lines) + "\n"

    def plot(self, ax=None):
        """Accuracy (or recall, for selection-only tables) per method: lines over the swept
        variable, bars with the seed spread otherwise."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        key = "top1_mean" if any(r["top1_mean"] is not None for r in self.rows) else "recall"
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        swept = list(dict.fromkeys(r["x"] for r in self.rows if r["x"] is not None))

        def spread(rows):  # the seed spread; none where it is undefined (one seed)
            return np.array([np.nan if key != "top1_mean" or r["top1_std"] is None
                             else r["top1_std"] for r in rows])

        if len(swept) <= 1:  # one bar per method: no line to draw through a single value
            rows = [next(r for r in self.rows if r["method"] == m) for m in methods]
            ax.bar(range(len(rows)), [r[key] for r in rows], yerr=spread(rows), color="C0",
                   capsize=3)
            ax.set_xticks(range(len(rows)), methods, rotation=30, ha="right", fontsize=8)
            lo = min(r[key] for r in rows)
            ax.set_ylim(max(0.0, lo - 0.1), None)
            if swept:
                ax.set_xlabel(f"{self.x_label} = {swept[0]:g}")
        else:
            for i, m in enumerate(methods):
                rows = [r for r in self.rows if r["method"] == m]
                if rows[0]["x"] is None:  # a reference for every swept value (fig4b's vanilla)
                    ax.axhline(rows[0][key], ls="--", color=f"C{i}", label=m)
                    continue
                xs = [r["x"] for r in rows]
                ys = np.array([r[key] for r in rows])
                # a single value (label-based selection) is a point with its spread
                ax.errorbar(xs, ys, yerr=spread(rows), marker="o", color=f"C{i}", label=m,
                            capsize=3, ls="-" if len(rows) > 1 else "none")
            if self.name == "fig4a":
                ax.set_xscale("log")
            ax.set_xlabel(self.x_label)
            ax.legend(fontsize=8)
        ax.set_ylabel("test top-1 (final step)" if key == "top1_mean" else "recall")
        ax.set_title(RECIPES[self.name][2], fontsize=9)
        return ax


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _x_cell(row: dict[str, Any]) -> str:
    """The swept value, and the one the data realised where they differ (.get: a table of an
    earlier version records none)."""
    if row["x"] is None:
        return ""
    realised = row.get("x_realised")
    if realised is None or math.isclose(realised, row["x"], rel_tol=1e-6):
        return _x_text(row["x"])
    return f"{_x_text(row['x'])} (realised {realised:.4g})"


def _validation_cell(row: dict[str, Any]) -> str:
    """The mean number of validation images, and the classes some seed's validation lacks."""
    if row.get("val_images") is None:
        return ""
    missing = row.get("val_classes_missing")
    if not row["val_images"] or not missing:  # without validation images, no class is lacking
        return f"{row['val_images']:g}"
    return f"{row['val_images']:g}, {missing} class{'es' * (missing > 1)} missing"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.=]+", "-", text.lower()).strip("-")


def _x_text(x: Any) -> str:
    """A swept value as the table and the run folders write it (3.0 as 3)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def run_folder(out: Path, method: str, x: Any, seed: int) -> Path:
    """The folder of the fine-tuning run of row ``method`` at swept value ``x`` with ``seed``."""
    value = "" if x is None else f"-x={_x_text(x)}"
    return out / "runs" / f"{_slug(method)}{value}-seed{seed}"


class _Workspace:
    """Computes, caches on disk and reuses the inputs rows share: data, features, units and
    selections (one object per experiment folder)."""

    def __init__(self, cfg: ExperimentConfig, out: Path, progress: bool):
        self.cfg, self.out, self.progress = cfg, out, progress
        self._cache: dict[Any, Any] = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def data(self, which: str) -> ImageDataset:
        cfg = self.cfg
        spec, split = {"source": (cfg.source, "train"), "target": (cfg.target, "train"),
                       "test": (cfg.target_test or cfg.target, "test")}[which]
        return self._once(("data", which), lambda: open_split(spec, split))

    def features(self, which: str) -> FeatureStore:
        given = self.cfg.source_features if which == "source" else self.cfg.target_features

        spec = self.cfg.source if which == "source" else self.cfg.target

        def build():
            if given:
                return _check_features_of(self.given_store(which), f"{which}_features", given,
                                          which, spec, self.data(which))
            ecfg = EmbedConfig(model=self.cfg.model, data=str(spec), weights=self.cfg.weights,
                               split="train" if str(spec) in DATASETS else None,
                               batch_size=self.cfg.embed_batch_size)
            return embed(ecfg, self.out / "features" / which, progress=self.progress)

        return self._once(("features", which), build)

    def given_store(self, which: str) -> FeatureStore:
        """The feature store given as ``source_features`` / ``target_features``, as on disk."""
        return self._once(("given", which),
                          lambda: FeatureStore.load(getattr(self.cfg, f"{which}_features")))

    def store_sha256(self, which: str) -> str:
        """The content hash of the given ``which`` feature store (:func:`_store_sha256`)."""
        return self._once(("sha256", which), lambda: _store_sha256(self.given_store(which)))

    def units(self, name: str) -> Units:
        def build():
            path = self.out / "units" / f"{name}.safetensors"
            if path.exists():
                return Units.load(path)
            store = self.features("source")
            if name == "classes":
                if store.labels is None:
                    raise PretrainReuseError("class units need pool labels; the source has none "
                                             "(skip the rows on classes, or give labelled data)")
                units = class_means(store)
            else:
                units = spherical_kmeans(replace(store, labels=None), int(name.split("-")[1]),
                                         seed=POOL_SEED)
            units.save(path)
            return units

        return self._once(("units", name), build)

    def target_units(self, regime: tuple = (), seed: int = 0) -> Units:
        """Class means of the target features a selection may use: all the target training
        data, or for a row with a low-data / long-tail ``regime`` (FinetuneConfig settings)
        only the images that the row's run with ``seed`` trains on."""
        if not regime:
            return self._once("target_units", lambda: class_means(self.features("target")))

        def build():
            ft = replace(self.cfg.base_finetune(), seed=seed, **dict(regime))
            train_ids = target_splits(ft, self.data("target"))[2]["train"]
            return class_means(_rows_with_ids(self.features("target"), train_ids))

        return self._once(("target_units", regime, seed), build)

    def cluster_share(self) -> float:
        """Default share of pool images for cluster selections (see ExperimentConfig)."""
        if self.cfg.cluster_k is not None:
            return self.cfg.cluster_k
        if self.features("source").labels is None:
            return min(1.0, self.cfg.k / self.cfg.clusters)
        classes = self.units("classes")
        top = self.selection(Pick("classes", "uot"), POOL_SEED)
        return float(classes.counts[top.selected].sum() / classes.counts.sum())

    def selection(self, pick: Pick, seed: int, settings: tuple = ()) -> Selection:
        """The selection a row's run with ``seed`` reuses: a random selection is drawn with that
        seed, and a run with a low-data or long-tail regime (the row's ``settings`` or the
        config's ``finetune``) selects for the target images it trains on; other selections are
        the same for every seed."""
        cfg = self.cfg
        clusters = pick.units != "classes"
        k = pick.k if pick.k is not None else (self.cluster_share() if clusters else cfg.k)
        if pick.group is not None:
            k = len(self.units(pick.units))  # the whole ranking, sliced below
        base = cfg.base_finetune()
        given = {**{name: getattr(base, name) for name in REGIMES if getattr(base, name) is not None},
                 **{name: v for name, v in settings if name in REGIMES}}
        regime = tuple((name, given[name]) for name in REGIMES if name in given)
        per_seed = pick.method == "random" or bool(regime)
        scfg = SelectConfig(method=pick.method, k=k, metric=pick.metric or cfg.metric,
                            eps_c=pick.eps_c or cfg.eps_c, seed=seed if per_seed else POOL_SEED,
                            unit_ids=cfg.relevant if pick.method == "label" else ())
        tag = (f"{pick.units}-{scfg.method}-{scfg.metric}-eps{scfg.eps_c:g}-k{k:g}"
               + "".join(f"-{name}{v:g}" for name, v in regime)
               + (f"-seed{seed}" if per_seed else ""))
        path = self.out / "selections" / f"{tag}.json"

        def build():
            sel = Selection.load(path) if path.exists() else select(
                self.units(pick.units), self.target_units(regime, seed), scfg)
            if not path.exists():
                sel.save(path)
            if pick.group is None:
                return sel
            i, n = pick.group
            ranking = sel.ranking()
            size = len(ranking) // n
            if size < 1:
                raise PretrainReuseError(f"cannot cut {len(ranking)} units into {n} groups; "
                                         "lower sweep.groups")
            return replace(sel, selected=[int(u) for u in ranking[i * size:(i + 1) * size]],
                           params={**sel.params, "group": [i, n]})

        return self._once(("selection", tag, pick.group), build)

    def recall(self, pick: Pick, sel: Selection) -> float | None:
        if not self.cfg.relevant:
            return None
        if pick.units == "classes":
            return sel.recall(self.cfg.relevant)
        return sel.sample_recall(self.units(pick.units), self.features("source").labels,
                                 self.cfg.relevant)

    def run_dir(self, row: Row, seed: int) -> Path:
        return run_folder(self.out, row.method, row.x, seed)

    def weights(self, row: Row) -> str | None:
        """The pre-trained weights a row's runs start from."""
        return self.cfg.weights_of()[row.pretraining] if row.pretraining else self.cfg.weights

    def split(self, row: Row, seed: int) -> tuple[ImageDataset, ImageDataset, dict]:
        """The target training and validation images of a row's run with ``seed`` (as the run
        draws them: :func:`~pretrain_reuse.finetune.target_splits`), and the parameters of its
        regime's sampler ({} without a regime)."""
        def build():
            train_set, val_set, record = target_splits(self.run_config(row, seed),
                                                       self.data("target"))
            return train_set, val_set, record["sampler"]

        return self._once(("split", row.settings, seed), build)

    def run_config(self, row: Row, seed: int) -> FinetuneConfig:
        """The recipe of a row's run with ``seed``: ``finetune`` with the row's mode, λ and
        settings (the keys these set are refused in ``finetune``: :func:`_check_finetune_keys`)."""
        base = self.cfg.base_finetune()
        return replace(base, mode=row.mode, seed=seed, lam=self.cfg.lam.get(row.mode, base.lam),
                       **dict(row.settings))

    def finetune(self, row: Row, seed: int) -> RunResult:
        cfg = self.cfg
        run_dir = self.run_dir(row, seed)
        sel = self.selection(row.pick, seed, row.settings) if row.pick else None
        if (run_dir / "result.json").exists():
            done = RunResult.load(run_dir / "result.json")
            if sel is not None and json.loads(done.meta["inputs"]["selected"]) != sel.selected:
                raise PretrainReuseError(
                    f"{str(run_dir)!r} was made with another selection than the one its row "
                    "makes now (e.g. an earlier version selected for a low-data run on all the "
                    "target images); pass a new --out, or delete that run folder to redo it")
            return done
        weights = self.weights(row)
        ft = self.run_config(row, seed)
        if self.progress:
            print(f"[experiment] {run_dir.name}", flush=True)
        return finetune_datasets(
            ft, model=cfg.model, weights=weights, train_pool=self.data("target"),
            test_set=self.data("test"), source_pool=self.data("source") if sel else None,
            selection=sel, units=self.units(row.pick.units) if sel else None, out=run_dir,
            # source only where the run reads it: knowledge, which selects nothing, does not
            # claim it, so a rerun without it must resume the runs
            inputs={"model": cfg.model, "weights": weights, "target": cfg.target,
                    "source": cfg.source if sel else None, "row": row.method, "x": row.x,
                    "selected": sel.selected if sel else None},
            progress=self.progress)


def _store_sha256(store: FeatureStore) -> str:
    """A hash of what a feature store holds: features, labels, sample ids and class names, not
    its meta (a store written again with the same numbers is the same store)."""
    digest = hashlib.sha256(hash_array(store.features).encode())
    if store.labels is not None:
        digest.update(hash_array(store.labels).encode())
    digest.update(json.dumps([store.ids, store.class_names]).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _rows_with_ids(store: FeatureStore, ids: list[str]) -> FeatureStore:
    """The samples of ``store`` with these ids, in this order."""
    position = {sid: i for i, sid in enumerate(store.ids)}
    missing = [sid for sid in ids if sid not in position]
    if missing:
        raise PretrainReuseError(
            f"the target features have no sample {missing[0]!r} ({len(missing)} missing); embed "
            "target_features from the target data itself, or leave target_features unset")
    rows = np.asarray([position[sid] for sid in ids], dtype=np.int64)
    return replace(store, features=np.asarray(store.features[rows]),
                   labels=None if store.labels is None else store.labels[rows],
                   ids=[store.ids[i] for i in rows])


def _check_features_of(store: FeatureStore, name: str, path: str, which: str, spec: str,
                       data: ImageDataset) -> FeatureStore:
    """``store`` (given as ``name``) if it holds the features of ``data``, the training split of
    the ``which`` data set ``spec``: the same samples (less those the embedding could not read)
    with the same labels. Units, class means and selections made from another data set's
    features would be a silent wrong answer (a target-1 selection reported for target-0)."""
    fix = f"embed {name} from {which} {spec!r} itself, or leave {name} unset"
    position = {sid: i for i, sid in enumerate(data.ids)}
    stray = [sid for sid in store.ids if sid not in position]
    if stray:
        raise PretrainReuseError(
            f"{name} {path!r} are not features of {which} {spec!r}: its sample {stray[0]!r} "
            f"({len(stray)} of {len(store)}) is not in that data's training split; {fix}")
    # the store's ids are distinct and all in the data: the rest are the data's images it lacks
    unread = store.meta.get("skipped", 0)  # images the embedding could not decode
    if len(data) - len(store) > unread:
        raise PretrainReuseError(
            f"{name} {path!r} hold {len(store)} of the {len(data)} training images of {which} "
            f"{spec!r} ({unread} unreadable); {fix}")
    if store.labels is not None and data.labels is not None:
        rows = np.asarray([position[sid] for sid in store.ids], dtype=np.int64)
        wrong = np.flatnonzero(store.labels != data.labels[rows])
        if wrong.size:
            i = int(wrong[0])
            raise PretrainReuseError(
                f"{name} {path!r} label sample {store.ids[i]!r} class {int(store.labels[i])}, "
                f"{which} {spec!r} class {int(data.labels[rows[i]])} ({wrong.size} samples "
                f"differ); {fix}")
    return store


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _row_names(cfg: ExperimentConfig) -> set[str]:
    """The row names of every recipe this config can run: one config may serve several recipes,
    so its ``skip`` may name rows of the others."""
    names = set()
    for build_rows, _, _ in RECIPES.values():
        with contextlib.suppress(PretrainReuseError):  # a recipe this config cannot run
            names.update(r.method for r in build_rows(cfg))
    return names


def _check_finetune_keys(name: str, cfg: ExperimentConfig, rows: list[Row]) -> None:
    """Refuse ``finetune`` keys that the recipe sets for each run itself: the run would use the
    recipe's value and ignore the config's without a word (a ``seed: 7`` running seed 0)."""
    owner = {"mode": f"each row of {name} sets its own mode (skip: leaves rows out)",
             "seed": "each run takes its seed from seeds (--seeds)"}
    for row in rows:
        for key, _ in row.settings:
            owner[key] = f"{name} sweeps it (give its values as sweep: {{{key}: [...]}})"
            if key in REGIMES:  # one run trains in one data regime (FinetuneConfig refuses two)
                for other in set(REGIMES) - {key}:
                    owner[other] = f"{name} sweeps {key}, another data regime"
    for key in cfg.finetune:
        if key in owner:
            raise PretrainReuseError(f"finetune {key!r} cannot be set for {name}: {owner[key]}; "
                                     "remove it from finetune")


def run_experiment(name: str, cfg: ExperimentConfig, out: str | Path, *,
                   progress: bool = True) -> ExperimentTable:
    """Run (or resume) recipe ``name`` into folder ``out`` and write its table."""
    build_rows, x_label, _ = RECIPES[check_choice("experiment", name, RECIPES)]
    rows = build_rows(cfg)
    unknown = sorted(set(cfg.skip) - _row_names(cfg))
    if unknown:
        raise PretrainReuseError(
            f"skip names {unknown[0]!r}, which no experiment has; the rows of {name} are: "
            f"{', '.join(dict.fromkeys(r.method for r in rows))}")
    rows = [r for r in rows if r.method not in cfg.skip]
    if not rows:
        raise PretrainReuseError(f"skip leaves no row of {name} to run; skip fewer rows")
    if cfg.source is None and any(r.pick for r in rows):
        raise PretrainReuseError(f"{name} needs 'source', the pre-training pool it selects from; "
                                 "pass --source or set it in --config")
    _check_finetune_keys(name, cfg, rows)
    trains = [r for r in rows if r.mode]
    if trains and cfg.target_test is None and str(cfg.target) not in DATASETS:
        raise PretrainReuseError(f"target {cfg.target!r} is a folder or list file with one split; "
                                 "pass --target-test (target_test) with the test data")
    out = Path(out)
    ws = _Workspace(cfg, out, progress)
    # What can fail on the user's inputs fails before the folder is claimed (nothing written):
    # each run's FinetuneConfig (a sweep's regime beside the one under finetune:), its training
    # images (a fraction or ratio the data cannot realise, fewer images than a batch, fewer steps
    # than the warm-up), the backbone with its weights, and the given feature stores (features
    # of another data set). The messages name the experiment's keys, not the finetune flags.
    for row in trains:
        for seed in cfg.seeds:
            train_set, _, _ = ws.split(row, seed)
            ft, run = ws.run_config(row, seed), ws.run_dir(row, seed).name
            check_batch_size(len(train_set), ft.batch_size, what=f"training ({run})",
                             flag="finetune.batch_size")
            total_steps(ft, len(train_set), run=f" of run {run}", flag="finetune.warmup_steps")
    picks = any(r.pick for r in rows)
    for weights in {*(ws.weights(r) for r in trains),
                    *([cfg.weights] if picks and not (cfg.source_features and cfg.target_features)
                      else [])}:
        create_backbone(cfg.model, weights=weights, device="cpu")
    if picks:
        for which in ("source", "target"):
            if getattr(cfg, f"{which}_features"):
                ws.features(which)
    reads = _reads(name, cfg, asdict(cfg))
    hashes = _hashes(reads, ws)
    changed = _claim(out, name, cfg, reads, hashes)
    if changed and progress:
        print(f"[experiment] {str(out)!r} held an experiment with other settings "
              f"({', '.join(changed)}) that finished no run: removed what the change affects", flush=True)
    # Every row's selections and recalls before the first fine-tuning run, so that a selection
    # that cannot be made (k above the number of units, relevant ids the pool lacks) fails while
    # no run has finished, which leaves the folder free for the corrected settings (_release).
    sels = {i: [ws.selection(row.pick, s, row.settings) for s in cfg.seeds]
            for i, row in enumerate(rows) if row.pick}
    recalls = {i: [ws.recall(rows[i].pick, sel) for sel in row_sels]
               for i, row_sels in sels.items()}
    # A reuse run draws its source batches from its selection's images, known only now: a batch
    # larger than them must fail here too, not when that run starts after others have finished
    for i, row in enumerate(rows):
        if not (row.mode and row.pick):
            continue
        for seed, sel in zip(cfg.seeds, sels[i], strict=True):
            ft = ws.run_config(row, seed)
            if ft.uses_source and ft.source_sampling != "units":  # "units" draws with replacement
                pool = selected_source(ws.data("source"), sel, ws.units(row.pick.units),
                                       source_head=ft.source_head)
                check_batch_size(len(pool.dataset), ft.source_batch_size or ft.batch_size,
                                 what=f"selected source ({ws.run_dir(row, seed).name})",
                                 flag="finetune.source_batch_size")
    table = []
    for i, row in enumerate(rows):
        results = [ws.finetune(row, s) for s in cfg.seeds] if row.mode else []
        final = [r.final["top1"] for r in results]
        splits = [ws.split(row, s) for s in cfg.seeds] if row.mode else []
        val = [v for _, v, _ in splits]
        swept = any(name in REGIMES for name, _ in row.settings)
        classes = len(np.unique(ws.data("target").labels))
        table.append({
            "method": row.method, "x": row.x,
            # means over the seeds' selections (they differ for random and regime rows)
            "recall": _mean(recalls[i]) if i in sels and recalls[i][0] is not None else None,
            "units": _mean([len(sel.selected) for sel in sels[i]]) if i in sels else None,
            "top1_mean": _mean(final),
            # the sample standard deviation of one seed is undefined (empty in results.csv), not 0
            "top1_std": float(np.std(final, ddof=1)) if len(final) > 1 else None,
            # without validation images no evaluation was picked: the column would repeat one
            "top1_at_best_val_mean": _mean([r.at_best_val["top1"] for r, v in zip(results, val, strict=True)
                                            if len(v)]),
            "mean_class_acc_mean": _mean([r.final["mean_class_acc"] for r in results]),
            "seeds": [r.config["seed"] for r in results],
            # what "at best val" rests on: a long tail's largest class keeps all its images
            "val_images": _mean([len(v) for v in val]),
            "val_classes_missing": max((classes - len(np.unique(v.labels)) for v in val), default=None),
            # the share / ratio the swept regime realises (floors, a small class's one image)
            "x_realised": _mean([sampler["realised"] for _, _, sampler in splits]) if swept else None,
        })
    extra = _knowledge_analysis(ws, rows, table) if name == "knowledge" else {}
    params = {**reads, **hashes, "seeds": list(cfg.seeds), "skip": list(cfg.skip)}
    result = ExperimentTable(name, table, x_label, params,
                             make_meta(f"experiment.{name}", params, seed=cfg.seeds[0]), extra)
    result.save(out)
    if (out / "report.html").exists():  # a report of the previous table would contradict it
        from .report import build_report

        build_report(out)
    return result


def _knowledge_analysis(ws: _Workspace, rows: list[Row], table: list[dict]) -> dict[str, Any]:
    """For every pre-training and seed: the knowledge of its fine-tuned model against its linear
    probe and the scratch model (``knowledge/<label>-seed<s>/``); the ratios' means go into the
    fine-tuned rows, and their correlation with test accuracy across all fine-tuned models
    (pre-trainings x seeds) into the table's ``extra``."""
    from .knowledge.analysis import analyze_knowledge
    from .knowledge.metrics import accuracy_correlation, knowledge_report
    from .knowledge.values import Interactions
    from .models import create_backbone

    cfg = ws.cfg
    by_method = {r.method: r for r in rows}
    per_sample: dict[str, list] = {k: [] for k in KNOWLEDGE_RATIOS}
    accuracy, models = [], []
    for entry in table:
        row = by_method[entry["method"]]
        if row.mode != "vanilla":
            continue
        probe = by_method[f"{row.pretraining} linear probe"]
        means: dict[str, list[float]] = {k: [] for k in KNOWLEDGE_RATIOS}
        for seed in cfg.seeds:
            out = ws.out / "knowledge" / f"{_slug(row.pretraining)}-seed{seed}"
            files = {"pretrained": ws.run_dir(probe, seed), "finetuned": ws.run_dir(row, seed)}
            if "scratch" in by_method:
                files["scratch"] = ws.run_dir(by_method["scratch"], seed)
            if not (out / "knowledge.json").exists():
                nets = {role: create_backbone(cfg.model, weights=str(d / "model.safetensors"))
                        for role, d in files.items()}
                analyze_knowledge(nets, ws.data("test"), replace(cfg.explain_config(), seed=seed),
                                  out, split="test", progress=ws.progress)
            explained = {role: [Interactions.load(p) for p in sorted(
                (out / role).glob("interactions-*.safetensors"))] for role in files}
            report = knowledge_report(explained["pretrained"], explained["finetuned"],
                                      explained.get("scratch"))
            for k in KNOWLEDGE_RATIOS:
                if k in report.overall:
                    per_sample[k].append(report.per_sample(k))
                    means[k].append(report.overall[k].mean)
            accuracy.append(RunResult.load(files["finetuned"] / "result.json").final["top1"])
            models.append(f"{row.pretraining} seed {seed}")
        entry.update({k: _mean(v) for k, v in means.items()})
    if len(accuracy) < 3:
        return {"models": models, "correlation": None,
                "why": "a correlation needs at least 3 fine-tuned models (pre-trainings x seeds)"}
    return {"models": models, "accuracy": accuracy, "correlation": {
        k: accuracy_correlation(v, accuracy, seed=cfg.seeds[0]).to_dict()
        for k, v in per_sample.items() if len(v) == len(accuracy)}}


def _reads(name: str, cfg: ExperimentConfig, values: dict[str, Any]) -> dict[str, Any]:
    """The settings among ``values`` (the fields of ``cfg``, or of the config an earlier version
    recorded in the folder's marker) that the rows of recipe ``name`` read: :data:`READS`, its
    swept values, the λ of its modes, ``finetune`` less what a resumed run may change. An
    experiment folder is claimed with them and the content hashes of the files they name
    (:func:`_hashes`), so a setting the recipe never reads may change between reruns."""
    params = {key: values.get(key) for key in ("model", "target", *READS[name])}
    if name in SWEPT:
        swept = SWEPT[name]
        params["sweep"] = {swept: list(values["sweep"].get(swept, SWEEP_DEFAULTS[swept]))}
    rows = RECIPES[name][0](cfg)  # all of them: skip may change
    trains = any(r.mode for r in rows)
    if "lam" in params:
        params["lam"] = {mode: lam for mode, lam in params["lam"].items()
                         if mode in {r.mode for r in rows}}
    if "finetune" in params:  # a recipe that trains nothing reads only the data regime (selection)
        params["finetune"] = {k: v for k, v in params["finetune"].items()
                              if k not in RESUMABLE_WITH_OTHER and (trains or k in REGIMES)}
    if params.get("source_features") and params.get("target_features"):
        # nothing is embedded: the stores' content is claimed instead (_hashes), and the weights
        # only by the fine-tuning runs
        del params["embed_batch_size"]
        if not trains:
            del params["weights"]
    return params


def _hashes(reads: dict[str, Any], ws: _Workspace) -> dict[str, Any]:
    """The content hashes of the weights files and feature stores named by the settings ``reads``:
    an experiment folder is claimed with them, as one changed in place would otherwise be reused
    with what was made from the old one (features, units, selections, runs)."""
    hashes: dict[str, Any] = {}
    if reads.get("weights"):
        hashes["weights_sha256"] = hash_file(reads["weights"])
    if "pretrainings" in reads:
        hashes["pretrainings_sha256"] = {label: hash_file(path)
                                         for label, path in reads["pretrainings"].items()}
    for which in ("source", "target"):
        if reads.get(f"{which}_features"):
            hashes[f"{which}_features_sha256"] = ws.store_sha256(which)
    return hashes


#: What an experiment writes into its folder before its table, as (folder, the glob of its
#: entries the experiment writes there, the settings they are computed from): None for the
#: selections and runs, which depend on nearly every setting. See :func:`_release`.
_OUTPUTS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("features", "source", ("model", "weights", "weights_sha256", "source", "embed_batch_size")),
    ("features", "target", ("model", "weights", "weights_sha256", "target", "embed_batch_size")),
    ("units", "*.safetensors", ("model", "weights", "weights_sha256", "source", "source_features",
                                "source_features_sha256", "embed_batch_size")),
    ("selections", "*.json", None),
    ("runs", "*-seed*", None),
)


def _claim(out: Path, name: str, cfg: ExperimentConfig, reads: dict[str, Any],
           hashes: dict[str, Any]) -> list[str]:
    """Mark ``out`` as an experiment folder of the settings ``reads`` and input ``hashes``; a
    rerun must use the same recipe and inputs (rows already run are reused, so a changed config
    would mix two experiments in one table), unless no fine-tuning run finished there
    (:func:`_release`; the settings it changed are returned)."""
    # seeds and skip may change between runs: they add or leave out rows, never alter one
    params = {"experiment": name, **reads, **hashes}
    _upgrade_marker(out, name, cfg, hashes)
    changed = _release(out, params, cfg)
    claim_folder(out, "experiment-run", params, what="an experiment folder")
    return changed


def _upgrade_marker(out: Path, name: str, cfg: ExperimentConfig, hashes: dict[str, Any]) -> None:
    """Rewrite the marker of a folder that an earlier version claimed for experiment ``name``
    in the form of this one: the settings the recipe reads (:func:`_reads`; the earlier marker
    may hold every setting of the config, which a rerun may change) and the content hashes.
    A hash it lacks is the file's as it is now: the earlier version recorded none to compare
    with, and refusing the folder would throw away its finished runs."""
    marker = out / "run.json"
    if not marker.is_file():
        return
    old = read_json(marker, "the marker of an experiment folder")
    old_params = old.get("params", {})
    if old.get("kind") != "experiment-run" or old_params.get("experiment") != name:
        return  # not an experiment folder, or another recipe's: claim_folder refuses it
    upgraded = json.loads(to_json({"experiment": name, **_reads(name, cfg, old_params),
                                   **{k: old_params.get(k, v) for k, v in hashes.items()}}))
    if upgraded != old_params:
        write_json(marker, {"kind": "experiment-run", "params": upgraded})


def _release(out: Path, params: dict[str, Any], cfg: ExperimentConfig) -> list[str]:
    """Hand a folder claimed with other settings over to ``params`` when its experiment finished
    nothing: no fine-tuning run and no table. That experiment stopped early (often on a user
    error, such as k above the number of units), and its folder must not refuse the corrected
    command; with nothing finished, no two experiments can mix in one table.

    Its outputs that the new settings would read as their own are removed: the selections and
    unfinished runs always, features and units when a setting they are computed from changed
    (``_OUTPUTS``; an embedding of the pool can take hours, and a changed k does not touch it).
    Only entries the experiment writes are removed, never one that holds an input of the new
    settings (such as ``source_features`` pointing into the old ``features/``), and a folder
    only once empty. Any other case is left to :func:`claim_folder` to accept or refuse.
    Returns the settings that changed ([] when nothing was released)."""
    marker = out / "run.json"
    if not marker.is_file():
        return []
    old = read_json(marker, "the marker of an experiment folder")
    new = json.loads(to_json(params))  # as stored: tuples become lists
    if old.get("kind") != "experiment-run" or old.get("params") == new:
        return []
    finished = [*out.glob("runs/*/result.json"), *out.glob("results.*"), out / "experiment.json"]
    if any(p.exists() for p in finished):
        return []
    given = [cfg.weights, cfg.source, cfg.target, cfg.target_test, cfg.source_features,
             cfg.target_features, *cfg.pretrainings.values()]
    inputs = [Path(p).resolve() for p in given if p]
    old_params = old.get("params", {})
    for folder, pattern, settings in _OUTPUTS:
        if settings is not None and all(old_params.get(k) == new.get(k) for k in settings):
            continue
        for path in sorted((out / folder).glob(pattern)):
            here = path.resolve()
            if any(p == here or here in p.parents for p in inputs):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        with contextlib.suppress(OSError):  # only an empty folder (it may hold others' files)
            (out / folder).rmdir()
    # claim_folder refuses a folder with files but no marker (features kept above), so the new
    # marker is written here, in claim_folder's format; it finds its own settings and accepts
    write_json(marker, {"kind": "experiment-run", "params": new})
    return sorted(k for k in set(new) | set(old_params) if new.get(k) != old_params.get(k))


__all__ = [
    "RECIPES",
    "SWEEP_DEFAULTS",
    "ExperimentConfig",
    "ExperimentTable",
    "load_experiment_config",
    "run_experiment",
]
