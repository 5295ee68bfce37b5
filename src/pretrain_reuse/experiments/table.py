"""The results table of an experiment: :class:`ExperimentTable`, and where its runs live."""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ValueEquality, atomic_path, read_json, require_keys, write_json
from ..errors import PretrainReuseError
from ..figures import save_png, subplots
from .config import slug
from .recipes import RECIPES

#: Knowledge ratios the ``knowledge`` recipe reports per fine-tuned model: the mean over seeds
#: (each seed's ratio is a mean over samples) and, as ``<ratio>_std``, their spread over seeds.
KNOWLEDGE_RATIOS = ("preserve", "discard", "new", "exclusive")
#: The fine-tuned model's knowledge sets whose fidelity alone (``set_ablation``'s R² of the
#: output rebuilt from that set only) the recipe reports as ``<set>_alone``, the same way.
SETS_ALONE = ("preserve", "new")
#: Every per-sample knowledge column of the recipe (the accuracy correlations take them).
_ALONE = tuple(f"{s}_alone" for s in SETS_ALONE)
KNOWLEDGE_COLUMNS = (*KNOWLEDGE_RATIOS, *_ALONE)
#: The levels the preserve ratio is read against (docs/knowledge.md §3), reported like the
#: ratios: its chance level and its other-image control.
KNOWLEDGE_LEVELS = ("preserve_chance", "preserve_other_image")
#: The knowledge columns of the tables, in order, and how they are headed.
KNOWLEDGE_SHOWN = (*KNOWLEDGE_RATIOS, *KNOWLEDGE_LEVELS, *_ALONE)
KNOWLEDGE_HEADERS = {"preserve_alone": "preserved alone (R²)", "new_alone": "new alone (R²)",
                     "preserve_chance": "preserve, chance", "preserve_other_image":
                     "preserve, other image"}

COLUMNS = ("method", "x", "recall", "units", "top1_mean", "top1_std", "top1_at_best_val_mean",
           "mean_class_acc_mean", "seeds", "val_images", "val_classes_missing", "x_realised",
           "images", *KNOWLEDGE_SHOWN, *(f"{k}_std" for k in KNOWLEDGE_SHOWN))
#: The columns every row of an ``experiment.json`` has (the others came later, or are the
#: knowledge recipe's).
REQUIRED_COLUMNS = COLUMNS[:9]


def correlation_title(corrupted: bool) -> str:
    """The heading of the knowledge recipe's correlation (:meth:`ExperimentTable.correlation`)."""
    return f"Knowledge ratios against {'accuracy on corrupted test data' if corrupted else 'test accuracy'}"


