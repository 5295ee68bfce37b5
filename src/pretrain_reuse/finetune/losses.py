r"""The loss of each fine-tuning mode; modes differ only here and in what their batches contain.

A batch is a dict of device tensors: ``x``, ``y`` (augmented target images and labels), plus for
``reuse`` ``sx``, ``sy`` (selected source images, source-head labels) and for
``reuse-unlabeled`` ``sx`` and ``sx_strong`` (weak and strong views of the same source images).
Target and source images go through the backbone in one forward pass, so BatchNorm sees the
mixed batch, as in the official code, unless ``source_bn="target"`` (see
:meth:`~.model.FinetuneModel.joint_features`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .model import FinetuneModel

Loss = Callable[[FinetuneModel, dict[str, torch.Tensor], float], tuple[torch.Tensor, dict]]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""``mean_b -sum_k target_bk log softmax(logits)_bk`` (target rows are distributions)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def target_loss(model: FinetuneModel, batch: dict, lam: float):
    """Cross-entropy on the target data (vanilla, linear-probe, scratch)."""
    ce = F.cross_entropy(model(batch["x"]), batch["y"])
    return ce, {"ce_target": ce.detach()}


def reuse_loss(model: FinetuneModel, batch: dict, lam: float):
    r"""Liu et al. eq. (6): ``CE(h_t(x_t), y_t) + lam * CE(h_s(x_s), y_s)``, two heads, one body."""
    z_t, z_s = model.joint_features(batch["x"], batch["sx"])
    ce_t = F.cross_entropy(model.head(z_t), batch["y"])
    ce_s = F.cross_entropy(model.source_head(z_s), batch["sy"])
    return ce_t + lam * ce_s, {"ce_target": ce_t.detach(), "ce_source": ce_s.detach()}


def reuse_unlabeled_loss(model: FinetuneModel, batch: dict, lam: float):
    r"""Unlabelled reuse (official FixMatch-style code): the softmax of the weak view, without
    gradient, temperature or threshold, is the soft target of the strong view:
    ``CE(h(x_t), y_t) + lam * softCE(h(x_s^strong), softmax(h(x_s^weak)))``."""
    z_t, z_weak, z_strong = model.joint_features(batch["x"], batch["sx"], batch["sx_strong"])
    ce_t = F.cross_entropy(model.head(z_t), batch["y"])
    pseudo = F.softmax(model.head(z_weak).detach(), dim=1)
    ce_s = soft_cross_entropy(model.head(z_strong), pseudo)
    return ce_t + lam * ce_s, {"ce_target": ce_t.detach(), "soft_ce_source": ce_s.detach()}


def cotuning_loss(model: FinetuneModel, batch: dict, lam: float):
    r"""Co-Tuning (You et al., NeurIPS 2020): ``CE(h_t(x), y) + lam * softCE(h_s(x), p(y_s|y))``
    with the pre-trained classifier as ``h_s`` and the learned relationship ``p(y_s | y_t)``."""
    z = model.features(batch["x"])
    ce_t = F.cross_entropy(model.head(z), batch["y"])
    ce_s = soft_cross_entropy(model.source_head(z), model.relationship[batch["y"]])
    return ce_t + lam * ce_s, {"ce_target": ce_t.detach(), "soft_ce_source": ce_s.detach()}


LOSSES: dict[str, Loss] = {
    "vanilla": target_loss,
    "linear-probe": target_loss,
    "scratch": target_loss,
    "reuse": reuse_loss,
    "reuse-unlabeled": reuse_unlabeled_loss,
    "co-tuning": cotuning_loss,
}

#: The source views each mode's batches carry (beyond the weak target view).
SOURCE_VIEWS: dict[str, tuple[str, ...]] = {
    "reuse": ("weak",),
    "reuse-unlabeled": ("weak", "strong"),
}
