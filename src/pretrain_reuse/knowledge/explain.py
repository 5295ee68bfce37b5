"""``explain``: interactions of a classifier on a set of samples, computed the same way for every
model that is compared (same samples, same players, same baseline).

For each sample: the players (a grid of patches or the parts of the synthetic world on the
backbone's preprocessed image; or token positions of a sentence for a text classifier), the
baseline, the masked game ``v(x_S)`` over all 2^n coalitions
(:func:`~pretrain_reuse.knowledge.games.masked_game`,
:func:`~pretrain_reuse.knowledge.text.masked_text_game`), then the AND (default, the paper's
Harsanyi interactions) or AND-OR decomposition, batched over samples. Games are cached in the
output folder, so an interrupted run resumes where it stopped. A cached game is named by a hash
of everything that determines it (the model's parameters and buffers, the preprocessed input, the
players, the label, the baseline and its options, the output), so a rerun with other settings or
another model computes its own games instead of reusing another run's (the cache keeps both); a
cached game that cannot be read (a truncated or foreign file), whose content hash is not the one
recorded beside it (a value changed anywhere in the file: :data:`GAME_HASH`), or whose v(N) and
v(∅) are not what two forward passes of the model give (a zeroed or overwritten file, record
included: :data:`ENDS_RTOL`; a learned baseline itself is not cached, so its games are checked by
their format and hash only), is computed again. A learned baseline's fit (its loss at the start
and at the iterate kept) is recorded beside its game and in each sample's
``info["baseline_fit"]``. The folder is marked as explain's by ``explain.json``, written before
anything else: only a new or empty folder or one so marked is written to. The marker records what
the run was given (:func:`rerun_identity`: its settings, data and model): a rerun with the same
resumes it, redoes what is missing or damaged, or, finding it finished and intact, writes
nothing (:func:`finished_explanation`); one with others is refused (:func:`check_rerun`), so a
finished explanation is never overwritten by another. In a folder of an earlier version,
which records none, the outputs of the earlier run that this run does not rewrite (the
interactions of samples beyond ``samples``, ``salient.png``) are deleted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import (
    atomic_path,
    describe_changes,
    hash_array,
    hash_file,
    link_file,
    lock_folder,
    make_meta,
    make_run_folder,
    releases_folders,
    to_json,
    write_json,
)
from ..configs import check_fields
from ..data.catalog import check_out_outside
from ..data.datasets import ImageDataset, labels_by_name, require_labels
from ..data.text import TextDataset, numbered_by
from ..embed import preprocessed
from ..errors import PretrainReuseError, check_choice, check_device, check_seed, preview
from ..figures import save_png
from ..finetune.data import check_dataset
from ..finetune.evaluate import evaluating
from ..models import (
    Backbone,
    finetune_mode,
    model_class_names,
    output_class_names,
    state_hash,
    trained_class_names,
    weights_meta,
    weights_path,
)
from ..runtime import full_float32
from .games import (
    BACKGROUNDS,
    BASELINES,
    INTEGRATED_LEVELS,
    OUTPUTS,
    SHRINK_TAU,
    LearnedBaseline,
    Players,
    baseline_input,
    coalition_values,
    grid_players,
    image_values,
    learn_baseline,
    mask_players,
    masked_game,
    resize_players,
)
from .plots import salient_figure
from .sparsify import and_interactions, and_or_interactions, check_qthres
from .text import (
    TEXT_BASELINES,
    TokenPlayers,
    baseline_token,
    eligible_positions,
    learn_baseline_embedding,
    masked_text_game,
    text_values,
    token_players,
)
from .values import Interactions, check_tau

#: "joint-and-or": in ``knowledge``, the models' AND-OR interactions are sparsified together
#: (:func:`~.sparsify.joint_and_or_interactions`); for one model it is "and-or".
DECOMPOSITIONS = ("and", "and-or", "joint-and-or")
#: Most players an explanation takes: 2^20 = 1,048,576 model evaluations per sample and model
#: (the cost is exponential in n; the group uses 8-12) and 8 MiB per stored game.
MAX_EXPLAIN_PLAYERS = 20
#: float64 arrays of 2^n values held per sample: the game, the four arrays of its Interactions
#: and the transform's working arrays (more for the AND-OR sparsification).
_ARRAYS_PER_SAMPLE = {"and": 8, "and-or": 16, "joint-and-or": 16}
#: Token players per sentence when ``n`` is not given (Chen et al., ICLR 2024).
TEXT_PLAYERS = 10
#: The file marking a folder as explain's output: only such a folder (or a new or empty one) is
#: written to, since a rerun deletes the earlier run's outputs that it does not rewrite.
MARKER = "explain.json"
#: The kind that marker records.
MARKER_KIND = "explanations"
#: The key of a cached game's record (the game's path with ``.json``) that holds the game's
#: content hash (:func:`~pretrain_reuse.artifacts.hash_array`); a learned baseline's fit is
#: recorded beside it.
GAME_HASH = "game_sha256"


class SampleGame(NamedTuple):
    """One sample's players and the function computing its game for a label."""

    players: dict[str, Any]  # how the players were chosen (their meta)
    names: list[str] | None
    key: dict[str, str]  # hashes of what, besides the model and the options, fixes the game
    compute: Callable[[int], tuple[np.ndarray, dict[str, Any] | None]]  # v, and the fit (_fit_record)
    # v(N), v(∅) for a label by two forward passes; None for a learned baseline (not stored)
    ends: Callable[[int], np.ndarray | None]


