"""How the knowledge ratios move with the analysis's own choices (players, baseline, τ, ...).

Jiang, Cheng & Li (arXiv 2410.08455) fix the choices their ratios rest on: which patches are the
players, what an absent player shows, the salience threshold. :func:`knowledge_sensitivity` runs
one ordinary knowledge analysis per combination of the varied settings, on the same models and
data, each in its own resumable sub-folder, and :func:`ratio_sensitivity` compares their ratios
sample by sample (docs/knowledge.md §5).
"""

from __future__ import annotations

import csv
import inspect
import itertools
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np

from ..artifacts import (
    ValueEquality,
    atomic_path,
    claim_folder,
    lock_folder,
    make_meta,
    releases_folders,
    to_json,
    write_json,
)
from ..configs import parse_sweep
from ..data.datasets import ImageDataset
from ..data.text import TextDataset
from ..errors import PretrainReuseError, check_choice
from ..figures import save_png, subplots
from ..models import Backbone
from .analysis import analyze_knowledge, games_folders, holds_games, load_analysis
from .explain import BASELINE_ONLY, CONFIG_DEFAULTS, ExplainConfig, rerun_identity, unread_settings
from .metrics import (
    KnowledgeReport,
    _load_json,
    _malformed,
    _nan_to_none,
    _none_to_nan,
    _save_json,
    knowledge_report,
)
from .plots import RATIO_COLOURS, literal

#: Settings that do not change what an analysis computes, so varying them would repeat it.
NOT_VARIED = ("batch_size", "device")
#: The settings of :func:`~.analysis.analyze_knowledge` outside :class:`~.explain.ExplainConfig`
#: that may be varied.
ANALYSIS_SETTINGS = ("tau", "match")
#: The per-variant checks copied from each analysis's ``knowledge.json`` (dotted paths).
CHECKS = {"faithfulness_error": "faithfulness.finetuned.mean",
          "effect_ratio": "counterfactual.effect_ratio",
          "preserve_alone_r2": "ablation.preserve.fidelity.mean",
          # the levels the preserve ratio is read against, which move with the settings too
          "preserve_chance": "report.chance.preserve.mean",
          "preserve_other_image": "other_image.overall.preserve.mean"}


def variable_settings() -> dict[str, Any]:
    """The settings ``--vary`` may set, with their types."""
    hints = {k: v for k, v in get_type_hints(ExplainConfig).items() if k not in NOT_VARIED}
    analysis = get_type_hints(analyze_knowledge)
    return {**hints, **{k: analysis[k] for k in ANALYSIS_SETTINGS}}


def _default_settings() -> dict[str, Any]:
    """Each variable setting's default (``baseline`` and ``background``: None, which a config
    resolves for its players)."""
    analysis = inspect.signature(analyze_knowledge).parameters
    return {**CONFIG_DEFAULTS,
            **{k: analysis[k].default for k in ANALYSIS_SETTINGS}}


def _check_setting(name: str) -> None:
    """Refuse a setting ``--vary`` cannot vary, in one line."""
    if name in NOT_VARIED:
        raise PretrainReuseError(f"--vary cannot vary {name}: it does not change what an "
                                 f"analysis computes; set it once with --{name.replace('_', '-')}")
    check_choice("--vary setting", name, variable_settings())


def parse_vary(specs: list[str]) -> dict[str, list[Any]]:
    """``["baseline=zero,mean", "tau=0.05,0.1"]`` -> ``{"baseline": ["zero", "mean"], "tau":
    [0.05, 0.1]}``, values typed like the setting they set."""
    for spec in specs:
        name = spec.partition("=")[0].strip().replace("-", "_")
        if name in NOT_VARIED:
            _check_setting(name)
    return parse_sweep(specs, variable_settings(), "--vary", "baseline=zero,mean,blur")


