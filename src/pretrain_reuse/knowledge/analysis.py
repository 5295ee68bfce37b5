r"""``knowledge``: what pre-training hands to the fine-tuned model, end to end.

Explains the pre-trained model (its linear probe on the target classes), the fine-tuned model and,
optionally, a model trained from scratch and fine-tuning checkpoints, on the *same* samples with
the *same* players and baseline; then reports (Jiang, Cheng & Li, arXiv 2410.08455, with the
definitions of ``docs/knowledge.md``):

- preserved / discarded / new knowledge and its exclusivity against the scratch model
  (:func:`~.metrics.knowledge_report`), overall and by interaction order, each ratio beside its
  chance level and its other-image control: the ratio with the compared model's games of another
  image (:func:`~.metrics.other_image_control`);
- how discriminative each of these sets is: the discrimination power of its interactions over
  the samples of a class (:func:`~.metrics.set_discrimination`, docs/knowledge.md §3);
- convergence of knowledge over the snapshots of fine-tuning and of scratch training, each
  towards its run's final model (:func:`~.metrics.knowledge_convergence`, docs/knowledge.md §4
  [recon]), over the training step each snapshot records (``first_at_threshold`` is a step);
- faithfulness of every model's salient interactions (their sum against v on all 2^n masks);
- each knowledge set of the fine-tuned model alone (:func:`~.metrics.set_ablation`): how well
  its preserved, its new (and its exclusive) interactions alone reproduce its output on all 2^n
  masks, the share of the output on the whole input each accounts for, and whether each alone
  keeps the model's decision;
- a counterfactual check the paper lacked: removing the players of a preserved interaction
  changes the fine-tuned model's output by ``v(N) - v(N \ S)``, which its salient interactions
  predict as ``sum_{AND T ∩ S ≠ ∅} I(T) + sum_{OR ∅ ≠ T ⊆ S} I(T)``; removing as many random
  players serves as the control; reported as the effect ratio and the rank (Spearman)
  correlation of predicted and measured changes (docs/knowledge.md §5), Pearson's beside it;
- with ``players="parts"`` on the synthetic world, whose class rules are known: precision and
  recall of every model's salient interactions against the rule's interactions
  (:func:`~.recovery.ground_truth_recovery`).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import make_meta, make_run_folder, read_json, releases_folders, write_json
from ..data.catalog import check_out_outside
from ..data.datasets import ImageDataset
from ..data.text import TextDataset
from ..errors import PretrainReuseError, check_choice, is_integer, preview
from ..figures import save_png
from ..models import Backbone, finetune_mode, state_hash, weights_meta, weights_path
from .contiguity import contiguity, player_adjacency
from .explain import (
    MARKER,
    MARKER_KIND,
    SHOWN,
    ExplainConfig,
    Games,
    _remove_stale,
    check_classifier,
    check_explainable,
    check_objects,
    check_outputs,
    check_rerun,
    choose_samples,
    data_path,
    decompose,
    display_samples,
    explain,
    explain_games,
    explainable,
    intact_explanations,
    model_classes,
    model_identity,
    record_added_settings,
    recorded_identity,
    rerun_identity,
    sample_order,
    sample_players,
    save_explanations,
    with_games,
)
from .interactions import orders
from .metrics import (
    MATCHES,
    _pearson,
    _ranks,
    knowledge_convergence,
    knowledge_report,
    other_image_control,
    other_sample_partners,
    set_ablation,
    set_discrimination,
)
from .plots import purity_is_informative, salient_figure, save_knowledge_plots
from .recovery import ground_truth_recovery, rule_game
from .sparsify import joint_and_or_interactions
from .values import Interactions, check_tau

ROLES = ("pretrained", "finetuned", "scratch")
#: The ``kind`` of ``knowledge.json``, by which a reader recognises it.
KIND = "knowledge-report"
#: The snapshot series of :func:`analyze_knowledge` (its parameters): the role of the model their
#: run ended with, the ``knowledge.json`` entry of their convergence curve and their folders'
#: prefix.
SERIES = {"checkpoints": ("finetuned", "convergence", "checkpoint"),
          "scratch_checkpoints": ("scratch", "scratch_convergence", "scratch-checkpoint")}
#: What an analysis writes into its folder (name patterns): a folder holding only these is an
#: analysis whose ``knowledge.json`` is missing (stopped before writing it, or deleted), which a
#: rerun finishes; a rerun deletes those of them it does not write again.
OUTPUTS = (*ROLES, *(f"{prefix}-*" for _, _, prefix in SERIES.values()), "strength_by_order.png",
           "ratios.png", "ratios_by_order.png", "purity.png", "convergence.png", "preserved.png")
#: The modes of ``finetune`` (``meta.params.mode`` of the model it writes) that fit each role: the
#: pre-trained model is the linear probe on its frozen backbone, the fine-tuned model any mode
#: that trains the pre-trained backbone on the target, the scratch model a scratch training.
#: Written out (knowledge may not import finetune); a test checks that it covers every mode.
ROLE_MODES = {"pretrained": ("linear-probe",),
              "finetuned": ("vanilla", "reuse", "reuse-unlabeled", "co-tuning"),
              "scratch": ("scratch",)}


#: The entries of ``knowledge.json`` that this version writes and the report reads, as dotted paths
#: (``*``: every entry of a mapping; ``?``: an optional part, whose entries are read only when it
#: is there): a summary lacking one was written by an earlier version (:func:`load_analysis`).
SUMMARY_KEYS = (
    "samples.n", "samples.asked", "samples.screened", "samples.correct_for_all",
    "report.overall.*.mean", "report.overall.*.std", "report.chance",
    "other_image",  # None for a single sample
    *(f"report.by_order.*.{n}.{e}" for n in ("preserve", "discard", "new") for e in ("mean", "n_used")),
    "strength_by_order", "meta.inputs.models.*.weights",
    "faithfulness.*.max", "faithfulness.*.mean", "faithfulness.*.max_over_samples",
    "counterfactual.n_sets",
    *(f"ablation.{name}.{e}" for name in ("salient", "preserve", "new")
      for e in ("items", "fidelity.mean", "share.mean", "error.mean", "same_decision.mean")),
    *(f"{curve}?.{e}" for curve in ("convergence", "scratch_convergence")
      for e in ("measure", "threshold", "steps", "similarity", "detour", "auc",
                "first_at_threshold", "n_decreases", "total_detour")),
    "ground_truth?.*.n_samples", "ground_truth?.*.overall.precision.mean",
    "ground_truth?.*.overall.recall.mean", "ground_truth?.*.overall.signed_recall.mean",
)


def missing_entry(record: Any, key: str) -> str | None:
    """The first entry along the dotted path ``key`` (see :data:`SUMMARY_KEYS`) that ``record``
    lacks, as a dotted path; None when all are there."""
    return _missing(record, key.split("."), "")


def _missing(record: Any, parts: list[str], where: str) -> str | None:
    if not parts:
        return None
    head, optional = parts[0].removesuffix("?"), parts[0].endswith("?")
    if not isinstance(record, dict):
        return where + head
    if head == "*":
        entries = record.items()
    elif head in record:
        entries = [(head, record[head])]
    else:
        return None if optional else where + head
    for key, value in entries:
        missing = _missing(value, parts[1:], f"{where}{key}.")
        if missing is not None:
            return missing
    return None


class KnowledgeWarning(UserWarning):
    """A doubt about the models given to :func:`analyze_knowledge` that does not stop it (the
    same network in two roles, a model trained in the mode of another role, snapshots that
    record no run); the CLI prints each as one ``warning:`` line."""


def correct_mask(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                 candidates: np.ndarray, device: torch.device) -> np.ndarray:
    """Which of ``candidates`` every model (``{role: model}``) classifies correctly (bool over the
    dataset), each reading the labels in its own numbering (:func:`~.explain.model_classes`); an
    unreadable image is not. Refuses a model whose output is not finite, naming it
    (:func:`~.explain.check_outputs`)."""
    ok = np.zeros(len(dataset), bool)
    views = {role: model_classes(m, dataset) for role, m in models.items()}
    ok[candidates] = np.logical_and.reduce(list(_correct_by_role(models, views, candidates,
                                                                 device).values()))
    return ok


def _correct_by_role(models: dict[str, Backbone], views: dict[str, ImageDataset | TextDataset],
                     candidates: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """Per role, which of ``candidates`` its model classifies correctly (bool over them), on
    the role's view of the data (its labels in the model's numbering), as :func:`correct_mask`
    reads them."""
    right = {}
    for role, model in models.items():
        logits, readable = check_outputs(model, views[role], candidates, role, device)
        right[role] = readable & (logits.argmax(1) == views[role].labels[candidates])
    return right


def counterfactual(x: Interactions, sets: list[int], tau: float, rng: np.random.Generator
                   ) -> dict[str, Any]:
    """Measured vs predicted output change when the players of each set in ``sets`` (bitmasks)
    are removed from the full input, against random sets of the same sizes."""
    full = (1 << x.n) - 1
    salient = x.salient(tau)
    # the salient interactions as arrays (one scan of all 2^n coalitions per sample, not per set)
    masks = {kind: np.array([t for (k, t) in salient if k == kind], dtype=np.int64)
             for kind in ("and", "or")}
    values = {kind: np.array([v for (k, _), v in salient.items() if k == kind])
              for kind in ("and", "or")}
    keys = np.arange(1 << x.n)
    sizes = orders(x.n)

    def change(s: int) -> tuple[float, float]:
        """An AND interaction is lost when the set removes any of its players, an OR one when
        it removes all of them."""
        measured = x.v[full] - x.v[full ^ s]
        lost = np.concatenate([values["and"][(masks["and"] & s) != 0],
                               values["or"][(masks["or"] != 0) & ((masks["or"] & ~s) == 0)]])
        return float(measured), math.fsum(lost)

    chosen = [change(s) for s in sets]
    random_sets = [int(rng.choice(keys[sizes == bin(s).count("1")])) for s in sets]
    control = [change(s) for s in random_sets]
    return {"preserved": chosen, "random": control}


def holds_games(folder: Path) -> bool:
    """Whether ``folder`` is an analysis's folder that holds the cached games of a role."""
    return any((folder / role / "games").is_dir() for role in ROLES)