@dataclass(frozen=True)
class ExplainConfig:
    """How games are built and decomposed.

    ``players``: ``"grid:RxC"`` (a grid of patches; with ``n`` set, ``n`` cells drawn by the
    documented rule of :func:`~.games.grid_players`, seeded with (``seed``, sample index): other
    cells for every sample, the same for every model), ``"parts"`` (the slots of the synthetic
    world, the ground-truth players) or ``"tokens"`` (``n`` token positions of each sentence, 10 by
    default, drawn by the rule of :func:`~.text.token_players`; a player is a whole word, all
    its pieces masked together; text classifiers; ``negations``
    makes negating stop words such as "not" eligible; only sentences of at least ``min_tokens``
    tokens, special tokens included, are explained, and players lie at positions below
    ``max_position``: Chen et al. (ICLR 2024) take sentences of more than 20 tokens and positions
    below 50, i.e. ``min_tokens=21, max_position=50``; the defaults 0 and None take every
    sentence and position). ``background``: what image pixels outside every player show in
    every masked input (the cells of a grid not drawn as players, the world's pixels outside its
    part slots): ``baseline`` (default: masked like absent players, as Liu, Deng, Cheng et al.'s
    grids), ``original`` (always the image, as Li & Zhang's part players with their
    ``background="ori"``), so ``original`` explains the players in the context of the rest of
    the image, or ``integrated`` (v averaged over 10 blends of the two, Li & Zhang's
    "integrated background": :data:`~.games.INTEGRATED_LEVELS`, 10 times the forward passes);
    token players always keep the words that are not players (``original``, the only
    choice). ``qthres``:
    bound of the noise the sparsification may remove, relative to |v(N) - v(∅)|; None = 0 for
    ``and`` (the exact Harsanyi transform) and 0.04 for the AND-OR decompositions (the group's
    setting); ``joint-and-or`` sparsifies the compared models of ``knowledge`` together, so the
    same effect gets the same AND/OR split in every model (docs/knowledge.md §1, Chen et al. 2024).
    The sparsifications decompose v - v(∅) and keep the bias v(∅) in I_and(∅), as the group
    does on its "-v0" outputs (:mod:`~.sparsify`).

    ``baseline``: for images ``zero`` (default), ``mean``, ``blur``, ``shrink`` (each
    normalised value moved toward 0 by at most :data:`~.games.SHRINK_TAU`, Liu et al. 2023) or
    ``learned``; for tokens
    ``mask`` (default: absent tokens become [MASK]), ``pad`` or ``learned`` (an embedding).
    ``baseline="mean"`` is the per-pixel mean, in the model's input space, of ``mean_samples``
    images of the data drawn with ``seed`` (all of them when the data has fewer), so a sample's
    game does not depend on which other samples are explained.
    ``baseline="learned"`` learns each sample's baseline for each model
    (:func:`~.games.learn_baseline`, Ren et al., CVPR 2023;
    :func:`~.text.learn_baseline_embedding`): it starts from ``zero`` (the normalisation's mean colour)
    or the [MASK] (else [PAD]) embedding and stays within ``baseline_radius`` of it: in
    normalised-input units for images (the normalisation's std), inside the valid pixel range;
    in the per-dimension std of the word-embedding matrix for text; ``baseline_lr`` and
    ``baseline_steps`` are the optimiser's settings (the group's example: 1e-3, 50). A learned
    baseline differs between the compared models, so their games differ in the baseline as well
    as in the network.
    """

    players: str = "grid:3x3"
    n: int | None = None
    negations: bool = False
    min_tokens: int = 0
    max_position: int | None = None
    background: str | None = None
    baseline: str | None = None
    baseline_lr: float = 1e-3
    baseline_steps: int = 50
    baseline_radius: float = 0.5
    mean_samples: int = 1000
    output: str = "log-odds"
    decomposition: str = "and"
    qthres: float | None = None
    samples: int = 20
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self):
        check_fields(self)
        check_seed("seed", self.seed)
        tokens = self.players == "tokens"
        if not (tokens or self.players == "parts" or
                (isinstance(self.players, str) and re.fullmatch(r"grid:\d+x\d+", self.players))):
            raise PretrainReuseError(
                f"players={self.players!r}: use grid:RxC (e.g. grid:4x4), parts or tokens")
        if self.players == "parts" and self.n is not None:  # the parts are the world's 9 slots
            raise PretrainReuseError(
                f"n={self.n} does not apply to players='parts' (every slot of the scene is a "
                "player); leave n out, or draw n cells of a grid (players='grid:RxC')")
        text_only = {"negations": self.negations, "min_tokens": self.min_tokens,
                     "max_position": self.max_position}
        for name, value in text_only.items():
            if value and not tokens:
                raise PretrainReuseError(f"{name} applies to players=tokens (text classifiers)")
        if self.min_tokens < 0 or (self.max_position is not None and self.max_position < 2):
            raise PretrainReuseError(
                f"min_tokens={self.min_tokens} must be >= 0 and max_position={self.max_position} "
                "None or >= 2 (position 0 is [CLS])")
        if self.background is None:
            object.__setattr__(self, "background", "original" if tokens else "baseline")
        check_choice("background", self.background, BACKGROUNDS)
        if tokens and self.background != "original":  # text_values keeps non-player tokens as is
            raise PretrainReuseError(
                f"background={self.background!r} does not apply to players=tokens: the words that "
                "are not players always keep their tokens; leave background out")
        if self.baseline is None:
            object.__setattr__(self, "baseline", "mask" if tokens else "zero")
        check_choice("baseline", self.baseline, TEXT_BASELINES if tokens else BASELINES)
        if tokens and self.n is None:
            object.__setattr__(self, "n", TEXT_PLAYERS)
        grid = re.fullmatch(r"grid:(\d+)x(\d+)", self.players)
        if grid and min(int(grid[1]), int(grid[2])) < 1:
            raise PretrainReuseError(f"players={self.players!r}: a grid needs at least one row and "
                                     "one column, e.g. grid:3x3")
        n = self.n if self.n is not None or not grid else int(grid[1]) * int(grid[2])
        if n is not None and not 1 <= n <= MAX_EXPLAIN_PLAYERS:
            raise PretrainReuseError(
                f"players={self.players!r} with n={n}: " + (
                    "n must be >= 1" if n < 1 else
                    f"every sample needs 2^{n} = {2**n:,} model evaluations per model and "
                    f"{2**n * 8 >> 20:,} MiB per game" if n <= 40 else  # past it, too long to print
                    f"every sample needs 2^{n} model evaluations per model") +
                f"; explain 1..{MAX_EXPLAIN_PLAYERS} players (--n N draws N cells of a grid)")
        if grid and self.n is not None and self.n > int(grid[1]) * int(grid[2]):
            cells = int(grid[1]) * int(grid[2])
            raise PretrainReuseError(
                f"n={self.n} players but the {int(grid[1])}x{int(grid[2])} grid has {cells} cells; pass "
                f"n <= {cells} or a grid of at least {self.n} cells (players='grid:RxC')")
        check_choice("output", self.output, OUTPUTS)
        check_choice("decomposition", self.decomposition, DECOMPOSITIONS)
        if self.qthres is not None:  # before any game is computed
            check_qthres(self.qthres)
        check_device(self.device, float64="explanation")  # games are float64
        if self.samples < 1 or self.batch_size < 1:
            raise PretrainReuseError(
                f"samples and batch_size must be >= 1, got {self.samples} and {self.batch_size}")
        if self.mean_samples < 1:
            raise PretrainReuseError(f"mean_samples must be >= 1, got {self.mean_samples}")
        if not (self.baseline_lr > 0 and self.baseline_radius > 0 and self.baseline_steps >= 0):
            raise PretrainReuseError(
                f"baseline_lr={self.baseline_lr} and baseline_radius={self.baseline_radius} must "
                f"be > 0 and baseline_steps={self.baseline_steps} >= 0")

    @property
    def noise_bound(self) -> float:
        """The sparsification's ``qthres``: as given, else 0 for ``and`` and 0.04 for AND-OR."""
        return self.qthres if self.qthres is not None else default_qthres(self.decomposition)


#: Each :class:`ExplainConfig` field's default.
CONFIG_DEFAULTS = {f.name: f.default for f in fields(ExplainConfig)}


def default_qthres(decomposition: str) -> float:
    """The noise bound a decomposition takes when none is given: 0 for ``and`` (the exact
    Harsanyi transform), 0.04 for the AND-OR decompositions (the group's setting)."""
    return 0.0 if decomposition == "and" else 0.04


def sample_players(dataset: ImageDataset, index: int, cfg: ExplainConfig,
                   size: tuple[int, int]) -> Players:
    """The players of the sample at position ``index`` at the model's input ``size``."""
    if cfg.players == "parts":
        if not hasattr(dataset, "scene"):
            raise PretrainReuseError(
                "players='parts' needs data with part annotations (the synthetic world); use "
                "players='grid:RxC' for other images")
        scene = dataset.scene(index)
        players = mask_players(scene.player_masks(),
                               names=[f"slot {k}" for k in range(len(scene.cells))],
                               background=cfg.background)
        return resize_players(players, size)
    rows, cols = (int(v) for v in cfg.players[5:].split("x"))
    return grid_players(size, (rows, cols), n=cfg.n, seed=[cfg.seed, index],
                        background=cfg.background)


