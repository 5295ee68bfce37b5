"""``pretrain-reuse report RUN_DIR``: one self-contained ``report.html`` (figures embedded as
base64 PNG, no external resources) from a run folder: a demo, an experiment, a fine-tuning run
(its accuracy and losses over training, its result after the last step and at the best
validation evaluation, its recipe), a grid search (every combination, and the one validation
picked), a knowledge analysis (the ``knowledge`` command's folder: the demo's knowledge
section, from its ``knowledge.json`` and ``preserved.png``) or a knowledge sensitivity analysis
(``knowledge --vary``: each setting's ratios and their paired change). An ``explain`` folder is refused
naming what it holds and how to open it.

Every figure is drawn from the files of the run (``summary.json``, selections, fine-tuning
results, ``knowledge/``). A demo folder lacking ``selections/``, ``knowledge/`` or the knowledge
interaction files shows, in place of what they draw, a note naming them and the ``demo`` command
that computes them (the selections' recalls, from ``summary.json``, are shown still); a folder
whose ``demo`` or ``experiment`` has not finished is refused naming the command that resumes
it, as is a missing fine-tuning result. Statements comparing
methods are generated from the numbers, so a result that does not favour a method says so. A
``summary.json`` or ``knowledge.json`` that lacks an entry the report reads (written by an older
version, or not a demo's) is refused in one line naming the entry, before anything is written;
so is a file whose entry has a type or value the report cannot use (edited by hand, or damaged),
naming the file.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_path, folder_in_use, read_json
from ..errors import PretrainReuseError, check_file, user_stacklevel
from ..figures import subplots

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:520px}
.note{background:#fff8e5;border-left:4px solid #e0b000;padding:.5em 1em}
.good{background:#eef8ee;border-left:4px solid #3a3;padding:.5em 1em}
code{background:#f4f4f4;padding:0 .2em}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _figure(fig, caption: str, alt: str) -> str:
    """The figure with its caption; its text alternative is ``alt`` (what it shows, with its key
    numbers where the caller has them) followed by the caption."""
    return _embedded(_png(fig), caption, alt)


def _embedded(png: str, caption: str, alt: str) -> str:
    """A base64 PNG as :func:`_figure` shows it."""
    return (f'<figure><img alt="{html.escape(f"{alt}. {caption}")}" '
            f'src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th scope="col">{html.escape(str(h))}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: Any) -> str:
    """``value`` (an entry of the run's files: a label, a count) as inert HTML text."""
    return html.escape(str(value))


def _fixed(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "n/a" for None (a ratio or error no sample defines)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _section(title: str, sid: str, content: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'


#: The entries of a demo's ``summary.json`` that the report reads, as dotted paths (``*``: every
#: entry of a mapping; read as :func:`~pretrain_reuse.knowledge.analysis.missing_entry` reads
#: them); those of ``knowledge.json`` are :data:`~pretrain_reuse.knowledge.analysis.SUMMARY_KEYS`.
SUMMARY_KEYS = (
    "scenario.name", "scenario.description", "scenario.pool", "scenario.target",
    "scenario.players", "scenario.related", "scenario.pool_classes",
    "selection.classes-uot", "selection.classes-greedy-ot", "selection.classes-random",
    "selection.*.recall", "selection.*.k",
    "finetune.*.mode", "finetune.*.seeds", "finetune.*.top1_mean", "finetune.*.top1_std",
    "finetune.*.top1_at_best_val_mean",
)

#: The entries of ``knowledge.json``'s counterfactual check the report reads when it made sets.
COUNTERFACTUAL_KEYS = tuple(f"counterfactual.{e}" for e in (
    "effect_ratio", "mean_abs_change_preserved", "mean_abs_change_random"))


def _check_entries(record: dict, keys: tuple[str, ...], path: Path, *, owner: str = "a demo's",
                   redo: str | None = None) -> None:
    """Refuse a record lacking one of ``keys``: the report would fail half-way. ``owner``: whose
    file it should be; ``redo``: what to do about it (default :data:`DEMO_REDO`)."""
    from ..knowledge.analysis import missing_entry

    for key in keys:
        missing = missing_entry(record, key)
        if missing is not None:
            raise PretrainReuseError(
                f"{str(path)!r} lacks {missing!r}: it was written by an older version of "
                f"pretrain-reuse or is not {owner}; {redo or DEMO_REDO}")


#: What the report says to do about a demo's file it cannot read (as :func:`_check_entries`).
DEMO_REDO = "rerun `pretrain-reuse demo` (into a new --out) and report on that folder"
#: ... about a standalone knowledge analysis's (its rerun recomputes an analysis of an earlier
#: version, or with a damaged file, from its cached games).
KNOWLEDGE_REDO = ("rerun its `pretrain-reuse knowledge` command with the same --out (it redoes "
                  "the analysis from its cached games) and report on that folder again")
#: ... about an experiment's (as :meth:`~pretrain_reuse.experiments.ExperimentTable.load`).
EXPERIMENT_REDO = "rerun the experiment into a new --out and report on that folder"


@contextlib.contextmanager
def _reading(path: Path, redo: str):
    """Refuse, in one line naming ``path``, an entry of ``path`` the report cannot use: the key
    checks above only know that entries exist, and a file edited by hand or written by another
    version can hold one of another type or value (a list for a mapping, a string for a number).
    The error's type and message are kept in the line, so that a bug of the report shows too."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        what = " ".join(str(e).split())[:200]
        raise PretrainReuseError(
            f"{str(path)!r} holds an entry the report cannot read ({type(e).__name__}: {what}): "
            f"the file is damaged or was written by another version of pretrain-reuse; {redo}"
        ) from None


def _marker(run: Path) -> dict:
    """The ``run.json`` a demo, experiment or fine-tuning run writes first (its kind and
    options); empty when the folder has none or it cannot be read (it only picks the page and
    words the advice of a message)."""
    try:
        marker = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _params(run: Path) -> dict:
    """The options a demo's or experiment's ``run.json`` records (empty when it records none)."""
    params = _marker(run).get("params")
    return params if isinstance(params, dict) else {}


def _demo_command(run: Path) -> str:
    """The command that resumes the demo in ``run`` (with the options of its ``run.json``): the
    demo skips the stages whose files it finds and computes the others."""
    params = _params(run)
    options = "".join([
        f" --scenario {params['scenario']}" if params.get("scenario", "world") != "world" else "",
        " --quick" if params.get("quick") else "",
        f" --seed {params['seed']}" if params.get("seed", 0) != 0 else ""])
    return f"pretrain-reuse demo{options} --out {run}"


def _experiment_command(run: Path) -> str:
    """The command that resumes the experiment in ``run`` (its config file is not recorded:
    CONFIG stands for it)."""
    name = _params(run).get("experiment", "NAME")
    return f"pretrain-reuse experiment {name} --config CONFIG --out {run}"


def _finetune_command(run: Path) -> str:
    """The command that resumes the fine-tuning run in ``run``: the experiment's or the grid
    search's it is a run of (which resume it with its own settings), else its finetune command."""
    if run.parent.name == "runs" and _marker(run.parent.parent).get("kind") == "experiment-run":
        return _experiment_command(run.parent.parent)
    if _marker(run.parent).get("kind") == "grid-run":
        return f"pretrain-reuse finetune ... --grid ... --out {run.parent}"
    return f"pretrain-reuse finetune ... --out {run}"


def _omitted(what: str, run: Path) -> str:
    """The note shown in place of a section (or figure) whose files the demo folder lacks."""
    return (f'<p class="note">Not in this folder: {html.escape(what)}; rerun '
            f"<code>{html.escape(_demo_command(run))}</code> to compute it.</p>")


def _run_result(path: Path, command: str):
    """The fine-tuning result at ``path``; a missing one is refused naming the ``command`` that
    computes it (a run stopped before it finished, or removed)."""
    from ..finetune.loop import RunResult

    if not path.exists():
        raise PretrainReuseError(f"{str(path)!r} does not exist: the run has not finished or was "
                                 f"removed; rerun `{command}` (its command, with the same --out) "
                                 "to compute it")
    return RunResult.load(path)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _selection_section(run: Path, summary: dict) -> str:
    from ..selection import Selection

    sel_dir = run / "selections"
    from ..data.catalog import open_dataset

    scenario = summary["scenario"]
    related = np.asarray(scenario["related"])
    known = ("the world plants the answer: the {n} pre-training classes of the target task's "
             "part families" if scenario["name"] == "world" else
             "the answer is known by construction: the {n} pool classes of the target's garments")
    parts = ["<p>Pre-training units are ranked by the row mass of the unbalanced OT plan towards "
             f"the target classes (Liu et al., NeurIPS 2022); {known.format(n=len(related))}, "
             f"out of {_text(scenario['pool_classes'])} pool classes.</p>"]
    # without the selections, their recalls (summary.json) are still shown, their figures not
    uot = Selection.load(sel_dir / "classes-uot.json") if sel_dir.exists() else None
    if uot is None:
        parts.append(_omitted("selections/ (the UOT scores and the images of the selected "
                              "classes)", run))
    else:
        fig, ax = subplots(figsize=(6.4, 3.2))
        uot.plot(ax, relevant=related)
        ax.set_title("UOT score of every pre-training class, sorted (cf. Fig. 2b)")
        parts.append(_figure(fig, "Sorted log row mass of the UOT plan; red dots: the planted "
                             "related classes; dashed line: the selection size.", "UOT scores"))
    rows = [[name, f"{v['recall']:.3f}", v["k"]] for name, v in summary["selection"].items()]
    parts.append(_table(["selection", "recall of related classes (samples, for clusters)",
                         "units selected"], rows))
    rec = {k: v["recall"] for k, v in summary["selection"].items()}
    for other in ("greedy-ot", "random"):
        u, o = rec["classes-uot"], rec[f"classes-{other}"]
        if u > o:
            parts.append(f'<p class="good">UOT recovers more of the related classes than {other} '
                         f"selection ({u:.3f} vs {o:.3f}).</p>")
        elif u == o:
            parts.append(f'<p class="note">UOT and {other} selection recover the same share of '
                         f"the related classes ({u:.3f}): no difference here.</p>")
        else:
            parts.append(f'<p class="note">UOT does <b>not</b> recover more related classes than '
                         f"{other} selection here ({u:.3f} vs {o:.3f}).</p>")
    if uot is not None:
        parts.append(_examples(uot, pool=open_dataset(scenario["pool"])))
    return _section("Selection of pre-training data", "selection", "".join(parts))


def _examples(sel, pool, per_class: int = 4, classes: int = 6) -> str:
    """Example images of the top selected classes."""
    from ..knowledge.plots import literal

    classes = min(classes, len(sel.selected))
    fig, axes = subplots(classes, per_class, figsize=(per_class * 1.1, classes * 1.15),
                             squeeze=False)
    labels = pool.labels
    for r, unit in enumerate(sel.selected[:classes]):
        idx = np.flatnonzero(labels == unit)[:per_class]
        for c, i in enumerate(idx):
            axes[r, c].imshow(pool.load(int(i)).permute(1, 2, 0).numpy())
            axes[r, c].axis("off")
        axes[r, 0].set_title(literal(pool.class_names[unit]), fontsize=7, loc="left")
    return _figure(fig, f"Images of the {classes} classes UOT ranks highest.", "selected examples")


def _finetune_section(run: Path, summary: dict) -> str:
    from ..knowledge.plots import literal

    ft = summary["finetune"]
    if not ft:
        return ""
    fig, ax = subplots(figsize=(6.4, 3.6))
    for name in ft:
        path = run / "finetune" / f"{name}-seed{ft[name]['seeds'][0]}" / "result.json"
        r = _run_result(path, _demo_command(run))
        with _reading(path, DEMO_REDO):
            ax.plot([h["step"] for h in r.history], [h["test"]["top1"] for h in r.history],
                    marker="o", ms=3, label=literal(name))
    ax.set_xlabel("step")
    ax.set_ylabel("target test top-1")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Fine-tuning curves (first seed)")
    rows = [[name, v["mode"], f"{v['top1_mean']:.4f}" + (
             "" if v["top1_std"] is None else f" ± {v['top1_std']:.4f}"),
             f"{v['top1_at_best_val_mean']:.4f}", len(v["seeds"])] for name, v in ft.items()]
    parts = ["<p>Test accuracy is reported twice: after the last step, and at the evaluation "
             "with the best <i>validation</i> accuracy (a split carved from the training data). "
             "The test split never selects anything.</p>",
             _figure(fig, "Target test top-1 during fine-tuning.", "fine-tuning curves; final test "
                     "top-1, mean over seeds: " + ", ".join(f"{name} {v['top1_mean']:.4f}"
                                                            for name, v in ft.items())),
             _table(["run", "mode", "final test top-1 (mean ± std over seeds)",
                     "test top-1 at best val", "seeds"], rows)]
    parts.append(_compare(ft, "reuse-uot", "vanilla"))
    parts.append(_compare(ft, "reuse-uot", "reuse-random"))
    parts.append(_compare(ft, "reuse-unlabeled-uot", "vanilla"))
    parts.append(_compare(ft, "reuse-unlabeled-uot", "reuse-unlabeled-random"))
    return _section("Fine-tuning with reused data", "finetune", "".join(parts))


def _compare(ft: dict, a: str, b: str, where: str = "") -> str:
    """A generated sentence comparing runs ``a`` and ``b`` (``top1_mean``, ``top1_std``,
    ``seeds`` each), honest about ties, spread and single seeds."""
    if a not in ft or b not in ft:
        return ""
    da = ft[a]["top1_mean"] - ft[b]["top1_mean"]
    one_seed = min(len(ft[a]["seeds"]), len(ft[b]["seeds"])) < 2  # its spread is undefined
    spread = None if one_seed else max(ft[a]["top1_std"], ft[b]["top1_std"])
    where, a, b = html.escape(where), html.escape(a), html.escape(b)  # labels of the run's files
    if one_seed:
        word = "ahead of" if da > 0 else "not ahead of"
        return (f'<p class="note">{where}{a} is {word} {b} by {100 * da:+.2f} points on one seed: '
                "no spread to compare with, so this is not evidence either way.</p>")
    if da > spread:
        return (f'<p class="good">{where}{a} beats {b} by {100 * da:.2f} points (more than the '
                "seed spread).</p>")
    if da > 0:
        return (f'<p class="note">{where}{a} is ahead of {b} by {100 * da:.2f} points, within the '
                f"seed spread ({100 * spread:.2f}): not a clear win.</p>")
    return f'<p class="note">{where}{a} does <b>not</b> beat {b} here ({100 * da:+.2f} points).</p>'


def _knowledge_section(run: Path, scenario: dict, players: str) -> str:
    """The knowledge section of a demo's page, from ``run/knowledge/``."""
    kdir = run / "knowledge"
    if not (kdir / "knowledge.json").exists():
        return _section("Knowledge handed over by pre-training", "knowledge", _omitted(
            "knowledge/knowledge.json (the knowledge analysis)", run))
    k = _read_knowledge(kdir, "its command")
    params = k.get("meta", {}).get("params", {})
    tau, match = params.get("tau", 0.05), params.get("match", "support")
    return _section("Knowledge handed over by pre-training", "knowledge", _knowledge_parts(
        k, kdir, run, players=players, baseline=scenario.get("baseline", "zero"),
        samples="test images", overlays=_overlays(run, scenario, tau, match)))


def _read_knowledge(kdir: Path, command: str, **check) -> dict:
    """``kdir/knowledge.json``, refused when its analysis has not finished (naming the
    ``command`` that finishes it) or lacks an entry the report reads (``check``: as
    :func:`_check_entries` words it)."""
    from ..knowledge.analysis import SUMMARY_KEYS as KNOWLEDGE_KEYS

    k = read_json(kdir / "knowledge.json", "knowledge")
    if k.get("finished") is False:
        raise PretrainReuseError(f"{str(kdir)!r} holds a knowledge analysis that has not finished "
                                 f"(a rerun stopped halfway); rerun {command} to finish it")
    _check_entries(k, KNOWLEDGE_KEYS, kdir / "knowledge.json", **check)
    return k


def _knowledge_parts(k: dict, kdir: Path, root: Path, *, players: str, baseline: str,
                     samples: str, overlays: str, **check) -> str:
    """What the report shows of the knowledge analysis ``k`` (its ``knowledge.json``, checked
    by :func:`_read_knowledge`) in ``kdir``: its samples, models (paths shown relative to
    ``root``), figures, tables and checks; ``players`` and ``baseline`` in words, ``samples``:
    what was explained (test images), ``overlays``: the figure of the preserved interactions;
    ``check``: how :func:`_check_entries` words a missing entry."""
    overall = k["report"]["overall"]
    # the analysis's own settings (a knowledge.json of an earlier version records neither)
    params = k.get("meta", {}).get("params", {})
    tau, match = params.get("tau", 0.05), params.get("match", "support")
    background = params.get("background") if samples == "images" else None
    counts = k["samples"]
    dropped = counts["screened"] - counts["correct_for_all"]
    parts = [f"<p>Interactions of each model's log-odds between the {_text(counts['n'])} samples' "
             f"players (here: {_text(players)}; absent players take the "
             f"{_BASELINE_TEXT.get(baseline, 'given')} baseline"
             f"{_BACKGROUND_TEXT.get(background, '')}). "
             f"Samples: {_text(counts['n'])} {_text(samples)} explained ({_text(counts['asked'])} "
             "asked), drawn among those every model classifies correctly: of the "
             f"{_text(counts['screened'])} screened, {_text(dropped)} were dropped because some "
             "model misclassifies them. "
             "Knowledge = salient interactions (|I| > "
             f"{100 * tau:g}% of the sample's largest).</p>",
             _models_table(root, k),
             "<p>preserve, discard, new and exclusive follow the <i>reconstructed</i> definitions "
             "of docs/knowledge.md in the pretrain-reuse repository (the paper's formulas were "
             "not found): per sample, preserve = |Ω_pre ∩ Ω_ft| / |Ω_pre|, discard = 1 − "
             "preserve, new = |Ω_ft \\ Ω_pre| / |Ω_ft|, exclusive = share of the preserved items "
             "the scratch model lacks; each is aggregated as the <b>mean of the per-sample "
             f"ratios</b> (std over samples), interactions matched by {html.escape(match)}.</p>"]
    from ..knowledge.plots import (
        other_image_levels,
        other_sample_word,
        plot_convergence,
        plot_ratios,
        plot_ratios_by_order,
        plot_set_purity,
        plot_strength_by_order,
        purity_is_informative,
    )

    word = other_sample_word(k)

    figures = [(plot_strength_by_order, "Normalised strength of interactions per order, mean over "
                "samples.", "strength by order"),
               (plot_ratios, "preserve = |Ω_pre ∩ Ω_ft| / |Ω_pre|; discard = 1 - preserve; new = "
                "|Ω_ft \\ Ω_pre| / |Ω_ft|; exclusive = share of preserved knowledge the scratch "
                "model lacks (means of per-sample ratios); black ticks: each ratio's chance level, "
                "were the other model's salient interactions random, as many per order; grey "
                f"dots: each ratio with the other model's knowledge of another {word}.",
                "knowledge ratios: " + ", ".join(
                    f"{n} {_fixed(overall[n]['mean'])}" for n in overall)),
               (plot_ratios_by_order, "The ratios per interaction order k = |S| (mean over the samples "
                "with salient interactions of that order).", "knowledge ratios by order")]
    if purity_is_informative(k):
        figures.append((plot_set_purity, "Discrimination power of each set: over the samples of a "
                        "class, how consistently its interactions push the output the same way "
                        "(1 = always the same sign); bar: mean over the classes of two samples or "
                        "more, dots: those classes.", "discrimination purity"))
    if "convergence" in k:
        figures.append((plot_convergence, "Similarity of each snapshot's knowledge to its run's "
                        "final model's (solid), and the share of it the final model drops "
                        "(dashed), over the training step each snapshot records.", "convergence"))
    for draw, caption, alt in figures:
        fig, ax = subplots(figsize=(5.2, 3.2))
        draw(k, ax)
        parts.append(_figure(fig, caption, alt))
    parts.append(overlays)
    # .get: a knowledge.json of an earlier version records no standard error
    chance = k["report"]["chance"]
    other = other_image_levels(k)
    rows = [[n, _fixed(overall[n]["mean"]), _fixed(chance.get(n, {}).get("mean")),
             _fixed(other.get(n, {}).get("mean")), _fixed(overall[n].get("sem")),
             _fixed(overall[n]["std"]), overall[n].get("n_used", "")] for n in overall]
    parts.append(_table(["ratio", "mean of per-sample ratios", "chance level (random salient "
                         "sets of the same sizes per order)", f"other {word} (the compared "
                         f"model's knowledge of another {word})", "standard error of the mean",
                         "std over samples", "samples"], rows))
    parts.append(_by_order(k["report"]["by_order"]))
    parts.append(_convergence(k))
    parts.append(_rule_recovery(k, tau))
    faith = k["faithfulness"]
    parts.append("<h3>Faithfulness</h3><p>How well each model's salient interactions alone "
                 "reproduce its output on all 2^n masks: the error |v(S) − ŵ(S)| in units of "
                 "|v(N) − v(∅)| (the output the players explain), its max over the masks and "
                 "its mean, each averaged over samples, and the worst sample's max.</p>" + _table(
                     ["model", "max error / |v(N) − v(∅)| (mean over samples)",
                      "mean error / |v(N) − v(∅)|", "worst sample"],
                     [[r, _fixed(f["max"], 4), _fixed(f["mean"], 4),
                       _fixed(f["max_over_samples"], 4)] for r, f in faith.items()]))
    parts.append(_set_ablation(k["ablation"]))
    if "ablation_pretrained" in k:  # since this version
        parts.append(_set_ablation(k["ablation_pretrained"], "pretrained"))
    if "contiguity" in k:  # image players, since this version
        parts.append(_contiguity(k["contiguity"]))
    cf = k["counterfactual"]
    if cf.get("n_sets"):
        _check_entries(k, COUNTERFACTUAL_KEYS, kdir / "knowledge.json", **check)
        ratio = cf["effect_ratio"]  # None when removing random players changed nothing
        verdict = ("Removing random players does not change the output, so the ratio is undefined"
                   if ratio is None else
                   "Removing the players of preserved interactions changes the output clearly more "
                   "than removing as many random players" if ratio > 1.2 else
                   "Removing the players of preserved interactions changes the output about as "
                   "much as removing as many random players: the check does not single them out"
                   if ratio >= 0.8 else
                   "Removing the players of preserved interactions changes the output <b>less</b> "
                   "than removing random players")
        parts.append("<h3>Counterfactual check</h3>" + _table(
            ["sets", "mean |Δv| preserved", "mean |Δv| random", "ratio",
             "rank corr(predicted, measured)"],
            [[cf["n_sets"], f"{cf['mean_abs_change_preserved']:.3f}",
              f"{cf['mean_abs_change_random']:.3f}", _fixed(ratio, 2),
              # .get: a knowledge.json of an earlier version has no rank correlation
              "n/a" if cf.get("prediction_spearman") is None else f"{cf['prediction_spearman']:.3f}"]])
            + f'<p class="{"good" if ratio is not None and ratio > 1.2 else "note"}">{verdict} '
              f"(ratio {_fixed(ratio, 2)}).</p>")
    return "".join(parts)


def _set_ablation(ablation: dict, model: str = "finetuned") -> str:
    """A model's game rebuilt from each of its knowledge sets alone (``SetAblation.to_dict()``
    in ``knowledge.json``: ``ablation`` of the fine-tuned model, ``ablation_pretrained``)."""
    rows = [[name, f"{a['items']:.1f}", _fixed(a["fidelity"]["mean"]), _fixed(a["share"]["mean"]),
             _fixed(a["error"]["mean"], 4), _fixed(a["same_decision"]["mean"], 2)]
            for name, a in ablation.items()]
    from ..knowledge.metrics import MODEL_NAMES

    whose = MODEL_NAMES[model]
    sets = ("what fine-tuning keeps of it (preserve) or drops (discard)" if model == "pretrained"
            else "preserve, new")
    return (f"<h3>Each knowledge set alone: the {whose} model</h3><p>The {whose} model's output "
            f"rebuilt from v(∅) and only the interactions of one set ({sets}; salient: all of "
            "its knowledge), compared with the output on all 2^n masks: fidelity R² (1: the set "
            "reproduces the output, 0: no better than its mean), the share of v(N) − v(∅) on the "
            "whole input that the set accounts for, the mean error in units of |v(N) − v(∅)|, and "
            "the share of samples on which the set alone keeps the model's decision (the sign "
            "of the log-odds; n/a for other outputs). Means over samples.</p>" + _table(
                ["set", "items per sample", "fidelity R²", "share of v(N) − v(∅)",
                 "mean error / |v(N) − v(∅)|", "same decision"], rows))


def _contiguity(sets: dict) -> str:
    """Each knowledge set's share of interactions of neighbouring players against chance
    (``Contiguity.to_dict()`` in ``knowledge.json``)."""
    rows = [[name, c["items"], _fixed(c["contiguous_share"]), _fixed(c["chance_share"]),
             _fixed(c["enrichment"], 2), _fixed(c["z"], 1)] for name, c in sets.items()]
    text = ("<h3>Neighbouring players</h3><p>Of each set's interactions of two or more players, "
            "the share whose players form one connected region (cells that share an edge), "
            "against the share coalitions drawn at random with the same orders would have on the "
            "same players; z: the excess in standard deviations of that chance count (it treats "
            "the interactions as independent, so read it as a size, not a test).</p>")
    return text + _table(["set", "interactions of order ≥ 2", "connected", "chance", "ratio", "z"],
                         rows)


def _models_table(run: Path, k: dict) -> str:
    """Which weights file (and the ``finetune`` mode it records) plays each role."""
    from ..models import finetune_mode

    rows = []
    for role, model in k["meta"]["inputs"]["models"].items():
        path = Path(model["weights"]) if model["weights"] else None
        shown = "not a file" if path is None else (
            str(path.relative_to(run.resolve())) if path.is_relative_to(run.resolve()) else str(path))
        # an analysis of an earlier version records no mode: read from the file, if still there
        mode = model["mode"] if "mode" in model else finetune_mode(path)
        rows.append([role, shown, mode or "not recorded"])
    return _table(["role", "model (weights file)", "trained in mode"], rows)


def _by_order(by_order: dict) -> str:
    """The ratios by order as a table, and whether discarded knowledge is high-order (the paper's
    claim): the mean discard ratio of the upper half of the orders against the lower half."""
    from ..knowledge.plots import BY_ORDER

    orders = sorted(by_order, key=int)
    rows = [[o, *(f"{_fixed(by_order[o][n]['mean'])} ({by_order[o][n]['n_used']})"
                  for n in BY_ORDER)] for o in orders]
    parts = ["<h3>By interaction order</h3>",
             _table(["order k", *(f"{n} (samples)" for n in BY_ORDER)], rows)]
    discard = {int(o): by_order[o]["discard"]["mean"] for o in orders
               if by_order[o]["discard"]["mean"] is not None}
    if len(discard) < 2:
        return "".join(parts) + ('<p class="note">Too few orders have salient pre-trained '
                                 "interactions to compare low and high orders.</p>")
    ks = sorted(discard)
    low, high = ks[:len(ks) // 2], ks[len(ks) // 2:]
    lo, hi = (float(np.mean([discard[o] for o in half])) for half in (low, high))
    verdict = ("more of the high-order pre-trained knowledge is discarded, as the paper claims"
               if hi > lo else "high-order pre-trained knowledge is <b>not</b> discarded more "
               "than low-order knowledge here, unlike the paper's claim")
    parts.append(f'<p class="{"good" if hi > lo else "note"}">Discarded share at orders '
                 f"{high[0]}–{high[-1]}: {hi:.3f} (mean over orders) against {lo:.3f} at orders "
                 f"{low[0]}–{low[-1]}: {verdict}.</p>")
    return "".join(parts)


def _convergence(k: dict) -> str:
    """The scalar summaries of each convergence curve (every curve ends at 1, so its shape is
    told by when it gets there and how straight)."""
    from ..knowledge.plots import CURVES

    curves = [(run, k[key]) for key, (run, _) in CURVES.items() if key in k]
    if not curves:
        return ""
    rows = [[run, len(c["steps"]), f"{c['steps'][0]}–{c['steps'][-1]}", _fixed(c["auc"]),
             "never" if c["first_at_threshold"] is None else c["first_at_threshold"],
             c["n_decreases"], _fixed(c["total_detour"])] for run, c in curves]
    threshold = curves[0][1]["threshold"]
    return ("<h3>Convergence</h3><p>Summaries of each curve s(t) over its snapshots' training "
            "steps [recon, docs/knowledge.md §4]: the area under s(t) divided by the steps "
            f"spanned, the first step with s(t) ≥ {threshold:g}, how often s(t) drops (stability), "
            "and Σ_t d(t).</p>"
            + _table(["run", "snapshots", "steps", "AUC", f"first step with s ≥ {threshold:g}",
                      "decreases", "Σ detour"], rows))


def _rule_recovery(k: dict, tau: float) -> str:
    """Precision / recall of the salient interactions against the world's class rules."""
    truth = k.get("ground_truth")
    if not truth:
        return ""
    rows = [[role, *(_fixed(g["overall"][m]["mean"]) for m in ("precision", "recall", "signed_recall")),
             g["n_samples"]] for role, g in truth.items()]
    # None: a model without salient interactions on any sample has no precision
    best = max((g["overall"]["precision"]["mean"] for g in truth.values()
                if g["overall"]["precision"]["mean"] is not None), default=None)
    verdict = ("No model has salient interactions to compare with the rule." if best is None else
               "Most salient interactions are not terms of the class rule (precision at most "
               f"{best:.3f} for every model): the networks' interactions are dense, so salience at "
               f"{100 * tau:g}% of the largest effect does not isolate the rule's AND/OR terms. "
               "Recall shows "
               "whether the rule's terms are among the salient ones." if best < 0.5 else
               "The salient interactions are mostly terms of the class rule.")
    return ("<h3>Recovery of the planted class rules</h3><p>The world's classes are known AND/OR "
            "rules over parts; their Harsanyi interactions are the ground truth.</p>"
            + _table(["model", "precision", "recall", "signed recall", "samples"], rows)
            + f'<p class="note">{verdict}</p>')


_BASELINE_TEXT = {"zero": "mean-colour", "mean": "mean-image", "blur": "blurred-image",
                  "shrink": "shrunk-image", "learned": "learned"}
_BACKGROUND_TEXT = {"original": "; pixels of no player show the image",
                    "integrated": "; pixels of no player show blends of the image and the "
                                  "baseline, the output averaged over 10 blends"}


def _players_text(players: str) -> str:
    return "the world's 3x3 part slots" if players == "parts" else f"a {players[5:]} grid of patches"


def _overlays(run: Path, scenario: dict, tau: float, match: str, samples: int = 4) -> str:
    """Sample images with the fine-tuned model's strongest preserved interactions (salient at
    ``tau``, preserved by the ``match`` rule) drawn as the outlines of their players."""
    from ..data.catalog import open_dataset
    from ..knowledge.explain import ExplainConfig, sample_players
    from ..knowledge.plots import salient_figure

    files = sorted((run / "knowledge" / "finetuned").glob("interactions-*.safetensors"))[:samples]
    if not files:
        return _omitted("knowledge/finetuned/interactions-*.safetensors (the images with the "
                        "strongest preserved interactions)", run)
    test = open_dataset(scenario["target"], split="test")
    cfg = ExplainConfig(players=scenario["players"])
    shown, among = [], []
    for f in files:
        x = _interactions(f, run)
        # the pre-trained model's interactions on the same sample: the preserved ones are drawn
        pre = _interactions(run / "knowledge" / "pretrained" / f.name, run)
        i = x.info["index"]
        if pre.info["index"] != i or not 0 <= i < len(test):
            raise _not_this_run(f, f"sample {i} (the pre-trained model's file: sample "
                                f"{pre.info['index']}; the test data has {len(test)})")
        image = test.load(i)
        masks = sample_players(test, i, cfg, tuple(image.shape[-2:])).masks
        if len(masks) != x.n or pre.n != x.n:
            raise _not_this_run(f, f"{x.n} players (the pre-trained model's file: {pre.n}; the "
                                f"run's players {scenario['players']!r}: {len(masks)})")
        shown.append((image.permute(1, 2, 0).numpy(), masks, x))
        among.append(pre)
    fig = salient_figure(shown, among=among, tau=tau, match=match)
    return _figure(fig, "The strongest preserved interactions of the fine-tuned model: outlined "
                   "player cells of each interaction (colour = interaction, legend = type and "
                   "effect on the log-odds).", "salient interactions")


def _interactions(path: Path, run: Path):
    """The interactions at ``path`` of the demo ``run``; a missing or damaged file is refused
    naming the rerun that recomputes it (the demo redoes an analysis with such a file)."""
    from ..knowledge.values import Interactions

    try:
        return Interactions.load(path)
    except PretrainReuseError as e:
        raise PretrainReuseError(f"{e} (rerun `pretrain-reuse demo --out {run}` with the run's "
                                 "options: it recomputes the knowledge analysis)") from None


def _not_this_run(path: Path, holds: str) -> PretrainReuseError:
    """The error for interactions that do not fit the run's data or players."""
    return PretrainReuseError(f"{str(path)!r} explains {holds}: it does not fit this run's "
                              "data and players; rerun `pretrain-reuse demo` (into a new --out)")


def _versions(meta: dict) -> str:
    """The versions and threads that produced a result, from its meta block: not those of the
    process rendering the report (results of an earlier version record none)."""
    env = meta.get("environment", {})
    return _table(["package", "version"], [
        ["pretrain-reuse", meta.get("version", "not recorded")],
        *([name, env.get(name, "not recorded")] for name in ("python", "torch", "numpy")),
        ["CPU threads", env.get("threads", "not recorded")],
        ["GPU", env.get("gpu") or ("none" if env else "not recorded")]])


def _parameters_section(run: Path, summary: dict) -> str:
    rows = [[stage, f"{sec:.1f}"] for stage, sec in summary.get("timing_s", {}).items()]
    total = sum(summary.get("timing_s", {}).values())
    versions = _versions(summary.get("meta", {}))
    plan = json.dumps(summary.get("plan", {}), indent=1)
    return _section("Parameters, versions and time", "parameters",
                    f"<p>Seed {_text(summary.get('seed'))}, quick={_text(summary.get('quick'))}; "
                    f"total {total:.0f} s of stage time.</p>" + versions +
                    _table(["stage", "seconds"], rows) + f"<pre>{html.escape(plan)}</pre>")


#: Pairs of experiment rows whose comparison the report states (same swept value).
EXPERIMENT_COMPARISONS = (
    ("reuse uot classes", "vanilla"), ("reuse uot classes", "reuse random classes"),
    ("reuse-unlabeled uot clusters", "vanilla"),
    ("reuse-unlabeled uot clusters", "reuse-unlabeled random clusters"),
    ("reuse uot cosine", "reuse greedy-ot cosine"),
)


def _correlation(table, corrupted: bool = False) -> str:
    """The knowledge recipe's correlation of knowledge ratios with accuracy across models, or
    with their accuracy on corrupted test data."""
    from ..experiments.table import correlation_title

    correlation = table.correlation(corrupted=corrupted)
    if correlation is None:
        return ""
    text, head, rows = correlation
    if not rows:
        return f'<p class="note">{_text(text)}</p>'
    return f"<h3>{correlation_title(corrupted)}</h3><p>{_text(text)}</p>" + _table(head, rows)


def _experiment_curves(run: Path, table) -> str:
    """The fine-tuning curves of every row of the ``table`` (its runs only: the folder may hold
    others, of seeds dropped on a rerun): the mean test top-1 over the row's seeds at each step,
    one colour per row, the legend beside the axes (table1 alone has 8 rows)."""
    from matplotlib import colormaps

    from ..experiments.table import run_folder
    from ..knowledge.plots import literal

    rows = [r for r in table.rows if r["seeds"]]
    if not rows:
        return ""
    # distinct colours: the 10 of tab10, then the 20 of tab20, then a sequential map
    colours = ([colormaps["tab10" if len(rows) <= 10 else "tab20"](i) for i in range(len(rows))]
               if len(rows) <= 20 else list(colormaps["viridis"](np.linspace(0, 1, len(rows)))))
    fig, ax = subplots(figsize=(6.4, 3.6))
    for row, colour in zip(rows, colours, strict=True):
        top1: dict[int, list[float]] = {}  # step -> the seeds' test top-1 there
        for seed in row["seeds"]:
            path = run_folder(run, row["method"], row["x"], seed) / "result.json"
            result = _run_result(path, _experiment_command(run))
            with _reading(path, EXPERIMENT_REDO):
                for h in result.history:
                    top1.setdefault(h["step"], []).append(h["test"]["top1"])
        steps = sorted(top1)
        x = f"{row['x']:g}" if isinstance(row["x"], float) else row["x"]  # 3.0 as 3
        label = row["method"] + ("" if x is None else f" ({table.x_label} = {x})")
        ax.plot(steps, [np.mean(top1[t]) for t in steps], marker="o", ms=3, color=colour,
                label=literal(label))
    ax.set_xlabel("step")
    ax.set_ylabel("target test top-1 (mean over seeds)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    runs = sum(len(r["seeds"]) for r in rows)
    return _figure(fig, f"Fine-tuning curves ({runs} of {runs} runs): one line per row of the "
                   "table, the mean test top-1 over its seeds at each evaluation.",
                   f"fine-tuning curves of the {len(rows)} rows")


def _experiment_body(run: Path) -> list[str]:
    """The page of an ``experiment`` folder: its table, plot, comparisons and curves."""
    from ..experiments import RECIPES, ExperimentTable

    table = ExperimentTable.load(run)
    fig, ax = subplots(figsize=(6.4, 4.0))
    table.plot(ax)
    verdicts = []
    by_key = {(r["method"], r["x"]): r for r in table.rows if r["top1_mean"] is not None}
    for x in dict.fromkeys(r["x"] for r in table.rows):
        ft = {m: r for (m, rx), r in by_key.items() if rx == x}
        for a, b in EXPERIMENT_COMPARISONS:
            where = "" if x is None else f"At {table.x_label} = {x}: "
            verdicts.append(_compare(ft, a, b, where))
    note = table.note()
    head, cells = table.cells()
    # the alternative to the plot: each row's plotted value (accuracy, or recall without one)
    shown = [h for h in head if h.startswith("test top-1 (final")] or ["recall"]
    values = "; ".join(f"{c[0]} {c[head.index(shown[0])]}" for c in cells
                       if shown[0] in head and c[head.index(shown[0])])
    parts = [_figure(fig, RECIPES[table.name][2], f"experiment results: {values}"),
             _table(head, cells), *([f"<p>{html.escape(note)}</p>"] if note else []), *verdicts]
    parts.append(_correlation(table))
    parts.append(_correlation(table, corrupted=True))
    parts.append(_experiment_curves(run, table))
    params = json.dumps(table.params, indent=1)
    return [f"<h1>pretrain-reuse experiment {html.escape(table.name)}</h1>",
            f"<p>{html.escape(RECIPES[table.name][2])}"
            + ("" if table.name == "knowledge" else " (Liu et al., NeurIPS 2022)") + ", run on the "
            f"data and backbone below. Run folder: <code>{html.escape(str(run))}</code>.</p>",
            _section("Results", "experiment", "".join(parts)),
            _section("Parameters and versions", "parameters",
                     _versions(table.meta) + f"<pre>{html.escape(params)}</pre>")]


#: What the report says to do about a fine-tuning run's or grid's file it cannot read.
FINETUNE_REDO = "rerun its finetune command into a new --out and report on that folder"


def _finetune_run_body(run: Path) -> list[str]:
    """A ``finetune`` run folder: its test and validation accuracy over training, its losses, the
    result at the last step and at the best validation evaluation, and its recipe."""
    result = _run_result(run / "result.json", _finetune_command(run))
    history, final, best = result.history, result.final, result.at_best_val
    inputs = result.meta.get("inputs", {})
    given = [f"{key} <code>{_text(inputs[key])}</code>" for key in ("model", "target", "source")
             if inputs.get(key) not in (None, "None")]
    fig, ax = subplots(figsize=(5.2, 3.4))
    result.plot(ax)
    ax.legend()
    curves = _figure(fig, "Top-1 accuracy on the validation split (dashed: what picks the "
                     "evaluation) and the test split at each evaluation.",
                     f"Accuracy over training; final test top-1 {_fixed(final['top1'], 4)}")
    losses = [k for k in history[-1] if k not in ("step", "epoch", "val", "test")]
    fig, ax = subplots(figsize=(5.2, 3.4))
    for key in losses:
        ax.plot([h["step"] for h in history], [h[key] for h in history], marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (step of the evaluation)")
    ax.legend()
    losses_fig = _figure(fig, "The training losses read at each evaluation's step.",
                         f"Losses over training: {', '.join(losses)}")
    rows = [["test top-1", _fixed(final["top1"], 4), _fixed(best["top1"], 4)],
            ["test mean per-class accuracy", _fixed(final["mean_class_acc"], 4),
             _fixed(best["mean_class_acc"], 4)],
            ["validation top-1", _fixed(final["val"]["top1"], 4), _fixed(best["val"]["top1"], 4)]]
    table = _table(["", f"after the last step ({final['step']})",
                    f"at the best validation evaluation ({best['step']})"], rows)
    config = json.dumps(result.config, indent=1)
    return [
        "<h1>pretrain-reuse report: a fine-tuning run</h1>",
        f"<p>Mode <code>{_text(result.config['mode'])}</code>; {'; '.join(given)}. Run folder: "
        f"<code>{_text(run)}</code>. The test split never picks anything: the second column is "
        "the test accuracy at the evaluation with the best validation top-1.</p>",
        _section("Results", "results", table + curves + losses_fig),
        _section("Recipe, versions and time", "parameters",
                 f"<p>{_text(result.meta.get('train_seconds', 'n/a'))} s of training.</p>"
                 + _versions(result.meta) + f"<pre>{html.escape(config)}</pre>")]


def _grid_body(run: Path) -> list[str]:
    """A ``finetune --grid`` folder: every combination's validation and test accuracy, and the
    one the validation split picked."""
    grid = read_json(run / "grid.json", "grid search")
    _check_entries(grid, ("grid", "best.run", "rows"), run / "grid.json")
    names = sorted(grid["grid"])
    rows = [[r["run"], *(_text(r[n]) for n in names), _fixed(r["val_top1"], 4),
             _fixed(r["test_top1_at_best_val"], 4), _fixed(r["test_top1_final"], 4),
             _text(r["best_step"])] for r in grid["rows"]]
    best = grid["best"]
    return [
        "<h1>pretrain-reuse report: a grid search</h1>",
        f"<p>{len(rows)} fine-tuning runs over {', '.join(map(_text, names))}, picked by "
        f"validation top-1: <code>{_text(best['run'])}</code> (validation "
        f"{_fixed(best['val_top1'], 4)}, its test top-1 {_fixed(best['test_top1_at_best_val'], 4)} "
        f"at that evaluation). Run folder: <code>{_text(run)}</code>; each run's own report: "
        "<code>pretrain-reuse report</code> on its folder.</p>",
        _section("Runs", "runs", _table(["run", *names, "validation top-1 (best)",
                                         "test top-1 at best validation", "test top-1 (final)",
                                         "best step"], rows)),
        _section("Versions", "parameters", _versions(grid.get("meta", {})))]


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the run's files (a demo, an experiment, a fine-tuning
    run, a grid search or a knowledge analysis folder) and return its path.

    A folder a command is writing now (:func:`~pretrain_reuse.artifacts.folder_in_use`: a run,
    or a rerun with more seeds or samples) is reported as it last finished, with a note saying
    so; one that has not finished yet is refused as being written, not with the advice to rerun
    it (which the lock would refuse)."""
    # absolute: the page (and the commands it names) do not depend on how the path was typed
    run = check_file("run folder", run_dir).resolve()
    if run.is_file():
        raise PretrainReuseError(f"{str(run)!r} is a file; pass the demo, experiment, fine-tuning "
                                 "run, grid or knowledge analysis folder that holds it")
    busy = folder_in_use(run)
    try:
        body = _page_body(run)
    except PretrainReuseError:
        if not busy:
            raise
        # not the error's advice: the rerun it names would be refused while the folder is held
        raise PretrainReuseError(
            f"{str(run)!r} is being written by another process now, and has not finished what "
            "report shows; report on it once that process has finished") from None
    if busy:
        note = ("another process was writing this folder when this page was made (a run, or a "
                "rerun with more seeds or samples): the page shows what had finished by then; "
                "run report again once it has finished")
        warnings.warn(f"{str(run)!r}: {note}", stacklevel=user_stacklevel())
        body.insert(1, f'<p class="note">Note: {html.escape(note)}.</p>')
    out = run / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(_page(body))
    return out


def _page_body(run: Path) -> list[str]:
    """The page of the folder ``run``: a list of HTML fragments, its title first."""
    if (run / "experiment.json").exists():
        with _reading(run / "experiment.json", EXPERIMENT_REDO):
            return _experiment_body(run)
    if (run / "grid.json").exists():
        with _reading(run / "grid.json", FINETUNE_REDO):
            return _grid_body(run)
    if (run / "sensitivity.json").exists():
        with _reading(run / "sensitivity.json", KNOWLEDGE_REDO):
            return _sensitivity_body(run)
    kind = _marker(run).get("kind")
    # a fine-tuning run by its marker, or by its result (a corrupt result.json is named as such)
    if kind == "finetune-run" or (kind is None and (run / "result.json").exists()):
        with _reading(run / "result.json", FINETUNE_REDO):
            return _finetune_run_body(run)
    if kind == "sensitivity-run":  # likewise
        raise PretrainReuseError(f"{str(run)!r}: this knowledge sensitivity analysis has not "
                                 "finished (it has no sensitivity.json yet); rerun its knowledge "
                                 "--vary command with the same --out to resume it")
    if kind == "grid-run":  # its marker records no command to name
        raise PretrainReuseError(f"{str(run)!r}: this grid search has not finished (it has no "
                                 "grid.json yet); rerun its finetune --grid command with the same "
                                 "--out to resume it")
    summary_path = run / "summary.json"
    if not summary_path.exists() and kind is None:
        if (run / "knowledge.json").exists():
            with _reading(run / "knowledge.json", KNOWLEDGE_REDO):
                return _knowledge_body(run)
        if (run / "explain.json").exists():
            raise _explain_folder(run)
        from ..knowledge.analysis import ROLES

        if any((run / role / "explain.json").is_file() for role in ROLES):
            raise PretrainReuseError(f"{str(run)!r}: this knowledge analysis has not finished (it "
                                     "has no knowledge.json yet); rerun its knowledge command "
                                     "with the same --out to resume it")
    if not summary_path.exists() and kind in ("demo-run", "experiment-run"):
        what, command = (("demo", _demo_command(run)) if kind == "demo-run" else
                         ("experiment", _experiment_command(run)))
        raise PretrainReuseError(f"{str(run)!r}: this {what} has not finished (it has no "
                                 f"{'summary' if what == 'demo' else 'experiment'}.json yet); "
                                 f"rerun its command with the same --out to resume it: `{command}`")
    if not summary_path.exists():
        raise PretrainReuseError(f"{str(run)!r} has no summary.json, experiment.json, "
                                 "result.json, grid.json or knowledge.json; pass a demo, "
                                 "experiment, fine-tuning run, grid or knowledge analysis folder")
    summary = read_json(summary_path, "summary")
    _check_entries(summary, SUMMARY_KEYS, summary_path)
    with _reading(summary_path, DEMO_REDO):
        body = [
            "<h1>pretrain-reuse report</h1>",
            "<p>Selection of pre-training data by unbalanced optimal transport (Liu et al., "
            "NeurIPS 2022) and the knowledge pre-training hands to the fine-tuned model (Jiang, "
            f"Cheng &amp; Li, arXiv 2410.08455), on "
            f"{html.escape(str(summary['scenario']['description']))}. Run folder: "
            f"<code>{html.escape(str(run))}</code>.</p>",
            _selection_section(run, summary),
            _finetune_section(run, summary),
        ]
        players = _players_text(summary["scenario"]["players"])
    with _reading(run / "knowledge" / "knowledge.json", DEMO_REDO):
        body.append(_knowledge_section(run, summary["scenario"], players))
    with _reading(run / "knowledge_sensitivity" / "sensitivity.json", DEMO_REDO):
        body.append(_demo_sensitivity_section(run))
    with _reading(summary_path, DEMO_REDO):
        body.append(_parameters_section(run, summary))
    return body


def _knowledge_body(run: Path) -> list[str]:
    """The page of a standalone ``knowledge`` folder (the ``knowledge`` command's, or one of an
    experiment's ``knowledge/``): the demo's knowledge section, from its ``knowledge.json``, with
    the analysis's own figure of the preserved interactions, and its settings and versions."""
    redo = {"owner": "a knowledge analysis's", "redo": KNOWLEDGE_REDO}
    k = _read_knowledge(run, "its `pretrain-reuse knowledge` command with the same --out", **redo)
    params = k["meta"].get("params", {})
    players, n = str(params.get("players", "")), params.get("n")
    if players == "tokens":
        shown = f"{n} words of each sentence"
    elif players == "parts" or (players.startswith("grid:") and n is None):
        shown = _players_text(players)
    elif players.startswith("grid:"):
        shown = f"{n} cells drawn from {_players_text(players)}"
    else:  # a knowledge.json of an earlier version records no settings
        shown = "as the analysis chose them"
    if players == "tokens":
        overlays = ""  # the analysis draws no images of sentences
    elif (run / "preserved.png").is_file():
        overlays = _embedded(base64.b64encode((run / "preserved.png").read_bytes()).decode(),
                             "The strongest preserved interactions of the fine-tuned model: "
                             "outlined player cells of each interaction (the analysis's own "
                             "preserved.png).", "salient interactions")
    else:
        overlays = (f'<p class="note">Not in this folder: preserved.png (the images with the '
                    f"strongest preserved interactions); {html.escape(KNOWLEDGE_REDO)}.</p>")
    inputs = k["meta"]["inputs"]
    data = inputs.get("data_path") or inputs.get("data")  # a file or folder, else a name
    split = params.get("split")
    where = f"{data} ({split})" if split else f"{data}"
    settings = json.dumps(params, indent=1)
    return [
        "<h1>pretrain-reuse report: a knowledge analysis</h1>",
        "<p>Which knowledge of the pre-trained model fine-tuning preserves, discards or adds "
        "(Jiang, Cheng &amp; Li, arXiv 2410.08455), on the data "
        f"<code>{_text(where)}</code>. Folder: <code>{_text(run)}</code>.</p>",
        _section("Knowledge handed over by pre-training", "knowledge", _knowledge_parts(
            k, run, run, players=shown, baseline=str(params.get("baseline", "zero")),
            samples="samples" if players == "tokens" else "images", overlays=overlays, **redo)),
        _section("Settings and versions", "parameters",
                 _versions(k["meta"]) + f"<pre>{html.escape(settings)}</pre>")]


def _sensitivity_parts(result) -> str:
    """The ratios of a :class:`~pretrain_reuse.knowledge.sensitivity.KnowledgeSensitivity` per
    setting, their paired change from the first setting with a verdict generated from the
    standard errors (and the settings too few samples compare), and the figure."""
    from ..knowledge.metrics import PAPER_RATIOS
    from ..knowledge.sensitivity import CHECKS

    rows, diffs = result.rows(), result.differences()
    reference = rows[0]["variant"]
    names = [n for n in PAPER_RATIOS if n in rows[0]]
    checks = [c for c in CHECKS if c in rows[0]]
    table = _table(["setting", "samples", *names, *(c.replace("_", " ") for c in checks)],
                   [[r["variant"], r["explained"],
                     *(f"{_fixed(r[n])} ± {_fixed(r[f'{n}_se'])}" for n in names),
                     *(_fixed(r[c]) for c in checks)] for r in rows])
    changes = _table(["setting", *(f"{n} change" for n in names)],
                     [[tag, *(f"{_fixed(d[n]['mean'], 3)} ± {_fixed(d[n]['se'], 3)} ({d[n]['n']})"
                              for n in names)] for tag, d in diffs.items()])
    moved = [f"{n} with {tag} ({d[n]['mean']:+.3f} ± {d[n]['se']:.3f})"
             for tag, d in diffs.items() for n in names
             if d[n]["se"] is not None and abs(d[n]["mean"]) > 2 * d[n]["se"]]
    uncompared = [tag for tag, d in diffs.items() if all(d[n]["se"] is None for n in names)]
    compared = len(diffs) - len(uncompared)
    verdict = (f'<p class="note">Beyond two standard errors of the paired change from '
               f"{_text(reference)}: {_text('; '.join(moved))}. Conclusions drawn from these "
               "ratios depend on the analysis's choices.</p>" if moved else
               f'<p class="good">No setting of the {compared} compared moves a ratio beyond two '
               f"standard errors of its paired change from {_text(reference)}.</p>" if compared
               else "")
    if uncompared:
        verdict += (f'<p class="note">Not compared, fewer than two of their samples being '
                    f"{_text(reference)}'s (another seed or number of samples): "
                    f"{_text(', '.join(uncompared))}.</p>")
    return (table + "<p>Mean ± standard error over the samples that define each ratio; the "
            "checks are the fine-tuned model's mean faithfulness error, the counterfactual effect "
            "ratio, the fidelity R² of its preserved interactions alone, and the chance and "
            "other-image levels of the preserve ratio. Change from "
            f"<code>{_text(reference)}</code>: the mean over the samples both settings explain "
            "of the per-sample difference, ± its standard error (paired samples in brackets).</p>"
            + changes + verdict + _figure(result.figure(), "Each ratio per setting, mean ± "
                                          "standard error over samples.",
                                          "knowledge ratios per setting"))


def _sensitivity_body(run: Path) -> list[str]:
    """A ``knowledge --vary`` folder: :func:`_sensitivity_parts` and its versions."""
    from ..knowledge.sensitivity import KnowledgeSensitivity

    result = KnowledgeSensitivity.load(run / "sensitivity.json")
    return [
        "<h1>pretrain-reuse report: a knowledge sensitivity analysis</h1>",
        f"<p>{len(result.variants)} knowledge analyses of the same models on the same data, one "
        f"per setting of {_text(', '.join(result.vary))}; the first is the reference. Folder: "
        f"<code>{_text(run)}</code>; each setting's own report: <code>pretrain-reuse "
        "report</code> on its sub-folder.</p>",
        _section("Knowledge ratios per setting", "ratios", _sensitivity_parts(result)),
        _section("Versions", "parameters", _versions(result.meta))]


def _demo_sensitivity_section(run: Path) -> str:
    """The demo's sensitivity stage: the knowledge ratios with each baseline."""
    from ..knowledge.sensitivity import KnowledgeSensitivity

    path = run / "knowledge_sensitivity" / "sensitivity.json"
    title = "How the knowledge ratios move with the baseline"
    if not path.exists():
        return _section(title, "sensitivity", _omitted(
            "knowledge_sensitivity/sensitivity.json (the analysis with each baseline)", run))
    return _section(title, "sensitivity", "<p>The knowledge analysis above, repeated on the same "
                    "models and images with each baseline for absent players.</p>"
                    + _sensitivity_parts(KnowledgeSensitivity.load(path)))


def _explain_folder(run: Path) -> PretrainReuseError:
    """The refusal of an ``explain`` folder (or of a model's folder inside a knowledge
    analysis), naming what it holds and what to open instead."""
    if (run.parent / "knowledge.json").is_file():
        return PretrainReuseError(
            f"{str(run)!r} holds the interactions of one model ({run.name}) of the knowledge "
            f"analysis in {str(run.parent)!r}; pass that folder: `pretrain-reuse report "
            f"{run.parent}`")
    # word players draw no figure: salient.png is there for image players only
    figure = ("its figure is salient.png beside them, and " if (run / "salient.png").is_file()
              else "")
    return PretrainReuseError(
        f"{str(run)!r} is the output of explain (one interactions file per sample), which report "
        f"does not render: {figure}pretrain_reuse.load(<folder>/interactions-0000.safetensors) "
        "opens one sample's interactions; report renders a knowledge analysis (pretrain-reuse "
        "knowledge), demo, experiment, fine-tuning run or grid folder")


def _page(body: list[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pretrain-reuse report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
