"""Running a recipe: check every run's inputs, claim the folder, compute and reuse what the rows
share, fine-tune each row per seed, and write the table."""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import make_meta, releases_folders, to_json
from ..data.catalog import check_exists, check_out_outside, has_splits
from ..data.datasets import labels_by_name
from ..data.text import is_sentence_file
from ..errors import PretrainReuseError, check_choice, check_ids_below
from ..finetune import RunResult
from ..finetune.data import check_batch_size, selected_source
from ..finetune.loop import total_steps
from ..finetune.model import check_source_head
from ..finetune.run import data_flags
from ..models import create_backbone
from ..models.checkpoint import features_hash
from ..models.registry import check_modality, model_modality
from ..units import class_count, embedding_of
from .claim import claim_experiment, input_hashes, recipe_reads, unread_settings
from .config import REGIME_OPTIONS, REGIMES, SWEPT, ExperimentConfig, slug
from .recipes import RECIPES, Row
from .table import (
    KNOWLEDGE_COLUMNS,
    KNOWLEDGE_LEVELS,
    KNOWLEDGE_RATIOS,
    SETS_ALONE,
    ExperimentTable,
)
from .workspace import Workspace


def _preserve_levels(summary: dict[str, Any]) -> dict[str, float | None]:
    """The preserve ratio's chance level and other-image control in an analysis's summary
    (:data:`~.table.KNOWLEDGE_LEVELS`; None where undefined, the control for one sample)."""
    from ..knowledge.plots import other_image_levels

    return {"preserve_chance": summary["report"]["chance"]["preserve"]["mean"],
            "preserve_other_image": other_image_levels(summary).get("preserve", {}).get("mean")}


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
    """Refuse ``finetune`` keys that the runs of the recipe would ignore without a word: those
    the recipe sets for each run itself (a ``seed: 7`` running seed 0), and an option of a data
    regime in which no run trains (a ``long_tail_order`` where neither ``finetune`` gives a
    ``long_tail_ratio`` nor the recipe sweeps one), as ``finetune`` refuses it."""
    owner = {"mode": f"each row of {name} sets its own mode (skip: leaves rows out)",
             "seed": "each run takes its seed from seeds (--seeds)"}
    swept = {key for row in rows for key, _ in row.settings}
    for key in swept:
        owner[key] = f"{name} sweeps it (give its values as sweep: {{{key}: [...]}})"
        if key in REGIMES:  # one run trains in one data regime (FinetuneConfig refuses two)
            for other in set(REGIMES) - {key}:
                owner[other] = f"{name} sweeps {key}, another data regime"
    for key in cfg.finetune:
        if key in owner:
            raise PretrainReuseError(f"finetune {key!r} cannot be set for {name}: {owner[key]}; "
                                     "remove it from finetune")
    base = cfg.base_finetune()
    for option, regime in REGIME_OPTIONS.items():
        if option in cfg.finetune and getattr(base, regime) is None and regime not in swept:
            # where the recipe sweeps another regime, finetune cannot set this one (above)
            other = sorted(swept & set(REGIMES))
            fix = (f"remove it from finetune ({name} sweeps {other[0]}, another data regime)"
                   if other else f"set {regime} under finetune too, or remove {option}")
            raise PretrainReuseError(f"finetune {option!r} has no effect in {name}: no run of it "
                                     f"trains in the {regime} regime that {option} shapes; {fix}")


