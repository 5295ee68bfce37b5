"""Figures of the knowledge analysis, shared by ``explain`` / ``knowledge`` (PNG files next to
their JSON) and the HTML report: interaction strength by order, the knowledge ratios, the
convergence curves, and salient interactions drawn as outlined players over the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..figures import save_png, subplots
from .metrics import MIN_CLASS_SAMPLES, MODEL_NAMES, knowledge_set
from .values import Interactions

RATIO_COLOURS = {"preserve": "C2", "discard": "C3", "new": "C0", "exclusive": "C4"}


def literal(text: Any) -> str:
    """``text`` (a label from a run's files or config) as matplotlib draws it letter for letter: a
    ``$`` starts mathtext there, so ``$5 to $10`` would be set as maths and ``B $x`` fail to
    draw. Every text drawn from user data goes through it."""
    return str(text).replace("$", r"\$")


def plot_strength_by_order(summary: dict[str, Any], ax) -> None:
    """Share of Σ|I| per interaction order, one line per model (``knowledge.json``)."""
    for role, hist in summary["strength_by_order"].items():
        ax.plot(range(1, len(hist) + 1), hist, marker="o", label=literal(role))
    ax.set_xlabel("interaction order |S|")
    ax.set_ylabel("share of Σ|I|")
    ax.legend()
    ax.set_title("Interaction strength by order")


def other_sample_word(summary: dict[str, Any]) -> str:
    """What the other-image control of an analysis (``knowledge.json``) pairs each sample
    with, in a word: ``"sentence"`` for token players, ``"image"`` otherwise."""
    players = summary.get("meta", {}).get("params", {}).get("players")
    return "sentence" if players == "tokens" else "image"


def other_image_levels(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each ratio's other-image control in an analysis's summary (``knowledge.json``):
    ``{ratio: its stats}``; empty where there is none (a single sample, an earlier version's)."""
    return (summary.get("other_image") or {}).get("overall", {})


def plot_ratios(summary: dict[str, Any], ax) -> None:
    """Preserved / discarded / new / exclusive knowledge, mean ± std over samples, each with its
    chance level (a black tick: :meth:`~.metrics.SampleKnowledge.chance_terms`) and its
    other-image control (a grey dot: :func:`~.metrics.other_image_control`); a ratio that no
    sample defines (its denominator is empty on every sample, e.g. no salient interaction) is None
    there, and drawn as an empty bar marked n/a."""
    overall = summary["report"]["overall"]
    names = [n for n in RATIO_COLOURS if n in overall]
    means = [overall[n]["mean"] for n in names]
    ax.bar([n if m is not None else f"{n}\n(n/a)" for n, m in zip(names, means, strict=True)],
           [m or 0.0 for m in means],
           yerr=[overall[n]["std"] or 0.0 for n in names],
           color=[RATIO_COLOURS[n] for n in names], capsize=4)
    # absent from the files of earlier versions (and the control from a single sample's)
    levels = ((summary["report"].get("chance", {}), dict(marker="_", s=900, color="black"),
               "chance (random salient sets)"),
              (other_image_levels(summary),
               dict(marker="o", s=30, color="dimgrey"),
               f"other {other_sample_word(summary)} (same models)"))
    for level, style, label in levels:
        marked = [(i, level[n]["mean"]) for i, n in enumerate(names)
                  if level.get(n, {}).get("mean") is not None]
        if marked:
            ax.scatter(*zip(*marked, strict=True), zorder=3, label=label, **style)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")
    # a ratio is at most 1, but its error bar may reach past it: the axis shows the whole bar
    tops = [(m or 0.0) + (overall[n]["std"] or 0.0) for n, m in zip(names, means, strict=True)]
    ax.set_ylim(0, max([1.0, *tops]) * 1.05)
    ax.set_ylabel("ratio (mean ± std over samples)")
    ax.set_title("Knowledge ratios (mean ± std over samples)")


#: The ratios drawn by interaction order.
BY_ORDER = ("preserve", "discard", "new")


def plot_ratios_by_order(summary: dict[str, Any], ax) -> None:
    """Preserve / discard / new per interaction order k = |S| (``report.by_order`` of
    ``knowledge.json``: means of the per-sample ratios); an order no sample defines is a gap."""
    by_order = summary["report"]["by_order"]
    orders = sorted(by_order, key=int)
    for name in BY_ORDER:
        means = [by_order[o][name]["mean"] for o in orders]
        ax.plot([int(o) for o in orders], [np.nan if m is None else m for m in means],
                marker="o", color=RATIO_COLOURS[name], label=name)
    ax.set_xlabel("interaction order |S|")
    ax.set_ylabel("ratio (mean over samples)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Knowledge ratios by order")


def plot_set_purity(summary: dict[str, Any], ax) -> None:
    """Discrimination purity of each knowledge set (the ``discrimination`` entry of
    ``knowledge.json``, ``SetDiscrimination.to_dict()``): a bar at the mean over classes, a dot per
    class, both over the classes of two samples or more (one sample's purity is 1 whatever its
    model knows); a set empty on every such class is an empty bar marked n/a."""
    discrimination = summary["discrimination"]
    names = [n for n in RATIO_COLOURS if n in discrimination]
    means = [discrimination[n]["purity"] for n in names]
    ax.bar([n if m is not None else f"{n}\n(n/a)" for n, m in zip(names, means, strict=True)],
           [m or 0.0 for m in means], color=[RATIO_COLOURS[n] for n in names], alpha=0.6)
    for x, name in enumerate(names):
        per_class = [c["purity"] for c in discrimination[name]["by_class"].values()
                     if c["purity"] is not None and c["n_samples"] >= MIN_CLASS_SAMPLES]
        ax.plot([x] * len(per_class), per_class, "k.", markersize=4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("purity (α-weighted β)")
    ax.set_title("Discrimination power of each knowledge set (dots: classes)")


def plot_set_ablation(ablation: dict[str, Any], ax, *, model: str = "finetuned") -> None:
    """Each knowledge set of ``model`` alone (``SetAblation.to_dict()``: the ``ablation`` or
    ``ablation_pretrained`` entry of ``knowledge.json``): per set, its surrogate's fidelity R²
    over all masks (solid) and the share of v(N) - v(∅) it accounts for (hatched), means over
    samples; a mean no sample defines is an empty bar, and the set's label says n/a."""
    names = list(ablation)
    colours = [RATIO_COLOURS.get(n, "C7") for n in names]
    x = np.arange(len(names))
    for offset, measure, hatch in ((-0.2, "fidelity", None), (0.2, "share", "//")):
        means = [ablation[n][measure]["mean"] for n in names]
        ax.bar(x + offset, [m or 0.0 for m in means], width=0.4, color=colours,
               hatch=hatch, alpha=0.8 if hatch is None else 0.45, label=measure)
    undefined = [any(ablation[n][m]["mean"] is None for m in ("fidelity", "share")) for n in names]
    ax.set_xticks(x, [f"{n}\n(n/a)" if u else n for n, u in zip(names, undefined, strict=True)])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("mean over samples")
    ax.legend(fontsize=7)
    ax.set_title(f"Each knowledge set alone: the {MODEL_NAMES[model]} model")


#: The convergence curves of ``knowledge.json``: its entry, the run it follows, its colour.
CURVES = {"convergence": ("fine-tuning", "C0"), "scratch_convergence": ("scratch", "C1")}


def plot_convergence(summary: dict[str, Any], ax) -> None:
    """The convergence curves of ``knowledge.json`` on one axis (:func:`draw_convergence`): of
    fine-tuning and, with its snapshots, of scratch training."""
    for key, (run, colour) in CURVES.items():
        if key in summary:
            draw_convergence(ax, summary[key], run, colour)


def draw_convergence(ax, curve: dict[str, Any], run: str, colour: str = "C0") -> None:
    """One run's convergence (``Convergence.to_dict``) against the training step each snapshot
    records: s(t), the similarity of a snapshot's knowledge with its run's final model's (solid),
    and the detour d(t), the share of it the final model drops (dashed)."""
    from matplotlib.ticker import MaxNLocator

    ax.plot(curve["steps"], curve["similarity"], marker="o", color=colour,
            label=literal(f"{run}: {curve['measure']} with its final knowledge"))
    ax.plot(curve["steps"], curve["detour"], marker="s", ls="--", color=colour,
            label=literal(f"{run}: detour"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("similarity s(t), detour d(t)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Convergence of knowledge (cf. Fig. 4)")


def draw_salient(ax, image: np.ndarray, masks: np.ndarray, x: Interactions, *, tau: float = 0.05,
                 top: int = 3, among: Interactions | None = None, match: str = "support") -> None:
    """``image`` (H, W, C in [0, 1]) with the ``top`` strongest salient interactions of ``x``
    outlined: each player of an interaction as the bounding box of its mask (H, W), one colour
    per interaction, inset by rank so that shared players stay visible. ``among``: only
    interactions also salient there, matched by ``match`` as in the knowledge report
    (:func:`~.metrics.knowledge_set`; e.g. the pre-trained model: preserved knowledge)."""
    from matplotlib import patches

    salient = x.salient(tau)
    if among is not None:
        keep = knowledge_set(among, tau=tau, match=match)
        salient = {key[:2]: v for key, v in knowledge_set(x, tau=tau, match=match).items()
                   if key in keep}
    ax.imshow(np.clip(image, 0, 1), cmap="gray" if image.shape[-1] == 1 else None)
    for rank, ((kind, mask), value) in enumerate(sorted(salient.items(), key=lambda kv: -abs(kv[1]))[:top]):
        colour, inset = f"C{rank}", 0.5 * rank
        for p in range(x.n):
            if mask >> p & 1:
                rows, cols = np.nonzero(masks[p])
                y0, x0, y1, x1 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
                ax.add_patch(patches.Rectangle((x0 - .5 + inset, y0 - .5 + inset),
                                               x1 - x0 - 2 * inset, y1 - y0 - 2 * inset,
                                               fill=False, lw=2, edgecolor=colour))
        ax.plot([], [], color=colour, label=literal(f"{kind} {value:+.2f}"))
    ax.set_title(literal(x.info.get("class", "")), fontsize=8)
    if salient:
        ax.legend(fontsize=6, loc="lower left", framealpha=0.7)
    ax.axis("off")


def salient_figure(samples: list[tuple[np.ndarray, np.ndarray, Interactions]], *, tau: float = 0.05,
                   top: int = 3, among: list[Interactions] | None = None, match: str = "support"):
    """One panel per (image, player masks, interactions) sample (see :func:`draw_salient`)."""
    fig, axes = subplots(1, len(samples), figsize=(2.6 * len(samples), 2.9), squeeze=False)
    for k, (ax, (image, masks, x)) in enumerate(zip(axes[0], samples, strict=True)):
        draw_salient(ax, image, masks, x, tau=tau, top=top,
                     among=None if among is None else among[k], match=match)
    fig.tight_layout()
    return fig


def purity_is_informative(summary: dict[str, Any]) -> bool:
    """Whether ``knowledge.json``'s discrimination says something: a class has two samples or
    more (only those enter the purities; a file of an earlier version records no per-class
    counts)."""
    per_class = summary.get("samples", {}).get("per_class")
    return ("discrimination" in summary and bool(per_class)
            and max(per_class.values()) >= MIN_CLASS_SAMPLES)


def save_knowledge_plots(summary: dict[str, Any], out: str | Path) -> list[Path]:
    """``strength_by_order.png``, ``ratios.png``, ``ratios_by_order.png``, ``purity.png`` (with
    a class of two samples or more) and ``convergence.png`` (with snapshots)."""
    written = []
    for name, draw in (("strength_by_order", plot_strength_by_order), ("ratios", plot_ratios),
                       ("ratios_by_order", plot_ratios_by_order), ("purity", plot_set_purity),
                       ("convergence", plot_convergence)):
        if ((name == "convergence" and "convergence" not in summary)
                or (name == "purity" and not purity_is_informative(summary))):
            continue
        fig, ax = subplots(figsize=(5.2, 3.2))
        draw(summary, ax)
        written.append(save_png(fig, Path(out) / f"{name}.png"))
    return written
