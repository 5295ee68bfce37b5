"""``pretrain-reuse demo``: both halves of the project on embedded data whose answers are known.

Two scenarios (``--scenario``):

- ``world`` (default): the procedural image world; it plants which pre-training classes a target
  task needs and which parts each class rule uses (the knowledge players are those parts).
- ``fashion``: real pixels. The pool mixes 10 Fashion-MNIST garment classes and 10 MNIST digit
  classes (``fashion-digits:pool``); the low-data target task tells apart the 4 upper-body
  garments from 40 images each, drawn from Fashion-MNIST's test split
  (``fashion-digits:target``). Its related pool classes are those 4 garments; the knowledge
  players are a 3x3 grid of patches. Needs ``apt-get install dataset-fashion-mnist``.

Stages (each writes into the run folder and is skipped when a rerun finds it finished):

1. ``pretrain``: a small CNN trained from scratch on the pool's classes (supervised).
2. ``embed``: features of the pre-training pool and the target training set.
3. ``units``: class means, and spherical k-means clusters as if the pool had no labels.
4. ``select``: UOT, greedy OT and random selection of classes and clusters, scored by recall of
   the known related classes.
5. ``finetune``: vanilla, reuse (UOT / greedy OT / random classes), reuse-unlabeled (UOT / random
   clusters), co-tuning, linear probe and scratch on the target task, over several seeds.
6. ``knowledge``: interactions of the pre-trained (linear probe), fine-tuned and scratch models on
   target test images (players: the world's parts, or grid patches): preserved / discarded / new knowledge,
   convergence over the snapshots of fine-tuning and of scratch training, faithfulness, the
   counterfactual check and each knowledge set alone. An analysis with a missing or damaged file
   is done again on a rerun.
7. ``sensitivity``: the same analysis with each baseline (zero, mean, blur), and how much the
   ratios move with it (:func:`~.knowledge.sensitivity.knowledge_sensitivity`; the games of the
   scenario's own baseline are the knowledge stage's).
8. ``report``: ``report.html`` (self-contained) and ``summary.json``.

A self-supervised pre-training variant is not part of the demo: a contrastive method needs far
more compute than the demo's ten CPU minutes to learn useful features; the unlabelled half of the
paper is covered by clustering the pool without its labels (stage 3) and ``reuse-unlabeled``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .artifacts import claim_folder, make_meta, read_json, releases_folders, write_json
from .data.catalog import open_dataset
from .embed import EmbedConfig, embed
from .errors import PretrainReuseError, check_choice
from .features import FeatureStore
from .finetune import FinetuneConfig, RunResult, finetune_datasets
from .knowledge.analysis import analyze_knowledge, load_analysis
from .knowledge.explain import ExplainConfig
from .knowledge.metrics import PAPER_RATIOS
from .knowledge.plots import other_image_levels
from .knowledge.sensitivity import KnowledgeSensitivity, knowledge_sensitivity
from .models import create_backbone
from .selection import SelectConfig, Selection, select
from .units import Units, class_means, spherical_kmeans

MODEL = "smallcnn"
#: The baselines the sensitivity stage compares (the learned one would fit one per sample and model).
SENSITIVITY_BASELINES = ("zero", "mean", "blur")


@dataclass(frozen=True)
class Scenario:
    """The data of a demo: the pre-training ``pool``, the ``target`` task (whose ``related``
    attribute names the pool classes it needs), the knowledge ``players`` and ``baseline``,
    k-means K, and how many times the plan's fine-tuning epochs to run (a smaller target set
    has fewer steps per epoch; the scale keeps the number of steps comparable)."""

    pool: str
    target: str
    players: str
    baseline: str
    clusters: int
    epochs_scale: int
    description: str


SCENARIOS = {
    "world": Scenario("synthetic:pretrain", "synthetic:target", "parts", "zero", 256, 1,
                      "the package's procedural image world, where the right answers are planted"),
    # baseline "mean", the explained images' mean image: black where the garments leave the
    # background black, where the mean colour ("zero") would paint every absent patch grey
    "fashion": Scenario("fashion-digits:pool", "fashion-digits:target", "grid:3x3", "mean", 64, 3,
                        "real pixels: a pool of Fashion-MNIST garments and MNIST digits, and a "
                        "low-data task on 4 upper-body garments from Fashion-MNIST's test split"),
}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run (``quick`` for tests, the default for the README)."""

    pretrain_epochs: int = 6
    finetune_epochs: int = 12
    seeds: tuple[int, ...] = (0, 1, 2)
    single_seed_modes: tuple[str, ...] = ("reuse-greedy-ot", "co-tuning", "linear-probe")
    explain_samples: int = 30