@releases_folders
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
    kept = {r.method for r in rows}
    for row in rows:  # knowledge: a fine-tuned model is analysed against its linear probe
        probe = f"{row.pretraining} linear probe"
        if name == "knowledge" and row.mode == "vanilla" and probe not in kept:
            raise PretrainReuseError(
                f"skip leaves out {probe!r}, the pre-trained model that the knowledge of "
                f"{row.method!r} is measured against; skip both rows, or neither")
    sentences = cfg.target is not None and is_sentence_file(cfg.target)
    # unlabelled reuse trains on augmentations of images, which sentences lack
    images_only = [r.method for r in rows if sentences and r.mode == "reuse-unlabeled"]
    if images_only:
        rows = [r for r in rows if r.mode != "reuse-unlabeled"]
        if not rows:
            raise PretrainReuseError(
                f"{name} fine-tunes with reuse-unlabeled only, whose soft targets come from weak "
                "and strong augmentations of images; sentences cannot run it")
    if cfg.source is None and any(r.pick for r in rows):
        raise PretrainReuseError(f"{name} needs 'source', the pre-training pool it selects from; "
                                 "pass --source or set it in --config")
    _check_finetune_keys(name, cfg, rows)
    for key in ("target", "target_test", "source"):  # before anything is read of them
        if getattr(cfg, key) is not None:
            check_exists(getattr(cfg, key), key)
    check_out_outside(out, data_flags(cfg.target, cfg.target_test, cfg.source))
    trains = [r for r in rows if r.mode]
    # a model of the other modality is refused before the data is read, as finetune does
    if trains:
        check_modality(cfg.model, model_modality(cfg.model), sentences, "the target data")
    if images_only and progress:  # said once the model is known to take the sentences
        print(f"[experiment] left out on sentences (reuse-unlabeled needs augmentations of "
              f"images): {', '.join(images_only)}", flush=True)
    others = [recipe for recipe in RECIPES if recipe != name]
    unread = {key: f"read by {'every other recipe' if recipes == others else ', '.join(recipes)}"
              for key, recipes in unread_settings(name, cfg).items()}
    # entries of the settings it reads: a sweep of another recipe's variable, a mode no row trains
    unread |= {f"sweep.{key}": f"swept by {', '.join(r for r, v in SWEPT.items() if v == key)}"
               for key in cfg.sweep if key != SWEPT.get(name)}
    trained = {r.mode for r in trains}
    unread |= {f"{key}.{mode}": f"no row of {name} trains in mode {mode}" for key in ("modes", "lam")
               if key not in unread for mode in getattr(cfg, key) if mode not in trained}
    if unread and progress:  # given for another recipe, or expected to act where it cannot
        print(f"[experiment] {name} does not read " + "; ".join(
            f"{key} ({why})" for key, why in unread.items()) + ": they change nothing here",
            flush=True)
    if trains and cfg.target_test is None and not has_splits(cfg.target):
        raise PretrainReuseError(f"target {cfg.target!r} is a folder or list file with one split; "
                                 "pass --target-test (target_test) with the test data")
    out = Path(out)
    ws = Workspace(cfg, out, progress)
    # What can fail on the user's inputs fails before the folder is claimed (nothing written):
    # each run's FinetuneConfig (a sweep's regime beside the one under finetune:), its training
    # images (a fraction or ratio the data cannot realise, fewer images than a batch, fewer steps
    # than the warm-up), the backbone with its weights, and the given feature stores (features
    # of another data set). The messages name the experiment's keys, not the finetune flags.
    for row in trains:
        for seed in cfg.seeds:
            try:
                train_set, _, _ = ws.split(row, seed)
            except PretrainReuseError as e:  # a regime the data cannot realise: maybe a default
                if SWEPT.get(name) not in REGIMES:
                    raise
                raise PretrainReuseError(f"{e}{_sweep_hint(name, cfg)}") from None
            ft, run = ws.run_config(row, seed), ws.run_dir(row, seed).name
            check_batch_size(len(train_set), ft.batch_size, what=f"training ({run})",
                             flag="finetune.batch_size")
            total_steps(ft, len(train_set), run=f" of run {run}", flag="finetune.warmup_steps")
    if trains:  # a test class the training data lacks (the first run would find it, after embedding)
        labels_by_name(ws.data("test"), ws.data("target").class_names, "test data (target_test)")
    picks = any(r.pick for r in rows)
    # the selections' network (cfg.weights): it embeds the data, or is compared with the
    # network of the given feature stores
    backbones = {weights: create_backbone(cfg.model, weights=weights, device="cpu") for weights in
                 {*(ws.weights(r) for r in trains), *([cfg.weights] if picks else [])}}
    _check_backbones(backbones, trains, ws, sentences)
    given = [which for which in ("source", "target") if picks and getattr(cfg, f"{which}_features")]
    for which in given:  # features of another data set are refused
        ws.features(which)
    if picks:
        if cfg.relevant:
            _check_relevant(ws)
        _check_unit_counts(ws, name, rows)
    ws.check_embedded_data()
    reads = recipe_reads(name, cfg, asdict(cfg))
    hashes = input_hashes(reads, ws)
    changed = claim_experiment(out, name, cfg, reads, hashes)
    for which in given:  # once the command runs: a refused one says why, and only that
        _warn_other_network(ws.features(which), which, cfg, backbones[cfg.weights])
    if name == "knowledge":
        _warn_same_pretrainings(cfg, backbones)
    if changed:  # a warning, not progress: files were deleted, which a quiet run must say too
        warnings.warn(f"{str(out)!r} held an experiment with other settings ({', '.join(changed)}) "
                      "that finished no run: removed what the change affects", stacklevel=3)
    # Every row's selections and recalls before the first fine-tuning run, so that a selection
    # that cannot be made (k above the number of units) fails while no run has finished, which
    # leaves the folder free for the corrected settings (claim.release).
    try:
        sels = {i: [ws.selection(row.pick, s, row.settings) for s in cfg.seeds]
                for i, row in enumerate(rows) if row.pick}
    except PretrainReuseError as e:
        if SWEPT.get(name) not in ("k", "clusters"):
            raise
        raise PretrainReuseError(f"{e}{_sweep_hint(name, cfg)}") from None
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
            # the pool images reused: clusters are whole, so a share of the pool is overshot
            "images": _mean([int(sel.counts[sel.selected].sum()) for sel in sels[i]])
            if i in sels and sels[i][0].counts is not None else None,
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
    # as experiment.json holds them (tuples as lists): the table returned equals the one loaded
    params = json.loads(to_json({**reads, **hashes, "seeds": list(cfg.seeds),
                                 "skip": list(cfg.skip)}))
    result = ExperimentTable(name, table, x_label, params,
                             make_meta(f"experiment.{name}", params, seed=cfg.seeds[0],
                                       inputs=hashes), extra)
    result.save(out)
    if (out / "report.html").exists():  # a report of the previous table would contradict it
        from ..report import build_report

        build_report(out)
    return result