@dataclass(frozen=True, eq=False)
class KnowledgeSensitivity(ValueEquality):
    """The knowledge ratios of one analysis per setting of the varied choices.

    Attributes:
        vary: ``{setting: [values]}``, as varied.
        variants: ``{tag: {setting: value}}`` in the order analysed; the first is the reference
            the others are compared with. A tag reads ``baseline=mean,tau=0.1``.
        ids: ``{tag: [sample id]}``, the samples each variant explains.
        ratios: ``{tag: {ratio: (samples,) float64}}``, each sample's ratio, NaN where its
            denominator is empty.
        checks: ``{tag: {check: value or None}}``: the fine-tuned model's mean faithfulness
            error, the counterfactual effect ratio and the fidelity R² of its preserved
            interactions alone (:data:`CHECKS`).
        meta: the producer, settings, seed and versions (:func:`~pretrain_reuse.artifacts.make_meta`).
    """

    vary: dict[str, list[Any]]
    variants: dict[str, dict[str, Any]]
    ids: dict[str, list[str]]
    ratios: dict[str, dict[str, np.ndarray]]
    checks: dict[str, dict[str, float | None]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every sample's ratio
        return (f"KnowledgeSensitivity(variants={list(self.variants)}, ratios="
                f"{list(next(iter(self.ratios.values())))})")

    def rows(self) -> list[dict[str, Any]]:
        """One row per variant: its settings, the samples it explains (``explained``), each
        ratio's mean and standard error over the samples that define it (None where fewer than
        two do), and its checks."""
        rows = []
        for tag, setting in self.variants.items():
            row: dict[str, Any] = {"variant": tag, **setting, "explained": len(self.ids[tag])}
            for name, values in self.ratios[tag].items():
                mean, se, _ = _mean_se(values)
                row[name], row[f"{name}_se"] = mean, se
            rows.append(row | self.checks[tag])
        return rows

    def differences(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """``{tag: {ratio: {"mean", "se", "n"}}}``: each variant's ratio minus the first
        variant's, on the samples both explain and both define (paired: the same image under
        two choices), with the standard error of that mean difference; None where fewer than
        two samples are paired."""
        first, *others = self.variants
        out = {}
        for tag in others:
            common = sorted(set(self.ids[first]) & set(self.ids[tag]))
            at = {t: {s: k for k, s in enumerate(self.ids[t])} for t in (first, tag)}
            out[tag] = {}
            for name in self.ratios[first]:
                a = np.array([self.ratios[first][name][at[first][s]] for s in common])
                b = np.array([self.ratios[tag][name][at[tag][s]] for s in common])
                mean, se, n = _mean_se(b - a)
                out[tag][name] = {"mean": mean, "se": se, "n": n}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The table and the paired differences as JSON-ready data (NaN as None)."""
        return {"vary": self.vary, "reference": next(iter(self.variants)), "rows": self.rows(),
                "differences": self.differences()}

    def save(self, path: str | Path) -> Path:
        """Write every sample's ratios (and :meth:`to_dict`, for readers of the JSON)
        atomically; returns the path."""
        per_sample = {tag: {"setting": self.variants[tag], "ids": self.ids[tag],
                            "checks": self.checks[tag],
                            "ratios": {k: [_nan_to_none(float(v)) for v in values]
                                       for k, values in self.ratios[tag].items()}}
                      for tag in self.variants}
        return _save_json(path, "knowledge-sensitivity", {**self.to_dict(), "per_variant": per_sample},
                          self.meta)

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeSensitivity:
        """Read a file written by :meth:`save`."""
        record = _load_json(path, "knowledge-sensitivity", ("vary", "per_variant"))
        with _malformed(path, "per-variant numbers", "KnowledgeSensitivity"):
            per = record["per_variant"]
            return cls(dict(record["vary"]), {t: dict(v["setting"]) for t, v in per.items()},
                       {t: list(v["ids"]) for t, v in per.items()},
                       {t: {k: _none_to_nan(x) for k, x in v["ratios"].items()} for t, v in per.items()},
                       {t: dict(v["checks"]) for t, v in per.items()}, dict(record.get("meta", {})))

    def plot(self, ax=None):
        """Each ratio's mean ± standard error per variant, grouped by ratio, on ``ax`` (None:
        the current axes, as every plot of the package); returns the axes."""
        import matplotlib.pyplot as plt  # only when plotting

        ax = ax or plt.gca()
        rows = self.rows()
        names = [n for n in RATIO_COLOURS if n in self.ratios[rows[0]["variant"]]]
        width = 0.8 / len(rows)
        for k, row in enumerate(rows):
            x = np.arange(len(names)) + (k - (len(rows) - 1) / 2) * width
            ax.bar(x, [row[n] if row[n] is not None else np.nan for n in names], width,
                   yerr=[row[f"{n}_se"] or 0.0 for n in names], capsize=3,
                   label=literal(row["variant"]), color=f"C{k % 10}")
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("ratio (mean ± s.e. over samples)")
        ax.legend(fontsize=7)
        ax.set_title("Knowledge ratios per setting")
        return ax

    def figure(self):
        """A new figure of :meth:`plot`, wide enough for every variant."""
        fig, ax = subplots(figsize=(max(6.0, 1.2 * len(self.variants) + 3), 4))
        self.plot(ax)
        return fig


def _mean_se(values: np.ndarray) -> tuple[float | None, float | None, int]:
    """Mean, standard error (sample std / √n) and count of the non-NaN ``values``; None where
    undefined (no value; one value for the standard error)."""
    values = values[~np.isnan(values)]
    n = int(values.size)
    mean = float(values.mean()) if n else None
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return mean, se, n


def ratio_sensitivity(reports: Mapping[str, KnowledgeReport], ids: Mapping[str, Sequence[str]],
                      variants: Mapping[str, dict[str, Any]], vary: dict[str, list[Any]], *,
                      checks: Mapping[str, dict[str, float | None]] | None = None
                      ) -> KnowledgeSensitivity:
    r"""The knowledge ratios of several analyses of the same models, compared sample by sample.

    For every variant v (one setting of the varied choices) and ratio r (preserve, discard, new,
    exclusive; docs/knowledge.md §3), with r_v(x) the ratio on sample x,

    .. math::

        \bar r_v = \frac{1}{|X_v|}\sum_{x \in X_v} r_v(x), \qquad
        \Delta_v = \frac{1}{|X_{0v}|}\sum_{x \in X_{0v}} \bigl(r_v(x) - r_0(x)\bigr),

    X_v the samples where r_v is defined and X_{0v} those where both r_v and the first variant's
    r_0 are: a paired difference, the same image under two choices, whose standard error
    s/√|X_{0v}| is far smaller than the spread of the ratio over images. A choice the
    conclusions do not depend on moves Δ within a few standard errors of 0. Not in Jiang, Cheng
    & Li (arXiv 2410.08455); docs/knowledge.md §5.

    Args:
        reports: ``{tag: KnowledgeReport}`` per variant, in the order of ``variants``.
        ids: ``{tag: sample ids}``, in the order of each report's samples.
        variants: ``{tag: {setting: value}}``; the first is the reference.
        vary: ``{setting: [values]}``, recorded as given.
        checks: ``{tag: {check: value}}`` recorded beside the ratios (optional).
    """
    if not all(isinstance(m, Mapping) for m in (reports, ids, variants)) or not variants \
            or list(reports) != list(variants) or list(ids) != list(variants):
        raise PretrainReuseError("reports, ids and variants must be dicts naming the same "
                                 "variants in the same order (one analysis each)")
    ratios = {}
    for tag, report in reports.items():
        if not isinstance(report, KnowledgeReport):
            raise PretrainReuseError(f"reports[{tag!r}] must be a KnowledgeReport (from "
                                     f"knowledge_report), got {type(report).__name__}")
        if len(ids[tag]) != report.n_samples:
            raise PretrainReuseError(f"variant {tag!r} has {len(ids[tag])} sample ids for "
                                     f"{report.n_samples} samples; pass one id per sample")
        ratios[tag] = {name: report.per_sample(name) for name in report.overall}
    if len({tuple(r) for r in ratios.values()}) > 1:
        raise PretrainReuseError("the variants measure different ratios (a scratch model in only "
                                 "some of them); give every analysis the same models")
    # the reports' own settings are theirs; knowledge_sensitivity records the sweep's
    meta = make_meta("knowledge.ratio_sensitivity", {"vary": dict(vary), "variants": dict(variants)})
    return KnowledgeSensitivity(dict(vary), {t: dict(v) for t, v in variants.items()},
                                {t: list(i) for t, i in ids.items()}, ratios,
                                {t: dict((checks or {}).get(t, {})) for t in variants}, meta)


@releases_folders
def knowledge_sensitivity(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                          cfg: ExplainConfig, vary: dict[str, list[Any]], out: str | Path, *,
                          tau: float = 0.05, match: str = "support", candidates: int = 400,
                          split: str | None = None, games_from: Sequence[str | Path] = (),
                          progress: bool = True) -> KnowledgeSensitivity:
    """Run :func:`~.analysis.analyze_knowledge` for every combination of ``vary`` (the other
    settings from ``cfg``, ``tau`` and ``match``) and compare the ratios (:func:`ratio_sensitivity`).

    Each combination is an ordinary, resumable knowledge analysis in the sub-folder named by its
    settings in alphabetical order (``baseline=mean,players=grid:4x4``), whose report
    ``pretrain-reuse report`` renders; a finished one is not run again, so a rerun with more
    values runs only the new ones. The first combination, in the order ``vary`` gives, is the
    reference. Analyses whose games are the same (they differ only in ``tau``, ``match``, the
    decomposition or its noise bound) compute them once, and so do reruns, which also take the
    games of the sub-folders already in ``out``. Every combination is checked before the first
    runs, its samples screened and its earlier analysis in ``out`` included, so a refused sweep
    writes nothing. Writes ``sensitivity.json`` (:meth:`KnowledgeSensitivity.save`),
    ``sensitivity.csv`` (:meth:`KnowledgeSensitivity.rows`) and ``sensitivity.png`` into ``out``,
    which must be new, empty or such a folder of a sweep of the same settings (with any values).
    ``games_from``: folders of other analyses of these models whose cached games the
    combinations may take (as :func:`~.analysis.analyze_knowledge`'s).

    A setting of ``vary`` may be any number or string field of :class:`~.explain.ExplainConfig`
    but ``batch_size`` and ``device`` (they change nothing computed), or ``tau`` / ``match``; a
    setting that ``cfg``, ``tau`` or ``match`` also sets to other than its default is refused, as
    the variants would override it unseen. Varying ``seed`` or ``samples`` explains other
    samples: only those two settings share are compared.
    """
    if not isinstance(out, str | Path):
        raise PretrainReuseError(f"out must be a folder path, got {out!r}")
    games_from = games_folders(games_from)
    if not isinstance(vary, Mapping) or not vary:
        raise PretrainReuseError("nothing to vary; pass --vary SETTING=V1,V2 (e.g. "
                                 "baseline=zero,mean,blur), in Python {'baseline': ['zero', 'mean']}")
    defaults = _default_settings()
    given = {**asdict(cfg), "tau": tau, "match": match} if isinstance(cfg, ExplainConfig) else {}
    if given:  # a baseline or background of None is resolved for the players: compare alike
        resolved = ExplainConfig(players=cfg.players)
        defaults |= {k: getattr(resolved, k) for k in ("baseline", "background", "n")}
    for name, values in vary.items():
        _check_setting(name)
        if not isinstance(values, list | tuple) or not values \
                or not all(isinstance(v, int | float | str) for v in values) \
                or len(set(values)) < len(values):
            raise PretrainReuseError(f"vary[{name!r}] must be a non-empty list of distinct numbers "
                                     f"or strings, got {values!r}")
        if given and given[name] != defaults[name]:
            raise PretrainReuseError(
                f"--vary sets {name}, but the analysis also sets {name}={given[name]!r} (a flag); "
                "drop one of them")
    if "players" in vary and len({v == "tokens" for v in vary["players"]}) > 1:
        raise PretrainReuseError("--vary players cannot mix tokens with image players: they "
                                 "explain different data; run one sweep for each")
    combinations = [dict(zip(vary, values, strict=True))
                    for values in itertools.product(*vary.values())]
    if len(combinations) < 2:
        raise PretrainReuseError("--vary gives one setting only, so there is nothing to compare; "
                                 "give two values or more (or run knowledge without --vary)")
    # named in a fixed order, so that the order of the --vary flags does not rename the analyses
    variants = {",".join(f"{k}={setting[k]}" for k in sorted(setting)): setting
                for setting in combinations}
    out = Path(out)
    configs = {tag: replace(cfg, **{k: v for k, v in setting.items() if k not in ANALYSIS_SETTINGS})
               if isinstance(cfg, ExplainConfig) else cfg for tag, setting in variants.items()}
    # a setting of one baseline (--baseline-lr with --vary baseline=zero,learned) is for the
    # variants that read it (the others take its default); one that none reads would change
    # nothing, and a sweep over it would show a difference of 0
    for name, reader in BASELINE_ONLY.items():
        given = name in vary or (isinstance(cfg, ExplainConfig) and getattr(cfg, name) != defaults[name])
        if given and all(getattr(c, "baseline", None) != reader for c in configs.values()):
            flag = f"--vary {name}" if name in vary else f"--{name.replace('_', '-')}"
            raise PretrainReuseError(
                f"{name} ({flag}) applies to baseline {reader!r}, which no setting of the sweep "
                "uses: it would change nothing; drop it")
    runs = {}
    for tag, setting in variants.items():
        c = configs[tag]
        if isinstance(c, ExplainConfig):
            c = replace(c, **{name: defaults[name] for name in unread_settings(c)})
        t, m = setting.get("tau", tau), setting.get("match", match)
        analyze_knowledge(models, dataset, c, out / tag, tau=t, match=m, candidates=candidates,
                          split=split, progress=False, check_only=True)
        runs[tag] = (c, t, m)
    # claimed once every combination has passed its checks: a refused sweep writes nothing.
    # By the settings varied, not their values, and by everything else: a rerun with more
    # values adds analyses, while one of other settings, models or data would leave the old
    # sweep's analyses beside the new one's
    fixed = {**asdict(cfg), "tau": tau, "match": match, "split": split, "candidates": candidates}
    params = {"vary": sorted(vary), "analysis": rerun_identity(
        models, dataset, {k: v for k, v in fixed.items() if k not in vary})}
    _record_settings_varied(out / "run.json", params)
    claim_folder(out, "sensitivity-run", params, what="a knowledge sensitivity analysis",
                 early=(*variants, "sensitivity.json", "sensitivity.csv", "sensitivity.png"))
    # the games of this sweep's earlier runs too (other values, or the flags in another order)
    done = [*games_from, *(f for f in sorted(out.iterdir())
                           if f.name not in variants and holds_games(f))]
    reports, ids, checks, said = {}, {}, {}, set()
    for k, (tag, (c, t, m)) in enumerate(runs.items()):
        if progress:  # each analysis draws its own bars; say which setting they belong to
            print(f"setting {k + 1}/{len(runs)}: {tag}", file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            analyze_knowledge(models, dataset, c, out / tag, tau=t, match=m, candidates=candidates,
                              split=split, games_from=done, progress=progress)
        # named by the variant they are of; one of the models (the same for every variant)
        # is said once
        for w in caught:
            if str(w.message) not in said:
                said.add(str(w.message))
                warnings.warn(f"{tag}: {w.message}", w.category, stacklevel=2)
        summary, explained = load_analysis(out / tag)
        reports[tag] = knowledge_report(explained["pretrained"], explained["finetuned"],
                                        explained.get("scratch"), tau=t, match=m)
        ids[tag] = summary["samples"]["ids"]
        checks[tag] = {name: _entry(summary, path) for name, path in CHECKS.items()}
        done.append(out / tag)
    result = ratio_sensitivity(reports, ids, variants, dict(vary), checks=checks)
    result = replace(result, meta=make_meta("knowledge.sensitivity", {
        "vary": dict(vary), "config": asdict(cfg), "tau": tau, "match": match, "split": split,
        "candidates": candidates}, seed=cfg.seed))
    if _written(out, result):  # a rerun of a finished sweep: nothing new to write
        return result
    rows = result.rows()
    with atomic_path(out / "sensitivity.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_png(result.figure(), out / "sensitivity.png")
    result.save(out / "sensitivity.json")  # last: its presence marks the sweep finished
    return result


def _record_settings_varied(marker: Path, params: dict[str, Any]) -> None:
    """Give the marker of an earlier version's sweep, which recorded no settings, those of this
    one: it is taken as this sweep, as those versions took any (the analyses in it are each
    checked against their own settings). One that cannot be written stays as it is, and the
    claim then refuses the folder."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict) and recorded.get("kind") == "sensitivity-run" \
            and recorded.get("params") == {}:
        try:
            lock_folder(marker.parent, "a knowledge sensitivity analysis")
            write_json(marker, {**recorded, "params": params})
        except PretrainReuseError:
            pass


def _written(out: Path, result: KnowledgeSensitivity) -> bool:
    """``out`` already holds ``result``'s files: its ``sensitivity.json`` records the same
    numbers (its meta aside, whose time stamp differs), and the table and figure are there."""
    try:
        earlier = KnowledgeSensitivity.load(out / "sensitivity.json")
    except PretrainReuseError:
        return False
    same = json.loads(to_json(earlier.to_dict())) == json.loads(to_json(result.to_dict()))
    return same and all((out / name).is_file() for name in ("sensitivity.csv", "sensitivity.png"))


def _entry(record: dict, path: str) -> float | None:
    """The number at the dotted ``path`` of ``record``; None where it is absent or undefined."""
    for key in path.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record if isinstance(record, int | float) else None