def games_folders(folders: Any) -> list[Path]:
    """``folders`` (``games_from``: earlier analyses' folders) as paths, each holding games: a
    wrong path would silently compute every game again. A single path, which would be read
    letter by letter, or another type is one line."""
    if isinstance(folders, str | Path) or not isinstance(folders, Sequence) \
            or not all(isinstance(f, str | Path) for f in folders):
        raise PretrainReuseError(f"games_from must be a list of folders (paths), got {folders!r}")
    folders = [Path(f) for f in folders]
    for folder in folders:
        if not holds_games(folder):
            raise PretrainReuseError(
                f"games_from (--games-from) {folder} holds no games of a knowledge analysis "
                f"({folder}/<role>/games); pass the out folder of an earlier knowledge analysis "
                "of these models")
    return folders


def _check_analysis(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                   cfg: ExplainConfig, *, tau: float, match: str, candidates: int = 400,
                   snapshots: Mapping[str, Backbone] | None = None) -> None:
    """Every check of :func:`analyze_knowledge`'s arguments that needs no game: the roles'
    models (classifiers over ``dataset``'s classes, numbered as each numbers them, that the
    players of ``cfg`` fit), the snapshots' objects (``{name in errors: model}``), ``tau``,
    ``match`` and ``candidates``. Run before the interactions are computed: a typo must not
    cost minutes, or leave files."""
    if not isinstance(models, Mapping):
        raise PretrainReuseError(f"models must be a dict of the roles' models, {{'pretrained': "
                                 f"..., 'finetuned': ..., 'scratch': ...}}, got {type(models).__name__}")
    for role in models:  # a misspelt role would be explained at full cost, then left out
        check_choice("a role of models", role, ROLES)
    missing = {"pretrained", "finetuned"} - models.keys()
    if missing:
        raise PretrainReuseError(f"knowledge needs the {' and '.join(sorted(missing))} model(s)")
    check_objects({**models, **(snapshots or {})}, dataset, cfg)
    check_choice("match", match, MATCHES)
    check_tau(tau)
    if not (is_integer(candidates) and candidates >= 1):
        raise PretrainReuseError(f"candidates={candidates!r} must be an integer >= 1 (samples "
                                 "screened at a time)")
    for role, m in models.items():
        check_classifier(m, model_classes(m, dataset, role), cfg, role)


