"""The ``pretrain-reuse`` command: parse flags, call one library function per verb, print.

User errors (:class:`PretrainReuseError`, bad flags) and a full or read-only disk print one line
and exit with status 2; anything else is a bug and keeps its traceback.

Each verb imports the library modules it uses when it runs, not at the top: torch alone takes
seconds to import, and ``--help``, ``--version`` or a usage error should not wait for it
(tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from . import __version__
from .errors import PretrainReuseError, check_choice, check_ids_below, check_seed, parse_ids
from .runtime import keep_freed_memory

EXIT_USER_ERROR = 2


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one that its help does not say
    (an option without help shows its default alone)."""

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = action.option_strings and not (default is None or default is False
                                                or default == [] or default == argparse.SUPPRESS)
        if shown and "default" not in (action.help or ""):
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) through our error path, and
    shows each option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise PretrainReuseError(f"{message} (see `{self.prog} --help`)")


def _seed(text: str) -> int:
    """argparse type of every seed flag: a bad seed is a one-line error before any work."""
    try:
        return check_seed("seed", int(text))
    except (ValueError, PretrainReuseError) as e:
        raise argparse.ArgumentTypeError(f"seed must be an integer in [0, 2**63), got {text!r}") from e


def _at_least(minimum: int):
    """argparse type of a count flag: an integer >= ``minimum``, refused with the flag's name
    before any work (the library would name its Python parameter: ``n_iter``)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return count


def _read_class_names(path: str) -> list[str]:
    """The lines of a ``--class-names`` file, refused when it has none."""
    from .errors import read_text

    names = [ln.strip() for ln in read_text("class names", path).splitlines() if ln.strip()]
    if not names:
        raise PretrainReuseError(f"--class-names {path!r} holds no names (it is empty or blank); "
                                 "give one line per class, or drop --class-names")
    return names


def _named_by_file(lines: list[str], existing: list[str] | None) -> list[str]:
    """The names a ``--class-names`` file gives to units or classes already named ``existing``
    (an image folder's ids, e.g. n01440764). A file whose lines start with those names, such as
    ImageNet's LOC_synset_mapping.txt (``n01440764 tench, Tinca tinca``), names each class by its
    whole line, matched by that name (:func:`~pretrain_reuse.data.datasets.line_names`; the
    longest name a line starts with, so that ``tabby cat, a pet`` names a folder ``tabby cat``
    beside one named ``tabby``): in any order, with lines for other classes, but one for every
    class (named by position, the rest would be named wrongly). Any other file, such as bare
    names some of which are the classes', names class i by line i, one line per class."""
    from .data.datasets import first_word, line_names

    if not existing:
        return lines
    by_first_word: dict[str, list[str]] = {}
    for name in existing:
        by_first_word.setdefault(first_word(name), []).append(name)
    by_name: dict[str, str] = {}
    for line in lines:
        named = [n for n in by_first_word.get(first_word(line), []) if line_names(line, n)]
        if named:
            by_name.setdefault(max(named, key=len), line)
    if all(name in by_name for name in existing):
        return [by_name[name] for name in existing]
    missing = next(name for name in existing if name not in by_name)
    # a mapping's lines say more than the names they start with; a list of bare names in the
    # classes' order may share some of them (CIFAR's "airplane" for a folder named airplane)
    if any(line != name for name, line in by_name.items()):
        raise PretrainReuseError(
            f"--class-names names {len(by_name)} of the {len(existing)} classes by their names "
            f"(lines that start with them), but no line starts with {missing!r}; add a line for "
            "every class, or give one line per class in the classes' order")
    if len(lines) != len(existing):
        raise PretrainReuseError(
            f"--class-names has {len(lines)} lines for {len(existing)} classes and does not name "
            f"them by their names (no line starts with {missing!r}); give one line per class (line "
            "i names class i), or lines that start with the classes' names (as ImageNet's "
            "LOC_synset_mapping.txt does)")
    return lines


def _with_data_names(units, data_names: list[str] | None):
    """``units`` recording, in ``meta["data_class_names"]``, the names their data gave the
    classes (folder names) where a ``--class-names`` file renamed them: fine-tuning matches a
    selection's units to the classes of its pre-training data by these."""
    if not data_names or list(data_names) == list(units.names or []):
        return units
    return replace(units, meta={**units.meta, "data_class_names": list(data_names)})


def _load_data(path: str, labels: str | None, what: str, class_names: list[str] | None = None):
    """A FeatureStore or Units from a CLI path: the planted feature world by name
    (``synthetic-features:pretrain`` / ``synthetic-features:target``), per-sample ``.npy``
    features with a ``.npy`` label vector (``class_names`` number labels that are names), or
    any other artifact, refused by name."""
    from .artifacts import load
    from .errors import lookup
    from .features import FeatureStore
    from .units import Units

    if path.startswith("synthetic-features:"):
        from .data.synthetic import feature_world

        world = feature_world()
        named = {"synthetic-features:pretrain": world.pretrain,
                 "synthetic-features:target": world.target}
        return lookup(named, path, f"--{what}")
    from .data.catalog import DATASETS

    if path in DATASETS:
        raise PretrainReuseError(
            f"--{what} {path!r} is an image data set; embed it first (`pretrain-reuse embed "
            f"--data {path} --out STORE`) and pass the store")
    if labels is not None:
        if not path.lower().endswith(".npy"):
            raise PretrainReuseError(
                f"labels were given for --{what} {path!r}, but they apply to .npy features only"
            )
        return FeatureStore.from_npy(path, labels, class_names=class_names)
    obj = load(path, what=f"--{what}", lazy=True)  # every command reads features block by block
    if not isinstance(obj, (FeatureStore, Units)):
        raise PretrainReuseError(
            f"--{what} {path!r} holds a {type(obj).__name__}, not units or features; pass a "
            "Units file, a .npy matrix of prototypes, or features")
    return obj


def load_units_arg(path: str, labels: str | None, class_names: str | None, what: str, *,
                   progress: bool = False):
    """Units from a CLI argument: a Units file, a ``.npy`` prototype matrix, or labelled
    per-sample features (then one unit per class, by :func:`~pretrain_reuse.units.class_means`,
    with a progress bar over the samples when ``progress``)."""
    from .units import Units, class_means

    names = _read_class_names(class_names) if class_names is not None else None
    # names at once for .npy labels: labels that are names are numbered by them, not renamed
    obj = _load_data(path, labels, what, names)
    data_names = None  # the classes' names before a --class-names file renamed them
    if names is not None and labels is None:
        if isinstance(obj, Units):
            if not obj.names and len(names) != len(obj):
                raise PretrainReuseError(f"--class-names has {len(names)} lines for the {len(obj)} "
                                         f"units of {path!r}; give one name per unit (line i names "
                                         "unit i)")
            data_names = obj.meta.get("data_class_names", obj.names)
            obj = _with_data_names(replace(obj, names=_named_by_file(names, obj.names)), data_names)
        else:
            data_names = obj.class_names
            obj = replace(obj, class_names=_named_by_file(names, obj.class_names))
    if isinstance(obj, Units):
        return obj
    if obj.labels is None:
        labels_fix = f" or pass --{what}-labels" if path.lower().endswith(".npy") else ""
        raise PretrainReuseError(
            f"--{what} {path!r} holds unlabelled features; build units first "
            f"(`pretrain-reuse units --method kmeans`){labels_fix}")
    try:
        units = class_means(obj, progress=progress)
    except PretrainReuseError as e:  # which of the command's inputs (a NaN row, too few labels)
        raise PretrainReuseError(f"--{what} {path!r}: {e}") from None
    return _with_data_names(units, data_names)


# --------------------------------------------------------------------------------------------
# Verbs
# --------------------------------------------------------------------------------------------


def _reporter() -> bool:
    """Whether this process prints the verb's results: under torchrun, rank 0 only."""
    from .distributed import rank_world

    return rank_world()[0] == 0


#: What every explanation that computes writes again (an analysis: in each model's folder),
#: and a rerun that finds it finished does not: only its marker may be brought up to date.
FIRST_INTERACTIONS = "interactions-0000.safetensors"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """The file at ``path`` as last written (inode, modification time, size); None when there is
    none. Every artifact is written to a temporary file and renamed, so a command that leaves a
    result's stamp as it was has not written it again."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _grid_rows(path: Path) -> list | None:
    """The rows of a grid.json (None when there is none, or it cannot be read)."""
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished(verb: str, out: str | Path) -> None:
    """The line of a rerun that found its output finished with the same settings: nothing was
    computed or written (a changed setting is refused, a missing or damaged file redone)."""
    print(f"{verb}: {out} is finished (same settings); nothing to do")


def cmd_embed(args) -> int:
    from .artifacts import read_json
    from .embed import EmbedConfig, embed

    cfg = EmbedConfig(model=args.model, data=args.data, weights=args.weights, layer=args.layer,
                      split=args.split, batch_size=args.batch_size, workers=args.workers,
                      shard_size=args.shard_size, device=args.device, precision=args.precision,
                      seed=args.seed, image_size=args.image_size)
    _init_distributed(cfg.device)
    _quiet_transformers(args.model, args.quiet)
    # a finished store: embed leaves its index as it was (a shard embedded again, or a damaged
    # index, rewrites it)
    index_before = _stamp(Path(args.out) / "index.json")
    embed(cfg, args.out, progress=not args.quiet, load=False)
    if not _reporter():
        return 0
    index = read_json(Path(args.out) / "index.json", "feature store index")
    skipped = index["meta"].get("skipped", 0)
    if index_before is not None and _stamp(Path(args.out) / "index.json") == index_before:
        _finished("embed", args.out)
        if skipped:  # images repaired since are not read again: the store is finished as it was
            print(f"warning: {skipped} images of {args.data} were unreadable when {args.out} was "
                  "embedded and have no features (index.json, meta.skipped_ids); after repairing "
                  "them, embed into a new --out", file=sys.stderr)
        _note_weights(args.model, args.weights, args.quiet)
        return 0
    print(f"wrote {index['n']} x {index['dim']} features to {args.out}"
          + (f"; skipped {skipped} unreadable images (see the warning above)" if skipped else ""))
    empty = index["meta"].get("classes_without_images", [])
    if empty:
        print(f"warning: {len(empty)} classes have no readable image (first: {empty[0]!r}), so "
              "class means (units --method class) will refuse these features; add readable "
              "images of those classes, or remove them, and embed again, or cluster the features "
              "(units --method kmeans)", file=sys.stderr)
    _note_weights(args.model, args.weights, args.quiet)
    return 0


def cmd_units(args) -> int:
    from .artifacts import check_output_file
    from .features import FeatureStore
    from .units import class_means, spherical_kmeans

    check_output_file(args.out, ".safetensors", "units")  # before minutes of clustering
    names = _read_class_names(args.class_names) if args.class_names is not None else None
    if args.features.lower().endswith(".npy"):  # here a .npy always holds per-sample features
        # names at once: labels that are names are numbered by them, not renamed afterwards
        store = FeatureStore.from_npy(args.features, args.labels, class_names=names)
    else:
        store = _load_data(args.features, args.labels, "features")
        if not isinstance(store, FeatureStore):
            raise PretrainReuseError(f"--features {args.features!r} holds units, not features")
        if names is not None:
            data_names = store.class_names
            store = replace(store, class_names=_named_by_file(names, store.class_names))
    # the k-means options; spherical_kmeans's defaults apply to those not given
    kmeans = _given(args, ("n_iter", "n_init", "init", "seed", "max_points_per_unit"))
    if args.method == "class":
        given = [_flag(f) for f in _given(args, ("k", *kmeans))]
        if given:
            raise PretrainReuseError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} "
                                     "to --method kmeans only; drop them for class means")
        if args.device != "cpu":
            raise PretrainReuseError("--device applies to --method kmeans only; class means "
                                     "are computed on the CPU: drop it")
        units = class_means(store, normalize=args.normalize, progress=not args.quiet)
        if names is not None and not args.features.lower().endswith(".npy"):
            units = _with_data_names(units, data_names)
    else:
        ignored = [flag for flag, value in (("--labels", args.labels),
                                             ("--class-names", args.class_names)) if value]
        if ignored:
            raise PretrainReuseError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} "
                                     "to --method class only: k-means clusters ignore labels; drop them")
        if args.k is None:
            raise PretrainReuseError("--method kmeans needs --k (paper: 2000 clusters)")
        units = spherical_kmeans(store, args.k, **kmeans, normalize_means=args.normalize,
                                 use_gpu=args.device == "cuda", progress=not args.quiet)
    units.save(args.out)
    dropped = units.meta.get("empty_dropped", 0)
    if dropped:
        subsample = " or too few points per unit (--max-points-per-unit)" \
            if args.max_points_per_unit else ""
        print(f"pretrain-reuse: warning: {dropped} of the {args.k} clusters ended empty and were "
              f"dropped: re-seeded beside the largest clusters, they found no samples to take "
              f"(duplicate or near-duplicate samples{subsample}); {args.out} holds "
              f"{len(units)}; pass a smaller --k for as many clusters as it asks", file=sys.stderr)
    sizes = units.meta["sizes"]
    print(f"wrote {len(units)} {units.kind} units to {args.out}: sizes min {sizes['min']}, "
          f"median {sizes['median']:g}, max {sizes['max']} ({sizes['below_5']} below 5)"
          + (f"; objective {units.meta['objective']:.4f}" if "objective" in units.meta else ""))
    return 0


def _given(args, fields) -> dict:
    """The options among ``fields`` (argparse dests without a default) the user gave."""
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def _flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def _parse_k(text: str) -> int | float:
    """``"100"`` -> 100 units; ``"0.1"`` or ``"10%"`` -> a 0.1 share of the source samples."""
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise PretrainReuseError(
                    f"--k {text} is not a share of the pool; pass a percentage in (0, 100]")
            return share / 100.0
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise PretrainReuseError(
            f"--k {text!r} is not a number; pass a unit count (100) or a sample fraction (0.1, 10%)"
        ) from None


#: select's methods and metrics, as selection.SELECTORS and transport.METRICS name them (a test
#: checks): the parser offers them without importing those modules, which load torch
SELECT_METHODS = ("uot", "greedy-ot", "random", "label")
METRIC_NAMES = ("cosine", "l2", "sqeuclidean")

#: select's options and the methods that read them
METHOD_FLAGS = {"metric": ("uot", "greedy-ot"), "eps_c": ("uot",), "eps": ("uot",),
                "tau_a": ("uot",), "tau_b": ("uot",), "max_iter": ("uot",), "tol": ("uot",),
                "dtype": ("uot", "greedy-ot"), "device": ("uot", "greedy-ot"), "seed": ("random",)}


def cmd_select(args) -> int:
    from .artifacts import check_output_file
    from .selection import SELECTORS, SelectConfig, select_many

    targets, outs = args.target, args.out
    if len(outs) != len(targets):
        raise PretrainReuseError(f"got {len(targets)} --target and {len(outs)} --out; give one "
                                 "output file per target, in the same order")
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise PretrainReuseError("two targets would be written to the same --out; give each "
                                 "its own file")
    target_labels = args.target_labels or [None] * len(targets)
    if len(target_labels) != len(targets):
        raise PretrainReuseError(f"got {len(targets)} --target and {len(target_labels)} "
                                 "--target-labels; give one labels file per target")
    for out in outs:  # before the class means of 1.28M rows
        check_output_file(out, ".json", "selection")
    ids = parse_ids(args.ids, "--ids") if args.ids else ()
    relevant = parse_ids(args.relevant, "--relevant") if args.relevant else ()
    k = _parse_k(args.k) if args.k else None  # the method's default: 100, or every named unit
    check_choice("method", args.method, SELECTORS)
    given = _given(args, METHOD_FLAGS)
    unread = [_flag(f) for f in given if args.method not in METHOD_FLAGS[f]]
    if unread:
        raise PretrainReuseError(f"{', '.join(unread)} would be ignored by --method "
                                 f"{args.method}; drop them or pick the method that reads them")
    cfg = SelectConfig(method=args.method, k=k, unit_ids=ids, name_pattern=args.names, **given)
    source = load_units_arg(args.source, args.source_labels, args.class_names, "source",
                            progress=not args.quiet)
    check_ids_below("--relevant", relevant, len(source), "source units")
    units = [load_units_arg(t, labels, None, "target", progress=not args.quiet)
             for t, labels in zip(targets, target_labels, strict=True)]
    # several targets: one batched solve (select_many), each selection as select() gives it
    for sel, out in zip(select_many(source, units, cfg), outs, strict=True):
        if relevant:
            sel = replace(sel, meta={**sel.meta, "relevant": list(relevant),
                                     "recall": sel.recall(relevant)})
        sel.save(out)
        _report_selection(sel, cfg, len(source), out, relevant)
    return 0


def _report_selection(sel, cfg, n_source: int, out: str, relevant: tuple[int, ...]) -> None:
    """The lines ``select`` prints for one saved selection: the top units and the recall of
    ``relevant`` (an unconverged solve has been warned of by select_many)."""
    names = sel.unit_names
    head = [f"{u}" + (f" ({names[u]})" if names else "") for u in sel.selected[:5]]
    covered = ""
    if isinstance(cfg.k, float):  # whole units: the last one may take the share far past k
        counts = sel.counts
        covered = (f" ({counts[sel.selected].sum() / counts.sum():.1%} of the {counts.sum()} "
                   f"source samples; {cfg.k * 100:g}% asked)")
    print(f"selected {len(sel.selected)} of {n_source} source units{covered} with {cfg.method} "
          f"-> {out}; top: {', '.join(head)}")
    if relevant:
        hits = round(sel.meta["recall"] * len(set(relevant)))
        print(f"recall of the {len(set(relevant))} relevant units: {sel.meta['recall']:.2%} ({hits})")


def cmd_finetune(args) -> int:
    from .finetune import load_config, run_finetune

    overrides = {f: getattr(args, f) for f in _config_fields()}
    cfg = load_config(args.config, **overrides)
    _init_distributed(cfg.device)

    trained = []  # the runs whose result.json this command (re)wrote

    def run(c, out, check_only=False):
        before = None if out is None else _stamp(Path(out) / "result.json")
        result = run_finetune(c, model=args.model, weights=args.weights, target=args.target,
                              target_test=args.target_test, source=args.source,
                              selection=args.selection, units=args.units, out=out,
                              progress=not args.quiet, check_only=check_only)
        if out is not None and (before is None or _stamp(Path(out) / "result.json") != before):
            trained.append(out)
        return result

    if args.grid:
        from .data.catalog import check_out_outside
        from .finetune.grid import grid_search, parse_grid
        from .finetune.run import data_flags

        # the grid's own folder: its runs' checks see only the runs' sub-folders
        check_out_outside(args.out, data_flags(args.target, args.target_test, args.source))

        grid_file = Path(args.out) / "grid.json"
        grid_before = _grid_rows(grid_file)
        from .configs import config_values

        # a flag or config key set to the default value is set too: the grid must not override it
        summary = grid_search(cfg, parse_grid(args.grid), args.out, run,
                              check=lambda c: run(c, None, check_only=True),
                              given=set(config_values(args.config, overrides)))
        best, tied = summary["best"], summary["tied_with_best"]
        if not _reporter():
            return 0
        # every run was finished, and the grid is the one summarised before: nothing new. A
        # rerun with fewer or other values reuses finished runs but picks among its own
        finished = not trained and grid_before is not None and grid_before == _grid_rows(grid_file)
        if finished:
            _finished("finetune", args.out)
        ties = (f"; tied with {len(tied)} other run{'s' if len(tied) > 1 else ''} ({', '.join(tied)}), "
                "the first in grid order is kept: a larger --val-fraction may separate them"
                if tied else "")
        # a finished grid still names its winner: the answer a rerun is usually made for
        print(f"best on validation: {best['run']} (val top-1 {best['val_top1']:.4f}; its test "
              f"top-1 {best['test_top1_at_best_val']:.4f}{ties}); "
              + (f"in {Path(args.out) / 'grid.csv'}" if finished
                 else f"wrote {Path(args.out) / 'grid.csv'}"))
        _note_weights(args.model, args.weights, args.quiet, mode=cfg.mode)
        return 0
    result = run(cfg, args.out)
    if not _reporter():
        return 0
    if not trained:  # its result.json was there and left as it was
        _finished("finetune", args.out)
        _note_weights(args.model, args.weights, args.quiet, mode=cfg.mode)
        return 0
    final, best = result.final, result.at_best_val
    # with no validation image (val_fraction 0, a regime that trains on all) nothing was picked
    picked = (f"{best['top1']:.4f} at the best-validation evaluation (step {best['step']})"
              if best["val"]["top1"] is not None else "no validation samples to pick an evaluation")
    print(f"{cfg.mode}: test top-1 {final['top1']:.4f} (mean per-class {final['mean_class_acc']:.4f}) "
          f"after the last step; {picked}; wrote {Path(args.out) / 'result.json'}")
    _note_weights(args.model, args.weights, args.quiet, mode=cfg.mode)
    return 0


def _config_fields() -> dict[str, tuple[type, bool]]:
    """FinetuneConfig fields as CLI flags: name -> (element type, takes a list)."""
    import dataclasses

    from .finetune.config import FinetuneConfig

    types = {"int": int, "float": float, "str": str, "bool": bool}
    out = {}
    for f in dataclasses.fields(FinetuneConfig):
        text = str(f.type).replace(" | None", "")
        many = text.startswith("tuple[")
        out[f.name] = (types[text[6:].split(",")[0] if many else text], many)
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field (``--head-lr-mult`` <-> ``head_lr_mult``); unset flags
    leave the YAML value or the default, so the dataclass stays the single source of defaults."""
    import dataclasses

    from .finetune.config import CHOICES, FIELD_HELP, FinetuneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    for name, (kind, many) in _config_fields().items():
        flag = "--" + name.replace("_", "-")
        choices = f"; one of {', '.join(CHOICES[name])}" if name in CHOICES else ""
        # argparse expands %-formats in help texts
        help_ = f"{FIELD_HELP[name]}{choices} (default: {defaults[name]})".replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
        else:
            p.add_argument(flag, dest=name, type=kind, nargs="+" if many else None, default=None,
                           help=help_)


def _explain_config(args):
    from .knowledge.explain import ExplainConfig

    return ExplainConfig(players=args.players, n=args.n, negations=args.negations,
                         min_tokens=args.min_tokens, max_position=args.max_position,
                         background=args.background, baseline=args.baseline,
                         baseline_lr=args.baseline_lr, baseline_steps=args.baseline_steps,
                         baseline_radius=args.baseline_radius,
                         mean_samples=args.mean_samples, output=args.output,
                         decomposition=args.decomposition, qthres=args.qthres, samples=args.samples,
                         seed=args.seed, batch_size=args.batch_size, device=args.device)


def _note_weights(model: str, weights: str | None, quiet: bool, mode: str | None = None) -> None:
    """Say, after a command's work, when the backbone held no pre-trained weights: nothing is
    ever downloaded, so a forgotten --weights would otherwise pass silently for a random network.
    (After, not before: a user error must stay the only line of a failed command.)"""
    from .models.registry import PACKAGED_WEIGHTS

    if quiet:
        return
    if mode == "scratch" and weights:
        note = "--mode scratch re-initialises every layer, so --weights is not used"
    elif weights is None and mode != "scratch" and not model.startswith(("hf:", "python:")) \
            and model not in PACKAGED_WEIGHTS:
        note = (f"no --weights: {model} starts from a random initialisation (nothing is "
                "downloaded); pass local pre-trained weights with --weights")
    else:
        return
    print(f"pretrain-reuse: note: {note}", file=sys.stderr)


def _quiet_transformers(model: str, quiet: bool) -> None:
    """--quiet also silences transformers' own "Loading weights" bar for hf: models."""
    if quiet and model.startswith("hf:"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _classifier(name: str, weights: str | None, what: str, quiet: bool):
    from .models import create_backbone

    _quiet_transformers(name, quiet)
    if weights is not None:
        from .errors import check_file

        check_file(what, weights)
    return create_backbone(name, weights=weights)


def _explain_data(args):
    """The data of explain / knowledge / evaluate and the split it was opened from (None: the
    file or folder as given); by default the test split of an embedded data set or of a folder
    of split folders."""
    from .data.catalog import DATASETS, open_dataset, split_folders
    from .data.text import is_sentence_file, text_file

    if is_sentence_file(args.data):
        if args.split:
            raise PretrainReuseError(f"--split does not apply to the sentence file {args.data!r}; "
                                     "pass one sentence file per split")
        return text_file(args.data), None
    split = args.split
    if not split:  # (split_folders refuses split folders beside others; --split picks one)
        splits = DATASETS[args.data].splits if args.data in DATASETS else split_folders(Path(args.data))
        split = "test" if "test" in splits else None
    return open_dataset(args.data, split=split), split


def _by_position(data, done: str, models: str = "the model names") -> str:
    """The note of ``models`` whose outputs were matched to ``data``'s classes by position (as
    ``done``: scored, explained): right only where the data holds the model's classes in its
    order, which nothing checks."""
    if not data.class_names:
        return (f"the data's integer labels name no classes, so they were {done} by position: "
                "its label i as output i")
    return (f"{models} none of the data's classes (neither class names a finetune run records "
            f"nor a Hugging Face id2label), so the data's classes were {done} by position: its "
            "class i as output i")


def _note_named_by_position(models: dict, data, quiet: bool) -> None:
    """Note the models whose outputs explain the data's named classes by position only."""
    from .models import output_class_names

    unnamed = [role for role, m in models.items()
               if output_class_names(m, data.class_names) is None]
    if data.class_names and unnamed and not quiet:
        who = ("the model names" if list(models) == ["model"] else
               f"the {' and '.join(unnamed)} model{'s name' if len(unnamed) > 1 else ' names'}")
        print(f"note: {_by_position(data, 'explained', who)}", file=sys.stderr)


def cmd_explain(args) -> int:
    from .data.catalog import check_out_outside
    from .knowledge.analysis import faithfulness_summary
    from .knowledge.explain import choose_samples, explain, explainable

    cfg = _explain_config(args)
    if cfg.decomposition == "joint-and-or":  # with one model it is and-or, under another name
        raise PretrainReuseError("--decomposition joint-and-or sparsifies several models' games "
                                 "together (knowledge); explain has one model: pass and-or")
    check_out_outside(args.out, {"--data": args.data})  # as given: the data set, not its split
    model = _classifier(args.model, args.weights, "--weights", args.quiet)
    data, split = _explain_data(args)
    asked = min(cfg.samples, len(data))
    indices = choose_samples(data, asked, cfg.seed, keep=explainable(model, data, cfg))
    before = _stamp(Path(args.out) / FIRST_INTERACTIONS)
    results = explain(model, data, indices, cfg, args.out, tau=args.tau, split=split,
                      progress=not args.quiet)
    if len(indices) < asked and not args.quiet:  # after explain's checks: an error comes alone
        why = (f"have at least --n {cfg.n} eligible words" if cfg.players == "tokens"
               else "are readable images")
        print(f"note: {len(indices)} of the {asked} samples asked for {why}; explained those",
              file=sys.stderr)
    if before is not None and _stamp(Path(args.out) / FIRST_INTERACTIONS) == before:
        _finished("explain", args.out)  # finished with these settings, and intact
        _note_weights(args.model, args.weights, args.quiet)
        return 0
    wrong = [r.info["sample"] for r in results if r.info["predicted"] != r.info["label"]]
    _note_named_by_position({"model": model}, data, args.quiet)
    if wrong and not args.quiet:
        print(f"note: the model misclassifies {len(wrong)} of the {len(results)} samples "
              f"explained (first: {wrong[0]!r}); their interactions explain the output of their "
              "true class, not of the model's answer", file=sys.stderr)
    # as knowledge.json summarises it: each sample's largest and mean error over the masks
    summary = faithfulness_summary(results, args.tau)
    error = (f"largest over the masks {summary['max']:.4f} (mean over samples; median "
             f"{summary['max_median']:.4f}, worst sample {summary['max_over_samples']:.4f}), "
             f"mean over the masks {summary['mean']:.4f}"
             if summary["max"] is not None else
             "undefined (no sample's game changes between the empty and the full set)")
    print(f"explained {len(results)} samples with n={results[0].n} players -> {args.out}; "
          f"faithfulness error of the salient interactions (tau={args.tau}, in units of "
          f"|v(N) - v(∅)|): {error}")
    _note_weights(args.model, args.weights, args.quiet)
    return 0


def cmd_knowledge(args) -> int:
    from .data.catalog import check_out_outside
    from .knowledge.analysis import KnowledgeWarning, analyze_knowledge
    from .knowledge.metrics import PAPER_RATIOS
    from .knowledge.plots import other_image_levels, other_sample_word, purity_is_informative

    cfg = _explain_config(args)
    check_out_outside(args.out, {"--data": args.data})  # as given: the data set, not its split
    models = {"pretrained": _classifier(args.model, args.pretrained, "--pretrained", args.quiet),
              "finetuned": _classifier(args.model, args.finetuned, "--finetuned", args.quiet)}
    if args.scratch:
        models["scratch"] = _classifier(args.model, args.scratch, "--scratch", args.quiet)
    if args.vary and (args.checkpoints or args.scratch_checkpoints):
        raise PretrainReuseError("--vary compares the knowledge ratios, not the convergence: drop "
                                 "--checkpoints / --scratch-checkpoints, or run the convergence "
                                 "without --vary")
    snapshots = {name: _snapshots(args.model, path, flag, args.quiet) if path else None
                 for name, path, flag in (("checkpoints", args.checkpoints, "--checkpoints"),
                                          ("scratch_checkpoints", args.scratch_checkpoints,
                                           "--scratch-checkpoints"))}
    data, split = _explain_data(args)
    if args.vary:
        return _knowledge_sensitivity(args, models, data, cfg, split)
    before = _stamp(Path(args.out) / "finetuned" / FIRST_INTERACTIONS)
    with warnings.catch_warnings():
        # the analysis's doubts (swapped roles, the same network twice) as one line each, also
        # with --quiet, which silences progress and notes only
        warnings.simplefilter("always", KnowledgeWarning)
        summary = analyze_knowledge(models, data, cfg, args.out, **snapshots, tau=args.tau,
                                    match=args.match, split=split, games_from=args.games_from,
                                    progress=not args.quiet)
    if before is not None and _stamp(Path(args.out) / "finetuned" / FIRST_INTERACTIONS) == before:
        _finished("knowledge", args.out)  # finished with these settings, and intact
        return 0
    _note_named_by_position(models, data, args.quiet)
    overall, chance = summary["report"]["overall"], summary["report"]["chance"]
    control = summary["other_image"]  # None for a single sample
    other = other_image_levels(summary)
    word = other_sample_word(summary)

    def levels(k: str) -> str:
        return f"chance {_number(chance[k]['mean'])}" + (
            f", other {word} {_number(other[k]['mean'])}" if k in other else "")

    line = ", ".join(f"{k} {_number(overall[k]['mean'])} ± {_number(overall[k].get('sem'))} "
                     f"({levels(k)})" for k in PAPER_RATIOS if k in overall)
    samples = summary["samples"]
    if not purity_is_informative(summary):
        line += ("; discrimination power n/a (no class has two samples; explain several "
                 "samples per class, --samples)")
    else:
        line += "; discrimination power " + ", ".join(
            f"{k} {_number(d['purity'])}" for k, d in summary["discrimination"].items())
    alone = summary["ablation"]["preserve"]
    line += (f"; preserved knowledge alone: fidelity R² {_number(alone['fidelity']['mean'])}, "
             f"share of the output {_number(alone['share']['mean'])}")
    if "contiguity" in summary:  # image players
        kept = summary["contiguity"]["preserve"]
        line += (f"; preserved interactions of neighbouring players {_number(kept['contiguous_share'])} "
                 f"(chance {_number(kept['chance_share'])})")
    if "ground_truth" in summary:
        found = summary["ground_truth"]["finetuned"]["overall"]
        line += (f"; class rules found by the fine-tuned model: precision "
                 f"{_number(found['precision']['mean'])}, recall {_number(found['recall']['mean'])}")
    fewer = (f" (only {samples['n']} of the {samples['asked']} asked: no other sample is "
             "classified correctly by every model)" if samples["n"] < samples["asked"] else "")
    legend = "chance: the ratio if the other model's salient interactions were random"
    if control:
        shared = control["same_class"]
        classes = ("of the same class (the samples are of one class)" if shared == samples["n"]
                   else f"of another class except in {shared} of the {samples['n']} pairs"
                   if shared else "of another class")
        legend += (f"; other {word}: the ratio with the other model's knowledge of another "
                   f"{word}, {classes}")
    print(f"knowledge over {samples['n']} samples{fewer} (± standard error over them; {legend}): "
          f"{line}; wrote {Path(args.out) / 'knowledge.json'}")
    return 0


def _knowledge_sensitivity(args, models: dict, data, cfg, split: str | None) -> int:
    """``knowledge --vary``: one analysis per setting, and how the ratios move between them."""
    from .knowledge.analysis import KnowledgeWarning
    from .knowledge.metrics import PAPER_RATIOS
    from .knowledge.sensitivity import knowledge_sensitivity, parse_vary

    vary = parse_vary(args.vary)
    out = Path(args.out)

    def stamps() -> dict:  # the sweep's table and every analysis it holds
        return {p: _stamp(p) for p in [out / "sensitivity.json",
                                       *out.glob(f"*/finetuned/{FIRST_INTERACTIONS}")]}

    before = stamps()
    with warnings.catch_warnings():
        warnings.simplefilter("always", KnowledgeWarning)  # as a single analysis shows them
        result = knowledge_sensitivity(models, data, cfg, vary, out, tau=args.tau,
                                       match=args.match, split=split, games_from=args.games_from,
                                       progress=not args.quiet)
    if before[out / "sensitivity.json"] is not None and stamps() == before:
        _finished("knowledge", out)  # nothing computed or written
        return 0
    _note_named_by_position(models, data, args.quiet)
    differences = result.differences()
    reference = next(iter(result.variants))
    for row in result.rows():
        ratios = ", ".join(f"{k} {_number(row[k])}" for k in PAPER_RATIOS if k in row)
        moved = differences.get(row["variant"], {}).get("preserve")
        if moved is None:  # the reference
            change = ""
        elif moved["n"] == 0:
            change = f" (no sample in common with {reference})"
        else:
            se = "n/a" if moved["se"] is None else f"{moved['se']:.3f}"
            change = (f" (preserve {moved['mean']:+.3f} ± {se} vs {reference}, {moved['n']} "
                      "paired samples)")
        print(f"{row['variant']}: {ratios} over {row['explained']} samples{change}")
    print(f"wrote {out / 'sensitivity.csv'} (each setting's analysis in its own sub-folder)")
    return 0


def _number(x: float | None) -> str:
    """A ratio to print; None where it is undefined (e.g. games without any effect)."""
    return "n/a" if x is None else f"{x:.3f}"


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or notes (warnings and errors still print)")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a command: the message on one line, without the source."""
    print(f"warning: {message}", file=sys.stderr)


def _snapshots(model: str, path: str, flag: str, quiet: bool) -> list:
    """The snapshot models of the run folder (or its ``snapshots/`` folder) at ``path``, in any
    order: knowledge orders them by the step each records."""
    from .artifacts import FOLDER_KINDS, read_json, safetensors_header
    from .errors import check_file

    folder = check_file(flag, path)
    if (folder / "run.json").exists():  # a run folder: a fine-tuning run's snapshots
        kind = read_json(folder / "run.json", f"the marker of {flag} {path!r}").get("kind")
        if kind in FOLDER_KINDS and kind != "finetune-run":  # a demo's, an experiment's, a grid's
            raise PretrainReuseError(
                f"{flag} {path!r} holds {FOLDER_KINDS[kind]}, not a fine-tuning run; pass the "
                "folder of one fine-tuning run made with --snapshots")
        folder = folder / "snapshots"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PretrainReuseError(f"{flag} {path!r} holds no .safetensors models; fine-tune with "
                                 "--snapshots to save them")
    foreign = [f for f in files if (safetensors_header(f) or {}).get("kind") != "backbone"]
    if foreign:  # e.g. an explain folder's interactions, which would fail as weights
        raise PretrainReuseError(
            f"{flag} {path!r} holds {foreign[0].name}, which is not a saved model; pass the "
            "snapshots folder of the fine-tuning run (finetune --snapshots) or the run folder")
    return [_classifier(model, str(f), flag, quiet) for f in files]


def _add_explain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="labelled data: image folder, list or data set name; or a sentence "
                   "file (.jsonl, or .csv / .tsv with a text column) (with --players tokens)")
    p.add_argument("--split", help="split of an embedded data set or of a folder of split "
                   "folders (default: test, where there is one)")
    p.add_argument("--players", default="grid:3x3",
                   help="grid:RxC, parts (synthetic world) or tokens (text classifiers) "
                   "(default: %(default)s)")
    p.add_argument("--n", type=int, help="players drawn from a larger grid (seeded, central cells); "
                   "tokens per sentence (default 10; no stop words, punctuation, digits)")
    p.add_argument("--negations", action="store_true",
                   help="tokens: negating stop words (not, no, didn, ...) may be players too")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="tokens: explain only sentences of at least this many tokens, special "
                   "tokens included (Chen et al.: 21) (default: %(default)s)")
    p.add_argument("--max-position", type=int,
                   help="tokens: players only at positions below this (Chen et al.: 50) "
                   "(default: any)")
    p.add_argument("--background",
                   help="images: what pixels of no player show: baseline (default; masked like "
                   "absent players) | original (always the image) | integrated (the output "
                   "averaged over 10 blends of the two; 10x the forward passes); tokens: original "
                   "(the words that are not players)")
    p.add_argument("--baseline",
                   help="images: zero (default) | mean | blur | shrink (each normalised value "
                   "moved 2 stds toward 0) | learned; tokens: mask (default) | pad | learned "
                   "(embedding); learned = per sample, for sparse interactions")
    p.add_argument("--baseline-lr", type=float, default=1e-3,
                   help="learned baseline: SGD rate (default: %(default)s)")
    p.add_argument("--baseline-steps", type=int, default=50,
                   help="learned baseline: iterations (default: %(default)s)")
    p.add_argument("--baseline-radius", type=float, default=0.5,
                   help="learned baseline: max distance from its start, in normalised-input "
                   "units for images (the normalisation's std), in the embedding matrix's std "
                   "for text (default: %(default)s)")
    p.add_argument("--mean-samples", type=int, default=1000,
                   help="mean baseline: images of --data averaged, drawn with --seed "
                   "(default: %(default)s)")
    p.add_argument("--output", default="log-odds",
                   help="log-odds | log-odds-clipped | logit (default: %(default)s)")
    p.add_argument("--decomposition", default="and", help="and (Harsanyi) | and-or (sparsified) | "
                   "joint-and-or (knowledge: the models sparsified together) (default: %(default)s)")
    p.add_argument("--qthres", type=float, help="noise bound of the sparsification, relative "
                   "to |v(N)-v(0)| (default: 0 for and, 0.04 for and-or and joint-and-or)")
    p.add_argument("--samples", type=int, default=20,
                   help="samples to explain, drawn with --seed (default: %(default)s)")
    p.add_argument("--tau", type=float, default=0.05,
                   help="salience threshold, relative to the largest interaction "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the samples and players drawn (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="masked inputs per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    _add_quiet(p)
    p.add_argument("--out", required=True, help="output folder")


def cmd_experiment(args) -> int:
    from .experiments import RECIPES, load_experiment_config, run_experiment

    check_choice("experiment", args.name, RECIPES)  # before any config error about its inputs
    cfg = load_experiment_config(
        args.config, model=args.model, weights=args.weights, source=args.source,
        target=args.target, target_test=args.target_test, source_features=args.source_features,
        target_features=args.target_features, seeds=args.seeds, k=args.k, clusters=args.clusters,
        relevant=None if args.relevant is None  # "" unsets the config's: no recall
        else parse_ids(args.relevant, "--relevant") if args.relevant else ())
    table = run_experiment(args.name, cfg, args.out, progress=not args.quiet)
    print(table.to_markdown())
    print(f"wrote {Path(args.out) / 'results.md'}, results.csv and results.png")
    if not (args.name == "knowledge" and cfg.pretrainings):  # they are its pre-trained weights
        _note_weights(cfg.model, cfg.weights, args.quiet)
    return 0


def cmd_demo(args) -> int:
    import torch

    from .demo import run_demo

    # Small convolutions gain little from a second thread, and an OpenMP team that shares its
    # cores with other work slows down several-fold, so the demo defaults to one thread.
    if args.threads < 1:
        raise PretrainReuseError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("runs/demo" if args.scenario == "world" else f"runs/demo-{args.scenario}"))
    summary = run_demo(out, quick=args.quick, seed=args.seed, progress=not args.quiet,
                       scenario=args.scenario)
    for name, rec in summary["selection"].items():
        print(f"selection {name:>18}: recall of the related classes {rec['recall']:.3f}")
    for name, ft in summary["finetune"].items():
        n = len(ft["seeds"])
        spread = f" ± {ft['top1_std']:.4f} ({n} seeds)" if n > 1 else " (1 seed)"
        print(f"finetune  {name:>18}: test top-1 {ft['top1_mean']:.4f}{spread}")
    k = summary["knowledge"]
    print("knowledge: " + ", ".join(f"{key} {k[key]:.3f}" for key in
                                    ("preserved", "discarded", "new", "exclusive_vs_scratch") if key in k))
    print("knowledge by baseline: " + "; ".join(
        f"{b} preserved {_number(r['preserved'])}, new {_number(r['new'])}"
        for b, r in summary["knowledge_by_baseline"].items()))
    print(f"wrote {out / 'report.html'} and summary.json "
          f"({sum(summary['timing_s'].values()):.0f} s of stages)")
    return 0


def cmd_evaluate(args) -> int:
    from .artifacts import check_output_file, make_meta, write_json
    from .data.text import TextDataset
    from .features import hash_ids
    from .finetune.evaluate import evaluate_model
    from .knowledge.explain import data_path
    from .models.checkpoint import weights_hash

    if args.out:
        check_output_file(args.out, ".json", "evaluation")  # before the work
    if args.corruption is not None:
        from .finetune.corruptions import parse_corruption

        parse_corruption(args.corruption)
    model = _classifier(args.model, args.weights, "--weights", args.quiet)
    data, split = _explain_data(args)
    scores = evaluate_model(model, data, batch_size=args.batch_size, device=args.device, workers=args.workers,
                            corruption=args.corruption, seed=args.seed, progress=not args.quiet)
    where = f"{args.data}" + (f" ({split})" if split else "") + (
        f" corrupted by {args.corruption} (seed {args.seed})" if args.corruption else "")
    print(f"top-1 {scores['top1']:.4f}, mean per-class {scores['mean_class_acc']:.4f} on "
          f"{scores['n']} {'sentences' if isinstance(data, TextDataset) else 'images'} of {where}"
          + (f"; {scores['unreadable']} unreadable images left out" if scores["unreadable"] else ""))
    notes = []
    if scores["classes_matched_by"] == "position":
        notes.append(_by_position(data, "scored"))
    if scores["unreadable"]:
        shown = ", ".join(scores["unreadable_ids"][:5])
        notes.append(f"unreadable images left out: {shown}"
                     + (", ..." if scores["unreadable"] > 5 else ""))
    absent = scores["classes_without_images"]
    if absent:
        sample = "sentence" if isinstance(data, TextDataset) else "readable image"
        notes.append(f"the data has no {sample} of {len(absent)} of the model's "
                     f"{model.num_classes} classes (first: {absent[0]!r}); the accuracies are "
                     "over the classes it has")
    for note in notes if not args.quiet else []:
        print(f"pretrain-reuse: note: {note}", file=sys.stderr)
    if args.out:
        params = {"model": args.model, "weights": args.weights, "data": args.data, "split": split,
                  "corruption": args.corruption, "batch_size": args.batch_size}
        # the weights as finetune records them; the data as explain does, with its samples
        inputs = {"weights": weights_hash(args.weights) if args.weights else None,
                  "data": data.source, "data_path": data_path(data), "ids": hash_ids(data.ids),
                  "n": len(data)}
        write_json(args.out, {"kind": "evaluation", **scores,
                              "meta": make_meta("evaluate", params, inputs=inputs, seed=args.seed)})
    _note_weights(args.model, args.weights, args.quiet)
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    print(f"wrote {build_report(args.run_dir)}")
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain-reuse", description=(
        "Reuse the right part of the pre-training data when fine-tuning (UOT selection, Liu et "
        "al. NeurIPS 2022), and explain what pre-training hands to the fine-tuned model."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    e = sub.add_parser("embed", help="images (or sentences) to a FeatureStore with a backbone",
                       description="Compute one feature vector per image (or sentence, with a "
                       "text backbone) into a sharded FeatureStore. Rerunning the same command "
                       "resumes; runs under torchrun with one shard set per process.")
    e.add_argument("--model", required=True, help="backbone name (timm:, torchvision:, hf:, "
                   "python:, or a registered name such as efficientnet-lite0)")
    e.add_argument("--weights", help="local weights file (.safetensors or a torch state dict)")
    e.add_argument("--data", required=True, help="image folder (a sub-folder per class, or flat), "
                   "comma-separated path,label list, or a data set name such as synthetic:pretrain; "
                   "or a sentence file (.jsonl of {\"text\": ..., \"label\": ...} lines, or .csv / .tsv "
                   "with a text column; labels optional) for a text backbone")
    e.add_argument("--split", help="sub-folder / split of --data (train, test...)")
    e.add_argument("--layer", default="penultimate", help="penultimate | head | logits")
    e.add_argument("--batch-size", type=_at_least(1), default=128,
                   help="images (sentences) per forward pass; a stopped run resumes with the "
                   "same one (other sizes sum in another order: features about 1e-7 apart), "
                   "--workers may change")
    e.add_argument("--workers", type=_at_least(0), default=0, help="DataLoader worker processes")
    e.add_argument("--shard-size", type=_at_least(1), default=8192, help="samples per shard file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--precision", default="auto", help="auto (bf16 on GPUs with native bf16, "
                   "compute capability 8.0+; else fp32) | fp32 | bf16")
    e.add_argument("--seed", type=_seed, default=0, help="initialises layers without weights")
    e.add_argument("--image-size", type=_at_least(1), help="input side in pixels, resized at the "
                   "backbone's crop ratio (224 of 256: 448 of 512); default: the backbone's own")
    _add_quiet(e)
    e.add_argument("--out", required=True, help="output FeatureStore folder")
    e.set_defaults(func=cmd_embed)

    u = sub.add_parser("units", help="class means or spherical k-means clusters of features",
                       description="Summarise features as units: one mean per class (labelled "
                       "data) or spherical k-means clusters (unlabelled data).")
    u.add_argument("--features", required=True,
                   help="FeatureStore folder, per-sample .npy features, or "
                   "synthetic-features:pretrain")
    u.add_argument("--labels", help=".npy label vector for .npy features")
    u.add_argument("--class-names", help="text file, one class name per line (line i names "
                   "class i); for classes named by folders, lines that start with the folder "
                   "name name that class, in any order (ImageNet's LOC_synset_mapping.txt)")
    u.add_argument("--method", choices=("class", "kmeans"), default="class")
    u.add_argument("--k", type=_at_least(1), help="number of clusters (kmeans; paper: 2000)")
    u.add_argument("--n-iter", type=_at_least(1), help="k-means passes over the samples (default 20)")
    u.add_argument("--n-init", type=_at_least(1), help="independent k-means runs (their own "
                   "initial centroids), the best objective kept (default 1)")
    u.add_argument("--init", choices=("random", "k-means++"),
                   help="k-means initial centroids: random samples (default, as faiss) or "
                   "k-means++ (recovers well-separated clusters that random starts merge)")
    u.add_argument("--max-points-per-unit", type=_at_least(1), default=None,
                   help="train k-means on at most k*this many samples (default: all)")
    u.add_argument("--normalize", action="store_true",
                   help="average L2-normalised features (default: raw features, as the paper)")
    u.add_argument("--seed", type=_seed, help="k-means seed (default 0)")
    u.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="k-means on the CPU (default) or the CUDA GPU, which must hold all the "
                   "features; the two give clusters that differ in the last bits")
    _add_quiet(u)
    u.add_argument("--out", required=True, help="output units .safetensors")
    u.set_defaults(func=cmd_units)

    s = sub.add_parser("select", help="rank pre-training units by similarity to a target task",
                       description="Select source (pre-training) units for a target task. S and T "
                       "are Units files, .npy prototype matrices, or per-sample .npy features with "
                       "--source-labels/--target-labels.")
    s.add_argument("--source", required=True, help="source units (S): a Units file, a .npy "
                   "prototype matrix, or per-sample features (a FeatureStore folder, whose class "
                   "means are taken, or a .npy with --source-labels)")
    s.add_argument("--target", required=True, nargs="+", help="target units (T), of the same "
                   "kinds (e.g. the FeatureStore folder of the target's training images); several "
                   "target tasks at once (one batched solve), each with its own --out")
    s.add_argument("--source-labels", help=".npy labels when --source holds per-sample features")
    s.add_argument("--target-labels", nargs="+", help=".npy labels when --target holds "
                   "per-sample features (one per target)")
    s.add_argument("--class-names", help="names of the source units, one per line; for units "
                   "named by folders, lines that start with the folder name name that unit "
                   "(ImageNet's LOC_synset_mapping.txt), so --names can match their words")
    s.add_argument("--k", help="units to select (default 100; with --method label: all named), "
                   "or a fraction of source samples (0.1 or 10%%); clusters: the paper keeps 200 "
                   "of 2000, about 10%% of the pool")
    s.add_argument("--method", default="uot", help=f"one of {', '.join(SELECT_METHODS)}")
    # no argparse defaults below: SelectConfig's apply, and a flag given to a method that does
    # not read it is refused (METHOD_FLAGS)
    s.add_argument("--metric", help=f"uot, greedy-ot: one of {', '.join(METRIC_NAMES)} (cosine; "
                   "the paper's greedy-ot baseline is l2)")
    s.add_argument("--eps-c", type=float, help="uot: cost scale, C = d/eps_c (0.01)")
    s.add_argument("--eps", type=float, help="uot: entropic regularisation (1.0)")
    s.add_argument("--tau-a", type=float, help="uot: source marginal penalty (1.0)")
    s.add_argument("--tau-b", type=float, help="uot: target marginal penalty (100.0)")
    s.add_argument("--max-iter", type=_at_least(1), help="uot: iteration cap (1000)")
    s.add_argument("--tol", type=float, help="uot: tolerance on the potentials (1e-6)")
    s.add_argument("--dtype", help="uot, greedy-ot: float64 (default) or float32")
    s.add_argument("--device", help="uot, greedy-ot: cpu (default) or cuda")
    s.add_argument("--seed", type=_seed, help="random: seed (0)")
    s.add_argument("--ids", help="label method: comma-separated source unit ids")
    s.add_argument("--names", help="label method: regular expression over unit names")
    s.add_argument("--relevant", help="unit ids known to be related (e.g. 7-24,80-100,127-146 for "
                   "the ImageNet birds); reports their recall and stores it in meta")
    _add_quiet(s)
    s.add_argument("--out", required=True, nargs="+", help="output selection .json (one per "
                   "--target, in their order)")
    s.set_defaults(func=cmd_select)

    f = sub.add_parser("finetune", help="fine-tune a backbone, optionally reusing selected "
                       "pre-training data", description="Fine-tune on the target data (modes: "
                       "vanilla, reuse, reuse-unlabeled, co-tuning, linear-probe, scratch). Every "
                       "field of the recipe is a flag and a YAML key; rerunning the same command "
                       "resumes an interrupted run.")
    f.add_argument("--model", required=True, help="backbone name, e.g. timm:resnet18, smallcnn, "
                   "or a text model (hf:<folder>)")
    f.add_argument("--weights", help="local weights of the pre-trained backbone")
    f.add_argument("--target", required=True, help="target training data: folder, list or name; "
                   "for a text model a sentence file (.jsonl, or .csv / .tsv with a text column)")
    f.add_argument("--target-test", help="target test data (default: the test split of a "
                   "named set or of a folder of split folders)")
    f.add_argument("--source", help="pre-training data (reuse modes; sentences for a text model)")
    f.add_argument("--selection", help="sel.json from `pretrain-reuse select` (reuse modes)")
    f.add_argument("--units", help="units file the selection was made on (clusters)")
    f.add_argument("--config", help="YAML file with recipe fields (flags override it)")
    _add_quiet(f)
    f.add_argument("--grid", action="append", metavar="FIELD=V1,V2",
                   help="grid search on the validation split, e.g. --grid lr=0.001,0.01 --grid "
                   "lam=0.3,1 (one run per combination under --out)")
    f.add_argument("--out", required=True, help="run folder")
    _add_config_flags(f)
    f.set_defaults(func=cmd_finetune)

    x = sub.add_parser("explain", help="game-theoretic interactions of a classifier on samples",
                       description="Interactions (Harsanyi AND, or sparse AND-OR) between players "
                       "(patches, parts or tokens) of a classifier's log-odds, per sample.")
    x.add_argument("--model", required=True, help="backbone name")
    x.add_argument("--weights", help="weights of a classifier over --data's classes")
    _add_explain_flags(x)
    x.set_defaults(func=cmd_explain)

    v = sub.add_parser("evaluate", help="accuracy of a classifier on labelled images (or sentences)",
                       description="Top-1 and mean per-class accuracy of a classifier (e.g. the "
                       "model.safetensors of a finetune run) on labelled images, computed as "
                       "finetune computes its test accuracy, or of a text classifier on labelled "
                       "sentences; classes are matched by name.")
    v.add_argument("--model", required=True, help="backbone name, as given to finetune")
    v.add_argument("--weights", help="the classifier's weights (runs/<name>/model.safetensors)")
    v.add_argument("--data", required=True,
                   help="image folder, list file or embedded data set (synthetic:target); or a "
                   "sentence file (.jsonl, or .csv / .tsv with a text column) for a text classifier")
    v.add_argument("--split", help="split of an embedded data set or of a folder of split "
                   "folders (default: test, where there is one)")
    v.add_argument("--corruption", metavar="NAME:SEVERITY",
                   help="score the images corrupted on the fly, as ImageNet-C corrupts them "
                   "(Hendrycks & Dietterich 2019), severity 1-5: gaussian-noise, shot-noise, "
                   "impulse-noise, contrast, brightness or gaussian-blur, e.g. gaussian-noise:3")
    v.add_argument("--seed", type=_seed, default=0, help="seed of a random corruption's draws")
    v.add_argument("--batch-size", type=_at_least(1), default=256)
    v.add_argument("--workers", type=_at_least(0), default=0, help="DataLoader worker processes")
    v.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _add_quiet(v)
    v.add_argument("--out", help="also write the scores as JSON")
    v.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("knowledge", help="preserved / discarded / new knowledge of fine-tuning",
                       description="Compare the interactions of the pre-trained model (its linear "
                       "probe), the fine-tuned model and a scratch model on the same samples "
                       "(Jiang, Cheng & Li, arXiv 2410.08455).")
    k.add_argument("--model", required=True, help="backbone name shared by the models")
    k.add_argument("--pretrained", required=True, help="linear-probe model.safetensors")
    k.add_argument("--finetuned", required=True, help="fine-tuned model.safetensors")
    k.add_argument("--scratch", help="scratch-trained model.safetensors")
    k.add_argument("--checkpoints", help="fine-tuning run folder made with finetune --snapshots "
                   "(or its snapshots/ folder): the convergence curve, over the steps the "
                   "snapshots record")
    k.add_argument("--scratch-checkpoints", help="likewise, the scratch run of --scratch: its "
                   "curve, to compare with fine-tuning's")
    k.add_argument("--match", default="support", help="support | signed")
    k.add_argument("--games-from", action="append", default=[], metavar="FOLDER",
                   help="take the cached games of another knowledge analysis of these models "
                   "(repeatable): only the same game (model, sample, players, baseline, output) "
                   "is taken, so another --tau, --match or --decomposition into a new --out "
                   "computes no game again")
    k.add_argument("--vary", action="append", metavar="SETTING=V1,V2",
                   help="how the ratios move with the analysis's choices: one analysis per "
                   "combination, each in its own sub-folder, e.g. --vary baseline=zero,mean,blur "
                   "--vary players=grid:3x3,grid:4x4 (any number or string setting below but "
                   "--batch-size and --device; also tau, match); writes sensitivity.csv/.json/.png; "
                   "the ratios only: not with --checkpoints / --scratch-checkpoints")
    _add_explain_flags(k)
    k.set_defaults(func=cmd_knowledge)

    ex = sub.add_parser("experiment", help="the paper's tables and figures as recipes on any data",
                        description="Run one experiment of Liu et al. (NeurIPS 2022) on your pool, "
                        "target and backbone: table1 (selection methods), table2 (clusters), "
                        "table3 (long tail), table4 (distance ablation), fig3a (selected "
                        "classes), fig3b (target fraction), fig4a (recall vs eps_c), fig4b "
                        "(similarity groups), and knowledge (Jiang et al.'s analysis for each of "
                        "several pre-trainings, e.g. supervised vs self-supervised weights, with the "
                        "correlation of the knowledge ratios with accuracy). Writes results.csv / "
                        ".md / .png; a rerun skips finished runs, and a folder without a finished run "
                        "or table takes new settings. Shared fine-tuning fields go "
                        "under `finetune:` in --config, explanation fields under `explain:`.")
    ex.add_argument("name", help="table1 | table2 | table3 | table4 | fig3a | fig3b | fig4a | "
                    "fig4b | knowledge")
    ex.add_argument("--config", help="YAML file with experiment fields (flags override it)")
    ex.add_argument("--model", help="backbone name, e.g. timm:resnet18, smallcnn")
    ex.add_argument("--weights", help="local weights of the pre-trained backbone")
    ex.add_argument("--source", help="pre-training pool: folder, list or name")
    ex.add_argument("--target", help="target training data: folder, list or name")
    ex.add_argument("--target-test", help="target test data (default: the test split of a "
                    "named set or of a folder of split folders)")
    ex.add_argument("--source-features", help="FeatureStore of the pool (default: embedded here)")
    ex.add_argument("--target-features", help="FeatureStore of the target (default: embedded here)")
    ex.add_argument("--seeds", type=_seed, nargs="+", help="fine-tuning seeds (default 0 1 2)")
    ex.add_argument("--k", type=_at_least(1), help="selected classes (default 100)")
    ex.add_argument("--clusters", type=_at_least(2), help="k-means clusters of the pool (default 2000)")
    ex.add_argument("--relevant", help="pool class ids related to the target (recall), e.g. 7-24; "
                    "'' for none, over the config's")
    _add_quiet(ex)
    ex.add_argument("--out", required=True, help="experiment folder (a rerun resumes it)")
    ex.set_defaults(func=cmd_experiment)

    d = sub.add_parser("demo", help="the whole pipeline on embedded data, with ground truth",
                       description="Run every stage (pre-train a small CNN, embed, units, select, "
                       "finetune, knowledge) on embedded data whose answers are known (the pool "
                       "classes a target task needs), scored against them, into report.html and "
                       "summary.json; rerunning the same command resumes.")
    d.add_argument("--scenario", default="world", help="world (the procedural image world, "
                   "default) | fashion (real pixels: Fashion-MNIST garments and MNIST digits)")
    d.add_argument("--out", help="run folder (default runs/demo, or runs/demo-SCENARIO)")
    d.add_argument("--quick", action="store_true", help="smaller problem, for tests")
    d.add_argument("--seed", type=_seed, default=0)
    _add_quiet(d)
    d.add_argument("--threads", type=_at_least(1), default=1, help="torch CPU threads (default 1)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="self-contained report.html of a demo, experiment, "
                       "fine-tuning run, grid or knowledge folder", description="Write report.html "
                       "into a demo, experiment, fine-tuning run, finetune --grid or knowledge "
                       "folder: its figures and tables, drawn from the folder's own files, in one "
                       "self-contained page (images embedded, no external files).")
    r.add_argument("run_dir", help="a demo, experiment, finetune run, finetune --grid or "
                   "knowledge folder")
    r.set_defaults(func=cmd_report)
    return p


