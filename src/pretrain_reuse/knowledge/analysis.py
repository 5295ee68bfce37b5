r"""``knowledge``: what pre-training hands to the fine-tuned model, end to end.

Explains the pre-trained model (its linear probe on the target classes), the fine-tuned model and,
optionally, a model trained from scratch and fine-tuning checkpoints, on the *same* samples with
the *same* players and baseline; then reports (Jiang, Cheng & Li, arXiv 2410.08455, with the
definitions of ``methods/knowledge.md``):

- preserved / discarded / new knowledge and its exclusivity against the scratch model
  (:func:`~.metrics.knowledge_report`), overall and by interaction order;
- how discriminative each of these sets is: the discrimination power of its interactions over
  the samples of a class (:func:`~.metrics.set_discrimination`, the note's option (a));
- convergence of knowledge over checkpoints (:func:`~.metrics.knowledge_convergence`);
- faithfulness of every model's salient interactions (their sum against v on all 2^n masks);
- a counterfactual check the paper lacked: removing the players of a preserved interaction
  changes the fine-tuned model's output by ``v(N) - v(N \ S)``, which its salient interactions
  predict as ``sum_{AND T ∩ S ≠ ∅} I(T) + sum_{OR ∅ ≠ T ⊆ S} I(T)``; removing as many random
  players serves as the control; reported as the effect ratio and the rank (Spearman)
  correlation of predicted and measured changes (note §6.1), Pearson's beside it;
- with ``players="parts"`` on the synthetic world, whose class rules are known: precision and
  recall of every model's salient interactions against the rule's interactions
  (:func:`~.recovery.ground_truth_recovery`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import make_meta, make_run_folder, write_json
from ..data.datasets import ImageDataset
from ..data.text import TextDataset
from ..errors import PretrainReuseError, check_choice, is_integer
from ..models import Backbone, state_hash
from .explain import (
    SHOWN,
    ExplainConfig,
    Games,
    _remove_stale,
    check_classifier,
    check_explainable,
    check_objects,
    check_outputs,
    choose_samples,
    data_path,
    decompose,
    display_samples,
    explain,
    explain_games,
    explainable,
    model_classes,
    sample_order,
    save_explanations,
    with_games,
)
from .metrics import (
    MATCHES,
    _pearson,
    _ranks,
    knowledge_convergence,
    knowledge_report,
    set_discrimination,
)
from .plots import salient_figure, save_knowledge_plots, save_png
from .recovery import ground_truth_recovery, rule_game
from .sparsify import joint_and_or_interactions
from .values import Interactions, check_tau

ROLES = ("pretrained", "finetuned", "scratch")
#: The ``kind`` of ``knowledge.json``, by which a reader recognises it.
KIND = "knowledge-report"


def correct_mask(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                 candidates: np.ndarray, device: torch.device) -> np.ndarray:
    """Which of ``candidates`` every model (``{role: model}``) classifies correctly (bool over the
    dataset); an unreadable image is not. Refuses a model whose output is not finite, naming it
    (:func:`~.explain.check_outputs`)."""
    ok = np.zeros(len(dataset), bool)
    ok[candidates] = True
    for role, model in models.items():
        logits, readable = check_outputs(model, dataset, candidates, role, device)
        ok[candidates] &= readable & (logits.argmax(1) == dataset.labels[candidates])
    return ok


def counterfactual(x: Interactions, sets: list[int], tau: float, rng: np.random.Generator
                   ) -> dict[str, Any]:
    """Measured vs predicted output change when the players of each set in ``sets`` (bitmasks)
    are removed from the full input, against random sets of the same sizes."""
    full = (1 << x.n) - 1
    salient = x.salient(tau)
    keys = np.arange(1 << x.n)

    def change(s: int) -> tuple[float, float]:
        measured = x.v[full] - x.v[full ^ s]
        pred = sum(val for (kind, t), val in salient.items()
                   if (kind == "and" and t & s) or (kind == "or" and t and (t & ~s) == 0))
        return float(measured), float(pred)

    chosen = [change(s) for s in sets]
    sizes = [bin(s).count("1") for s in sets]
    random_sets = [int(rng.choice(keys[[bin(int(k)).count("1") == z for k in keys]]))
                   for z in sizes]
    control = [change(s) for s in random_sets]
    return {"preserved": chosen, "random": control}


def analyze_knowledge(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                      cfg: ExplainConfig, out: str | Path, *, checkpoints: list[Backbone] | None = None,
                      tau: float = 0.05, match: str = "support", candidates: int = 400,
                      split: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the analysis into ``out`` and return (and write ``knowledge.json``) its summary.

    ``out`` must be new, empty or the folder of an earlier analysis (it holds ``knowledge.json``,
    or only the models' folders of a run stopped before writing it); there the outputs of the
    earlier run that this run does not rewrite (the folder of a scratch model or of checkpoints no
    longer given, their figures) are deleted. Every model is checked (a classifier over the data's
    classes with finite outputs, players that fit its input) before anything is written.

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
        checkpoints: fine-tuning checkpoints, oldest first, for the convergence curve: the
            snapshots of the run that made ``models["finetuned"]``, so the last one must be it
            (a run's last snapshot is its final model; else the curve is another model's).
        tau: salience threshold relative to each sample's largest interaction.
        candidates: samples screened at a time for being correct under every model (one
            forward pass of each model over them); screening goes on until ``cfg.samples``
            samples are correct for every model or every sample has been screened.
        split: the split ``dataset`` was opened from (recorded in the meta; the dataset does
            not know it).
    """
    missing = {"pretrained", "finetuned"} - models.keys()
    if missing:
        raise PretrainReuseError(f"knowledge needs the {' and '.join(sorted(missing))} model(s)")
    check_objects({**models, **{f"checkpoint {t}": m for t, m in enumerate(checkpoints or [])}},
                  dataset, cfg)
    # named sentence labels numbered as the fine-tuned model numbers its classes (its id2label)
    dataset = model_classes(models["finetuned"], dataset)
    # checked before the interactions are computed: a typo must not cost minutes, or leave files
    check_choice("match", match, MATCHES)
    check_tau(tau)
    if not (is_integer(candidates) and candidates >= 1):
        raise PretrainReuseError(f"candidates={candidates!r} must be an integer >= 1 (samples "
                                 "screened at a time)")
    out = Path(out)
    device = torch.device(cfg.device)
    if checkpoints and state_hash(checkpoints[-1]) != state_hash(models["finetuned"]):
        raise PretrainReuseError(
            f"the last of the {len(checkpoints)} checkpoints is not the fine-tuned model (other "
            "weights); pass the snapshots of the run that made it (finetune --snapshots: its last "
            "snapshot is its final model)")
    named = {**models, **{f"checkpoint {t}": m for t, m in enumerate(checkpoints or [])}}
    for role, m in named.items():
        check_classifier(m, dataset, cfg, role)
    order = sample_order(dataset, cfg.seed, keep=explainable(models["finetuned"], dataset, cfg))
    correct, screened = np.zeros(len(dataset), bool), 0
    while screened < len(order) and correct.sum() < cfg.samples:
        chunk = order[screened:screened + candidates]
        correct |= correct_mask(models, dataset, chunk, device)
        screened += len(chunk)
    if not correct.any():
        raise PretrainReuseError("no sample is classified correctly by every model; check that "
                                 "the models were trained on this data")
    indices = choose_samples(dataset, cfg.samples, cfg.seed, keep=correct)
    for role, m in named.items():
        check_explainable(m, dataset, indices, cfg, role, device)
    folders = [*models, *(_checkpoint_folder(t) for t in range(len(checkpoints or [])))]
    marker = make_run_folder(out, "a knowledge analysis", "knowledge.json", early=tuple(folders))
    if marker.exists():
        # this run rewrites the earlier one's files model by model: until its own summary is
        # written, the folder must not read as the earlier, finished analysis
        write_json(marker, {"kind": KIND, "finished": False})
    params = {"tau": tau, "split": split}
    games = {role: explain_games(m, dataset, indices, cfg, out / role, role=role, params=params,
                                 progress=progress) for role, m in models.items()}
    explained = (_joint(games, cfg.noise_bound) if cfg.decomposition == "joint-and-or" else
                 {role: decompose(g, cfg) for role, g in games.items()})
    for role, xs in explained.items():
        save_explanations(xs, models[role], dataset, cfg, out / role, tau)
    report = knowledge_report(explained["pretrained"], explained["finetuned"],
                              explained.get("scratch"), tau=tau, match=match)
    labels = [int(dataset.labels[i]) for i in indices]
    summary: dict[str, Any] = {
        "kind": KIND,
        "samples": {"n": len(indices), "asked": cfg.samples, "screened": screened,
                    "correct_for_all": int(correct.sum()),
                    "per_class": {str(c): labels.count(c) for c in sorted(set(labels))},
                    "ids": [dataset.ids[i] for i in indices]},
        "report": report.to_dict(),
        "discrimination": set_discrimination(report, labels).to_dict(),
        "faithfulness": {role: _faithfulness(xs, tau) for role, xs in explained.items()},
        "strength_by_order": {role: _strength_by_order(xs) for role, xs in explained.items()},
        "counterfactual": _counterfactual_summary(report, explained["finetuned"], tau, cfg.seed),
    }
    if cfg.players == "parts" and hasattr(dataset, "scene"):
        summary["ground_truth"] = _ground_truth(dataset, indices, explained, tau)
    inputs = {"data": dataset.source, "data_path": data_path(dataset),
              "models": {role: _model_inputs(xs[0]) for role, xs in explained.items()}}
    if checkpoints:
        curves = [explain(m, dataset, indices, cfg, out / _checkpoint_folder(t),
                          role=f"checkpoint {t}", tau=tau, split=split, progress=progress)
                  for t, m in enumerate(checkpoints)]
        inputs["checkpoints"] = [_model_inputs(xs[0]) for xs in curves]
        summary["convergence"] = {**knowledge_convergence(curves, tau=tau, match=match).to_dict(),
                                  "checkpoints": inputs["checkpoints"]}
    summary["meta"] = make_meta("knowledge.analyze", {**asdict(cfg), **params, "match": match,
                                                      "candidates": candidates},
                                seed=cfg.seed, inputs=inputs)
    if checkpoints:
        summary["meta"]["checkpoint_decomposition"] = curves[0][0].kind
    write_json(out / "knowledge.json", summary)
    written = [out / name for name in folders] + save_knowledge_plots(summary, out)
    if cfg.players != "tokens":  # the fine-tuned model's preserved knowledge over the images
        shown = explained["finetuned"][:SHOWN]
        written.append(save_png(salient_figure(
            display_samples(models["finetuned"], dataset, shown, cfg), tau=tau,
            among=explained["pretrained"][:SHOWN], match=match), out / "preserved.png"))
    _remove_stale(out, [*ROLES, "checkpoint-*", "convergence.png", "purity.png", "preserved.png"],
                  written)
    return summary