@releases_folders
def analyze_knowledge(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                      cfg: ExplainConfig, out: str | Path, *, checkpoints: list[Backbone] | None = None,
                      scratch_checkpoints: list[Backbone] | None = None, tau: float = 0.05,
                      match: str = "support", candidates: int = 400, split: str | None = None,
                      games_from: Sequence[str | Path] = (), progress: bool = True,
                      check_only: bool = False) -> dict[str, Any] | None:
    """Run the analysis into ``out`` and return (and write ``knowledge.json``) its summary.

    ``out`` must be new, empty or the folder of an earlier analysis (it holds ``knowledge.json``,
    or only files an analysis writes: a run stopped before writing its summary, or one whose
    summary was deleted). ``knowledge.json`` records what the analysis was given (from its
    start: :func:`~.explain.rerun_identity` of its settings, data, models and snapshots): a
    rerun with other settings or inputs is refused before anything is written, as it would
    overwrite that analysis (finished or not). In the folder of an earlier version, which
    records none, the outputs of the earlier run that this run does not rewrite (the folder of
    a scratch model or of checkpoints no longer given, their figures) are deleted.
    An earlier analysis's damaged or missing files are simply written again (its cached games
    make that cheap; a cached game whose v(N) or v(∅) the model no longer gives is computed
    again). A rerun of a finished analysis with the same settings and inputs whose files are all
    intact (:func:`finished_analysis`) returns its summary and writes nothing. Every model is
    checked (a classifier over the data's classes with finite outputs, players that fit its
    input) before anything is written. Doubts that do not stop the
    analysis are :class:`KnowledgeWarning` s: the same network in two roles, a model whose
    weights file records a ``finetune`` mode that does not fit its role (:data:`ROLE_MODES`:
    a fine-tuned model given as the pre-trained one), snapshots that record no run.

    Args:
        models: ``{"pretrained": ..., "finetuned": ..., "scratch": ...}`` (scratch optional), each
            a classifier over ``dataset``'s classes (the pre-trained backbone with its linear probe).
        dataset: labelled target data (usually the test split).
        cfg: players, baseline, decomposition, number of samples. With
            ``decomposition="joint-and-or"`` the compared models (``models``) are sparsified
            together, but every checkpoint is sparsified on its own (AND-OR, as ``"and-or"``):
            one joint problem over the checkpoints would pull their supports together and so
            bias the similarity the convergence curve measures. ``knowledge.json``'s meta
            records the checkpoints' decomposition as ``checkpoint_decomposition``.
        checkpoints: snapshots of the fine-tuning run that made ``models["finetuned"]``
            (``finetune --snapshots``), in any order: they are ordered by the training step each
            records, and refused when one records no step, two record the same step, they
            record different runs (snapshots of two runs in one folder) or the last is not
            ``models["finetuned"]`` (a run's last snapshot is its final model). Snapshots of
            an earlier version record no run: they are read, with a warning that only their
            steps and their last model are checked. Gives the convergence curve of
            docs/knowledge.md §4 (``knowledge.json``'s ``convergence``).
        scratch_checkpoints: likewise, the snapshots of the scratch training that made
            ``models["scratch"]``: the scratch curve (``scratch_convergence``) that the
            fine-tuning curve is compared with.
        tau: salience threshold relative to each sample's largest interaction.
        candidates: samples screened at a time for being correct under every model (one
            forward pass of each model over them); screening goes on until ``cfg.samples``
            samples are correct for every model or every sample has been screened.
        split: the split ``dataset`` was opened from (recorded in the meta; the dataset does
            not know it).
        games_from: folders of other analyses whose cached games this one may take instead of
            computing them (a game is named by its model, sample, players, baseline and output,
            so only the same game is taken): analyses that differ only in ``tau``, ``match`` or
            the decomposition share their games (:func:`~.sensitivity.knowledge_sensitivity`).
        check_only: make every check of a run, the samples screened and the rerun of ``out``
            included, and return None without writing anything (a finished analysis in ``out``
            passes): several analyses are checked before the first runs.
    """
    given = {name: list(snaps or []) for name, snaps in
             (("checkpoints", checkpoints), ("scratch_checkpoints", scratch_checkpoints))}
    _check_analysis(models, dataset, cfg, tau=tau, match=match, candidates=candidates,
                   snapshots={f"{name}[{t}]": m for name, snaps in given.items()
                              for t, m in enumerate(snaps)})
    games_from = games_folders(games_from)
    out = Path(out)
    check_out_outside(out, {"--data": data_path(dataset)})
    device = torch.device(cfg.device)
    series = {name: _ordered_snapshots(name, snaps, models.get(SERIES[name][0]))
              for name, snaps in given.items() if snaps}
    named = {**models, **{_snapshot_role(name, t): m for name, snaps in series.items()
                          for t, m in enumerate(snaps)}}
    # each model explains a sample's class as its own output, as explain does: named labels
    # numbered as it numbers its classes (the class names its finetune run recorded, or its
    # id2label), so that a classifier trained elsewhere compares with one trained here. A
    # snapshot, which records no class names, numbers them as the model its run ended with.
    # The fine-tuned model's numbering is the analysis's (its summary's labels)
    views = {role: model_classes(m, dataset) for role, m in models.items()}
    views.update({_snapshot_role(name, t): views[SERIES[name][0]]
                  for name, snaps in series.items() for t in range(len(snaps))})
    dataset = views["finetuned"]
    for name, snaps in series.items():  # the models themselves were checked above
        for t, m in enumerate(snaps):
            role = _snapshot_role(name, t)
            check_classifier(m, views[role], cfg, role)
    params = {"tau": tau, "split": split}
    identity = rerun_identity(named, dataset, {**asdict(cfg), **params, "match": match,
                                               "candidates": candidates})
    check_rerun(out, "knowledge.json", identity, "a knowledge analysis",
                another=f"pass another --out (with --games-from {out} to take the games it "
                "computed, which another --tau, --match or --decomposition shares)")
    done = finished_analysis(out, identity, dataset, cfg)
    if done is not None and check_only:
        return None
    if done is not None:  # the same analysis, finished and intact: nothing to do
        record_added_settings(out / "knowledge.json", identity, "a knowledge analysis")
        for doubt in _doubts(models, series):
            warnings.warn(doubt, KnowledgeWarning, stacklevel=3)
        return done
    order = sample_order(dataset, cfg.seed, keep=explainable(models["finetuned"], dataset, cfg))
    correct, screened = np.zeros(len(dataset), bool), 0
    right = dict.fromkeys(models, 0)  # samples each model classifies correctly, of those screened
    while screened < len(order) and correct.sum() < cfg.samples:
        chunk = order[screened:screened + candidates]
        by_role = _correct_by_role(models, views, chunk, device)
        correct[chunk] = np.logical_and.reduce(list(by_role.values()))
        right = {role: right[role] + int(ok.sum()) for role, ok in by_role.items()}
        screened += len(chunk)
    if not correct.any():  # every sample was screened
        counts = ", ".join(f"{role} {n}" for role, n in right.items())
        raise PretrainReuseError(
            f"none of the {screened} samples is classified correctly by every model (correct of "
            f"them: {counts}); the weakest model may need more training (train it longer or "
            "better), or pass more data to screen (knowledge's --data and --split; an "
            "experiment's target_test); check too that every model was trained on this data's "
            "classes")
    indices = choose_samples(dataset, cfg.samples, cfg.seed, keep=correct)
    for role, m in named.items():
        check_explainable(m, views[role], indices, cfg, role, device)
    if check_only:
        return None
    folders = [*models, *(_snapshot_folder(name, t) for name, snaps in series.items()
                          for t in range(len(snaps)))]
    marker = make_run_folder(out, "a knowledge analysis", "knowledge.json",
                             early=_earlier_outputs(out), kind=KIND)
    for doubt in _doubts(models, series):  # after the checks: an error stays the only message
        warnings.warn(doubt, KnowledgeWarning, stacklevel=3)
    if marker.exists():
        # a model's folder of this analysis whose explain.json was lost is still its own
        for name in folders:
            if (out / name).is_dir() and not (out / name / MARKER).exists():
                write_json(out / name / MARKER, {"kind": MARKER_KIND, "finished": False})
    # this run (re)writes the files model by model: until its own summary is written, the
    # folder must not read as a finished analysis, and a rerun with other settings is refused
    write_json(marker, {"kind": KIND, "finished": False, "identity": identity})
    games = {role: explain_games(m, views[role], indices, cfg, out / role, role=role, params=params,
                                 games_from=[f / role for f in games_from], progress=progress)
             for role, m in models.items()}
    explained = (_joint(games, cfg.noise_bound) if cfg.decomposition == "joint-and-or" else
                 {role: decompose(g, cfg) for role, g in games.items()})
    for role, xs in explained.items():
        save_explanations(xs, models[role], views[role], cfg, out / role, tau)
    report = knowledge_report(explained["pretrained"], explained["finetuned"],
                              explained.get("scratch"), tau=tau, match=match)
    labels = [int(dataset.labels[i]) for i in indices]
    summary: dict[str, Any] = {
        "kind": KIND,
        "identity": identity,
        "samples": {"n": len(indices), "asked": cfg.samples, "screened": screened,
                    "correct_for_all": int(correct.sum()),
                    "per_class": {str(c): labels.count(c) for c in sorted(set(labels))},
                    "ids": [dataset.ids[i] for i in indices]},
        "report": report.to_dict(),
        "discrimination": set_discrimination(report, labels).to_dict(),
        "faithfulness": {role: faithfulness_summary(xs, tau) for role, xs in explained.items()},
        "strength_by_order": {role: _strength_by_order(xs) for role, xs in explained.items()},
        "other_image": _other_image(games, explained, labels, cfg, tau, match),
        "counterfactual": _counterfactual_summary(report, explained["finetuned"], tau, cfg.seed),
        "ablation": set_ablation(report, explained["finetuned"]).to_dict(),
        "ablation_pretrained": set_ablation(report, explained["pretrained"], model="pretrained").to_dict(),
    }
    if cfg.players != "tokens":
        size = tuple(models["finetuned"].spec.input_size)
        summary["contiguity"] = contiguity(report, [player_adjacency(
            sample_players(dataset, int(i), cfg, size).masks) for i in indices]).to_dict()
    if cfg.players == "parts" and hasattr(dataset, "scene"):
        summary["ground_truth"] = _ground_truth(dataset, indices, explained, tau)
    inputs = {"data": dataset.source, "data_path": data_path(dataset),
              "models": {role: _model_inputs(xs[0]) for role, xs in explained.items()}}
    for name, snaps in series.items():
        curve = [explain(m, views[_snapshot_role(name, t)], indices, cfg,
                         out / _snapshot_folder(name, t),
                         role=_snapshot_role(name, t), tau=tau, split=split, progress=progress,
                         games_from=[f / _snapshot_folder(name, t) for f in games_from])
                 for t, m in enumerate(snaps)]
        inputs[name] = [_model_inputs(xs[0]) for xs in curve]
        steps = [c["step"] for c in inputs[name]]
        summary[SERIES[name][1]] = {
            **knowledge_convergence(curve, tau=tau, match=match, steps=steps).to_dict(),
            "checkpoints": inputs[name]}
    summary["meta"] = make_meta("knowledge.analyze", {**asdict(cfg), **params, "match": match,
                                                      "candidates": candidates},
                                seed=cfg.seed, inputs=inputs)
    if series:
        summary["meta"]["checkpoint_decomposition"] = curve[0][0].kind
    write_json(out / "knowledge.json", summary)
    written = [out / name for name in folders] + save_knowledge_plots(summary, out)
    if cfg.players != "tokens":  # the fine-tuned model's preserved knowledge over the images
        shown = explained["finetuned"][:SHOWN]
        written.append(save_png(salient_figure(
            display_samples(models["finetuned"], dataset, shown, cfg), tau=tau,
            among=explained["pretrained"][:SHOWN], match=match), out / "preserved.png"))
    _remove_stale(out, list(OUTPUTS), written)
    return summary


