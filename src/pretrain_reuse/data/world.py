r"""A procedural image world whose answers are known: which pre-training classes a target task
needs, and which combinations of image parts each class depends on.

Generative model
----------------
*Parts.* A part is a (shape, colour, texture) triple: 8 shapes (square, frame, disk, ring,
triangle, diamond, cross, x), 8 colours, and ``textures`` of (solid, striped, checked, dotted)
multiplying the colour by 1 or 0.45 in a pattern. Shapes and colours come in pairs of similar
shapes (square/frame, disk/ring, ...) and fixed colour pairs; a *family* is one shape pair times
one colour pair, so there are 4 x 4 = 16 families of ``4 * textures`` parts each, and families share
no part (like ImageNet's groups: birds, dogs, ...). A world uses ``families`` of them.

*Class rules.* Every class has a rule over the parts of one family: an AND of 2-3 terms
(``rule_terms``), each term a single part or, with probability ``or_prob``, an OR of two parts, e.g.
``red striped disk AND (cyan solid ring OR cyan striped ring)``. Rules of one task are
*compatible*: the union of all parts a rule mentions never satisfies another rule of the task, so a
rule-following image belongs to one class only.

*Tasks.* ``pretrain`` has ``families x classes_per_family`` classes (128 by default). Target task
``target-k`` (k < ``target_tasks``; ``target`` is ``target-0``) takes ``target_families`` families
(seeded per k) and draws ``target_classes_per_family`` *new* rules over their parts (no target rule
equals a pre-training rule), except that ``target_shared_classes`` of each family's classes are
pre-training classes of that family, rule and all (as CUB's birds include ImageNet's bird
classes; 0 by default: every target class is new). Its ``related`` classes are the pre-training
classes of those families: they share parts with the target classes (each shares at least one
part with the target rules, by construction), the others share none. This is the ground truth
for selection recall, and what makes pre-training useful: features that detect the target's
parts are learnt on them.

*Images.* ``image_size``² RGB, tiled by a ``grid`` x ``grid`` array of slots (cells of about
``image_size / grid`` pixels; the players of an interaction analysis). An image of class c
shows one part of each term of c's rule, plus each other alternative of its OR terms with
probability ``extra_alt_prob`` (so both AND and OR structure appear in images), plus up to
``max_distractors`` distractor parts (half of them from the class's own family, as hard negatives),
redrawn while they would make another rule of the task hold, each in its own random slot,
placed at a random offset inside the slot's cell (parts never cross cells). Background: a random
grey level plus uniform pixel noise of std ``noise``; part colours are jittered by up to 8 %.

*Determinism.* Sample ``i`` of (task, split) is drawn from its own generator seeded by
``(seed, task, split, i)``, so any sample or subset is reproducible without generating the others,
and DataLoader workers need no shared state. Labels are blocked: sample ``i`` has class
``i // per_class``.

*Ground truth per image* (:class:`Scene`): the part in each slot, its box and pixel mask, the
slots serving each term of the rule, and :meth:`Scene.rule_holds` -- the Boolean game
v*(S) = AND over terms of (OR over the term's slots in S), which is exactly the AND/OR interaction
structure a model of the class should use.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..configs import check_fields
from ..errors import PretrainReuseError, check_choice, check_seed
from .datasets import ImageDataset, Transform, convert_channels

SHAPES = ("square", "frame", "disk", "ring", "triangle", "diamond", "cross", "x")
COLOURS = ("red", "orange", "green", "yellow", "blue", "cyan", "magenta", "white")
RGB = np.array([(230, 40, 40), (250, 150, 30), (40, 190, 60), (235, 225, 40),
                (50, 80, 240), (40, 215, 230), (215, 50, 215), (245, 245, 245)], np.float32) / 255
TEXTURES = ("solid", "striped", "checked", "dotted")
N_FAMILIES = (len(SHAPES) // 2) * (len(COLOURS) // 2)
_DARK = 0.45  # intensity of a texture's dark pixels
_DISTRACTOR_SAME_FAMILY = 0.5  # share of distractors drawn from the class's own family
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class WorldConfig:
    """Size and difficulty of a world; every field is recorded with the data that uses it."""

    image_size: int = 32
    grid: int = 3
    families: int = 16
    classes_per_family: int = 8
    textures: int = 2
    rule_terms: tuple[int, int] = (2, 3)
    or_prob: float = 0.3
    extra_alt_prob: float = 0.3
    max_distractors: int = 2
    noise: float = 0.04
    target_tasks: int = 4
    target_families: int = 2
    target_classes_per_family: int = 5
    target_shared_classes: int = 0
    pretrain_train: int = 100
    pretrain_test: int = 20
    target_train: int = 40
    target_test: int = 40
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise PretrainReuseError(f"WorldConfig: {what}")

        check_fields(self)  # the types first: a float count failed deep inside make_world
        check_seed("seed", self.seed)

        need(1 <= self.families <= N_FAMILIES, f"families must be in 1..{N_FAMILIES}, got {self.families}")
        need(1 <= self.textures <= len(TEXTURES), f"textures must be in 1..4, got {self.textures}")
        need(self.grid >= 2, f"grid must be >= 2, got {self.grid}")
        need(self.image_size // self.grid >= 8,
             f"image_size // grid must be >= 8 pixels per cell, got {self.image_size // self.grid}")
        lo, hi = self.rule_terms
        need(1 <= lo <= hi <= self.grid**2, f"rule_terms must be (min, max) with 1 <= min <= max "
                                            f"<= grid², got {self.rule_terms}")
        need(2 * hi <= self.grid**2 or self.or_prob == 0 or self.extra_alt_prob == 0,
             "a rule showing all its OR alternatives must fit the grid: lower rule_terms or raise grid")
        for name in ("or_prob", "extra_alt_prob"):
            need(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")
        need(self.noise >= 0 and self.max_distractors >= 0, "noise and max_distractors must be >= 0")
        need(1 <= self.target_families <= self.families,
             f"target_families must be in 1..families={self.families}, got {self.target_families}")
        need(0 <= self.target_shared_classes <= min(self.target_classes_per_family,
                                                    self.classes_per_family),
             "target_shared_classes must be in 0..min(target_classes_per_family, "
             f"classes_per_family), got {self.target_shared_classes}")
        for name in ("classes_per_family", "target_tasks", "target_classes_per_family",
                     "pretrain_train", "pretrain_test", "target_train", "target_test"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def cell(self) -> int:
        """Side in pixels of one cell of the grid the parts are placed on."""
        return self.image_size // self.grid

    @property
    def part_size(self) -> int:
        """Side in pixels of a part, leaving room in its cell for position jitter."""
        return self.cell - max(2, self.cell // 4)  # room left in the cell for position jitter


@dataclass(frozen=True)
class Rule:
    """A class rule: an AND over ``terms``, each term an OR over part ids."""

    terms: tuple[tuple[int, ...], ...]

    @property
    def parts(self) -> frozenset[int]:
        """Every part that occurs in the rule."""
        return frozenset(p for term in self.terms for p in term)

    def holds(self, parts: Collection[int]) -> bool:
        """Whether a composition showing ``parts`` satisfies the rule."""
        return all(any(p in parts for p in term) for term in self.terms)

    def describe(self, part_names: list[str]) -> str:
        """The rule in words, e.g. ``"wing AND (beak OR tail)"``."""
        def term(t):
            alts = " OR ".join(part_names[p] for p in t)
            return f"({alts})" if len(t) > 1 else alts

        return " AND ".join(term(t) for t in self.terms)


@dataclass(frozen=True)
class Scene:
    """The ground truth of one generated image.

    Attributes:
        label: the class.
        rule: the class rule.
        slot_parts: (grid²,) part id shown in each slot, -1 for an empty slot.
        boxes: (grid², 4) ``[y0, x0, y1, x1)`` of the drawn part, -1 for an empty slot.
        cells: (grid², 4) ``[y0, x0, y1, x1)`` of each slot's cell (the players' regions).
        masks: (grid², H, W) bool pixel mask of the drawn part in each slot.
    """

    label: int
    rule: Rule
    slot_parts: np.ndarray
    boxes: np.ndarray
    cells: np.ndarray
    masks: np.ndarray

    @property
    def term_slots(self) -> tuple[tuple[int, ...], ...]:
        """For each AND term of the rule, the slots whose part satisfies it (its OR alternatives)."""
        return tuple(tuple(int(s) for s in np.flatnonzero(np.isin(self.slot_parts, term)))
                     for term in self.rule.terms)

    def rule_holds(self, slots: Iterable[int]) -> bool:
        """The ground-truth game: does the class rule hold on the parts in ``slots`` alone?"""
        return self.rule.holds({int(self.slot_parts[s]) for s in slots})

    def player_masks(self) -> np.ndarray:
        """(grid², H, W) bool: each slot's cell, the region a player covers."""
        size = self.masks.shape[1]
        out = np.zeros((len(self.cells), size, size), bool)
        for k, (y0, x0, y1, x1) in enumerate(self.cells):
            out[k, y0:y1, x0:x1] = True
        return out