def _checkpoint_folder(t: int) -> str:
    """The folder of the ``t``-th checkpoint's explanations."""
    return f"checkpoint-{t:03d}"


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


def _joint(games: dict[str, Games], qthres: float) -> dict[str, list[Interactions]]:
    """The roles' games decomposed together (one AND/OR split for a shared effect); the joint
    solver's meta is each result's ``meta["solver"]``."""
    joint = joint_and_or_interactions(np.stack([g.values for g in games.values()]), qthres=qthres)
    return {role: with_games(g, results) for (role, g), results in zip(games.items(), joint, strict=True)}


def _faithfulness(xs: list[Interactions], tau: float) -> dict[str, float | int | None]:
    """Each entry of :meth:`~.values.Interactions.faithfulness_error` averaged over the samples,
    and the worst sample's ``max``. A sample with v(N) = v(∅) (e.g. a blank image under the
    mean-colour baseline) has no effect to reproduce and so no normalised error: it is left out
    (``undefined`` counts those samples), and an entry no sample defines is None."""
    errors = [x.faithfulness_error(tau) for x in xs]

    def defined(key: str) -> list[float]:
        return [e[key] for e in errors if not np.isnan(e[key])]

    out = {k: float(np.mean(defined(k))) if defined(k) else None for k in errors[0]}
    worst = defined("max")
    return out | {"max_over_samples": float(max(worst)) if worst else None,
                  "undefined": len(errors) - len(worst)}


def _strength_by_order(xs: list[Interactions]) -> list[float]:
    """Mean over samples of the normalised strength sum_{|S|=k} |I(S)| / sum_S |I(S)|, k = 1..n."""
    hists = []
    for x in xs:
        o = np.array([bin(s).count("1") for s in range(1 << x.n)])
        mag = np.abs(x.and_values) + np.abs(x.or_values)
        mag[0] = 0.0
        total = mag.sum()
        hists.append([mag[o == k].sum() / total if total > 0 else 0.0 for k in range(1, x.n + 1)])
    return np.mean(hists, axis=0).tolist()


def _counterfactual_summary(report, finetuned: list[Interactions], tau: float,
                            seed: int) -> dict[str, Any]:
    """The counterfactual check over the preserved sets of every sample and as many random sets:
    the effect ratio (mean |measured change| of the preserved sets over that of the random ones)
    and the rank (Spearman) correlation of predicted and measured changes, as the note (§6.1)
    asks, with the Pearson correlation beside it (None when either is constant)."""
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