def finished_analysis(out: str | Path, identity: dict[str, Any],
                      dataset: ImageDataset | TextDataset, cfg: ExplainConfig
                      ) -> dict[str, Any] | None:
    """The summary of the finished analysis in ``out`` when a run with ``identity``
    (:func:`~.explain.rerun_identity` of its settings, data and models) has nothing to do there:
    ``knowledge.json`` records that identity, :func:`load_analysis` reads it all, its samples are
    in ``dataset``, every explanation folder is marked finished with its files intact
    (:func:`~.explain.intact_explanations`: interactions, ``salient.png``, cached games) and every
    figure of the analysis is there. None otherwise: the run does (or redoes) the work."""
    out = Path(out)
    loaded = load_analysis(out)
    if loaded is None or recorded_identity(loaded[0], identity) != identity:
        return None
    summary, explained = loaded
    positions = {sample: i for i, sample in enumerate(dataset.ids)}
    ids = summary["samples"].get("ids")
    if not isinstance(ids, list) or len(ids) != summary["samples"]["n"] \
            or any(not isinstance(s, str) or s not in positions for s in ids):
        return None
    indices = [positions[s] for s in ids]
    for folder in explained:
        try:
            finished = json.loads((out / folder / MARKER).read_text()).get("finished")
        except (OSError, ValueError, AttributeError):
            return None
        if finished is not True or intact_explanations(out / folder, indices, cfg) is None:
            return None
    figures = ["strength_by_order.png", "ratios.png", "ratios_by_order.png",
               *(["purity.png"] if purity_is_informative(summary) else []),
               *(["convergence.png"] if "convergence" in summary else []),
               *(["preserved.png"] if cfg.players != "tokens" else [])]
    if not all((out / name).is_file() and (out / name).stat().st_size > 0 for name in figures):
        return None
    return summary


