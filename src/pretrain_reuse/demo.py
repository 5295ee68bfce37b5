"""``pretrain-reuse demo``: the pipeline on generated data whose answer is known.

Today it covers the selection half on the planted feature world
(:func:`~pretrain_reuse.data.synthetic.feature_world`): class units and spherical k-means clusters
of the pre-training pool, then UOT, greedy-OT and random selection, scored by their recall of the
planted related classes. Every stage writes its artifact into the run folder and is skipped when a
rerun finds it there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import read_json, write_json
from .data.synthetic import feature_world
from .errors import PretrainReuseError
from .selection import SelectConfig, Selection, select
from .units import Units, class_means, spherical_kmeans

METHODS = (("uot", "cosine"), ("greedy-ot", "cosine"), ("greedy-ot", "l2"), ("random", "cosine"))


def _stage(path: Path, build: Callable[[], Any], load: Callable[[Path], Any], timing: dict,
           name: str):
    """Load ``path`` if an earlier run finished it, otherwise build, save and time it."""
    if path.exists():
        return load(path)
    t0 = time.perf_counter()
    obj = build()
    obj.save(path)
    timing[name] = round(time.perf_counter() - t0, 3)
    return obj


def run_demo(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the demo into ``out`` and return (and write) ``summary.json``."""
    _claim_run_dir(out, {"quick": quick, "seed": seed})
    timing: dict[str, float] = {}
    sizes = dict(n_groups=20, classes_per_group=10, n_hubs=10) if quick else {}
    t0 = time.perf_counter()
    world = feature_world(seed=seed, **sizes)
    timing["data"] = round(time.perf_counter() - t0, 3)
    related = set(world.related.tolist())

    classes = _stage(out / "pretrain_classes.safetensors", lambda: class_means(world.pretrain),
                     Units.load, timing, "units_classes")
    target = _stage(out / "target_classes.safetensors", lambda: class_means(world.target),
                    Units.load, timing, "units_target")
    n_clusters = 2 * len(classes)  # over-cluster, like 2000 clusters for 1000 ImageNet classes
    clusters = _stage(out / "pretrain_clusters.safetensors",
                      lambda: spherical_kmeans(world.pretrain, n_clusters, seed=seed),
                      Units.load, timing, "units_clusters")

    summary: dict[str, Any] = {"selection": {}, "world": {
        "pretrain_classes": len(classes), "target_classes": len(target),
        "related_classes": len(related), "hub_classes": len(world.hubs), "clusters": n_clusters}}
    related_samples = np.isin(world.pretrain.labels, world.related)
    fraction = related_samples.mean()
    for method, metric in METHODS:
        tag = f"{method}-{metric}"
        cfg = SelectConfig(method=method, metric=metric, k=len(related), seed=seed,
                           eps_c=0.01 if metric == "cosine" else 0.1)
        sel = _stage(out / f"select_classes_{tag}.json", partial(select, classes, target, cfg),
                     Selection.load, timing, f"select_classes_{tag}")
        # Unlabelled pool: select clusters covering the share of samples the related classes hold,
        # then score the samples that come with them.
        ccfg = SelectConfig(method=method, metric=metric, k=float(fraction), seed=seed,
                            eps_c=cfg.eps_c)
        csel = _stage(out / f"select_clusters_{tag}.json", partial(select, clusters, target, ccfg),
                      Selection.load, timing, f"select_clusters_{tag}")
        taken = np.isin(clusters.assignment, csel.selected)
        summary["selection"][tag] = {
            "recall": sel.recall(related),
            "hubs_selected": len(set(sel.selected) & set(world.hubs.tolist())),
            "clusters_sample_recall": float((taken & related_samples).sum() / related_samples.sum()),
            "clusters_sample_precision": float((taken & related_samples).sum() / max(taken.sum(), 1)),
        }
    if not (out / "uot_scores.png").exists():
        _plot_scores(out, world.related)
    old = read_json(out / "summary.json", "summary") if (out / "summary.json").exists() else {}
    summary["timing_s"] = {**old.get("timing_s", {}), **timing}
    summary["seed"] = seed
    summary["quick"] = quick
    write_json(out / "summary.json", summary)
    return summary


def _claim_run_dir(out: Path, params: dict) -> None:
    """Mark ``out`` as a demo run with ``params``; refuse to resume a run made with others."""
    marker = out / "run.json"
    if marker.exists():
        old = read_json(marker, "run marker")
        if old.get("params") != params:
            raise PretrainReuseError(
                f"{str(out)!r} holds a demo run with {old.get('params')}, not {params}; pass "
                "another --out or delete that folder"
            )
        return
    if out.exists() and not out.is_dir():
        raise PretrainReuseError(f"--out {str(out)!r} is a file; pass a folder for the run")
    if out.exists() and any(out.iterdir()):
        raise PretrainReuseError(f"{str(out)!r} is not empty and not a demo run; pass another --out")
    write_json(marker, {"kind": "demo-run", "params": params})


def _plot_scores(out: Path, related: np.ndarray) -> None:
    """Sorted UOT scores with the related classes marked (Liu et al., Fig. 2b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = Selection.load(out / "select_classes_uot-cosine.json")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sel.plot(ax, relevant=related)
    ax.set_title("UOT score of every pre-training class (sorted)")
    fig.tight_layout()
    fig.savefig(out / "uot_scores.png", dpi=110)
    plt.close(fig)