def _check_backbones(backbones: dict, trains: list[Row], ws: Workspace, sentences: bool) -> None:
    """The backbones (by weights file) fit the data and the rows: a text model for sentences, an
    image model for images, and a classifier head for co-tuning, whose source head it is."""
    for backbone in backbones.values():
        check_modality(backbone.spec.name, backbone.spec.modality, sentences, "the target data")
    for row in trains:
        if row.mode == "co-tuning":
            check_source_head(backbones[ws.weights(row)],
                              other_fix=", or leave the row out (skip: [co-tuning] in --config)")


def _sweep_hint(name: str, cfg: ExperimentConfig) -> str:
    """For an error about a swept value, which may be the recipe's default the user never typed:
    what the recipe sweeps and how to set it ("" for a recipe that sweeps no such value)."""
    swept = SWEPT.get(name)
    if swept not in ("k", "clusters", "groups", *REGIMES):
        return ""
    return (f" (the {name} recipe sweeps {swept} over {list(cfg.values(swept))}; set "
            f"sweep: {{{swept}: [...]}} in --config to values this data allows)")


def _source_pool(ws: Workspace):
    """What the pool's units are made of: the given source store, else the pool data (read
    before it is embedded)."""
    return ws.features("source") if ws.cfg.source_features else ws.data("source")


def _check_unit_counts(ws: Workspace, name: str, rows: list[Row]) -> None:
    """Every row's selection can be made from the pool: classes need labels and at least k of
    them, k-means at least K samples. Checked before the folder is claimed, from the pool's
    labels and size: the units themselves (k-means on the whole pool) come after."""
    cfg, pool = ws.cfg, _source_pool(ws)
    for row in (r for r in rows if r.pick):
        pick = row.pick
        if pick.units != "classes":
            clusters = int(pick.units.split("-")[1])
            if clusters > len(pool):
                raise PretrainReuseError(
                    f"{clusters} k-means clusters need at least as many pool samples; source "
                    f"{cfg.source!r} has {len(pool)}: lower clusters{_sweep_hint(name, cfg)}")
            continue
        if pool.labels is None:
            raise PretrainReuseError(
                f"row {row.method!r} selects pool classes, but source {cfg.source!r} has no "
                "labels; give labelled pool data, or leave the row out (skip: in --config)")
        n = class_count(pool)
        k = n if pick.group else pick.k if pick.k is not None else cfg.k
        if pick.group and pick.group[1] > n:
            raise PretrainReuseError(f"cannot cut {n} pool classes into {pick.group[1]} groups; "
                                     f"lower groups{_sweep_hint(name, cfg)}")
        if isinstance(k, int) and k > n:
            # a swept k is set by the sweep, which --k does not change
            fix = (f"pass k <= {n} (--k)" if pick.k is None else
                   f"sweep only k <= {n}{_sweep_hint(name, cfg)}")
            raise PretrainReuseError(f"k={k} exceeds the {n} classes of source {cfg.source!r} "
                                     f"(row {row.method!r}); {fix}")