def _earlier_outputs(out: Path) -> tuple[str, ...]:
    """What an analysis whose ``knowledge.json`` is missing (stopped before writing it, or
    deleted) left in ``out``: its models' and snapshots' explanation folders (marked as such)
    and, only beside them, its figures; nothing in a folder without such an explanation folder,
    whose files may be anyone's."""
    found = [p for pattern in OUTPUTS for p in out.glob(pattern)] if out.is_dir() else []
    folders = [p.name for p in found if p.is_dir() and (p / MARKER).is_file()]
    return (*folders, *(p.name for p in found if p.is_file())) if folders else ()


def load_analysis(out: str | Path) -> tuple[dict[str, Any], dict[str, list[Interactions]]] | None:
    """The summary (``knowledge.json``) and every explained model's and snapshot's interactions
    (``{folder name: per sample}``) of the finished analysis in ``out``; None when there is none,
    it has not finished, was written by an earlier version (it lacks one of :data:`SUMMARY_KEYS`),
    or any file it lists is missing or unreadable (one interactions file
    per sample in each model's and snapshot's folder): then rerun :func:`analyze_knowledge`
    into ``out``, which writes them again from its cached games."""
    out = Path(out)
    try:
        summary = read_json(out / "knowledge.json", "knowledge")
        n = summary["samples"]["n"]
        folders = [*summary["faithfulness"],
                   *(_snapshot_folder(name, t) for name, (_, key, _) in SERIES.items()
                     for t in range(len(summary.get(key, {}).get("checkpoints", []))))]
        # an earlier version's summary lacks entries this version writes (the report reads them)
        if summary.get("kind") != KIND or summary.get("finished") is False \
                or any(missing_entry(summary, key) is not None for key in SUMMARY_KEYS):
            return None
        explained = {}
        for folder in folders:
            files = sorted((out / folder).glob("interactions-*.safetensors"))
            if [f.name for f in files] != [f"interactions-{k:04d}.safetensors" for k in range(n)]:
                return None
            explained[folder] = [Interactions.load(f) for f in files]
    except (PretrainReuseError, KeyError, TypeError, AttributeError):
        return None
    return summary, explained


