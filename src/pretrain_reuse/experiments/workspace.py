"""What the rows of an experiment share, computed once and cached in its folder: data,
features, units and selections; and each row's fine-tuning runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import hash_array
from ..data.catalog import has_splits
from ..data.datasets import ImageDataset
from ..data.text import TextDataset
from ..distributed import process_device
from ..embed import EmbedConfig, data_identity, embed
from ..errors import PretrainReuseError
from ..features import FeatureStore
from ..finetune import FinetuneConfig, RunResult, finetune_datasets, open_split, target_splits
from ..finetune.loop import computes_in, recorded_precision
from ..selection import SelectConfig, Selection, select
from ..units import Units, class_means, spherical_kmeans
from .config import POOL_SEED, REGIMES, ExperimentConfig
from .recipes import Pick, Row
from .table import run_folder


class Workspace:
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
            # on the runs' device and precision: a GPU server embeds its pool on the GPU
            run = self.cfg.base_finetune()
            ecfg = EmbedConfig(model=self.cfg.model, data=str(spec), weights=self.cfg.weights,
                               split="train" if has_splits(spec) else None,
                               batch_size=self.cfg.embed_batch_size, layer=self.cfg.layer,
                               device=run.device, precision=run.precision)
            return embed(ecfg, self.out / "features" / which, progress=self.progress)

        return self._once(("features", which), build)

    def check_embedded_data(self) -> None:
        """Refuse a source or target that changed on disk since this experiment embedded it
        (:func:`_check_data_unchanged`); its units, selections and runs were made from the data
        as it was, and would be reused as they are."""
        for which, given, spec in (("source", self.cfg.source_features, self.cfg.source),
                                   ("target", self.cfg.target_features, self.cfg.target)):
            folder = self.out / "features" / which
            if spec is not None and not given and (folder / "embed.json").is_file():
                _check_data_unchanged(folder, which, spec, self.data(which))

    def given_store(self, which: str) -> FeatureStore:
        """The feature store given as ``source_features`` / ``target_features``, as on disk
        (read when indexed: the means and k-means read it block by block)."""
        return self._once(("given", which), lambda: FeatureStore.load(
            getattr(self.cfg, f"{which}_features"), lazy=True))

    def store_sha256(self, which: str) -> str:
        """The content hash of the given ``which`` feature store (:func:`_store_sha256`)."""
        return self._once(("sha256", which), lambda: _store_sha256(self.given_store(which)))

    def units(self, name: str) -> Units:
        def build():
            path = self.out / "units" / f"{name}.safetensors"
            if path.exists():
                return Units.load(path)
            store = self.features("source")
            if name == "classes":  # run_experiment has checked that the pool has labels
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
            size = len(ranking) // n  # >= 1: run_experiment has checked n against the classes
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
        """The recipe of a row's run with ``seed``: the settings of the row's mode
        (:meth:`ExperimentConfig.mode_finetune`) with the seed and the row's swept data regime
        (which ``finetune`` may not set: ``_check_finetune_keys``; nor may ``modes``)."""
        return replace(self.cfg.mode_finetune(row.mode), seed=seed, **dict(row.settings))

    def finetune(self, row: Row, seed: int) -> RunResult:
        cfg = self.cfg
        run_dir = self.run_dir(row, seed)
        sel = self.selection(row.pick, seed, row.settings) if row.pick else None
        ft = self.run_config(row, seed)
        self._check_precision(run_dir, ft)
        if (run_dir / "result.json").exists():
            try:
                done = RunResult.load(run_dir / "result.json")
            except PretrainReuseError as e:  # damaged: the run is redone from scratch
                raise PretrainReuseError(f"{e}: delete the run folder {str(run_dir)!r} and rerun "
                                         "the experiment, which trains that run again") from None
            if sel is not None and json.loads(done.meta["inputs"]["selected"]) != sel.selected:
                raise PretrainReuseError(
                    f"{str(run_dir)!r} was made with another selection than the one its row "
                    "makes now (e.g. an earlier version selected for a low-data run on all the "
                    "target images); pass a new --out, or delete that run folder to redo it")
            return done
        weights = self.weights(row)
        if self.progress:
            print(f"[experiment] {run_dir.name}", flush=True)
        return finetune_datasets(
            ft, model=cfg.model, weights=weights, train_pool=self.data("target"),
            test_set=self.data("test"), source_pool=self.data("source") if sel else None,
            # clusters map to images through their units; classes through the pool's labels
            selection=sel, units=self.units(row.pick.units) if sel and row.pick.units != "classes"
            else None, out=run_dir,
            # source only where the run reads it: knowledge, which selects nothing, does not
            # claim it, so a rerun without it must resume the runs
            inputs={"model": cfg.model, "weights": weights, "target": cfg.target,
                    "source": cfg.source if sel else None, "row": row.method, "x": row.x,
                    "selected": sel.selected if sel else None},
            progress=self.progress)

    def _check_precision(self, run_dir: Path, ft: FinetuneConfig) -> None:
        """Refuse to go on with a folder whose run computed in another precision than this
        device would (``precision: auto`` on a GPU with or without native bf16): its table would
        mix the two. The experiment's claim leaves the precision setting out, so that the fix
        named here is one the config can apply, where it sets the run's precision (its mode's
        settings, or finetune's)."""
        recorded = recorded_precision(run_dir)
        now = computes_in(ft.precision, process_device(ft.device))
        if recorded is not None and recorded != now:
            where = f"modes: {ft.mode}" if "precision" in self.cfg.modes.get(ft.mode, {}) else "finetune"
            raise PretrainReuseError(
                f"{str(run_dir)!r} was trained in {recorded}, but precision {ft.precision!r} "
                f"computes in {now} on this device; set precision: {recorded} under {where}: in "
                "the config to go on with this experiment, or pass a new --out")


def _check_data_unchanged(folder: Path, which: str, spec: str,
                          data: ImageDataset | TextDataset) -> None:
    """Refuse data that changed on disk since the experiment embedded it into ``folder`` (images
    added, removed or renamed; relabelled; sentences edited), naming the change: the experiment's
    units, selections and runs were made from the data as it was (and embed refused it as an
    embedding made with other settings, pointing at the experiment's own folder, though no
    setting changed). Compares what embed recorded of the data (:func:`data_identity`); a key an
    earlier version did not record is left to embed, which takes the data as it is once."""
    try:
        recorded = json.loads((folder / "embed.json").read_text())["params"]
        now = data_identity(data)
        changed = [k for k in now if k in recorded and recorded[k] != now[k]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # not readable: embed decides
    if not changed:
        return
    change = {"n": f"{recorded['n']} samples then, {now['n']} now",
              "ids": "as many samples, other file names",
              "labels": "the same samples, other labels",
              "texts": "the same lines, other sentences"}[changed[0]]
    raise PretrainReuseError(
        f"{which} {str(spec)!r} changed since this experiment embedded it ({change}); its "
        "selections and runs were made from the data as it was: pass a new --out for the data "
        "as it is, or restore the data to resume this experiment")


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