def _warn_other_network(store, which: str, cfg: ExperimentConfig, backbone) -> None:
    """Warn when a given feature store was embedded by another network than the experiment's
    ``model`` with ``weights``, whose features its own embedding would select on: a store of
    another model is a silent change of the method, unless meant (selecting on a stronger
    model's features is a valid variant, hence a warning, not an error)."""
    made_by = embedding_of(store)
    if made_by is None:
        return
    if made_by["state"] == features_hash(backbone, made_by["layer"]) and made_by["layer"] == cfg.layer:
        return
    weights = f" with weights {cfg.weights!r}" if cfg.weights else ""
    warnings.warn(
        f"{which}_features {getattr(cfg, f'{which}_features')!r} were embedded by "
        f"{made_by['model']} ({made_by['layer']} layer, parameters {made_by['state']}), not by "
        f"the experiment's model {cfg.model}{weights} at its {cfg.layer} layer: the selections "
        f"rank units by those features; embed them with model, weights and layer, or leave "
        f"{which}_features unset", stacklevel=2)


def _warn_same_pretrainings(cfg: ExperimentConfig, backbones: dict) -> None:
    """Warn of two ``pretrainings`` of the knowledge recipe that hold the same network (by the
    parameters their fine-tuning starts from, whatever the file's format): their rows only
    repeat each other, at the cost of their runs."""
    seen: dict[str, str] = {}
    for label, weights in cfg.weights_of().items():
        state = features_hash(backbones[weights], "penultimate")
        if state in seen:
            warnings.warn(f"pretrainings {seen[state]!r} and {label!r} hold the same network "
                          f"(parameters {state}): their rows repeat each other; drop one, or check "
                          "that each names the weights meant", stacklevel=3)
        seen.setdefault(state, label)


def _check_relevant(ws: Workspace) -> None:
    """``relevant`` names classes of the pool (the recall of every selection, fig3a's label
    selection): an id the pool lacks is refused by the pool's labels, before the folder is
    claimed, not by the first recall, once every selection is made and saved."""
    cfg = ws.cfg
    # the class units are the means of the given store's classes, else of the embedded pool's
    pool = _source_pool(ws)
    if pool.labels is None:
        raise PretrainReuseError(f"relevant names classes of the pool, but source {cfg.source!r} "
                                 "has no labels; give labelled pool data, or leave relevant unset")
    check_ids_below("relevant", cfg.relevant, class_count(pool), f"classes of source {cfg.source!r}")


def _model_file(run_dir: Path) -> Path:
    """The fine-tuned model of a finished run folder, which a run writes with its result."""
    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise PretrainReuseError(
            f"the finished run {str(run_dir)!r} lacks its model.safetensors (deleted or moved); "
            "put it back, or delete that run folder to train it again")
    return path