@dataclass(frozen=True)
class TargetTask:
    """A target task: its families, class rules and the related pre-training classes."""

    families: np.ndarray
    rules: list[Rule]
    related: np.ndarray


@dataclass(frozen=True)
class World:
    """Vocabulary, rules and ground truth of a world built by :func:`make_world`.

    Attributes:
        config: the :class:`WorldConfig`.
        part_names: name of every part id (``"red striped disk"``).
        families: family ids used by the world (into the 16 shape-pair x colour-pair families).
        pretrain_rules: rule of each pre-training class.
        pretrain_families: family of each pre-training class.
        targets: the target tasks, ``targets[k]`` is ``target-k``.
    """

    config: WorldConfig
    part_names: list[str]
    families: np.ndarray
    pretrain_rules: list[Rule]
    pretrain_families: np.ndarray
    targets: list[TargetTask]

    def __repr__(self) -> str:  # a summary: the dataclass repr prints every rule
        return (f"World(parts={len(self.part_names)}, families={len(self.families)}, "
                f"pretrain_classes={len(self.pretrain_rules)}, targets={len(self.targets)}, "
                f"seed={self.config.seed})")

    @cached_property
    def _painter(self) -> _Painter:
        return _Painter(self.config)

    @property
    def task_names(self) -> list[str]:
        """The names of the world's tasks: ``pretrain``, ``target-0``, ..."""
        return ["pretrain"] + [f"target-{k}" for k in range(len(self.targets))]

    def dataset(self, task: str = "pretrain", split: str = "train", *,
                transform: Transform | None = None, mode: str | None = None) -> WorldDataset:
        """The images of ``task`` (``pretrain``, ``target``, ``target-k``) and ``split``."""
        task = "target-0" if task == "target" else task
        check_choice("task", task, self.task_names)
        check_choice("split", split, _SPLITS)
        return WorldDataset(self, task, split, transform=transform, mode=mode)