def _ordered_snapshots(param: str, snapshots: list[Backbone], final: Backbone | None
                       ) -> list[Backbone]:
    """``snapshots`` (the value of :func:`analyze_knowledge`'s ``param``) in the order of the
    training step each records, refused unless they are the snapshots of one run that ended with
    ``final``, the model of their role (see :func:`analyze_knowledge`)."""
    role = SERIES[param][0]
    where = f"{param} (--{param.replace('_', '-')})"
    if final is None:
        raise PretrainReuseError(f"{where} need the {role} model their run ended with; pass it "
                                 f"too (models[{role!r}], --{role})")
    ids = [model_identity(m) for m in snapshots]
    names = [Path(i["weights"]).name if i["weights"] else f"{param}[{k}]" for k, i in enumerate(ids)]
    for name, i in zip(names, ids, strict=True):
        if i["step"] is None:
            raise PretrainReuseError(
                f"{where}: {name} records no training step, so it is not a snapshot of a run; "
                "pass the snapshots folder of one run (finetune --snapshots)")
    # a run started by an earlier version and resumed by this one has snapshots without a run
    # before ones with it: only those that record one can be told apart (_doubts warns)
    recorded = [k for k, i in enumerate(ids) if i["run"] is not None]
    other = next((k for k in recorded if ids[k]["run"] != ids[recorded[0]]["run"]), None)
    if other is not None:
        first = recorded[0]
        raise PretrainReuseError(
            f"{where} mix the snapshots of several runs ({names[first]}: run {ids[first]['run']}; "
            f"{names[other]}: run {ids[other]['run']}); pass the snapshots folder of one run")
    order = sorted(range(len(ids)), key=lambda k: ids[k]["step"])
    for a, b in itertools.pairwise(order):
        if ids[a]["step"] == ids[b]["step"]:
            raise PretrainReuseError(
                f"{where}: {names[a]} and {names[b]} both record step {ids[a]['step']} (a copy?); "
                "pass each snapshot of the run once")
    if ids[order[-1]]["state"] != state_hash(final):
        raise PretrainReuseError(
            f"the last of the {len(ids)} {param} is not the "
            f"{'fine-tuned' if role == 'finetuned' else role} model (step "
            f"{ids[order[-1]]['step']} has other weights); pass the "
            "snapshots of the run that made it (finetune --snapshots: its last snapshot is its "
            "final model)")
    return [snapshots[k] for k in order]