QUICK = DemoPlan(pretrain_epochs=2, finetune_epochs=4, seeds=(0,), single_seed_modes=(),
                 explain_samples=8)

#: Fine-tuning runs: name -> (mode, selection used or None).
RUNS = {
    "vanilla": ("vanilla", None),
    "reuse-uot": ("reuse", "classes-uot"),
    "reuse-random": ("reuse", "classes-random"),
    "reuse-greedy-ot": ("reuse", "classes-greedy-ot"),
    "reuse-unlabeled-uot": ("reuse-unlabeled", "clusters-uot"),
    "reuse-unlabeled-random": ("reuse-unlabeled", "clusters-random"),
    "co-tuning": ("co-tuning", None),
    "linear-probe": ("linear-probe", None),
    "scratch": ("scratch", None),
}
QUICK_RUNS = ("vanilla", "reuse-uot", "reuse-random", "linear-probe", "scratch")
#: Runs whose first seed saves snapshots: the knowledge stage's convergence curves of fine-tuning
#: and of scratch training (docs/knowledge.md §4).
SNAPSHOT_RUNS = ("vanilla", "scratch")
#: Weight of the source loss per mode. Labelled reuse uses the paper's MoCo value (1.0); the
#: unlabelled loss uses 0.3 because the strong view (RandAugmentMC + Cutout of up to half the
#: side, made for photos) often erases or recolours the parts a 32 px world image is classified
#: by. A validation grid over lr {0.003, 0.01, 0.03} x lambda {0.1, 0.3, 1} on the world (seeds
#: 0-2) picked lambda 0.3, 0.1, 0.1, never the official 1.0.
LAMBDA = {"reuse": 1.0, "reuse-unlabeled": 0.3, "co-tuning": 0.3}


class _Stages:
    """Runs named stages once: a stage found done (its marker file exists, mostly) is skipped on
    a rerun."""

    def __init__(self, out: Path, timing: dict[str, float], progress: bool):
        self.out, self.timing, self.progress = out, timing, progress

    def run(self, name: str, done: bool, build: Callable[[], Any]) -> None:
        if done:
            return
        if self.progress:
            print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        build()
        self.timing[name] = round(time.perf_counter() - t0, 2)
        write_json(self.out / "timing.json", self.timing)  # survives an interruption