def _image_game(model: Backbone, x: torch.Tensor, label: int, players: Players,
                cfg: ExplainConfig, mean: torch.Tensor | None) -> tuple[np.ndarray, dict | None]:
    """v(x_S) of one sample under the configured (fixed or learned) baseline, and the learned
    baseline's fit (:func:`_fit_record`; None for a fixed baseline)."""
    if cfg.baseline != "learned":
        b = baseline_input(x, cfg.baseline, mean=mean)
        return masked_game(model, x, label, players, b, output=cfg.output,
                           batch_size=cfg.batch_size), None
    init = baseline_input(x, "zero")
    spec = model.spec
    mean_c = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_c = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    # the box: within the radius of the mean colour, and a valid image ((0 - mean)/std..(1 - mean)/std)
    lower = torch.maximum(init - cfg.baseline_radius, (0 - mean_c) / std_c).expand_as(x)
    upper = torch.minimum(init + cfg.baseline_radius, (1 - mean_c) / std_c).expand_as(x)
    learned = learn_baseline(model, x, label, players, init, lower.contiguous(),
                             upper.contiguous(), lr=cfg.baseline_lr, steps=cfg.baseline_steps,
                             output=cfg.output, batch_size=cfg.batch_size)
    return learned.game, _fit_record(learned)


def choose_samples(dataset: ImageDataset | TextDataset, k: int, seed: int,
                   keep: np.ndarray | None = None) -> np.ndarray:
    """``k`` sample positions drawn evenly over classes (seeded), among ``keep`` if given, passing
    over images that cannot be read (as every other command skips them): the draw goes on down
    the seeded order, so fewer than ``k`` come back only when fewer are readable."""
    order = sample_order(dataset, seed, keep)
    if not isinstance(dataset, ImageDataset):
        return np.sort(order[:k])
    chosen: list[int] = []
    for start in range(0, len(order), max(k, 1)):
        block = order[start:start + k]
        images = dataset.load_many(block)
        chosen += [int(i) for i, image in zip(block, images, strict=True) if image is not None]
        if len(chosen) >= k:
            break
    if k and len(order) and not chosen:
        raise PretrainReuseError(f"none of the {len(order)} samples drawn from {dataset.source!r} "
                                 "is a readable image; check the data's files")
    return np.sort(np.asarray(chosen[:k], dtype=np.int64))


