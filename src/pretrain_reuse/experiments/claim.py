"""Which folder belongs to which experiment: a folder is claimed with the settings its recipe
reads and the content hashes of the files they name, so that a rerun never mixes two experiments
in one table, and a folder whose experiment finished nothing is handed over to new settings."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from ..artifacts import (
    claim_folder,
    hash_file,
    lock_folder,
    read_json,
    to_json,
    write_json,
)
from ..finetune.config import FinetuneConfig, mode_reads
from ..finetune.loop import RESUMABLE_WITH_OTHER
from .config import REGIME_OPTIONS, REGIMES, SWEEP_DEFAULTS, SWEPT, ExperimentConfig
from .recipes import RECIPES
from .workspace import Workspace

#: Fine-tuning settings left out of the claim: what a run may resume with (another value, or
#: one that computes the same), and the precision, which each run's folder records as computed
#: and :meth:`Workspace.finetune` compares (so that ``auto`` -> ``bf16`` can follow the advice of
#: its error on a host of mixed GPUs).
_NOT_CLAIMED = (*RESUMABLE_WITH_OTHER, "precision")
#: The value of every fine-tuning setting that no config gives.
DEFAULTS = asdict(FinetuneConfig())

_SELECTS = ("weights", "source", "source_features", "target_features", "embed_batch_size",
            "layer", "relevant", "finetune")  # finetune: a low-data / long-tail regime selects for its images
_TRAINS = ("target_test", "lam", "modes")

#: The ExperimentConfig fields each recipe reads, besides model, target, its swept values and
#: seeds / skip (which add or leave out runs, never change one); see :func:`recipe_reads`.
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


#: Fields every recipe reads, or that only add or leave out runs; and those a recipe reads
#: without claiming them (they change no run, so a rerun may change them).
_ALWAYS_READ = ("model", "target", "seeds", "skip", "sweep")
_READ_UNCLAIMED = {"knowledge": ("corruption",)}


def unread_settings(name: str, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """The fields of ``cfg`` set to another value than their default that recipe ``name``
    never reads, each with the recipes that do read it (a setting given for another recipe, or
    expected to act where it cannot)."""
    def reads(recipe: str) -> set[str]:
        return {*_ALWAYS_READ, *READS[recipe], *_READ_UNCLAIMED.get(recipe, ())}

    unread = {}
    for f in fields(ExperimentConfig):
        if f.name in reads(name):  # model and target, which every recipe reads, have no default
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if getattr(cfg, f.name) != default:
            unread[f.name] = [recipe for recipe in READS if f.name in reads(recipe)]
    return unread


def recipe_reads(name: str, cfg: ExperimentConfig, values: dict[str, Any]) -> dict[str, Any]:
    """The settings among ``values`` (the fields of ``cfg``, or of the config an earlier version
    recorded in the folder's marker) that the rows of recipe ``name`` read: :data:`READS`, its
    swept values, the λ and settings of its modes, ``finetune`` less what a resumed run may
    change. An
    experiment folder is claimed with them and the content hashes of the files they name
    (:func:`input_hashes`), so a setting the recipe never reads may change between reruns."""
    params = {key: values.get(key) for key in ("model", "target", *READS[name])}
    if name in SWEPT:
        swept = SWEPT[name]
        params["sweep"] = {swept: list(values["sweep"].get(swept, SWEEP_DEFAULTS[swept]))}
    rows = RECIPES[name][0](cfg)  # all of them: skip may change
    trains = any(r.mode for r in rows)
    modes = {r.mode for r in rows}
    # A value that a run would take anyway is no setting: writing the default out (momentum:
    # 0.9 under finetune, lam: {reuse: 0.3}) or a mode's value that its shared one already
    # gives must not refuse the folder. So finetune keeps what differs from FinetuneConfig's
    # default, lam and modes what differs from the value finetune gives the mode.
    shared = values.get("finetune") or {}

    def given(key: str, mode: str | None = None):
        if mode is not None and key in shared and mode_reads(mode, key):
            return shared[key]
        return DEFAULTS.get(key)

    def needed(value, key: str, mode: str | None = None) -> bool:
        return key not in _NOT_CLAIMED and to_json(value) != to_json(given(key, mode))

    if "lam" in params:  # (None in the marker of an earlier version without it)
        params["lam"] = {mode: lam for mode, lam in (params["lam"] or {}).items()
                         if mode in modes and needed(lam, "lam", mode)}
    if "finetune" in params:  # a recipe that trains nothing reads only the data regime (selection)
        params["finetune"] = {k: v for k, v in (params["finetune"] or {}).items()
                              if needed(v, k) and (trains or k in (*REGIMES, *REGIME_OPTIONS))}
    if "modes" in params:
        # only where some mode of the recipe has settings: folders claimed before ``modes``
        # existed record none, and must not be refused by a config that gives none either
        per_mode = {mode: {k: v for k, v in settings.items() if needed(v, k, mode)}
                    for mode, settings in (params["modes"] or {}).items() if mode in modes}
        params["modes"] = {mode: settings for mode, settings in per_mode.items() if settings}
        if not params["modes"]:
            del params["modes"]
    # a file or folder by its resolved path: ./pre.pth, pre.pth and /abs/pre.pth are one input
    for key in _PATHS:
        if params.get(key):
            params[key] = _resolved(params[key])
    if params.get("pretrainings"):
        params["pretrainings"] = {label: _resolved(path)
                                  for label, path in params["pretrainings"].items()}
    if params.get("layer") in (None, "penultimate"):
        # the default is not recorded: folders claimed before ``layer`` existed record none
        params.pop("layer", None)
    if params.get("source_features") and params.get("target_features"):
        # nothing is embedded: the stores' content is claimed instead (input_hashes), and the weights
        # only by the fine-tuning runs
        del params["embed_batch_size"]
        params.pop("layer", None)
        if not trains:
            del params["weights"]
    return params


#: The settings that name a file or folder (or an embedded data set).
_PATHS = ("weights", "source", "target", "target_test", "source_features", "target_features")


def _resolved(path: str) -> str:
    """``path`` made absolute, links resolved, where it exists; an embedded data set's name (or a
    path that does not exist) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def input_hashes(reads: dict[str, Any], ws: Workspace) -> dict[str, Any]:
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


def claim_experiment(out: Path, name: str, cfg: ExperimentConfig, reads: dict[str, Any],
           hashes: dict[str, Any]) -> list[str]:
    """Mark ``out`` as an experiment folder of the settings ``reads`` and input ``hashes``; a
    rerun must use the same recipe and inputs (rows already run are reused, so a changed config
    would mix two experiments in one table), unless no fine-tuning run finished there
    (:func:`_release`; the settings it changed are returned)."""
    # seeds and skip may change between runs: they add or leave out rows, never alter one
    params = {"experiment": name, **reads, **hashes}
    # before the marker is rewritten or a stopped experiment's outputs removed: they may be a
    # running one's
    lock_folder(out, "an experiment")
    _upgrade_marker(out, name, cfg, hashes)
    changed = _release(out, params, cfg)
    claim_folder(out, "experiment-run", params, what="an experiment")
    return changed


def _upgrade_marker(out: Path, name: str, cfg: ExperimentConfig, hashes: dict[str, Any]) -> None:
    """Rewrite the marker of a folder that an earlier version claimed for experiment ``name``
    in the form of this one: the settings the recipe reads (:func:`recipe_reads`; the earlier marker
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
    upgraded = json.loads(to_json({"experiment": name, **recipe_reads(name, cfg, old_params),
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