@releases_folders
def run_demo(out: Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
             scenario: str = "world") -> dict:
    """Run (or resume) the demo of ``scenario`` into ``out``; returns and writes ``summary.json``."""
    plan = QUICK if quick else DemoPlan()
    scene = SCENARIOS[check_choice("scenario", scenario, SCENARIOS)]
    pool, target = open_dataset(scene.pool, split="train"), open_dataset(scene.target, split="train")
    # the version and every setting of the stages: a folder another version began (other epochs,
    # λ or K) would otherwise resume, mixing its finished stages with this version's
    claim_folder(out, "demo-run", {"quick": quick, "seed": seed, "scenario": scenario,
                                   "version": __version__, "plan": asdict(plan),
                                   "scenario_settings": asdict(scene), "lambda": LAMBDA},
                 what="a demo run")
    timing_file = out / "timing.json"
    timing: dict[str, float] = read_json(timing_file, "timing") if timing_file.exists() else {}
    stages = _Stages(out, timing, progress)
    target_test = open_dataset(scene.target, split="test")
    related = np.asarray(target.related)

    pre_dir = out / "pretrain"
    pre_cfg = FinetuneConfig(mode="scratch", epochs=plan.pretrain_epochs, batch_size=128, lr=0.1,
                             head_lr_mult=1.0, schedule="cosine", augment="flip", weight_decay=5e-4,
                             val_fraction=0.05, eval_every=plan.pretrain_epochs, seed=seed,
                             checkpoint_every=100)
    stages.run("pretrain", (pre_dir / "result.json").exists(), lambda: finetune_datasets(
        pre_cfg, model=MODEL, train_pool=pool, test_set=open_dataset(scene.pool, split="test"),
        out=pre_dir, progress=progress))
    weights = str(pre_dir / "model.safetensors")

    def embed_stage(data: str, name: str) -> None:
        stages.run(f"embed_{name}", (out / name / "index.json").exists(), lambda: embed(
            EmbedConfig(model=MODEL, data=data, weights=weights, batch_size=256), out / name,
            progress=progress))

    embed_stage(scene.pool, "features_pretrain")
    embed_stage(scene.target, "features_target")
    stages.run("units", (out / "units_clusters.safetensors").exists(),
               lambda: _units(out, scene.clusters, seed))
    classes, clusters = (Units.load(out / f"units_{k}.safetensors") for k in ("classes", "clusters"))
    target_units = class_means(FeatureStore.load(out / "features_target"))
    stages.run("select", (out / "selections" / "clusters-random.json").exists(),
               lambda: _select(out, classes, clusters, target_units, related, seed))

    runs = QUICK_RUNS if quick else tuple(RUNS)
    epochs = plan.finetune_epochs * scene.epochs_scale
    for name in runs:
        mode, sel = RUNS[name]
        for s in (plan.seeds[:1] if name in plan.single_seed_modes else plan.seeds):
            run_dir = out / "finetune" / f"{name}-seed{s}"
            # λ only where the mode reads it: finetune_datasets refuses an option it would ignore
            weight = {"lam": LAMBDA[mode]} if mode in LAMBDA else {}
            cfg = FinetuneConfig(mode=mode, epochs=epochs, batch_size=32, lr=0.01, **weight,
                                 augment="flip",
                                 eval_every=max(1, epochs // 6), seed=s,
                                 schedule="cosine", checkpoint_every=1000,
                                 # the convergence curves of the knowledge stage
                                 snapshots=name in SNAPSHOT_RUNS and s == plan.seeds[0])
            if mode == "linear-probe":
                cfg = replace(cfg, lr=0.1, head_lr_mult=1.0)
            stages.run(f"finetune_{name}_seed{s}", (run_dir / "result.json").exists(), lambda cfg=cfg,
                       sel=sel, run_dir=run_dir: finetune_datasets(
                           cfg, model=MODEL, weights=weights, train_pool=target,
                           test_set=target_test, source_pool=pool if sel else None,
                           selection=Selection.load(out / "selections" / f"{sel}.json") if sel else None,
                           units=clusters if sel and sel.startswith("clusters") else None,
                           out=run_dir, progress=progress))

    # an analysis with a missing or damaged file is done again (from its cached games)
    stages.run("knowledge", load_analysis(out / "knowledge") is not None,
               lambda: _knowledge(out, plan, seed, target_test, scene, progress))
    stages.run("sensitivity", _sensitivity_done(out / "knowledge_sensitivity"),
               lambda: _sensitivity(out, plan, seed, target_test, scene, progress))
    summary = _summary(out, plan, runs, related, timing, quick, seed)
    summary["scenario"] = {"name": scenario, **asdict(scene), "related": related.tolist(),
                           "pool_classes": len(pool.class_names)}
    # the writing process's versions and threads; each stage's artifacts record their own
    summary["meta"] = make_meta("demo", {"quick": quick, "scenario": scenario, "plan": asdict(plan),
                                         "lambda": LAMBDA}, seed=seed)
    write_json(out / "summary.json", summary)
    from .report import build_report

    build_report(out)
    return summary


def _units(out: Path, clusters: int, seed: int) -> None:
    store = FeatureStore.load(out / "features_pretrain")
    class_means(store).save(out / "units_classes.safetensors")
    unlabelled = replace(store, labels=None)  # the paper's unlabelled case: no ImageNet labels
    spherical_kmeans(unlabelled, clusters, seed=seed).save(out / "units_clusters.safetensors")


def _select(out: Path, classes: Units, clusters: Units, target: Units, related: np.ndarray,
            seed: int) -> None:
    share = float(np.isin(classes.assignment, related).mean())
    for method in ("uot", "greedy-ot", "random"):
        select(classes, target, SelectConfig(method=method, k=len(related), seed=seed)).save(
            out / "selections" / f"classes-{method}.json")
        select(clusters, target, SelectConfig(method=method, k=share, seed=seed)).save(
            out / "selections" / f"clusters-{method}.json")


def _knowledge_models(out: Path, seed: int) -> dict:
    """The roles of the knowledge analysis: the linear probe, vanilla fine-tuning and scratch."""
    return {role: create_backbone(MODEL, weights=str(out / "finetune" / f"{run}-seed{seed}" /
                                                     "model.safetensors"))
            for role, run in (("pretrained", "linear-probe"), ("finetuned", "vanilla"),
                              ("scratch", "scratch"))}


def _knowledge(out: Path, plan: DemoPlan, seed: int, test_set, scene: Scenario,
               progress: bool) -> None:
    def snapshots(run: str) -> list:  # in any order: the analysis orders them by their steps
        folder = out / "finetune" / f"{run}-seed{seed}" / "snapshots"
        return [create_backbone(MODEL, weights=str(p)) for p in folder.glob("*.safetensors")]

    cfg = ExplainConfig(players=scene.players, baseline=scene.baseline, samples=plan.explain_samples,
                        seed=seed)
    analyze_knowledge(_knowledge_models(out, seed), test_set, cfg, out / "knowledge",
                      checkpoints=snapshots("vanilla"), scratch_checkpoints=snapshots("scratch"),
                      split="test", progress=progress)


def _sensitivity(out: Path, plan: DemoPlan, seed: int, test_set, scene: Scenario,
                 progress: bool) -> None:
    # the scenario's own baseline first: the reference the others are compared with
    baselines = [scene.baseline, *(b for b in SENSITIVITY_BASELINES if b != scene.baseline)]
    cfg = ExplainConfig(players=scene.players, samples=plan.explain_samples, seed=seed)
    knowledge_sensitivity(_knowledge_models(out, seed), test_set, cfg, {"baseline": baselines},
                          out / "knowledge_sensitivity", split="test",
                          games_from=[out / "knowledge"], progress=progress)


def _sensitivity_done(folder: Path) -> bool:
    """The sensitivity stage finished and every analysis of it is intact (a damaged one is done
    again from its cached games, as the knowledge stage's)."""
    try:
        result = KnowledgeSensitivity.load(folder / "sensitivity.json")
    except PretrainReuseError:
        return False
    return all(load_analysis(folder / tag) is not None for tag in result.variants)


def _summary(out: Path, plan: DemoPlan, runs, related, timing, quick: bool, seed: int) -> dict:
    selection = {}
    clusters = Units.load(out / "units_clusters.safetensors")
    labels = FeatureStore.load(out / "features_pretrain").labels
    for path in sorted((out / "selections").glob("*.json")):
        sel = Selection.load(path)
        if path.stem.startswith("classes"):
            recall = sel.recall(related)
        else:  # clusters: the share of the related classes' samples that the clusters bring
            recall = sel.sample_recall(clusters, labels, related)
        selection[path.stem] = {"recall": recall, "k": len(sel.selected)}
    finetune = {}
    for name in runs:
        results = [RunResult.load(p) for p in sorted((out / "finetune").glob(f"{name}-seed*/result.json"))]
        final = np.array([r.final["top1"] for r in results])
        best = np.array([r.at_best_val["top1"] for r in results])
        finetune[name] = {"mode": RUNS[name][0], "top1_mean": float(final.mean()),
                          # undefined for one seed, as in an experiment's results
                          "top1_std": float(final.std(ddof=1)) if len(final) > 1 else None,
                          "top1_at_best_val_mean": float(best.mean()),
                          "seeds": [r.config["seed"] for r in results]}
    k = read_json(out / "knowledge" / "knowledge.json", "knowledge")
    overall = k["report"]["overall"]
    sensitivity = KnowledgeSensitivity.load(out / "knowledge_sensitivity" / "sensitivity.json")
    changes = sensitivity.differences()
    pre = RunResult.load(out / "pretrain" / "result.json")
    return {
        "selection": selection,
        "finetune": finetune,
        "knowledge": {
            **{name: overall[key]["mean"] for name, key in (
                ("preserved", "preserve"), ("discarded", "discard"), ("new", "new"),
                ("exclusive_vs_scratch", "exclusive")) if key in overall},
            # each ratio were the other model's salient interactions random
            "chance": {key: k["report"]["chance"][key]["mean"] for key in PAPER_RATIOS
                       if key in k["report"]["chance"]},
            # each ratio with the compared model's knowledge of another image
            "other_image": {key: level["mean"] for key, level in other_image_levels(k).items()
                            if key in PAPER_RATIOS},
            "faithfulness_error": {r: f["max"] for r, f in k["faithfulness"].items()},
            "counterfactual": k["counterfactual"],
            # each set of the fine-tuned model's knowledge alone: fidelity R², share of the output
            "set_alone": {name: {m: a[m]["mean"] for m in ("fidelity", "share")}
                          for name, a in k["ablation"].items()},
            "samples": k["samples"]["n"],
            # each set's share of interactions of neighbouring players, and chance's
            **({"contiguity": {name: {m: c[m] for m in ("contiguous_share", "chance_share")}
                               for name, c in k["contiguity"].items()}}
               if "contiguity" in k else {}),
            # world only: precision / recall of the salient interactions against the class rules
            **({"ground_truth": {role: {m: g["overall"][m]["mean"] for m in ("precision", "recall")}
                                 for role, g in k["ground_truth"].items()}}
               if "ground_truth" in k else {}),
        },
        # the ratios with each baseline, and their paired change from the scenario's own
        "knowledge_by_baseline": {
            row["baseline"]: {
                **{name: row[key] for name, key in (("preserved", "preserve"), ("new", "new"))},
                **{f"{name}_change": changes[row["variant"]][key]
                   for name, key in (("preserved", "preserve"), ("new", "new"))
                   if row["variant"] in changes}}
            for row in sensitivity.rows()},
        "pretrain": {"top1": pre.final["top1"]},
        "timing_s": timing,
        "plan": asdict(plan),
        "quick": quick,
        "seed": seed,
    }