def _doubts(models: dict[str, Backbone], series: dict[str, list[Backbone]]) -> list[str]:
    """The :class:`KnowledgeWarning` s of :func:`analyze_knowledge` (one line each)."""
    doubts = []
    states = {role: state_hash(m) for role, m in models.items()}
    same = [(a, b) for i, a in enumerate(states) for b in list(states)[i + 1:]
            if states[a] == states[b]]
    if same:  # e.g. vanilla fine-tuning without --weights is a scratch run
        a, b = same[0]
        doubts.append(f"the {a} and {b} models are the same network (equal weights), so their "
                      f"knowledge is identical; check --{a} and --{b}")
    for role, model in models.items():
        mode = finetune_mode(model)
        if mode is not None and mode not in ROLE_MODES[role]:
            doubts.append(
                f"the {role} model {str(weights_path(model))!r} was trained in mode {mode!r}, "
                f"but the {role} role takes mode {' or '.join(ROLE_MODES[role])}; are the roles swapped? "
                f"(check --{role})")
    for name, snaps in series.items():
        paths = [weights_path(m) for m in snaps]
        unrecorded = [p for p in paths if p is not None and "run" not in weights_meta(p)]
        if len(unrecorded) == len(snaps):
            doubts.append(
                f"the {name} record no run (snapshots of an earlier version): that they are one "
                f"run's is checked only by their steps and by the last being the {SERIES[name][0]} "
                "model")
        elif unrecorded:
            doubts.append(
                f"{len(unrecorded)} of the {len(snaps)} {name} "
                f"({preview([p.name for p in unrecorded])}) record no run (snapshots of an "
                "earlier version, before the run was resumed): that they are the others' run is "
                f"checked only by their steps and by the last being the {SERIES[name][0]} model")
    return doubts


def _snapshot_folder(param: str, t: int) -> str:
    """The folder of the explanations of the ``t``-th snapshot (in step order) of ``param``."""
    return f"{SERIES[param][2]}-{t:03d}"


def _snapshot_role(param: str, t: int) -> str:
    """How messages and progress bars name the ``t``-th snapshot of ``param``."""
    return f"{SERIES[param][2].replace('-', ' ')} {t}"


def _model_inputs(x: Interactions) -> dict[str, Any]:
    """The model identity an explanation recorded (:func:`~.explain.model_identity`)."""
    return {k: v for k, v in x.meta["inputs"].items() if k not in ("data", "data_path")}


def _ground_truth(dataset, indices: np.ndarray, explained: dict[str, list[Interactions]],
                  tau: float) -> dict[str, Any]:
    """Recovery of each model's interactions against the rule game of every sample's scene."""
    n = explained["finetuned"][0].n
    truths = [rule_game(dataset.scene(int(i)).term_slots, n) for i in indices]
    return {role: ground_truth_recovery(xs, truths, tau=tau).to_dict()
            for role, xs in explained.items()}


def _joint(games: dict[str, Games], qthres: float, what: str = "the sparse decomposition"
           ) -> dict[str, list[Interactions]]:
    """The roles' games decomposed together (one AND/OR split for a shared effect); the joint
    solver's meta is each result's ``meta["solver"]``; ``what`` names it in warnings."""
    joint = joint_and_or_interactions(np.stack([g.values for g in games.values()]), qthres=qthres)
    return {role: with_games(g, results, what=what)
            for (role, g), results in zip(games.items(), joint, strict=True)}


