"""Hyper-parameter grid search on the validation split (Liu et al. search lr x λ x weight decay).

Every combination is an ordinary, resumable fine-tuning run in its own sub-folder; the winner is
the run with the best validation top-1 at its best-validation evaluation. The test split is only
reported, never used to choose.
"""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, get_type_hints

from ..artifacts import atomic_path, claim_folder, make_meta, releases_folders, write_json
from ..configs import parse_sweep
from ..errors import PretrainReuseError
from .config import FinetuneConfig
from .loop import RESUMABLE_WITH_OTHER, RunResult

#: Fields that decide which images validate (:func:`~.run.target_splits`): runs of a grid over
#: them would be picked on different validation sets.
SPLIT_FIELDS = ("seed", "val_fraction", "train_fraction", "long_tail_ratio", "long_tail_order")


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["lr=0.001,0.01", "lam=0.3,1"]`` -> ``{"lr": [0.001, 0.01], "lam": [0.3, 1.0]}``, values
    typed like the config field they set."""
    return parse_sweep(specs, get_type_hints(FinetuneConfig), "--grid", "lr=0.001,0.01")


@releases_folders
def grid_search(cfg: FinetuneConfig, grid: dict[str, list[Any]], out: str | Path,
                run: Callable[[FinetuneConfig, Path], RunResult],
                check: Callable[[FinetuneConfig], int],
                given: Collection[str] | None = None) -> dict[str, Any]:
    """Run ``run(cfg_with_values, folder)`` for every combination of ``grid`` and pick the best
    on validation (the first in grid order among runs tied with it, which ``tied_with_best``
    names); writes ``grid.csv`` and ``grid.json`` (the winner and every row) into ``out``.
    ``out`` must be new, empty or a grid search's (:func:`~pretrain_reuse.artifacts.claim_folder`),
    whose runs a rerun resumes.

    ``check(cfg_with_values)`` makes every check of a run without running it and returns its
    number of validation images: all combinations are checked before the first run, not after
    hours of the others. A field of ``grid`` that ``cfg`` sets is refused, as the grid would
    override it unseen: one of the fields ``given`` (those a flag or the config file set), or,
    without ``given``, one ``cfg`` holds at other than its default; so are the
    fields that decide which images validate (:data:`SPLIT_FIELDS`), and those that do not
    change what a run computes (``workers``, ``checkpoint_every``)."""
    if not grid:
        raise PretrainReuseError("the grid is empty; pass --grid FIELD=V1,V2")
    defaults = FinetuneConfig()
    for name in grid:
        flag = "--" + name.replace("_", "-")
        if name in SPLIT_FIELDS:
            raise PretrainReuseError(
                f"--grid cannot vary {name}: it also decides which images validate, so the runs "
                f"would be picked on different validation sets; run one grid per {flag} value")
        if name in RESUMABLE_WITH_OTHER:
            raise PretrainReuseError(f"--grid cannot vary {name}: it does not change what a run "
                                     f"computes; set it once with {flag}")
        if name in given if given is not None else getattr(cfg, name) != getattr(defaults, name):
            raise PretrainReuseError(
                f"--grid varies {name}, but the config also sets {name}={getattr(cfg, name)!r} (a "
                "flag or the config file); drop one of them")
    out = Path(out)
    names = sorted(grid)
    settings = [dict(zip(names, values, strict=True))
                for values in itertools.product(*(grid[n] for n in names))]
    configs = [replace(cfg, **setting) for setting in settings]
    tags = [",".join(f"{k}={v}" for k, v in setting.items()) for setting in settings]
    # every run's checks warn alike (a selection made for other data): each warning is shown
    # once, after the checks (an error stays the only message), and not again by the runs
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for tag, c in zip(tags, configs, strict=True):
            if c.val_fraction == 0:
                raise PretrainReuseError("grid search picks on the validation split; set "
                                         "val_fraction > 0")
            if check(c) == 0:  # a data regime can train on every image and leave none for it
                raise PretrainReuseError(
                    f"grid search picks on the validation split, but run {tag} would have no "
                    "validation images (its data regime trains on every image); give the grid "
                    "other regimes")
    shown: dict[tuple[str, type], warnings.WarningMessage] = {}
    for w in seen:
        shown.setdefault((str(w.message), w.category), w)
    for w in shown.values():
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # claimed once every combination has passed its checks: a refused grid writes nothing. The
    # marker records no settings, as each run refuses other settings on a rerun; a rerun with
    # more values reuses the runs the two grids share. Versions before it wrote no marker: a
    # folder of theirs holds only this grid's runs and results.
    claim_folder(out, "grid-run", {}, what="a grid search", early=(*tags, "grid.csv", "grid.json"))
    rows, inputs = [], {}
    with warnings.catch_warnings():
        for text, category in shown:
            warnings.filterwarnings("ignore", message=re.escape(text) + "$", category=category)
        results = [run(c, out / tag) for c, tag in zip(configs, tags, strict=True)]
    for setting, tag, result in zip(settings, tags, results, strict=True):
        inputs = inputs or result.meta["inputs"]  # the runs differ in settings only
        best = result.at_best_val
        rows.append({**setting, "run": tag, "val_top1": best["val"]["top1"],
                     "test_top1_at_best_val": best["top1"], "test_top1_final": result.final["top1"],
                     "best_step": best["step"]})
    winner = max(rows, key=lambda r: r["val_top1"])  # the first in grid order among ties
    # a small validation split ties often; which run won is then the grid's order, not the data
    tied = [r["run"] for r in rows if r["val_top1"] == winner["val_top1"] and r is not winner]
    with atomic_path(out / "grid.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"kind": "grid", "grid": grid, "selected_by": "validation top-1",
               "best": winner, "tied_with_best": tied, "rows": rows,
               "meta": make_meta("finetune.grid", {"grid": grid, "config": cfg.to_dict()},
                                 inputs=inputs, seed=cfg.seed)}
    write_json(out / "grid.json", summary)
    return summary