def _init_distributed(device: str) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group, NCCL when the verb runs on
    GPUs (``device``), gloo otherwise (NCCL refuses the CPU tensors of a CPU run). Called by
    the verbs that run as several processes (embed, finetune) once their device is known;
    :func:`main` leaves the group."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    from .distributed import COLLECTIVE_TIMEOUT
    from .errors import check_device

    if not dist.is_initialized():
        check_device(device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:  # else the launcher's choice
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)


def help_pages() -> dict[str, str]:
    """Markdown page per verb, made from the parser's own help text (docs/cli/*.md), so the
    documentation cannot drift from the command."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix it for stable pages
    try:
        parser = build_parser()
        verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        pages = {"index": f"# pretrain-reuse\n\n```\n{parser.format_help()}```\n"}
        for name, sub in verbs.choices.items():
            pages[name] = f"# pretrain-reuse {name}\n\n```\n{sub.format_help()}```\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return pages


def _finish_distributed() -> None:
    """Leave the process group :func:`_init_distributed` joined. Without torchrun there is none,
    and torch is not imported here: after a Ctrl-C during its first import, importing it again
    fails with a traceback."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: A full or read-only disk, or a folder the user may not write: the user's to fix, not a bug.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


#: The verbs whose work survives an interruption (a rerun resumes it); the others write their
#: one output file at the end, atomically, so an interrupted run leaves nothing.
RESUMING_VERBS = ("embed", "finetune", "explain", "knowledge", "experiment", "demo")