def family_parts(family: int, textures: int) -> np.ndarray:
    """Part ids of one of the 16 families (2 shapes x 2 colours x ``textures``)."""
    shapes = 2 * (family // (len(COLOURS) // 2)) + np.arange(2)
    colours = 2 * (family % (len(COLOURS) // 2)) + np.arange(2)
    return np.array([_part_id(s, c, t, textures) for s in shapes for c in colours
                     for t in range(textures)])


def _part_id(shape: int, colour: int, texture: int, textures: int) -> int:
    return (shape * len(COLOURS) + colour) * textures + texture


def _part_fields(part: int, textures: int) -> tuple[int, int, int]:
    shape_colour, texture = divmod(part, textures)
    shape, colour = divmod(shape_colour, len(COLOURS))
    return shape, colour, texture


def make_world(config: WorldConfig | None = None) -> World:
    """Build a world's vocabulary, pre-training rules and target tasks from ``config`` (seeded)."""
    cfg = config or WorldConfig()
    if cfg.rule_terms[0] > 4 * cfg.textures:
        raise PretrainReuseError(
            f"WorldConfig: rule_terms={cfg.rule_terms} needs more parts than a family has "
            f"(4 x textures = {4 * cfg.textures}); lower rule_terms or raise textures")
    rng = np.random.default_rng([cfg.seed, 0])
    families = np.sort(rng.permutation(N_FAMILIES)[:cfg.families])
    t = cfg.textures
    names = [f"{COLOURS[c]} {TEXTURES[x]} {SHAPES[s]}" if t > 1 else f"{COLOURS[c]} {SHAPES[s]}"
             for s in range(len(SHAPES)) for c in range(len(COLOURS)) for x in range(t)]
    rules: list[Rule] = []
    for f in families:
        rules += _sample_rules(rng, family_parts(f, t), cfg.classes_per_family, cfg, avoid=[],
                               what=f"classes_per_family={cfg.classes_per_family}")
    pre_fams = np.repeat(families, cfg.classes_per_family)
    targets = [_make_target(k, cfg, families, rules, pre_fams) for k in range(cfg.target_tasks)]
    return World(config=cfg, part_names=names, families=families, pretrain_rules=rules,
                 pretrain_families=pre_fams, targets=targets)


def _make_target(k: int, cfg: WorldConfig, families: np.ndarray, pre_rules: list[Rule],
                 pre_fams: np.ndarray) -> TargetTask:
    rng = np.random.default_rng([cfg.seed, 1, k])
    chosen = np.sort(rng.choice(families, cfg.target_families, replace=False))
    rules: list[Rule] = []
    for f in chosen:
        family_rules = [r for r, pf in zip(pre_rules, pre_fams, strict=True) if pf == f]
        # Pre-training rules are mutually compatible, so new rules only need to fit beside them.
        # Drawn only when asked for, so that the default worlds keep their random stream.
        shared = []
        if cfg.target_shared_classes:
            picked = rng.choice(len(family_rules), cfg.target_shared_classes, replace=False)
            shared = [family_rules[i] for i in picked]
        for _ in range(100):
            new = _sample_rules(rng, family_parts(f, cfg.textures), cfg.target_classes_per_family,
                                cfg, avoid=family_rules, start=shared,
                                what=f"target_classes_per_family={cfg.target_classes_per_family}")
            used = frozenset().union(*(r.parts for r in new))
            # Every related class must share a part with the task: that is what "related" means.
            if all(r.parts & used for r in family_rules):
                break
        else:
            raise PretrainReuseError(
                "WorldConfig: target rules cannot share parts with every related class; raise "
                "target_classes_per_family or lower classes_per_family")
        rules += new
    related = np.flatnonzero(np.isin(pre_fams, chosen))
    return TargetTask(families=chosen, rules=rules, related=related)


def _sample_rules(rng: np.random.Generator, parts: np.ndarray, n: int, cfg: WorldConfig,
                  avoid: list[Rule], what: str, start: Sequence[Rule] = ()) -> list[Rule]:
    """``n`` mutually compatible rules over ``parts``: ``start``, then random ones, none of them
    equal to a rule in ``avoid``."""
    rules = list(start)
    if len(rules) == n:
        return rules
    for _ in range(2000):
        rule = _random_rule(rng, parts, cfg)
        if rule not in avoid and all(_compatible(rule, r) for r in rules):
            rules.append(rule)
            if len(rules) == n:
                return rules
    raise PretrainReuseError(
        f"WorldConfig: cannot draw {n} compatible class rules over {len(parts)} parts "
        f"({what}); lower it, or raise textures for more parts per family")


def _random_rule(rng: np.random.Generator, parts: np.ndarray, cfg: WorldConfig) -> Rule:
    lo, hi = cfg.rule_terms
    n_terms = int(rng.integers(lo, min(hi, len(parts)) + 1))
    widths = [1] * n_terms
    for k in range(n_terms):  # a term becomes an OR while the family has parts left for it
        if rng.random() < cfg.or_prob and sum(widths) < len(parts):
            widths[k] = 2
    picked = rng.permutation(parts)[:sum(widths)]
    bounds = np.cumsum([0, *widths])
    terms = sorted(tuple(sorted(int(p) for p in picked[a:b])) for a, b in itertools.pairwise(bounds))
    return Rule(terms=tuple(terms))


def _compatible(a: Rule, b: Rule) -> bool:
    """Neither rule holds on all the parts the other mentions (so no image satisfies both)."""
    return not a.holds(b.parts) and not b.holds(a.parts)


class _Painter:
    """Pre-computed shape masks and texture patterns, and the rendering of one composition."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        n = cfg.part_size
        # pixel centres in [-1, 1]
        v, u = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
        r, m = np.hypot(u, v), np.maximum(abs(u), abs(v))
        self.shapes = np.stack([
            m <= 0.85,                                         # square
            (m <= 0.95) & (m >= 0.5),                          # frame
            r <= 0.95,                                         # disk
            (r <= 0.95) & (r >= 0.5),                          # ring
            (v <= 0.85) & (abs(u) <= (v + 1) * 0.5),           # triangle
            abs(u) + abs(v) <= 1.0,                            # diamond
            ((abs(u) <= 0.3) | (abs(v) <= 0.3)) & (m <= 0.95),  # cross
            ((abs(u - v) <= 0.4) | (abs(u + v) <= 0.4)) & (m <= 0.95),  # x
        ])
        y, x = np.mgrid[0:n, 0:n]
        self.textures = np.stack([
            np.ones((n, n)),
            np.where((y // 2) % 2 == 0, 1.0, _DARK),                     # striped
            np.where(((y // 2) + (x // 2)) % 2 == 0, 1.0, _DARK),          # checked
            np.where((y % 3 == 1) & (x % 3 == 1), _DARK, 1.0),            # dotted
        ]).astype(np.float32)
        # Cells tile the whole image (sizes differ by at most one pixel), so the players do too.
        edges = np.arange(cfg.grid + 1) * cfg.image_size // cfg.grid
        self.cells = np.array([(edges[r], edges[k], edges[r + 1], edges[k + 1])
                               for r in range(cfg.grid) for k in range(cfg.grid)])


    def paint(self, rng: np.random.Generator, slot_parts: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render one composition: (H, W, 3) uint8 image, part boxes, part pixel masks."""
        cfg, n = self.cfg, self.cfg.part_size
        size = cfg.image_size
        image = np.full((size, size, 3), rng.uniform(0.05, 0.3), np.float32)
        boxes = np.full((len(slot_parts), 4), -1)
        masks = np.zeros((len(slot_parts), size, size), bool)
        room = self.cells[:, 2:] - self.cells[:, :2] - n + 1  # positions a part can take in its cell
        offsets = (rng.random((len(slot_parts), 2)) * room).astype(int)
        jitter = rng.uniform(0.92, 1.08, size=(len(slot_parts), 3)).astype(np.float32)
        for slot, (cell, part) in enumerate(zip(self.cells, slot_parts, strict=True)):
            if part < 0:
                continue
            shape, colour, texture = _part_fields(int(part), cfg.textures)
            y0, x0 = cell[0] + offsets[slot, 0], cell[1] + offsets[slot, 1]
            mask = self.shapes[shape]
            colour_px = RGB[colour] * jitter[slot] * self.textures[texture][..., None]
            np.copyto(image[y0:y0 + n, x0:x0 + n], colour_px, where=mask[..., None])
            boxes[slot] = (y0, x0, y0 + n, x0 + n)
            masks[slot, y0:y0 + n, x0:x0 + n] = mask
        # Uniform noise of std `noise`: as good as Gaussian here and three times faster to draw.
        image += (2 * np.sqrt(3) * cfg.noise) * (rng.random(image.shape, dtype=np.float32) - 0.5)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), boxes, masks


class WorldDataset(ImageDataset):
    """The images of one task and split of a :class:`World`, generated on access.

    Attributes (besides the :class:`~pretrain_reuse.data.datasets.ImageDataset` ones):
        world, task, split; rules: the rule of each class; related: the related pre-training
        classes (target tasks) or None (``pretrain``).
    """

    def __init__(self, world: World, task: str, split: str, *, transform: Transform | None,
                 mode: str | None):
        if mode is not None:
            check_choice("mode", mode, ("RGB", "L"))
        cfg = world.config
        if task == "pretrain":
            rules, related = world.pretrain_rules, None
            names = [f"f{f:02d}-{j}" for f in world.families for j in range(cfg.classes_per_family)]
            per_class = cfg.pretrain_train if split == "train" else cfg.pretrain_test
        else:
            target = world.targets[int(task.split("-")[1])]
            rules, related = target.rules, target.related
            names = [f"t{f:02d}-{j}" for f in target.families
                     for j in range(cfg.target_classes_per_family)]
            per_class = cfg.target_train if split == "train" else cfg.target_test
        labels = np.repeat(np.arange(len(rules), dtype=np.int64), per_class)
        ids = [f"{task}/{split}/{names[y]}/{i % per_class:05d}" for i, y in enumerate(labels)]
        super().__init__(ids=ids, labels=labels, class_names=names, transform=transform,
                         source=f"synthetic:{task}")
        self.world, self.task, self.split, self.mode = world, task, split, mode
        self.rules, self.related = rules, related
        self._seed_key = (cfg.seed, world.task_names.index(task) + 1, _SPLITS.index(split))
        self._cache: dict[int, np.ndarray] = {}

    @cached_property
    def _families(self) -> tuple[np.ndarray, np.ndarray, dict[int, list[int]]]:
        """Parts of every family in use, the family of each of those parts, and the classes of each
        family (a rule only ever mentions parts of its own family)."""
        textures = self.world.config.textures
        parts = {int(f): family_parts(int(f), textures) for f in self.world.families}
        n_parts = len(SHAPES) * len(COLOURS) * textures
        part_family = np.full(n_parts, -1)
        for f, ids in parts.items():
            part_family[ids] = f
        classes: dict[int, list[int]] = {f: [] for f in parts}
        for k, rule in enumerate(self.rules):
            classes[int(part_family[next(iter(rule.parts))])].append(k)
        return np.concatenate(list(parts.values())), part_family, classes

    def load(self, index: int) -> torch.Tensor:
        """The rendered image at ``index`` (cached), a float (3, H, W) tensor in [0, 1]."""
        image = self._cache.get(index)
        if image is None:
            image = self.render(index)[0]
            self._cache[index] = image  # 3 KB per 32 px image: epochs and embedding reuse it
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        return convert_channels(x, self.mode)

    def scene(self, index: int) -> Scene:
        """The ground truth of sample ``index``."""
        return self.render(index)[1]

    def render(self, index: int) -> tuple[np.ndarray, Scene]:
        """Sample ``index`` as an (H, W, 3) uint8 image and its :class:`Scene`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        cfg, painter = self.world.config, self.world._painter
        rng = np.random.default_rng([*self._seed_key, index])
        label = int(self.labels[index])
        rule = self.rules[label]
        parts = self._rule_parts(rng, rule)
        parts += self._distractors(rng, label, rule, cfg.grid**2 - len(parts))
        slot_parts = np.full(cfg.grid**2, -1)
        slot_parts[rng.permutation(cfg.grid**2)[:len(parts)]] = parts
        image, boxes, masks = painter.paint(rng, slot_parts)
        return image, Scene(label=label, rule=rule, slot_parts=slot_parts, boxes=boxes,
                            cells=painter.cells, masks=masks)

    def _rule_parts(self, rng: np.random.Generator, rule: Rule) -> list[int]:
        shown = []
        for term in rule.terms:
            first = int(rng.integers(len(term)))
            shown += [p for k, p in enumerate(term)
                      if k == first or rng.random() < self.world.config.extra_alt_prob]
        return shown

    def _distractors(self, rng: np.random.Generator, label: int, rule: Rule, room: int) -> list[int]:
        """Up to ``max_distractors`` parts outside the rule that make no other rule hold."""
        cfg = self.world.config
        every, part_family, classes = self._families
        n = min(int(rng.integers(cfg.max_distractors + 1)), room)
        family = int(part_family[next(iter(rule.parts))])
        own = every[part_family[every] == family]
        for _ in range(10):
            picked = [int(_pick(rng, own if rng.random() < _DISTRACTOR_SAME_FAMILY else every))
                      for _ in range(n)]
            if set(picked) & rule.parts:
                continue
            shown = rule.parts | set(picked)
            rivals = {k for f in {int(part_family[p]) for p in shown} for k in classes[f]} - {label}
            if not any(self.rules[k].holds(shown) for k in rivals):
                return picked
        return []  # rare: no valid draw; an image without distractors is still correct


def _pick(rng: np.random.Generator, values: np.ndarray):
    return values[rng.integers(len(values))]  # rng.choice costs 10x more per call