@dataclass(frozen=True, eq=False)
class ExperimentTable(ValueEquality):
    """The results of one experiment: one dict per row with the keys of ``COLUMNS``
    (accuracies None for selection-only rows, recall None without ``relevant``)."""

    name: str
    rows: list[dict[str, Any]]
    x_label: str | None
    params: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the knowledge recipe's correlations

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every row's record
        return (f"ExperimentTable(name={self.name!r}, rows={len(self.rows)}, "
                f"methods={len({r.get('method') for r in self.rows})}, x_label={self.x_label!r})")

    def save(self, out: str | Path) -> Path:
        """Write ``experiment.json``, ``results.csv``, ``results.md`` and ``results.png``."""
        out = Path(out)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in self.rows)
        for name, text in (("results.csv", buf.getvalue()), ("results.md", self.to_markdown())):
            with atomic_path(out / name) as tmp:
                tmp.write_text(text)
        fig, ax = subplots(figsize=(6.4, 4.0))
        self.plot(ax)
        save_png(fig, out / "results.png")
        write_json(out / "experiment.json", {"kind": "experiment", "name": self.name,
                                             "x_label": self.x_label, "rows": self.rows,
                                             "params": self.params, "extra": self.extra,
                                             "meta": self.meta})
        return out / "experiment.json"

    @classmethod
    def load(cls, path: str | Path) -> ExperimentTable:
        """From ``experiment.json`` or the folder holding it."""
        path = Path(path)
        d = read_json(path / "experiment.json" if path.is_dir() else path, "experiment")
        if d.get("kind") != "experiment":
            raise PretrainReuseError(f"{str(path)!r} is not an experiment.json")
        require_keys(d, ("name", "rows", "x_label", "params"), path, "experiment.json")
        if d["name"] not in RECIPES:
            raise PretrainReuseError(f"{str(path)!r} names experiment {d['name']!r}, which is not "
                                     f"one of {', '.join(RECIPES)}; pass an experiment folder")
        rows = d["rows"] if isinstance(d["rows"], list) else [None]
        for i, row in enumerate(rows):
            missing = [k for k in REQUIRED_COLUMNS if not isinstance(row, dict) or k not in row]
            if missing:
                raise PretrainReuseError(
                    f"{str(path)!r} row {i} lacks {missing[0]!r}: it was written by an older "
                    "version of pretrain-reuse or edited; rerun the experiment into a new --out")
        return cls(d["name"], d["rows"], d["x_label"], d["params"], d.get("meta", {}),
                   d.get("extra", {}))

    def run_dirs(self, out: Path) -> list[Path]:
        """The folders of the fine-tuning runs in the table (rows x their seeds), under ``out``."""
        return [run_folder(out, r["method"], r["x"], s) for r in self.rows for s in r["seeds"]]

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and formatted rows of the table (shared by Markdown and the HTML report); the
        spread is shown only when there are several seeds."""
        ratios = [k for k in KNOWLEDGE_SHOWN if any(r.get(k) is not None for r in self.rows)]
        # a recipe that selects nothing (knowledge) has no recall or units column; .get: a table
        # of an earlier version records no images
        picks = [k for k in ("recall", "units", "images")
                 if any(r.get(k) is not None for r in self.rows)]
        # .get: a table of an earlier version records no validation sizes
        val = any(r.get("val_images") is not None for r in self.rows)
        head = ["method", *([self.x_label] if self.x_label else []), *picks,
                "test top-1 (final, mean ± std over seeds)", "test top-1 (at best val)",
                *(["validation images"] if val else []), "seeds",
                *(KNOWLEDGE_HEADERS.get(k, k) for k in ratios)]
        number = {"recall": "{:.4f}", "units": "{:g}", "images": "{:g}"}
        body = []
        for r in self.rows:
            acc = "" if r["top1_mean"] is None else _accuracy(r["top1_mean"])
            if len(r["seeds"]) > 1:
                acc += f" ± {_accuracy(r['top1_std'])}"
            best = r["top1_at_best_val_mean"]
            body.append([r["method"], *([_x_cell(r)] if self.x_label else []),
                         *("" if r.get(k) is None else number[k].format(r[k]) for k in picks), acc,
                         "" if best is None else _accuracy(best),
                         *([_validation_cell(r)] if val else []),
                         str(len(r["seeds"])) if r["seeds"] else "",
                         *(_ratio_cell(r, k) for k in ratios)])
        # a column empty in every row (a selection-only table's accuracies and seeds) says
        # nothing; results.csv keeps every column
        keep = [j for j in range(len(head)) if j == 0 or not body or any(b[j] for b in body)]
        return [head[j] for j in keep], [[b[j] for j in keep] for b in body]

    def note(self) -> str:
        """What the knowledge recipe's ratios rest on (the settings of its analyses and their
        samples, ``extra["analysis"]``); empty for the other recipes and for tables of an
        earlier version; for a table with recalls of class and of cluster rows, what each
        measures."""
        recalled = [r["method"] for r in self.rows if r.get("recall") is not None]
        if any("classes" in m for m in recalled) and any("clusters" in m for m in recalled):
            return ("recall: the share of the related pool classes selected (classes rows), of "
                    "the related classes' images the selected clusters hold (clusters rows); "
                    "units: the classes or clusters selected; images: the pool images they hold "
                    "(whole clusters differ in size).")
        a = self.extra.get("analysis")
        if not a:
            return ""
        correct = a["correct_for_all"]
        return (f"Knowledge ratios: mean over seeds ± std over seeds of each analysis's mean over "
                f"samples (docs/knowledge.md, reconstructed); salient = |I| > τ = {a['tau']:g} × the "
                f"sample's largest interaction; players {a['players']}, baseline {a['baseline']}; "
                f"{_span(a['explained'])} of the {a['asked']} samples asked explained per "
                f"analysis, drawn among the test samples every compared model classifies "
                f"correctly ({_span(correct)} of the {_span(a['screened'])} screened).")

    def correlation(self, *, corrupted: bool = False) -> tuple[str, list[str], list[list[str]]] | None:
        """The knowledge recipe's correlation of each ratio with test accuracy across its
        fine-tuned models (``extra``), or with their accuracy on corrupted test data
        (``corrupted``; ``corruption`` of the config): a sentence on what it rests on (or why
        there is none), and a header and rows (none without a correlation). None for the other
        recipes, for tables of an earlier version and, with ``corrupted``, without a corruption."""
        extra = self.extra
        if "models" not in extra or (corrupted and "corrupted" not in extra):
            return None
        accuracy = ""
        if corrupted:
            scores = ", ".join(f"{a:.4f}" for a in extra["corrupted"]["accuracy"])
            accuracy = (f" Accuracy on the test data corrupted by {extra['corrupted']['corruption']} "
                        f"(ImageNet-C's corruption, seeded with each run's seed): {scores}.")
        if not extra.get("correlation"):
            return f"No correlation with accuracy: {extra.get('why', '')}.{accuracy}", [], []

        def ci(v):
            return "–" if v[0] is None else f"[{v[0]:+.2f}, {v[1]:+.2f}]"

        def num(v):
            return "undefined" if v is None else f"{v:+.2f}"

        correlation = extra["corrupted"]["correlation"] if corrupted else extra["correlation"]
        rows = [[KNOWLEDGE_HEADERS.get(k, k), num(c["pearson"]), ci(c["pearson_ci"]), num(c["spearman"]),
                 ci(c["spearman_ci"])] for k, c in correlation.items()]
        # .get: a table of an earlier version records none
        undefined = [KNOWLEDGE_HEADERS.get(k, k) for k in extra.get("undefined", [])]
        left_out = (f" No correlation for {', '.join(undefined)}: a model defines it on none of "
                    "its samples." if undefined else "")
        return (f"Across {len(extra['models'])} fine-tuned models "
                f"({', '.join(map(str, extra['models']))}); intervals: bootstrap over explained "
                "samples (they do not cover model-to-model variation, so few models make any "
                f"correlation fragile).{left_out}{accuracy}", ["ratio", "Pearson", "95% CI", "Spearman",
                                                               "95% CI"], rows)

    def to_markdown(self) -> str:
        """The table as Markdown (``results.md``), with the knowledge recipe's correlation."""
        head, body = self.cells()
        lines = [f"# {RECIPES[self.name][2]}", "", *_markdown_table(head, body)]
        # the notes are prose, read as plain text too: only a tag would come alive ("|I| > τ")
        note = self.note().replace("<", "&lt;").replace("\n", " ")
        if note:
            lines += ["", note]
        for corrupted in (False, True):
            correlation = self.correlation(corrupted=corrupted)
            if correlation is not None:
                text, head, rows = correlation
                lines += ["", f"## {correlation_title(corrupted)}", "", text.replace("<", "&lt;"),
                          *(["", *_markdown_table(head, rows)] if rows else [])]
        return "\n".join(lines) + "\n"

    def plot(self, ax=None):
        """Accuracy (or recall, for selection-only tables) per method: lines over the swept
        variable, bars with the seed spread otherwise."""
        import matplotlib.pyplot as plt

        from ..knowledge.plots import literal

        ax = ax or plt.gca()
        if self.name == "knowledge":
            return self._plot_knowledge(ax)
        key = "top1_mean" if any(r["top1_mean"] is not None for r in self.rows) else "recall"
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        swept = list(dict.fromkeys(r["x"] for r in self.rows if r["x"] is not None))

        def spread(rows):  # the seed spread; none where it is undefined (one seed)
            return np.array([np.nan if key != "top1_mean" or r["top1_std"] is None
                             else r["top1_std"] for r in rows])

        if len(swept) <= 1:  # one bar per method: no line to draw through a single value
            rows = [next(r for r in self.rows if r["method"] == m) for m in methods]
            ax.bar(range(len(rows)), [r[key] for r in rows], yerr=spread(rows), color="C0",
                   capsize=3)
            ax.set_xticks(range(len(rows)), [literal(m) for m in methods], rotation=30,
                          ha="right", fontsize=8)
            ax.set_ylim(0.0, None)  # a bar's length is its value: an axis from 0.4 triples a gap
            if swept:
                ax.set_xlabel(literal(f"{self.x_label} = {swept[0]:g}"))
        else:
            for i, m in enumerate(methods):
                rows = [r for r in self.rows if r["method"] == m]
                if rows[0]["x"] is None:  # a reference for every swept value (fig4b's vanilla)
                    ax.axhline(rows[0][key], ls="--", color=f"C{i}", label=literal(m))
                    continue
                xs = [r["x"] for r in rows]
                ys = np.array([r[key] for r in rows])
                # a single value (label-based selection) is a point with its spread
                ax.errorbar(xs, ys, yerr=spread(rows), marker="o", color=f"C{i}", label=literal(m),
                            capsize=3, ls="-" if len(rows) > 1 else "none")
            if self.name == "fig4a":
                ax.set_xscale("log")
            ax.set_xlabel(literal(self.x_label))
            ax.legend(fontsize=8)
        ax.set_ylabel("test top-1 (final step)" if key == "top1_mean" else "recall")
        ax.set_title(RECIPES[self.name][2], fontsize=9)
        return ax

    def _plot_knowledge(self, ax):
        """The knowledge recipe: per row (pre-training and model), bars of test top-1 and of the
        knowledge ratios side by side, each with its spread over seeds, on one axis from 0."""
        from ..knowledge.plots import RATIO_COLOURS, literal

        series = [("top1", "test top-1", "C7"), *(
            (k, k, RATIO_COLOURS[k]) for k in KNOWLEDGE_RATIOS
            if any(r.get(k) is not None for r in self.rows))]
        width = 0.8 / len(series)
        tops = [1.0]  # the tops of the bars with their error bars
        for j, (key, label, colour) in enumerate(series):
            mean, std = ("top1_mean", "top1_std") if key == "top1" else (key, f"{key}_std")
            tops += [r[mean] + (r.get(std) or 0.0) for r in self.rows if r.get(mean) is not None]
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(self.rows))],
                   [np.nan if r.get(mean) is None else r[mean] for r in self.rows], width,
                   yerr=[np.nan if r.get(std) is None else r[std] for r in self.rows],
                   color=colour, capsize=2, label=label)
        ax.set_xticks(range(len(self.rows)), [literal(r["method"]) for r in self.rows], rotation=30,
                      ha="right", fontsize=8)
        # accuracy and ratios are at most 1, their error bars may reach past it: all are shown
        ax.set_ylim(0.0, max(tops) * 1.05)
        ax.set_ylabel("mean ± std over seeds")
        ax.legend(fontsize=7, ncol=len(series))
        ax.set_title(RECIPES[self.name][2], fontsize=9)
        return ax