#: The verbs that run as several processes under ``torchrun`` (:func:`_init_distributed`); the
#: others would run once per process, each doing the whole work into the same files.
DISTRIBUTED_VERBS = ("embed", "finetune")


def _check_single_process(verb: str) -> None:
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and verb not in DISTRIBUTED_VERBS:
        raise PretrainReuseError(
            f"{verb} runs in one process, but torchrun started {world} (WORLD_SIZE={world}), each "
            f"of which would do the whole work into the same files; run it without torchrun "
            f"(only {' and '.join(DISTRIBUTED_VERBS)} run as several processes)")


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        _check_single_process(args.verb)
        keep_freed_memory()
        try:
            with warnings.catch_warnings():
                # a library warning (units of different networks, ...) as one line, not
                # Python's file:line and source excerpt
                warnings.showwarning = _print_warning
                return args.func(args)
        finally:
            _finish_distributed()
    except PretrainReuseError as e:
        print(f"pretrain-reuse: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.errno not in _STORAGE_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"pretrain-reuse: error: {e.strerror}{where}; free disk space or fix the "
              "permissions (or choose another --out), then rerun the same command", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resumes = getattr(args, "verb", None) in RESUMING_VERBS
        print("pretrain-reuse: interrupted; " + ("rerun the same command to resume" if resumes
              else "nothing was written"), file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
