"""FinetuneConfig: every knob of a fine-tuning run, with the defaults of Liu et al. (NeurIPS 2022)
where the paper or its code fixes one, except where README.md ("Where the defaults differ from the
official code") says otherwise: a validation split, λ 0.3 in every mode, a source head over the
selected classes.

CLI flags map one to one onto the fields (``--lr`` <-> ``lr``); a YAML file loads into the same
class, and an unknown key or a value of the wrong type is an error. The resolved config is saved
with every run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..configs import check_fields, checked_values, config_values
from ..errors import (
    PretrainReuseError,
    check_choice,
    check_device,
    check_image_size,
    check_positive,
    check_seed,
)

MODES = ("vanilla", "reuse", "reuse-unlabeled", "co-tuning", "linear-probe", "scratch")
SCHEDULES = ("step", "cosine")

#: The values a text field takes.
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "schedule": SCHEDULES,
    "source_head": ("selected", "full"),
    "source_sampling": ("images", "units"),
    "source_bn": ("mixed", "target"),
    "cotuning_relationship": ("direct", "reverse"),
    "augment": ("standard", "flip", "none"),
    "precision": ("auto", "fp32", "bf16"),
    # data.samplers.ORDERS, which cannot be imported here: the data package imports torch,
    # and the command line reads these choices at startup
    "long_tail_order": ("index", "random"),
}

#: Options that only some modes read (option -> those modes): set in another mode, an option
#: would be silently ignored (see :meth:`FinetuneConfig.check_options_used`).
MODE_OPTIONS: dict[str, tuple[str, ...]] = {
    "lam": ("reuse", "reuse-unlabeled", "co-tuning"),
    "source_batch_size": ("reuse", "reuse-unlabeled"),
    "source_sampling": ("reuse", "reuse-unlabeled"),
    "source_bn": ("reuse", "reuse-unlabeled"),
    "source_head": ("reuse",),  # reuse-unlabeled reads no source labels
    "cotuning_relationship": ("co-tuning",),
    "cutout": ("reuse-unlabeled",),  # the strong view exists only there
    "strong_ops": ("reuse-unlabeled",),
}

def mode_reads(mode: str, option: str) -> bool:
    """Whether a run in ``mode`` reads ``option`` (every mode reads those not in
    :data:`MODE_OPTIONS`)."""
    return mode in MODE_OPTIONS.get(option, (mode,))


#: What each field means: the help of its command-line flag and the reference of its YAML key.
FIELD_HELP: dict[str, str] = {
    "mode": "what to fine-tune with (see the modes above)",
    "epochs": "passes over the target training split",
    "max_steps": "optimiser steps; replaces epochs when given",
    "batch_size": "target images per step",
    "source_batch_size": "source images per step of the reuse modes; None: as batch_size "
                         "(paper: 256 + 256)",
    "grad_accum": "micro-batches per step: the same step in less memory (exactly, where it divides "
                  "the batch sizes)",
    "lr": "learning rate of the backbone (SGD)",
    "head_lr_mult": "learning-rate factor of the new heads",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay",
    "lam": "λ, the weight of the source loss (reuse, reuse-unlabeled, co-tuning); the default is "
           "the official value for supervised reuse: its scripts use 1.0 for reuse-unlabeled and "
           "for MoCo with labels, and co-tuning's authors 2.3",
    "schedule": "step: lr ÷10 at each milestone; cosine: to 0",
    "milestones": "fractions of training where the step schedule divides the lr by 10",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "source_head": "reuse's source head: over the selected classes, or the full pre-training "
                   "label space (the official code)",
    "source_sampling": "reuse's source batches: uniform over images (the official code) or "
                       "balanced over the selected units",
    "source_bn": "BatchNorm statistics in training: of the mixed target + source batch (the "
                 "official code) or of the target batch only",
    "cotuning_relationship": "co-tuning's p(y_s | y_t): direct (Transfer-Learning-Library) or "
                             "reverse (the thuml code)",
    "val_fraction": "share of every class held out for validation (0: none; then the best-"
                    "validation result is the final one)",
    "eval_every": "epochs between evaluations",
    "checkpoint_every": "steps between checkpoints",
    "snapshots": "also save the model at every evaluation, in snapshots/ (knowledge "
                 "--checkpoints)",
    "image_size": "input side in pixels, the resize keeping the backbone's crop ratio; the "
                  "model is saved with it (None: the backbone's)",
    "augment": "standard: RandomResizedCrop + flip; flip: flip only; none",
    "cutout": "reuse-unlabeled's strong view: Cutout side / image side (0: none)",
    "strong_ops": "reuse-unlabeled's strong view: FixMatch RandAugmentMC operations per image "
                  "(0: none)",
    "train_fraction": "train on this share of every target class (seeded; validation comes "
                      "from the rest)",
    "long_tail_ratio": "train on a long tail of the target: largest / smallest class (seeded; "
                       "validation comes from the rest)",
    "long_tail_order": "which classes the long tail keeps most images of: index (class 0 the "
                       "most, as Cui et al.'s code) or random (a seeded permutation of the "
                       "classes)",
    "seed": "seed of the split, the batches, the augmentations and the new layers",
    "device": "cpu, cuda or cuda:N",
    "precision": "auto: bf16 autocast on GPUs with native bf16 (compute capability 8.0+), else "
                 "fp32; fp32; bf16",
    "workers": "data-loading processes",
}


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning recipe.

    Modes: ``vanilla`` (backbone + new head, CE on the target), ``reuse`` (plus CE of a second head
    on the selected labelled pre-training data, weight ``lam``), ``reuse-unlabeled`` (plus soft CE
    of the strong view against the softmax of the weak view of selected unlabelled data),
    ``co-tuning`` (You et al. 2020: the pre-trained head learns p(y_s | y_t)), ``linear-probe``
    (frozen backbone) and ``scratch`` (random initialisation, same recipe as vanilla).

    Length: ``epochs`` passes over the target training split (one pass = ``len // batch_size``
    steps, as the official code), or ``max_steps`` optimiser steps when given; ``eval_every``
    counts epochs (an evaluation every ``eval_every`` passes, and one at the end), and
    ``checkpoint_every`` steps. Every field's meaning: :data:`FIELD_HELP` (the help of its
    ``finetune`` flag, docs/cli/finetune.md).
    """

    mode: str = "vanilla"
    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 256
    source_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 0.003
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lam: float = 0.3
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.6, 0.8)
    warmup_steps: int = 0
    source_head: str = "selected"
    source_sampling: str = "images"
    source_bn: str = "mixed"
    cotuning_relationship: str = "direct"
    val_fraction: float = 0.1
    eval_every: int = 10
    checkpoint_every: int = 200
    snapshots: bool = False
    image_size: int | None = None
    augment: str = "standard"
    cutout: float = 0.5
    strong_ops: int = 2
    train_fraction: float | None = None
    long_tail_ratio: float | None = None
    long_tail_order: str = "index"
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    workers: int = 0

    def __post_init__(self):
        check_fields(self)
        for name, choices in CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        check_device(self.device)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PretrainReuseError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("batch_size", "source_batch_size"):
            if self.grad_accum > (getattr(self, name) or self.batch_size):
                raise PretrainReuseError(
                    f"grad_accum={self.grad_accum} exceeds {name}={getattr(self, name)}; each "
                    "micro-batch needs a sample: lower grad_accum or raise the batch size")
        if self.max_steps is not None and self.max_steps < 1:
            raise PretrainReuseError(f"max_steps must be >= 1, got {self.max_steps!r}")
        for name in ("lr", "head_lr_mult"):
            check_positive(name, getattr(self, name))
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise PretrainReuseError(f"lam (λ) must be >= 0, got {self.lam!r}")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.momentum < 1):
            raise PretrainReuseError("weight_decay must be a finite number >= 0 and momentum in "
                                     f"[0, 1), got {self.weight_decay!r} and {self.momentum!r}")
        check_seed("seed", self.seed)
        for name in ("workers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise PretrainReuseError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.source_batch_size is not None and self.source_batch_size < 1:
            raise PretrainReuseError(f"source_batch_size must be >= 1 (or unset), got "
                                     f"{self.source_batch_size!r}")
        if self.image_size is not None:
            check_image_size(self.image_size)
        if not 0 <= self.val_fraction < 1:
            raise PretrainReuseError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        # strictly: a repeated milestone would divide the lr by 100 at once
        if any(a >= b for a, b in pairwise(self.milestones)) or not all(
                0 < m < 1 for m in self.milestones):
            raise PretrainReuseError(
                f"milestones must be increasing fractions of training in (0, 1), got {self.milestones}"
            )
        if not 0 <= self.cutout < 1:
            raise PretrainReuseError(f"cutout must be in [0, 1), got {self.cutout!r}")
        if self.strong_ops < 0:
            raise PretrainReuseError(f"strong_ops must be >= 0, got {self.strong_ops!r}")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise PretrainReuseError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.long_tail_ratio is not None and not 1 <= self.long_tail_ratio < math.inf:
            raise PretrainReuseError(f"long_tail_ratio must be a finite number >= 1, got "
                                     f"{self.long_tail_ratio}")
        if self.train_fraction is not None and self.long_tail_ratio is not None:
            raise PretrainReuseError(  # the splits would draw the low-data subset only
                "train_fraction and long_tail_ratio are two data regimes; give one of them")

    @property
    def uses_source(self) -> bool:
        """Whether the mode trains on selected pre-training data (reuse, reuse-unlabeled)."""
        return self.mode in ("reuse", "reuse-unlabeled")

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (as saved in ``run.json``)."""
        return asdict(self)

    def check_options_used(self) -> None:
        """Refuse an option set (to other than its default) that this recipe never reads: a
        ``lam`` with vanilla, or ``epochs`` beside ``max_steps``, would be silently ignored.

        Called where a user states a recipe (:func:`~.run_finetune`, the grid), not in
        ``__post_init__``: the experiment and the demo share one base recipe across modes."""
        default = FinetuneConfig()

        def is_set(name: str) -> bool:
            return getattr(self, name) != getattr(default, name)

        for name, modes in MODE_OPTIONS.items():
            if self.mode not in modes and is_set(name):
                raise PretrainReuseError(
                    f"{name}={getattr(self, name)!r} has no effect in mode {self.mode!r} (only in "
                    f"{', '.join(modes)}); drop it")
        if self.schedule != "step" and is_set("milestones"):
            raise PretrainReuseError(
                f"milestones {list(self.milestones)} have no effect with schedule "
                f"{self.schedule!r}; drop them, or use schedule 'step'")
        if self.long_tail_ratio is None and is_set("long_tail_order"):
            raise PretrainReuseError(
                f"long_tail_order={self.long_tail_order!r} has no effect without "
                "long_tail_ratio (it orders the classes of a long tail); pass long_tail_ratio, "
                "or drop it")
        if self.max_steps is not None and is_set("epochs"):
            raise PretrainReuseError(
                f"epochs={self.epochs} has no effect beside max_steps={self.max_steps} (max_steps "
                "sets the length of training); pass one of them")


#: What a run is made from and where it goes: arguments of :func:`~.run.run_finetune` and flags
#: of ``finetune``, never fields of the recipe (an experiment's YAML holds them beside it).
RUN_ARGUMENTS = ("model", "weights", "target", "target_test", "source", "selection", "units", "out")


def load_config(path: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """A config from a YAML file (optional) with ``overrides`` on top; unknown keys and values of
    the wrong type are errors."""
    values = config_values(path, overrides)
    for key in values:
        if key in RUN_ARGUMENTS:
            flag = "--" + key.replace("_", "-")
            raise PretrainReuseError(
                f"{key} is a flag of finetune ({flag}), not a field of its --config; pass {flag} "
                f"on the command line ({key}= to run_finetune in Python) and drop it from the config")
    return FinetuneConfig(**checked_values(values, FinetuneConfig))


def lr_at(step: int, total_steps: int, cfg: FinetuneConfig) -> float:
    """Learning-rate factor at ``step`` (multiply the base lr): linear warm-up, then either a step
    decay (÷10 at each milestone fraction of training, Liu et al.) or a cosine to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        # milestones in whole steps: 0.07 * 100 is 7.000000000000001 in floating point
        return 0.1 ** sum(step >= round(m * total_steps, 6) for m in cfg.milestones)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