def _knowledge_analysis(ws: Workspace, rows: list[Row], table: list[dict]) -> dict[str, Any]:
    """For every pre-training and seed: the knowledge of its fine-tuned model against its linear
    probe and the scratch model (``knowledge/<label>-seed<s>/``); the ratios' means and the
    fidelity of the preserved and of the new knowledge alone (``<set>_alone``:
    :func:`~pretrain_reuse.knowledge.metrics.set_ablation`'s R²), with their spread over seeds
    (``<column>_std``), go into the fine-tuned rows, and into the table's
    ``extra`` their correlation with test accuracy across all fine-tuned models (pre-trainings x
    seeds) and what the analyses rest on (``analysis``: τ, players, baseline, samples asked,
    screened, correct for every model and explained per analysis). With ``corruption`` set,
    ``extra["corrupted"]`` holds each fine-tuned model's accuracy on the corrupted test data and
    the ratios' correlation with it."""
    from ..finetune.evaluate import evaluate_model
    from ..knowledge.analysis import analyze_knowledge, load_analysis
    from ..knowledge.metrics import accuracy_correlation, knowledge_report, set_ablation

    cfg = ws.cfg
    by_method = {r.method: r for r in rows}
    per_sample: dict[str, list] = {k: [] for k in KNOWLEDGE_COLUMNS}
    accuracy, corrupted, models, summaries = [], [], [], []
    for entry in table:
        row = by_method[entry["method"]]
        if row.mode != "vanilla":
            continue
        probe = by_method[f"{row.pretraining} linear probe"]
        means: dict[str, list[float]] = {k: [] for k in (*KNOWLEDGE_COLUMNS, *KNOWLEDGE_LEVELS)}
        for seed in cfg.seeds:
            files = {"pretrained": ws.run_dir(probe, seed), "finetuned": ws.run_dir(row, seed)}
            if "scratch" in by_method:
                files["scratch"] = ws.run_dir(by_method["scratch"], seed)
            # without the scratch model (skipped) the analysis compares other models and screens
            # other samples: a folder of its own, so neither reuses the other's
            out = ws.out / "knowledge" / (f"{slug(row.pretraining)}-seed{seed}"
                                          + ("" if "scratch" in files else "-no-scratch"))
            # not run yet, stopped, or with a file missing or damaged: (re)computed, which its
            # cached games make cheap
            if load_analysis(out) is None:
                nets = {role: create_backbone(cfg.model, weights=str(_model_file(d)))
                        for role, d in files.items()}
                analyze_knowledge(nets, ws.data("test"), replace(cfg.explain_config(), seed=seed),
                                  out, split="test", progress=ws.progress)
            summary, explained = load_analysis(out)
            summaries.append(summary)
            report = knowledge_report(explained["pretrained"], explained["finetuned"],
                                      explained.get("scratch"))
            alone = set_ablation(report, explained["finetuned"])
            values = {**{k: report.per_sample(k) for k in KNOWLEDGE_RATIOS if k in report.overall},
                      **{f"{k}_alone": alone.measures[k]["fidelity"] for k in SETS_ALONE}}
            for k, v in values.items():
                per_sample[k].append(v)
                if not np.isnan(v).all():  # a mean no sample defines is no number (JSON has none)
                    means[k].append(float(np.nanmean(v)))
            for k, level in _preserve_levels(summary).items():
                if level is not None:
                    means[k].append(level)
            accuracy.append(RunResult.load(files["finetuned"] / "result.json").final["top1"])
            if cfg.corruption is not None:
                net = create_backbone(cfg.model, weights=str(_model_file(files["finetuned"])))
                test = ws.data("test")
                corrupted.append(evaluate_model(
                    net, test, device=ws.run_config(row, seed).device, corruption=cfg.corruption,
                    seed=seed)["top1"])
            models.append(f"{row.pretraining} seed {seed}")
        entry.update({k: _mean(v) for k, v in means.items()})
        # the spread over seeds, undefined (None) for one seed as top1_std
        entry.update({f"{k}_std": float(np.std(v, ddof=1)) if len(v) > 1 else None
                      for k, v in means.items()})
    # one explain config for every analysis; none without fine-tuned rows (skipped)
    params = summaries[0]["meta"]["params"] if summaries else None
    analysis = params and {
        "tau": params["tau"], "players": params["players"], "baseline": params["baseline"],
        "asked": params["samples"], "explained": [s["samples"]["n"] for s in summaries],
        **{key: [s["samples"][key] for s in summaries] for key in ("screened", "correct_for_all")}}
    scored = ({"corrupted": {"corruption": cfg.corruption, "accuracy": corrupted, "correlation": None}}
              if cfg.corruption is not None else {})
    if len(accuracy) < 3:
        return {"models": models, "analysis": analysis, "correlation": None, **scored,
                "why": "a correlation needs at least 3 fine-tuned models (pre-trainings x seeds)"}
    # a ratio some model defines on no sample (e.g. exclusive where nothing is preserved) has no
    # correlation; the table says which
    defined = {k: v for k, v in per_sample.items()
               if len(v) == len(accuracy) and all(not np.isnan(m).all() for m in v)}

    def correlation(of: list[float]) -> dict[str, Any]:
        return {k: accuracy_correlation(v, of, seed=cfg.seeds[0]).to_dict() for k, v in defined.items()}

    extra = {"models": models, "accuracy": accuracy, "analysis": analysis, **scored,
             "correlation": correlation(accuracy),
             "undefined": [k for k, v in per_sample.items() if v and k not in defined]}
    if scored:
        extra["corrupted"]["correlation"] = correlation(corrupted)
    return extra
