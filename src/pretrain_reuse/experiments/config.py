"""The settings of an experiment: :class:`ExperimentConfig`, its YAML loader and the values the
recipes sweep."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configs import check_fields, checked_values, config_values
from ..errors import PretrainReuseError, check_choice, check_positive, check_seed, parse_ids
from ..finetune import MODES, FinetuneConfig
from ..finetune.config import MODE_OPTIONS, mode_reads
from ..finetune.corruptions import parse_corruption
from ..models.backbone import LAYERS
from ..transport import METRICS

#: The seed of what the experiment derives from the pool once for all rows (k-means clusters, the
#: clusters' image budget): not the first of ``seeds``, so that adding or dropping seeds, which
#: a rerun may do, never changes a row.
POOL_SEED = 0

#: FinetuneConfig settings that change which target images a run trains on: the data regimes
#: (one at a time), and how a regime draws its images (option -> its regime).
REGIMES = ("train_fraction", "long_tail_ratio")
REGIME_OPTIONS = {"long_tail_order": "long_tail_ratio"}

#: Values swept by the recipes, unless the config's ``sweep`` overrides them.
SWEEP_DEFAULTS: dict[str, tuple] = {
    "clusters": (1000, 2000),                       # table2: k-means K (the paper's two values)
    "long_tail_ratio": (10.0,),                     # table3: largest / smallest class (paper)
    "k": (50, 100, 200, 300),                       # fig3a: selected classes
    "train_fraction": (0.2, 0.4, 0.6, 0.8),         # fig3b
    "eps_c": (0.0001, 0.001, 0.01, 0.1, 1.0),      # fig4a
    "groups": (10,),                                # fig4b: number of score groups
}

#: The variable each recipe sweeps (its values: ``ExperimentConfig.values``).
SWEPT = {"table2": "clusters", "table3": "long_tail_ratio", "fig3a": "k",
         "fig3b": "train_fraction", "fig4a": "eps_c", "fig4b": "groups"}


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
        layer: the layer of ``model`` whose features select (``embed --layer``): ``penultimate``
            (default; supervised backbones), or ``head`` for a MoCo backbone, whose selection
            features are its 128-d projection head (Liu et al.'s code, ``encoder_q`` in
            ziquanliu/NeurIPS2022_UOT_fine_tuning ``Self_Supervised_PT/get_class_mean.py``).
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
            al.'s Table 4 counts, the cosine rows' 0.01 does not, on the class means shipped in
            ziquanliu/NeurIPS2022_UOT_fine_tuning, ``Supervised_PT/class_mean/`` and
            ``Self_Supervised_PT/class_mean/``).
        relevant: pool class ids known to be related to the target (recall, label selection); in
            YAML a list or the syntax of ``--relevant`` (``"7-24,80-100"``).
        finetune: FinetuneConfig fields shared by every run, less those the recipe sets (mode,
            seed, a swept setting).
        modes: FinetuneConfig fields per mode, on top of ``finetune``: a scratch model or a
            linear probe is trained with its own recipe (e.g. ``{scratch: {lr: 0.1, epochs:
            200}}``), as Jiang et al. train the three models of the knowledge analysis.
        lam: λ per mode (``{reuse: 0.3}`` is short for ``modes: {reuse: {lam: 0.3}}``).
        sweep: values of the swept variable (see ``SWEEP_DEFAULTS``).
        skip: row names not to run (e.g. ``co-tuning`` for a backbone without a classifier).
        pretrainings: label -> weights file, the pre-trainings the ``knowledge`` recipe compares
            (default: ``{"pretrained": weights}``).
        explain: ExplainConfig fields of the ``knowledge`` recipe (players, n, baseline, samples).
        corruption: ``NAME:SEVERITY`` (e.g. ``gaussian-noise:3``): the ``knowledge`` recipe also
            scores every fine-tuned model on the test data corrupted so (``evaluate
            --corruption``, seeded with the run's seed) and correlates the ratios with that
            accuracy too, as Jiang et al.'s reviewer 3 asked of discarded knowledge and robustness.
            It changes no run, so a rerun may change it.
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
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    lam: dict[str, float] = field(default_factory=dict)
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    pretrainings: dict[str, str] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)
    embed_batch_size: int = 256
    layer: str = "penultimate"
    corruption: str | None = None

    def __post_init__(self):
        check_fields(self)  # a config built in Python, not only one read by the loader
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
        check_choice("layer", self.layer, LAYERS)
        if self.corruption is not None:
            parse_corruption(self.corruption)
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
        for mode, lam in self.lam.items():
            check_choice("lam key", mode, MODES)
            if mode not in MODE_OPTIONS["lam"]:  # it would be stored and silently ignored
                raise PretrainReuseError(
                    f"lam {{{mode}: {lam}}} has no effect: mode {mode!r} has no source loss for λ "
                    f"to weigh (only {', '.join(MODE_OPTIONS['lam'])}); remove it from lam")
            if "lam" in self.modes.get(mode, {}):
                raise PretrainReuseError(f"λ of mode {mode!r} is given twice, in lam and in modes; "
                                         "keep one")
        for mode, settings in self.modes.items():
            check_choice("modes key", mode, MODES)
            for key in ("mode", "seed"):
                if key in settings:
                    raise PretrainReuseError(f"modes {mode!r} cannot set {key!r}: the recipe sets "
                                             "it for each run; remove it")
            # selections are made for the images of a regime, whatever the mode
            for key in (*REGIMES, *REGIME_OPTIONS):
                if key in settings:
                    raise PretrainReuseError(f"modes {mode!r} cannot set {key!r}: a data regime "
                                             "holds for every run; set it under finetune")
            for key in settings:  # finetune's may be shared by modes that do not read them
                if not mode_reads(mode, key):
                    raise PretrainReuseError(
                        f"modes {mode!r} sets {key}, which has no effect in mode {mode!r} (only "
                        f"in {', '.join(MODE_OPTIONS[key])}); remove it")
        self.base_finetune()  # FinetuneConfig checks each value (λ >= 0, lr > 0, ...)
        for mode in {*self.lam, *self.modes}:
            self.mode_finetune(mode)
        if "seed" in self.explain:  # the knowledge recipe analyses each run with its own seed
            raise PretrainReuseError("explain 'seed' cannot be set: each analysis takes the seed "
                                     "of its fine-tuning run from seeds (--seeds); remove it from explain")
        self.explain_config()

    def explain_config(self):
        """The ExplainConfig of the ``knowledge`` recipe, from ``explain``."""
        from ..knowledge.explain import ExplainConfig

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

    def mode_finetune(self, mode: str) -> FinetuneConfig:
        """The FinetuneConfig of the runs of ``mode``: ``finetune``, less the options ``mode``
        does not read (``MODE_OPTIONS``: a λ shared by the reuse modes is no setting of vanilla),
        then ``modes[mode]`` and ``lam[mode]`` on top (the recipe still sets each run's seed and
        swept setting)."""
        shared = {key: value for key, value in self.finetune.items()
                  if mode_reads(mode, key)}
        settings = {**shared, **self.modes.get(mode, {})}
        if mode in self.lam:
            settings["lam"] = self.lam[mode]
        values = checked_values(settings, FinetuneConfig, f"modes {mode!r} key")
        return FinetuneConfig(**{**values, "mode": mode})


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
        name = slug(label)
        if not name or name in folders:
            clash = f" as {folders[name]!r} does" if name else ""
            raise PretrainReuseError(
                f"pretrainings label {label!r} makes the folder name {name!r}{clash}; give labels "
                "that differ in their letters and digits")
        folders[name] = label


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


def slug(text: str) -> str:
    """``text`` as a folder name: lower case, runs of other characters than ``a-z0-9.=`` as ``-``."""
    return re.sub(r"[^a-z0-9.=]+", "-", text.lower()).strip("-")