def _other_image(games: dict[str, Games], explained: dict[str, list[Interactions]],
                 labels: list[int], cfg: ExplainConfig, tau: float, match: str) -> dict[str, Any] | None:
    """The other-image control of every ratio (:func:`~.metrics.other_image_control`), with the
    partner of each sample and how many pairs share a class; None for a single sample.
    Under ``joint-and-or`` each control pair or triple is decomposed together, as the
    same-image ones were."""
    if len(labels) < 2:
        return None
    partners = other_sample_partners(labels)

    def moved(roles: tuple[str, ...]) -> dict[str, list[Interactions]]:
        """Every role's interactions, those of ``roles`` taken from each sample's partner."""
        if cfg.decomposition != "joint-and-or":
            return {role: [xs[j] for j in partners] if role in roles else xs
                    for role, xs in explained.items()}
        return _joint({role: Games(g.values[partners], [g.infos[j] for j in partners], g.meta)
                       if role in roles else g for role, g in games.items()}, cfg.noise_bound,
                      what="the sparse decomposition of the other-image control")

    others = ("finetuned", "scratch")  # the pre-trained model's own knowledge stays on its image
    pairs = moved(others)
    scratch = None
    if "scratch" in explained:
        triples = moved(("scratch",))
        scratch = (triples["pretrained"], triples["finetuned"], triples["scratch"])
    levels = other_image_control(pairs["pretrained"], pairs["finetuned"], scratch_other=scratch,
                                 tau=tau, match=match)
    return {"partners": [int(j) for j in partners],
            "same_class": int(sum(labels[i] == labels[j] for i, j in enumerate(partners))),
            "overall": {k: v.to_dict() for k, v in levels.items()}}


def faithfulness_summary(xs: list[Interactions], tau: float) -> dict[str, float | int | None]:
    """Each entry of :meth:`~.values.Interactions.faithfulness_error` averaged over the samples,
    the worst sample's ``max`` and the median sample's (errors are in units of |v(N) - v(∅)|, so
    a sample whose v(N) is near v(∅) has a large one that the mean follows). A sample with
    v(N) = v(∅) (e.g. a blank image under the mean-colour baseline) has no effect to reproduce
    and so no normalised error: it is left out (``undefined`` counts those samples), and an
    entry no sample defines is None."""
    errors = [x.faithfulness_error(tau) for x in xs]

    def defined(key: str) -> list[float]:
        return [e[key] for e in errors if not np.isnan(e[key])]

    out = {k: float(np.mean(defined(k))) if defined(k) else None for k in errors[0]}
    worst = defined("max")
    return out | {"max_over_samples": float(max(worst)) if worst else None,
                  "max_median": float(np.median(worst)) if worst else None,
                  "undefined": len(errors) - len(worst)}


def _strength_by_order(xs: list[Interactions]) -> list[float]:
    """Mean over samples of the normalised strength sum_{|S|=k} |I(S)| / sum_S |I(S)|, k = 1..n."""
    hists = []
    for x in xs:
        o = orders(x.n)
        mag = np.abs(x.and_values) + np.abs(x.or_values)
        mag[0] = 0.0
        total = mag.sum()
        hists.append([mag[o == k].sum() / total if total > 0 else 0.0 for k in range(1, x.n + 1)])
    return np.mean(hists, axis=0).tolist()


def _counterfactual_summary(report, finetuned: list[Interactions], tau: float,
                            seed: int) -> dict[str, Any]:
    """The counterfactual check over the preserved sets of every sample and as many random sets:
    the effect ratio (mean |measured change| of the preserved sets over that of the random ones)
    and the rank (Spearman) correlation of predicted and measured changes, as docs/knowledge.md
    (§5) describes, with the Pearson correlation beside it (None when either is constant)."""
    rng = np.random.default_rng([seed, 13])
    pres, rand = [], []
    for sample, x in zip(report.samples, finetuned, strict=True):
        sets = sorted({item[1] for item in sample.preserve})
        if sets:
            res = counterfactual(x, sets, tau, rng)
            pres += res["preserved"]
            rand += res["random"]
    if not pres:
        return {"n_sets": 0}
    p, r = np.array(pres), np.array(rand)
    both = np.concatenate([p, r])
    measured, predicted = both[:, 0], both[:, 1]
    defined = len(both) > 2 and measured.std() > 0 and predicted.std() > 0
    spearman = float(_pearson(_ranks(predicted), _ranks(measured))) if defined else None
    return {
        "n_sets": len(p),
        "mean_abs_change_preserved": float(np.abs(p[:, 0]).mean()),
        "mean_abs_change_random": float(np.abs(r[:, 0]).mean()),
        "effect_ratio": float(np.abs(p[:, 0]).mean() / max(np.abs(r[:, 0]).mean(), 1e-12)),
        "prediction_spearman": spearman,
        "prediction_pearson": float(_pearson(predicted, measured)) if defined else None,
        "mean_abs_prediction_error": float(np.abs(measured - predicted).mean()),
    }