def _markdown_text(text: str) -> str:
    """A table cell (labels come from the experiment's config) as inert Markdown: a ``|`` would
    split the cell and HTML would be rendered by most Markdown viewers."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _ratio_cell(row: dict[str, Any], key: str) -> str:
    """A knowledge ratio's mean, with its spread over seeds where there is one (.get: a table of
    an earlier version records none)."""
    if row.get(key) is None:
        return ""
    std = row.get(f"{key}_std")
    return f"{row[key]:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _span(values: list[int]) -> str:
    """A count per analysis: the one value, or the range they take."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _accuracy(value: float) -> str:
    """An accuracy to 4 decimals, the same for equal means summed in another order: 0.33625 and
    0.33625000000000005 (a mean over seeds) were shown as 0.3362 and 0.3363."""
    return f"{round(value, 10):.4f}"


def _x_cell(row: dict[str, Any]) -> str:
    """The swept value, and the one the data realised where they differ (.get: a table of an
    earlier version records none)."""
    if row["x"] is None:
        return ""
    realised = row.get("x_realised")
    if realised is None or math.isclose(realised, row["x"], rel_tol=1e-6):
        return _x_text(row["x"])
    return f"{_x_text(row['x'])} (realised {realised:.4g})"


def _validation_cell(row: dict[str, Any]) -> str:
    """The mean number of validation images, and the classes some seed's validation lacks."""
    if row.get("val_images") is None:
        return ""
    missing = row.get("val_classes_missing")
    if not row["val_images"] or not missing:  # without validation images, no class is lacking
        return f"{row['val_images']:g}"
    return f"{row['val_images']:g}, {missing} class{'es' * (missing > 1)} missing"


def _x_text(x: Any) -> str:
    """A swept value as the table and the run folders write it (3.0 as 3)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def _markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(map(_markdown_text, head)) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(_markdown_text, cells)) + " |" for cells in body)]


def run_folder(out: Path, method: str, x: Any, seed: int) -> Path:
    """The folder of the fine-tuning run of row ``method`` at swept value ``x`` with ``seed``."""
    value = "" if x is None else f"-x={_x_text(x)}"
    return out / "runs" / f"{slug(method)}{value}-seed{seed}"