def sample_order(dataset: ImageDataset | TextDataset, seed: int,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """The positions of the samples (of those in ``keep``, if given) in the seeded order in which
    :func:`choose_samples` draws them: every class is represented before any repeats."""
    require_labels(dataset, "explaining")  # the class whose output to explain
    candidates = np.arange(len(dataset)) if keep is None else np.flatnonzero(keep)
    rng = np.random.default_rng([seed, 11])
    order = candidates[rng.permutation(len(candidates))]
    # round-robin over classes
    labels = dataset.labels[order]
    rank = np.zeros(len(order), int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return order[np.argsort(rank, kind="stable")]


def explainable(model: Backbone, dataset: ImageDataset | TextDataset,
                cfg: ExplainConfig) -> np.ndarray | None:
    """Which samples have the players ``cfg`` asks for: for ``tokens``, the sentences of at least
    ``min_tokens`` tokens with at least ``n`` eligible words below ``max_position`` (bool over
    the dataset); None (every sample) for images."""
    if cfg.players != "tokens":
        return None
    _check_pairing(model, dataset, cfg, "model")
    tokenizer = model.preprocess.tokenizer
    enc = tokenizer(dataset.texts, truncation=True, max_length=model.spec.max_length)
    keep = np.array([len(ids) >= cfg.min_tokens and len(eligible_positions(
        ids, tokenizer, negations=cfg.negations, word_ids=_word_ids(enc, k),
        max_position=cfg.max_position)) >= cfg.n for k, ids in enumerate(enc["input_ids"])])
    if not keep.any():
        limits = (f" with min_tokens={cfg.min_tokens}, max_position={cfg.max_position}"
                  if cfg.min_tokens or cfg.max_position else "")
        raise PretrainReuseError(
            f"no sentence has n={cfg.n} eligible words (no special tokens, stop words, "
            f"punctuation, digits or single letters){limits}; lower n or pass longer sentences")
    return keep


class Games(NamedTuple):
    """The games of one model on the explained samples, before their decomposition."""

    values: np.ndarray  # (samples, 2^n) float64
    infos: list[dict[str, Any]]  # per sample: its id, label, players, ... (Interactions.info)
    meta: dict[str, Any]  # the explanation's meta (Interactions.meta, less the solver's)


@releases_folders
def explain(model: Backbone, dataset: ImageDataset | TextDataset, indices: np.ndarray,
            cfg: ExplainConfig, out: str | Path | None = None, *, role: str = "model",
            tau: float = 0.05, split: str | None = None, progress: bool = True,
            games_from: Sequence[Path] = ()) -> list[Interactions]:
    """Interactions of ``model`` (a classifier over ``dataset``'s classes) on the samples at
    ``indices``; with ``out``, games and interactions are saved there (and reused on rerun), and
    ``salient.png`` draws the salient interactions (threshold ``tau``) of the first samples.
    Their ``meta`` records ``cfg``, ``tau``, ``split`` (the split ``dataset`` was opened from,
    which the dataset does not know), the model's identity (:func:`model_identity`) and the data;
    ``meta["solver"]`` is the decomposition's own meta (parameters and diagnostics); each
    sample's ``info`` holds the class the model ``predicted`` for it: a misclassified sample's
    interactions explain the output of its true class, not of the model's answer. The model is
    moved to ``cfg.device`` (and stays there), computes in eval mode and is left in the
    train/eval mode it came in. ``games_from``: other explanation folders whose cached games of
    the same name (the same game: :func:`explain_games`) are linked into ``out`` instead of being
    computed.
    Everything that would fail is checked before anything is written (:func:`check_explainable`).
    A rerun into the ``out`` of a finished explanation with the same settings, data, model and
    samples whose files are all intact (:func:`finished_explanation`) returns the saved
    interactions and writes nothing; one with a missing or damaged file redoes the run (from the
    cached games that are intact)."""
    check_objects({role: model}, dataset, cfg)
    check_tau(tau)
    indices = _check_indices(indices, dataset)
    dataset = model_classes(model, dataset)
    identity = None
    check_out_outside(out, {"--data": data_path(dataset)})
    if out is not None:
        identity = rerun_identity({role: model}, dataset, {
            **asdict(cfg), "tau": tau, "split": split, "indices": [int(i) for i in indices]})
        check_rerun(Path(out), MARKER, identity, "an explanation run")
        done = finished_explanation(Path(out), identity, indices, cfg)
        if done is not None:  # the same run, finished and intact: nothing to do
            record_added_settings(Path(out) / MARKER, identity, "an explanation run")
            return done
    predicted = check_explainable(model, dataset, indices, cfg, role, torch.device(cfg.device))
    if out is not None:  # until the interactions are written, not only while games are computed
        lock_folder(Path(out), "an explanation run")
    games = explain_games(model, dataset, indices, cfg, out, role=role,
                          params={"tau": tau, "split": split}, progress=progress, identity=identity,
                          games_from=[Path(f) for f in games_from])
    results = [x.with_info(predicted=int(p))
               for x, p in zip(decompose(games, cfg), predicted, strict=True)]
    if out is not None:
        save_explanations(results, model, dataset, cfg, Path(out), tau, identity=identity)
    return results


#: Settings that do not change what an explanation computes: a rerun may give others.
RERUN_WITH_OTHER = ("batch_size", "device")


def rerun_identity(models: dict[str, Backbone], dataset: ImageDataset | TextDataset,
                   params: dict[str, Any]) -> dict[str, Any]:
    """What a rerun into an explanation's or analysis's folder must give as the run that wrote
    it did, as JSON: ``params`` (the settings, but :data:`RERUN_WITH_OTHER`), the data (its
    absolute path, or its name) and each model (by role) as its parameters and buffers
    (:func:`~pretrain_reuse.models.state_hash`, wherever they were loaded from) and its input
    size; the data's labels; for sentences also their content
    (:meth:`~pretrain_reuse.data.text.TextDataset.content_hash`)."""
    settings = _resolved({k: v for k, v in params.items() if k not in RERUN_WITH_OTHER})
    return json.loads(to_json({
        **settings, "data": data_path(dataset) or dataset.source,
        "labels": hash_array(dataset.labels),
        **({"texts": dataset.content_hash()} if isinstance(dataset, TextDataset) else {}),
        "models": {role: {"state": state_hash(m), "input_size": m.spec.input_size}
                   for role, m in models.items()}}))


#: Settings added after earlier versions had written their markers, each with the value those
#: versions used (a function of the recorded identity and the rerun's): a recorded identity
#: without one gets it, so that rerunning such a folder with the same flags still matches. The
#: data's labels and sentences were not compared then: such a folder is taken once as made of
#: the data as it is now, as those versions took it, and records it (:func:`record_added_settings`).
_ADDED_SETTINGS = {
    "background": lambda recorded, now: "original" if recorded.get("players") == "tokens"
    else "baseline",
    "labels": lambda recorded, now: now["labels"],
    "texts": lambda recorded, now: now["texts"],
}


def _resolved(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as what they compute: a ``qthres`` of None (the default) as the bound their
    decomposition takes, and a setting of :data:`BASELINE_ONLY` their baseline does not read at
    its default. So an explicit default is the same run, and so are folders of
    earlier versions, which recorded None, or a flag their baseline did not read."""
    settings = dict(settings)
    if "qthres" in settings and settings["qthres"] is None:
        settings["qthres"] = default_qthres(settings.get("decomposition", "and"))
    for name, reader in BASELINE_ONLY.items():
        if name in settings and settings.get("baseline") != reader:
            settings[name] = CONFIG_DEFAULTS[name]
    return settings


def recorded_identity(marker: Any, now: dict[str, Any]) -> Any:
    """The :func:`rerun_identity` a folder's marker (its parsed JSON) records, completed with the
    settings of :data:`_ADDED_SETTINGS` it predates (those the rerun's identity ``now`` has);
    None when it records none."""
    recorded = marker.get("identity") if isinstance(marker, dict) else None
    if not isinstance(recorded, dict):
        return recorded
    return {**{key: value(recorded, now) for key, value in _ADDED_SETTINGS.items() if key in now},
            **_resolved(recorded)}


def record_added_settings(marker: Path, identity: dict[str, Any], what: str) -> None:
    """Write into the ``marker`` of a finished explanation or analysis (``what``) of an earlier
    version the settings it lacks (:data:`_ADDED_SETTINGS`) or recorded in an earlier form, as
    the rerun with ``identity`` that found it finished took them: from then on a change of what
    they record (the data's labels or sentences) is told, as in a folder of this version. Where
    another process holds the folder or it cannot be written, it stays as it is (it is still
    the same run)."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if not (isinstance(recorded, dict) and recorded.get("identity") != identity
            and recorded_identity(recorded, identity) == identity):
        return
    try:
        lock_folder(marker.parent, what)
        write_json(marker, {**recorded, "identity": identity})
    except PretrainReuseError:
        pass


def check_rerun(out: Path, marker: str, identity: dict[str, Any], what: str, *,
                another: str = "pass another --out") -> None:
    """Refuse, before anything is written, a run into ``out`` whose ``marker`` records another
    :func:`rerun_identity` (a run with other settings or inputs, finished or not): it would
    overwrite that run's outputs. A marker that records none (an earlier version's; a damaged
    one, which the run rewrites) lets the run go on as before. ``another``: the message's
    advice for running elsewhere."""
    try:
        recorded = recorded_identity(json.loads((out / marker).read_text()), identity)
    except (OSError, ValueError):  # no marker, or not JSON
        return
    if recorded is not None and recorded != identity:
        raise PretrainReuseError(
            f"out (--out) {str(out)!r} holds {what} made with other settings or inputs "
            f"({describe_changes(identity, recorded)}); rerun with the same settings to reuse "
            f"it, or {another}, or remove the folder")


def finished_explanation(folder: Path, identity: dict[str, Any], indices: np.ndarray,
                         cfg: ExplainConfig) -> list[Interactions] | None:
    """The saved interactions of the explanation in ``folder`` when a run with ``identity``
    (:func:`rerun_identity`) on the samples at ``indices`` has nothing to do there: its marker
    records that identity and that it finished, and its files are intact
    (:func:`intact_explanations`). None otherwise: the run does (or redoes) the work."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("finished") is not True \
            or recorded_identity(marker, identity) != identity:
        return None
    return intact_explanations(folder, indices, cfg)


def intact_explanations(folder: Path, indices: np.ndarray | list[int],
                        cfg: ExplainConfig) -> list[Interactions] | None:
    """The interactions saved in the explanation folder ``folder`` for the samples at
    ``indices``, when every file a run would write there is intact: one readable
    ``interactions-*.safetensors`` per sample, of that sample and no more, ``salient.png``
    (images), and each sample's cached game, equal to the game its interactions explain (with
    a learned baseline's fit beside it). None when any is missing or damaged."""
    names = [f"interactions-{k:04d}.safetensors" for k in range(len(indices))]
    if sorted(p.name for p in folder.glob("interactions-*.safetensors")) != names:
        return None
    if cfg.players != "tokens" and not _nonempty(folder / "salient.png"):
        return None
    xs = []
    for name, i in zip(names, indices, strict=True):
        try:
            x = Interactions.load(folder / name)
            index, game = int(x.info["index"]), str(x.info["game"])
        except (PretrainReuseError, KeyError, TypeError, ValueError):
            return None
        cached = _cached_game(folder / "games" / f"{index:07d}-{game}.npy", x.n,
                              fitted=cfg.baseline == "learned")
        if index != int(i) or cached is None or not np.array_equal(cached[0], x.v):
            return None
        xs.append(x)
    return xs


def _nonempty(path: Path) -> bool:
    """Whether ``path`` is a file with something in it (a figure a run wrote)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def check_objects(models: dict[str, Any], dataset: Any, cfg: Any) -> None:
    """The Python caller passed loaded objects, not names or paths (which the CLI opens)."""
    for role, model in models.items():
        if not isinstance(model, Backbone):
            raise PretrainReuseError(
                f"the {role} model must be a Backbone, got {type(model).__name__}; load it with "
                "pretrain_reuse.models.create_backbone(name, weights=path)")
    check_dataset("the data", dataset)
    if not isinstance(cfg, ExplainConfig):
        raise PretrainReuseError(f"cfg must be an ExplainConfig, got {type(cfg).__name__}; build "
                                 "it with ExplainConfig(**fields)")
    unread = unread_settings(cfg)
    if unread:
        name = unread[0]
        raise PretrainReuseError(
            f"{name}={getattr(cfg, name)!r} (--{name.replace('_', '-')}) applies to baseline "
            f"{BASELINE_ONLY[name]!r} only, not {cfg.baseline!r}: it would change nothing; drop it")


#: Settings only one baseline reads: given for another, they would change nothing computed, yet
#: a rerun without them would be refused as one with other settings.
BASELINE_ONLY = {"baseline_lr": "learned", "baseline_steps": "learned",
                 "baseline_radius": "learned", "mean_samples": "mean"}


def unread_settings(cfg: ExplainConfig) -> list[str]:
    """The settings of :data:`BASELINE_ONLY` that ``cfg`` sets to other than their defaults
    although its baseline does not read them."""
    return [name for name, reader in BASELINE_ONLY.items()
            if getattr(cfg, name) != CONFIG_DEFAULTS[name] and cfg.baseline != reader]


def check_explainable(model: Backbone, dataset: ImageDataset | TextDataset, indices: np.ndarray,
                      cfg: ExplainConfig, role: str, device: torch.device) -> np.ndarray:
    """Refuse, before any game is computed or any file written, what would stop an explanation
    half-way: a model that is not a classifier over the data's classes, a chosen image that cannot
    be read, a model whose output on a chosen sample is not finite (NaN weights), players that do
    not fit the model's input (a grid finer than its pixels, parts of data without annotations),
    and games that would not fit in memory. ``indices``: valid sample positions. Returns the class
    the model predicts for each of them."""
    check_classifier(model, dataset, cfg, role)
    logits, readable = check_outputs(model, dataset, indices, role, device)
    if not readable.all():
        sample = dataset.ids[indices[np.flatnonzero(~readable)[0]]]
        raise PretrainReuseError(
            f"image {sample!r} of {dataset.source!r} cannot be read (a corrupt or non-image "
            "file); fix or remove that file, or draw other samples (another seed, --seed)")
    if cfg.players == "tokens":
        n = cfg.n
    else:
        size = tuple(model.spec.input_size)
        n = max(sample_players(dataset, int(i), cfg, size).n for i in indices)
    _check_memory(len(indices), n, cfg.decomposition)
    return logits.argmax(axis=1)


def check_classifier(model: Backbone, dataset: ImageDataset | TextDataset, cfg: ExplainConfig,
                     role: str) -> None:
    """``model`` is a classifier over ``dataset``'s classes of the modality of ``cfg.players``:
    as many classes, or, for data labelled by names and a model that names its classes, names
    the model knows numbered as it numbers them (:func:`model_classes`)."""
    _check_pairing(model, dataset, cfg, role)
    if model.num_classes is None or model.layer != "penultimate":
        raise PretrainReuseError(
            f"{role}: the model must be a classifier with a head (got num_classes="
            f"{model.num_classes}); pass the weights of a fine-tuned or linear-probe model")
    require_labels(dataset, "explaining")  # the class whose output to explain
    names = output_class_names(model, dataset.class_names)
    if isinstance(dataset, TextDataset) and dataset.named and names is not None:
        # the data's names are the model's classes (fewer is fine); numbered otherwise than the
        # model numbers them, every label would silently explain another class
        if not np.array_equal(numbered_by(dataset, names).labels, dataset.labels):
            raise PretrainReuseError(
                f"{role} {model.spec.name}: the data's class names are numbered in sorted order, "
                "not as the model numbers them ("
                + ", ".join(f"{i}={name!r}" for i, name in enumerate(names))
                + "); give the labels as these indices, or renumber the data with "
                "model_classes(model, data)")
        return
    if dataset.class_names is None:
        # integer labels are the model's class indices: a few samples may hold only some classes
        if int(dataset.labels.max()) >= model.num_classes:
            raise PretrainReuseError(
                f"{role} {model.spec.name}: the data has the label {int(dataset.labels.max())} but "
                f"the model outputs only {model.num_classes} classes (0-{model.num_classes - 1}); "
                "pass a model trained on this data's classes")
        return
    if model.num_classes != len(dataset.class_names):
        raise PretrainReuseError(
            f"{role} {model.spec.name}: the model outputs {model.num_classes} classes but the data "
            f"has {len(dataset.class_names)}; pass a model trained on this data's classes"
            + ("" if role != "pretrained" else
               " (for the pre-trained model, the classifier of finetune --mode linear-probe)"))
    trained = trained_class_names(model)
    if trained is not None and trained != list(dataset.class_names):
        # as many classes is not the same classes: every label would explain another class
        how = "in another order" if sorted(trained) == sorted(dataset.class_names) else "other classes"
        raise PretrainReuseError(
            f"{role} {model.spec.name}: the model was trained on the classes "
            f"{preview(trained)} but the data's are {preview(dataset.class_names)} ({how}); "
            "pass a model trained on these classes, or the data numbered as the model numbers "
            "them (model_classes(model, data))")


def model_classes(model: Backbone, dataset: ImageDataset | TextDataset, role: str | None = None
                  ) -> ImageDataset | TextDataset:
    """``dataset`` with its labels as ``model``'s class indices, matched by name: sentences
    labelled by class names and images of named classes, for a model that names its outputs
    (the classes its finetune run recorded, else its config's ``id2label``:
    :func:`~pretrain_reuse.models.output_class_names`), are renumbered by the model's names (a
    view; the data may hold fewer classes, a class the model lacks is refused). Any other data
    (integer labels are the model's indices already; names for a model without names, numbered
    in sorted order) is returned as it is. ``role`` names the model (a knowledge role, also its
    flag) where it has other classes."""
    names = output_class_names(model, dataset.class_names)
    if isinstance(dataset, TextDataset):
        return numbered_by(dataset, names) if dataset.named and names is not None else dataset
    if names is None or dataset.class_names is None or dataset.labels is None \
            or list(dataset.class_names) == names:
        return dataset
    # an image folder numbers its classes in sorted order, a list file with a classes.txt in that
    # file's order: a run's test folder numbers its training classes otherwise
    view = copy.copy(dataset)
    owner, fix = "training data", None
    if role is not None:  # the model is the likelier mistake: one of another task in a role
        owner = f"{role} model (--{role})"
        fix = (f"pass as the {role} model a classifier over the data's classes (for a "
               "pre-trained backbone, its linear probe: finetune --mode linear-probe), or data "
               "(--data) of its classes")
    view.labels = labels_by_name(dataset, names, "data (--data)", owner=owner, fix=fix)
    view.class_names = list(names)
    return view


def check_outputs(model: Backbone, dataset: ImageDataset | TextDataset, indices: np.ndarray,
                  role: str, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_logits`, refusing a model whose output on a readable sample is NaN or
    infinite (NaN weights, a diverged training): every game and interaction would be NaN, and an
    all-NaN output would still pass for class 0 under argmax."""
    logits, readable = class_logits(model, dataset, indices, device)
    bad = np.flatnonzero(readable & ~np.isfinite(logits).all(axis=1))
    if len(bad):
        raise PretrainReuseError(
            f"{role} {model.spec.name}: its output on sample {dataset.ids[indices[bad[0]]]!r} is "
            f"NaN or infinite ({len(bad)} of the {int(readable.sum())} samples checked); check the "
            "model's weights (a diverged training gives NaN)")
    return logits, readable


@torch.no_grad()
@full_float32()
def class_logits(model: Backbone, dataset: ImageDataset | TextDataset, indices: np.ndarray,
                 device: torch.device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s logits (k, classes), float32 on the CPU, on the samples at ``indices`` (k,),
    and which of them could be read ((k,) bool; the rows of unreadable images are NaN)."""
    model = model.to(device)
    logits = np.full((len(indices), model.num_classes), np.nan, np.float32)
    readable = np.ones(len(indices), bool)
    text = isinstance(dataset, TextDataset)
    data = None if text else preprocessed(dataset, model.preprocess)
    with evaluating(model):
        for s in range(0, len(indices), batch_size):
            chunk = [int(i) for i in indices[s:s + batch_size]]
            if text:
                enc = model.preprocess.batch([dataset.texts[i] for i in chunk])
                logits[s:s + len(chunk)] = model({k: v.to(device) for k, v in enc.items()}).float().cpu()
            else:
                xs = [data.load(i) for i in chunk]
                ok = np.array([x is not None for x in xs])
                readable[s:s + len(chunk)] = ok
                if ok.any():
                    batch = torch.stack([x for x in xs if x is not None]).to(device)
                    logits[s:s + len(chunk)][ok] = model(batch).float().cpu().numpy()
    return logits, readable


@full_float32()
@releases_folders
def explain_games(model: Backbone, dataset: ImageDataset | TextDataset, indices: np.ndarray,
                  cfg: ExplainConfig, out: str | Path | None, *, role: str, params: dict[str, Any],
                  progress: bool, identity: dict[str, Any] | None = None,
                  games_from: Sequence[Path] = ()) -> Games:
    """The games of ``model`` on the samples at ``indices`` (valid positions, already passed by
    :func:`check_explainable`: the callers check every model before anything is written); with
    ``out``, cached there, its marker recording ``identity`` (:func:`rerun_identity`, already
    passed by :func:`check_rerun`) when given. ``params``: recorded in the meta beside ``cfg``.
    ``games_from``: other explanation folders whose cached games of the same name (the same
    game) are linked into ``out`` instead of being computed."""
    device = torch.device(cfg.device)
    model = model.to(device)
    with evaluating(model):
        setup = (_text_samples(model, dataset, cfg, device) if cfg.players == "tokens"
                 else _image_samples(model, dataset, indices, cfg, device))
        folder = Path(out) if out is not None else None
        if folder is not None:
            # unfinished until save_explanations: a rerun with other settings rewrites the samples'
            # files one by one, and a folder stopped halfway holds a mix of the two runs
            write_json(make_run_folder(folder, "an explanation run", MARKER, kind=MARKER_KIND),
                       _marker(finished=False, identity=identity))
            (folder / "games").mkdir(exist_ok=True)
        identity = model_identity(model)
        # integer labels are the model's class indices (check_classifier): named by the model if it can
        names = dataset.class_names or trained_class_names(model) or model_class_names(model)
        games, infos = [], []
        for i in tqdm([int(i) for i in indices], desc=f"explain {role}", unit="sample",
                      disable=not progress):
            sample = setup(i)
            label = int(dataset.labels[i])
            game = _digest({"model": identity["state"], "sample": sample.key, "label": label,
                            "baseline": _baseline_options(cfg), "output": cfg.output})
            cache = None if folder is None else folder / "games" / f"{i:07d}-{game}.npy"
            cached = None if cache is None else _reusable_game(
                cache, [f / "games" / cache.name for f in games_from], sample.players["n"],
                fitted=cfg.baseline == "learned", ends=partial(sample.ends, label))
            if cached is None:
                v, fit = sample.compute(label)
                _check_finite(v, role, model, dataset.ids[i])
                if cache is not None:
                    # before the game: a crash in between leaves a record of another game, whose
                    # hash then refuses the game that is there
                    _write_record(cache, v, fit)
                    with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                        np.save(fh, v)
            else:
                v, fit, hashed = cached
                if not hashed:  # an earlier version's game, checked by its format and ends
                    _write_record(cache, v, fit)
            games.append(v)
            infos.append({"sample": dataset.ids[i], "index": i, "label": label,
                          "class": names[label] if names is not None else str(label),
                          "players": sample.players, "player_names": sample.names, "role": role,
                          "model": model.spec.name, "baseline": cfg.baseline, "output": cfg.output,
                          "game": game, "baseline_fit": fit})
    meta = make_meta("knowledge.explain", {**asdict(cfg), **params}, seed=cfg.seed,
                     inputs={**identity, "data": dataset.source, "data_path": data_path(dataset)})
    return Games(np.stack(games), infos, meta)


def _write_record(cache: Path, v: np.ndarray, fit: dict | None) -> None:
    """Write the record of the game ``v`` cached at ``cache``: its content hash, and a learned
    baseline's ``fit``."""
    write_json(cache.with_suffix(".json"), {**(fit or {}), GAME_HASH: hash_array(v)})


def _reusable_game(cache: Path, others: list[Path], n: int, *, fitted: bool,
                   ends: Callable[[], np.ndarray | None]) -> tuple[np.ndarray, dict | None, bool] | None:
    """The game cached at ``cache`` (see :func:`_cached_game`) if it passes the checks, else the
    first of ``others`` that does, linked to ``cache`` with its record; None if none does. A
    game's file name records everything it depends on, so another explanation folder's file of
    that name holds the same game, unless it is damaged: then the next folder's is taken.
    ``ends``: the model's v(N) and v(∅) (a forward pass, only run when a file is there)."""
    found = [p for p in (cache, *others) if p.is_file()]
    model_ends = ends() if found else None
    for path in found:
        cached = _cached_game(path, n, fitted=fitted)
        if cached is None or not _same_ends(cached[0], model_ends):
            continue  # damaged, or not the model's game (zeroed, overwritten)
        if path != cache:
            # in an order that a crash between the two steps leaves a record that refuses the
            # game beside it (recomputed), never a damaged game without a record (trusted)
            record = path.with_suffix(".json")
            if record.is_file():
                link_file(record, cache.with_suffix(".json"))
                link_file(path, cache)
            else:  # an earlier version's game: the record of the game it replaces would refuse it
                link_file(path, cache)
                cache.with_suffix(".json").unlink(missing_ok=True)
        return cached
    return None


def decompose(games: Games, cfg: ExplainConfig) -> list[Interactions]:
    """Each sample's game decomposed on its own: the AND (Harsanyi) interactions for
    ``decomposition="and"``, else AND-OR (``"joint-and-or"`` joins models only in ``knowledge``)."""
    solver = and_interactions if cfg.decomposition == "and" else and_or_interactions
    return with_games(games, solver(games.values, qthres=cfg.noise_bound))


def with_games(games: Games, results: list[Interactions], *,
               what: str = "the sparse decomposition") -> list[Interactions]:
    """The decompositions ``results`` of ``games`` with each sample's info and the explanation's
    meta; ``meta["solver"]`` is the decomposition's own meta. A solve that stopped before its
    tolerance is warned of (as ``what``): its salient sets may differ from the optimum's."""
    short = [res.meta for res in results if res.meta.get("converged") is False]
    if short:
        warnings.warn(
            f"{what} stopped before its tolerance on {len(short)} of "
            f"{len(results)} samples (relative duality gap up to "
            f"{max(m.get('gap', math.nan) for m in short):.3g}); their salient interactions may "
            "differ from the optimum's (each sample's meta.solver records its gap)", stacklevel=2)
    return [replace(res, info=info, meta={**games.meta, "solver": res.meta})
            for res, info in zip(results, games.infos, strict=True)]


def save_explanations(results: list[Interactions], model: Backbone,
                      dataset: ImageDataset | TextDataset, cfg: ExplainConfig, folder: Path,
                      tau: float, *, identity: dict[str, Any] | None = None) -> None:
    """Write ``interactions-*.safetensors`` and (images) ``salient.png`` at threshold ``tau``
    into the explanation folder ``folder``, delete an earlier run's outputs not rewritten, and
    mark the folder finished (recording ``identity``, as :func:`explain_games` did)."""
    # the folder is this run's (explain_games marked it unfinished): an earlier run's samples go
    # first, damaged ones among them, which Interactions.save refuses to replace (not its kind)
    _remove_stale(folder, ["interactions-*.safetensors"], [])
    written = [x.save(folder / f"interactions-{k:04d}.safetensors") for k, x in enumerate(results)]
    if cfg.players != "tokens":
        written.append(save_png(salient_figure(display_samples(
            model, dataset, results[:SHOWN], cfg), tau=tau), folder / "salient.png"))
    _remove_stale(folder, ["salient.png"], written)
    write_json(folder / MARKER, _marker(finished=True, identity=identity))


def _marker(*, finished: bool, identity: dict[str, Any] | None) -> dict[str, Any]:
    """An explanation folder's ``explain.json``."""
    return {"kind": MARKER_KIND, "finished": finished,
            **({"identity": identity} if identity is not None else {})}


def data_path(dataset: ImageDataset | TextDataset) -> str | None:
    """The absolute path of the folder or file ``dataset`` was read from; None for a data set
    known by name (its name identifies it)."""
    path = Path(dataset.source)
    return str(path.resolve()) if path.exists() else None


def _check_indices(indices: np.ndarray, dataset: ImageDataset | TextDataset) -> np.ndarray:
    """``indices`` as a non-empty 1-D integer array of positions in ``dataset``."""
    idx = np.asarray(indices)
    if (idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer)
            or idx.min() < 0 or idx.max() >= len(dataset)):
        shape = f"shape {idx.shape}, dtype {idx.dtype}" + (
            f", range [{idx.min()}, {idx.max()}]" if idx.size and idx.dtype.kind in "iuf" else "")
        raise PretrainReuseError(
            f"indices ({shape}) must be a non-empty 1-D array of integer sample positions in "
            f"[0, {len(dataset)}); draw them with choose_samples")
    return idx


#: Samples drawn in ``salient.png``.
SHOWN = 6


def display_samples(model: Backbone, dataset: ImageDataset, xs: list[Interactions],
                    cfg: ExplainConfig) -> list[tuple[np.ndarray, np.ndarray, Interactions]]:
    """(image as the model sees it, in [0, 1], HWC; player masks; interactions) per sample."""
    data = preprocessed(dataset, model.preprocess)
    size = tuple(model.spec.input_size)
    mean = torch.tensor(model.spec.mean).view(-1, 1, 1)
    std = torch.tensor(model.spec.std).view(-1, 1, 1)
    out = []
    for x in xs:
        i = int(x.info["index"])
        image = (data.load(i) * std + mean).permute(1, 2, 0).numpy()
        out.append((image, sample_players(dataset, i, cfg, size).masks, x))
    return out


def model_identity(model: Backbone) -> dict[str, Any]:
    """What identifies a model: its name, the weights file it was loaded from (path, content hash
    and, for a fine-tuning snapshot, its step and the run that wrote it; None when the weights
    come from elsewhere or the file does not record them), the ``finetune`` mode that file
    records (kept here so that a report of a moved or copied folder need not read the file at
    its old path) and the hash of its parameters and buffers as they are."""
    path = weights_path(model)
    meta = {} if path is None else weights_meta(path)
    step, run = meta.get("step"), meta.get("run")
    return {"model": model.spec.name, "weights": None if path is None else str(path),
            "weights_hash": None if path is None else hash_file(path),
            "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
            "run": run if isinstance(run, str) else None, "mode": finetune_mode(model),
            "state": state_hash(model)}


def _remove_stale(folder: Path, patterns: list[str], written: list[Path]) -> None:
    """Delete the files and folders matching ``patterns`` in ``folder`` that this run did not
    write: the outputs of an earlier run with more samples, models or checkpoints, which
    anything reading the folder would otherwise take for this run's."""
    keep = {p.name for p in written}
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _cached_game(path: Path, n: int, *,
                 fitted: bool) -> tuple[np.ndarray, dict | None, bool] | None:
    """The game of ``n`` players cached at ``path``, when its baseline was ``fitted`` (learned)
    the fit recorded beside it (``path`` with ``.json``), and whether the record holds the game's
    content hash; None when there is no game, or it is not a .npy array of 2^n finite float64
    values (truncated, overwritten, another program's), or its record is unreadable or holds
    another content hash (a changed value anywhere in the file), which the caller then computes
    again and writes over. A game cached by an earlier version has no hash in its record (or no
    record, with a fixed baseline): it is checked by its format and its two end values, and its
    record is written when it is reused."""
    record_path = path.with_suffix(".json")
    try:
        with open(path, "rb") as fh:
            v = np.lib.format.read_array(fh, allow_pickle=False)
        record = json.loads(record_path.read_text()) if fitted or record_path.exists() else {}
    except (OSError, ValueError, EOFError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    if not (v.dtype == np.float64 and v.shape == (1 << n,) and np.isfinite(v).all()
            and isinstance(record, dict)):
        return None
    if GAME_HASH in record and record[GAME_HASH] != hash_array(v):
        return None
    fit = {k: value for k, value in record.items() if k != GAME_HASH} if fitted else None
    return v, fit, GAME_HASH in record


#: How far a cached game's v(N) and v(∅) may lie from the model's own, relative to the game's
#: scale max(1, |v(N)|, |v(∅)|), for the game to be reused. The cached values come from batches of
#: ``batch_size`` masked inputs and the check from a batch of two: float32 kernels chosen per
#: batch size (TF32 convolutions on GPUs, PyTorch's default: 10-bit mantissa, ~1e-3 relative)
#: give slightly other logits; a zeroed, shifted or another model's game is off by far more.
ENDS_RTOL = 1e-2


def _same_ends(v: np.ndarray, ends: np.ndarray | None) -> bool:
    """Whether the cached game ``v`` has the model's v(N) and v(∅) (``ends``, in that order;
    None: not checkable, a learned baseline, whose game is then trusted by its format and
    content hash)."""
    if ends is None:
        return True
    cached = v[[len(v) - 1, 0]]
    return bool(np.abs(cached - ends).max() <= ENDS_RTOL * max(1.0, np.abs(ends).max()))


def _fit_record(learned: LearnedBaseline) -> dict[str, Any]:
    """What a learned baseline's optimisation achieved: ``loss`` = Σ_S |I_and(S)| at the start
    and at the iterate kept (``best_step``), of ``steps``."""
    return {"loss_initial": float(learned.loss[0]), "loss": float(learned.loss[learned.best_step]),
            "best_step": int(learned.best_step), "steps": len(learned.loss) - 1}


def _check_finite(v: np.ndarray, role: str, model: Backbone, sample: str) -> None:
    """Refuse a game with NaN or infinite values (a model with NaN weights, a diverged training):
    every interaction computed from it would be NaN."""
    bad = int((~np.isfinite(v)).sum())
    if bad:
        raise PretrainReuseError(
            f"{role} {model.spec.name}: its output on sample {sample!r} is NaN or infinite for "
            f"{bad} of the {v.size} masked inputs; check the model's weights (a diverged "
            "training gives NaN)")


def _digest(obj: Any) -> str:
    """Short hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _tensor_hash(x: torch.Tensor) -> str:
    return hash_array(x.detach().cpu().numpy())


def _baseline_options(cfg: ExplainConfig) -> dict[str, Any]:
    """The options that fix the baseline (the learned one's optimiser settings)."""
    if cfg.baseline != "learned":
        return {"baseline": cfg.baseline}
    return {"baseline": cfg.baseline, "lr": cfg.baseline_lr, "steps": cfg.baseline_steps,
            "radius": cfg.baseline_radius}


def _check_memory(samples: int, n: int, decomposition: str) -> None:
    """Refuse a run whose games and interactions would not fit the available memory."""
    need = samples * 2**n * 8 * _ARRAYS_PER_SAMPLE[decomposition]
    free = _available_memory()
    if free is not None and need > free:
        raise PretrainReuseError(
            f"explaining {samples} samples with n={n} players needs about {need / 2**30:.1f} GiB "
            f"(games, interactions and the {decomposition} transform) but "
            f"{free / 2**30:.1f} GiB are available; explain fewer samples per run (--samples) "
            "or fewer players (--n)")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_pairing(model: Backbone, dataset: ImageDataset | TextDataset, cfg: ExplainConfig,
                   role: str) -> None:
    """Token players go with a text classifier and sentences, the others with images."""
    tokens = cfg.players == "tokens"
    if tokens != (model.spec.modality == "text"):
        fix = ("pass a text classifier (hf:<folder> of a sequence classifier)" if tokens
               else "use players='tokens' for a text classifier")
        raise PretrainReuseError(f"{role}: players={cfg.players!r} but {model.spec.name} is a "
                                 f"{model.spec.modality} model; {fix}")
    if tokens != isinstance(dataset, TextDataset):
        raise PretrainReuseError(
            f"players={cfg.players!r} does not fit the data {dataset.source!r}: token players "
            "need sentences (a .jsonl, .csv or .tsv sentence file), the others images")


def _image_samples(model: Backbone, dataset: ImageDataset, indices: np.ndarray,
                   cfg: ExplainConfig, device: torch.device) -> Callable[[int], SampleGame]:
    data = preprocessed(dataset, model.preprocess)
    size = tuple(model.spec.input_size)
    xs = {int(i): data.load(int(i)) for i in indices}  # readable: checked by check_explainable
    _warn_of_no_effect(dataset, indices, cfg, xs, size)
    mean = _data_mean(data, cfg).to(device) if cfg.baseline == "mean" else None

    mean_key = {} if mean is None else {"mean": _tensor_hash(mean)}

    def setup(i: int) -> SampleGame:
        players = sample_players(dataset, i, cfg, size)
        key = {"input": _tensor_hash(xs[i]), "players": hash_array(players.masks),
               "background": players.background, **mean_key}
        x = xs[i].to(device)

        def ends(label: int) -> np.ndarray | None:
            if cfg.baseline == "learned":
                return None
            return coalition_values(image_values(model, x, label, players, cfg.output),
                                    baseline_input(x, cfg.baseline, mean=mean), players.n,
                                    [(1 << players.n) - 1, 0])

        return SampleGame(players.meta, players.names, key, lambda label: _image_game(
            model, x, label, players, cfg, mean), ends)

    return setup


def _warn_of_no_effect(dataset: ImageDataset, indices: np.ndarray, cfg: ExplainConfig,
                       xs: dict[int, torch.Tensor], size: tuple[int, int]) -> None:
    """Warn of a masking option that gives the default's games on these samples (the model's
    inputs ``xs``): it would read as a setting that was compared and made no difference."""
    if cfg.baseline == "shrink" and all(bool((x.abs() <= SHRINK_TAU).all()) for x in xs.values()):
        warnings.warn(
            f"baseline 'shrink' is the zero baseline on these images: every value of the model's "
            f"normalised input lies within ±{SHRINK_TAU:g} of 0 (the normalisation's mean colour), "
            "so shrinking toward it leaves nothing; the games are those of baseline 'zero' (shrink "
            "differs where values exceed that, as under ImageNet's normalisation)", stacklevel=2)
    if cfg.background != "baseline" and not any(
            (sample_players(dataset, int(i), cfg, size).masks.sum(0) == 0).any() for i in indices):
        levels = len(INTEGRATED_LEVELS)
        cost = (f" and the {levels} blends cost {levels} times the forward passes"
                if cfg.background == "integrated" else "")
        fix = ("draw fewer grid cells (n) to leave some" if cfg.players.startswith("grid:")
               else "use background 'baseline'")
        warnings.warn(
            f"background {cfg.background!r} is 'baseline' on these samples: the players cover "
            f"every pixel, so there is no pixel of no player to show{cost}; the games are the "
            f"same ({fix})", stacklevel=2)


def _data_mean(data: ImageDataset, cfg: ExplainConfig) -> torch.Tensor:
    """(C, H, W) per-pixel mean of ``cfg.mean_samples`` readable images of ``data`` drawn with
    ``cfg.seed`` (the ``mean`` baseline), accumulated in float64."""
    k = min(cfg.mean_samples, len(data))
    pick = np.sort(np.random.default_rng([cfg.seed, 17]).choice(len(data), k, replace=False))
    total, count = None, 0
    for i in pick:
        x = data.load(int(i))
        if x is not None:
            total = x.double() if total is None else total + x
            count += 1
    if total is None:
        raise PretrainReuseError(f"baseline 'mean': none of the {k} images drawn is readable; "
                                 "check the data")
    return (total / count).float()


def _text_samples(model: Backbone, dataset: TextDataset, cfg: ExplainConfig,
                  device: torch.device) -> Callable[[int], SampleGame]:
    tokenizer = model.preprocess.tokenizer

    def setup(i: int) -> SampleGame:
        enc = tokenizer(dataset.texts[i], truncation=True, max_length=model.spec.max_length,
                        return_tensors="pt")
        word_ids = _word_ids(enc, 0)
        enc = {k: v[0].to(device) for k, v in enc.items()}
        players = token_players(enc["input_ids"].tolist(), tokenizer, cfg.n, seed=[cfg.seed, i],
                                negations=cfg.negations, word_ids=word_ids,
                                max_position=cfg.max_position)
        key = {"input": _digest({k: v.tolist() for k, v in enc.items()}),
               "players": _digest(players.pieces)}  # the masked tokens, not only the first

        def ends(label: int) -> np.ndarray | None:
            if cfg.baseline == "learned":
                return None
            token = torch.tensor(baseline_token(tokenizer, cfg.baseline), device=device)
            return coalition_values(text_values(model, enc, label, players, cfg.output,
                                                 embeddings=False),
                                    token, players.n, [(1 << players.n) - 1, 0])

        return SampleGame(players.meta, players.names, key, lambda label: _text_game(
            model, enc, label, players, cfg), ends)

    return setup


def _word_ids(encoding, k: int) -> list[int | None] | None:
    """The words of sentence ``k``'s tokens from a fast tokenizer's encoding, else None."""
    return encoding.word_ids(k) if encoding.is_fast else None


def _text_game(model: Backbone, enc: dict[str, torch.Tensor], label: int, players: TokenPlayers,
               cfg: ExplainConfig) -> tuple[np.ndarray, dict | None]:
    """v(x_S) of one sentence under the configured (token or learned embedding) baseline, and
    the learned baseline's fit (None for a token baseline)."""
    tokenizer = model.preprocess.tokenizer
    if cfg.baseline != "learned":
        return masked_text_game(model, enc, label, players, baseline_token(tokenizer, cfg.baseline),
                                output=cfg.output, batch_size=cfg.batch_size), None
    words = model.body.get_input_embeddings().weight.detach()
    start = baseline_token(tokenizer, "mask" if tokenizer.mask_token_id is not None else "pad")
    init, radius = words[start], cfg.baseline_radius * words.std(dim=0)
    learned = learn_baseline_embedding(model, enc, label, players, init, init - radius,
                                       init + radius, lr=cfg.baseline_lr,
                                       steps=cfg.baseline_steps, output=cfg.output,
                                       batch_size=cfg.batch_size)
    return learned.game, _fit_record(learned)
