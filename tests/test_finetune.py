"""Fine-tuning: the schedule, splits, batches, losses and metrics against closed forms and
independent references (hand-written torch, scikit-learn); checkpoints that round-trip; runs of
every mode through the CLI on tiny image folders; kill -9 and resume bit-identical; torchrun.

Every process here runs torch on one thread: the machine is a loaded 2-core box (two threads are
~10x slower than one there), and bitwise comparisons between processes need the same thread count
on both sides (subprocesses get ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import pretrain_reuse
from _helpers import kill_when, smallcnn_from_file, torchrun
from pretrain_reuse.artifacts import hash_array, safetensors_header
from pretrain_reuse.cli import main
from pretrain_reuse.data.catalog import open_dataset
from pretrain_reuse.data.datasets import ArrayDataset
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.finetune.augment import View
from pretrain_reuse.finetune.checkpoint import load_state, save_state
from pretrain_reuse.finetune.config import FinetuneConfig, lr_at
from pretrain_reuse.finetune.data import StepBatches, selected_source, split_validation
from pretrain_reuse.finetune.evaluate import accuracy, cotuning_relationship, cotuning_reverse_relationship
from pretrain_reuse.finetune.losses import (
    cotuning_loss,
    reuse_loss,
    reuse_unlabeled_loss,
    soft_cross_entropy,
)
from pretrain_reuse.finetune.model import FinetuneModel
from pretrain_reuse.finetune.run import run_finetune
from pretrain_reuse.models import create_backbone, save_backbone
from pretrain_reuse.models.smallcnn import SmallCNN
from pretrain_reuse.selection import Selection
from pretrain_reuse.units import Units

ERROR_PREFIX = "pretrain-reuse: error: "
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC = create_backbone("smallcnn-s").spec
SIDE = SPEC.input_size[0]  # images are written at the network's input size: no resize, no crop
FEAT = create_backbone("smallcnn-s").feature_dim


# --------------------------------------------------------------------------------------------
# The learning-rate schedule: closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 7, 10, 37, 100, 1003])
def test_step_schedule_divides_by_10_at_60_and_80_percent(total):
    cfg = FinetuneConfig(schedule="step")
    for s in range(total):
        # integer arithmetic: step s is past the milestone m*T when 10*s >= 10*m*T
        expected = 1.0 if 10 * s < 6 * total else (0.1 if 10 * s < 8 * total else 0.01)
        assert lr_at(s, total, cfg) == pytest.approx(expected, rel=1e-12), s


def test_step_schedule_with_warmup():
    cfg = FinetuneConfig(schedule="step", warmup_steps=5)
    total = 50
    got = [lr_at(s, total, cfg) for s in range(total)]
    expected = [(s + 1) / 5 for s in range(5)] + [
        1.0 if s < 30 else (0.1 if s < 40 else 0.01) for s in range(5, total)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("warmup", [0, 4])
def test_cosine_schedule_closed_form(warmup):
    cfg = FinetuneConfig(schedule="cosine", warmup_steps=warmup)
    total = 40
    for s in range(total):
        if s < warmup:
            expected = (s + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert lr_at(s, total, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_at(warmup, total, cfg) == pytest.approx(1.0)
    assert lr_at(warmup + (total - warmup) // 2, total, cfg) == pytest.approx(0.5)


def test_step_schedule_milestones_exact_in_decimal():
    cfg = FinetuneConfig(schedule="step", milestones=(0.07, 0.14))
    assert lr_at(6, 100, cfg) == pytest.approx(1.0)
    assert lr_at(7, 100, cfg) == pytest.approx(0.1)  # 7% of 100 steps reached
    assert lr_at(14, 100, cfg) == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------
# Validation split and step batches
# --------------------------------------------------------------------------------------------


def test_split_validation_is_stratified_disjoint_and_seeded():
    counts = [10, 25, 3, 1, 2]
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), counts))
    train, val = split_validation(labels, 0.2, seed=3)
    # round(0.2 n_c), at least 1, never the last sample of a class: 10->2, 25->5, 3->1, 1->0, 2->1
    assert np.bincount(labels[val], minlength=5).tolist() == [2, 5, 1, 0, 1]
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again = split_validation(labels, 0.2, seed=3)
    assert np.array_equal(again[1], val)
    other = split_validation(labels, 0.2, seed=4)[1]
    assert not np.array_equal(other, val)
    assert np.bincount(labels[other], minlength=5).tolist() == [2, 5, 1, 0, 1]
    assert split_validation(labels, 0.0, seed=3)[1].size == 0


def test_step_batches_epochs_are_permutation_prefixes():
    n, bs = 50, 8
    b = StepBatches(n, bs, seed=1, stream=0)
    assert b.steps_per_epoch == 6  # drop_last
    epochs = []
    for e in range(4):
        seen = np.concatenate([b.batch(e * 6 + k) for k in range(6)])
        assert len(seen) == 48 and len(np.unique(seen)) == 48  # no repeat inside an epoch
        assert seen.min() >= 0 and seen.max() < n
        assert all(len(b.batch(e * 6 + k)) == bs for k in range(6))
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    # a pure function of (seed, stream, step): a fresh object, any call order
    fresh = StepBatches(n, bs, seed=1, stream=0)
    for step in (13, 0, 23, 5):
        assert np.array_equal(fresh.batch(step), b.batch(step))
    # step 13 is the second batch of epoch 2 (the epoch's permutation is kept between calls)
    assert np.array_equal(b.batch(13), np.random.default_rng([1, 0, 2]).permutation(n)[8:16])
    assert not np.array_equal(StepBatches(n, bs, seed=2, stream=0).batch(0), b.batch(0))
    assert not np.array_equal(StepBatches(n, bs, seed=1, stream=1).batch(0), b.batch(0))
    with pytest.raises(PretrainReuseError, match="batch"):
        StepBatches(5, 8, seed=0, stream=0)


def test_unit_balanced_batches_draw_units_uniformly():
    from scipy.stats import chi2

    sizes = [1, 4, 45, 150]
    groups = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    b = StepBatches(len(groups), 64, seed=0, stream=1, balanced_groups=groups)
    draws = np.concatenate([b.batch(s) for s in range(200)])
    per_group = np.bincount(groups[draws], minlength=4)
    expected = len(draws) / 4
    stat = ((per_group - expected) ** 2 / expected).sum()
    assert stat < chi2.ppf(0.999, df=3), per_group  # image-uniform would give ~[64, 256, ...]
    # inside a unit, members are drawn uniformly too
    members = np.flatnonzero(groups == 3)
    hits = np.array([(draws == m).sum() for m in members])
    e = hits.sum() / len(members)
    assert ((hits - e) ** 2 / e).sum() < chi2.ppf(0.999, df=len(members) - 1)
    assert np.array_equal(StepBatches(len(groups), 64, 0, 1, groups).batch(17), b.batch(17))


# --------------------------------------------------------------------------------------------
# Losses against hand-written torch
# --------------------------------------------------------------------------------------------


def hand_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(len(y)), y]).mean()


def tiny_model(num_classes=3, source_classes=None, seed=0) -> FinetuneModel:
    torch.manual_seed(seed)
    return FinetuneModel(create_backbone("smallcnn-s"), num_classes,
                         source_classes=source_classes, seed=seed)


def images(n, seed):
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def test_reuse_loss_is_target_ce_plus_lam_source_ce():
    model = tiny_model(3, source_classes=4).eval()
    x, sx = images(5, 1), images(6, 2)
    y, sy = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([3, 0, 1, 1, 2, 3])
    lam = 0.37
    loss, stats = reuse_loss(model, {"x": x, "y": y, "sx": sx, "sy": sy}, lam)
    with torch.no_grad():
        lt = model.head(model.backbone.features(x))
        ls = model.source_head(model.backbone.features(sx))
    expected = hand_ce(lt, y) + lam * hand_ce(ls, sy)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["ce_target"].item() == pytest.approx(hand_ce(lt, y).item(), rel=1e-5)
    assert stats["ce_source"].item() == pytest.approx(hand_ce(ls, sy).item(), rel=1e-5)


def test_reuse_loss_sends_target_and_source_through_one_forward_in_train_mode():
    model = tiny_model(3, source_classes=4).train()
    x, sx = images(4, 3), 3 * images(4, 4) + 2  # source images of other statistics
    y, sy = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 0])
    loss, _ = reuse_loss(model, {"x": x, "y": y, "sx": sx, "sy": sy}, 1.0)
    z = model.backbone.features(torch.cat([x, sx]))  # BatchNorm over the mixed batch
    mixed = hand_ce(model.head(z[:4]), y) + hand_ce(model.source_head(z[4:]), sy)
    separate = (hand_ce(model.head(model.backbone.features(x)), y)
                + hand_ce(model.source_head(model.backbone.features(sx)), sy))
    assert loss.item() == pytest.approx(mixed.item(), rel=1e-5)
    assert abs(loss.item() - separate.item()) > 1e-4


def test_reuse_unlabeled_loss_soft_targets_from_the_weak_view_without_gradient():
    model = tiny_model(3).eval()
    x = images(4, 5)
    weak = images(6, 6).requires_grad_(True)
    strong = images(6, 7).requires_grad_(True)
    y = torch.tensor([2, 1, 0, 1])
    lam = 0.8
    loss, stats = reuse_unlabeled_loss(model, {"x": x, "y": y, "sx": weak, "sx_strong": strong}, lam)
    with torch.no_grad():
        p = torch.softmax(model(weak), dim=1)
        soft = -(p * torch.log_softmax(model(strong), dim=1)).sum(dim=1).mean()
        expected = hand_ce(model(x), y) + lam * soft
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["soft_ce_source"].item() == pytest.approx(soft.item(), rel=1e-5)
    loss.backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0  # target is detached
    assert strong.grad is not None and strong.grad.abs().max() > 0


def test_cotuning_loss_uses_the_relationship_as_soft_target():
    model = tiny_model(3).eval()
    model.source_head = nn.Linear(model.backbone.feature_dim, 5)
    rel = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    rel = rel / rel.sum(dim=1, keepdim=True)
    model.register_buffer("relationship", rel)
    x, y = images(6, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    loss, _ = cotuning_loss(model, {"x": x, "y": y}, 0.5)
    with torch.no_grad():
        z = model.backbone.features(x)
        soft = -(rel[y] * torch.log_softmax(model.source_head(z), dim=1)).sum(dim=1).mean()
        expected = hand_ce(model.head(z), y) + 0.5 * soft
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(7, 5, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    one_hot = F.one_hot(y, 5).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)
    probs = torch.softmax(torch.randn(7, 5, generator=g), dim=1)
    assert soft_cross_entropy(logits, probs).item() == pytest.approx(
        F.cross_entropy(logits, probs).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Metrics and the Co-Tuning relationship
# --------------------------------------------------------------------------------------------


def test_accuracy_matches_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4, 6], size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])  # 3, 5 absent
    logits = rng.normal(size=(300, 7))
    logits[np.arange(300), labels] += rng.uniform(0, 2.5, 300)  # better than chance, unevenly
    got = accuracy(logits, labels)
    pred = logits.argmax(axis=1)
    assert got["top1"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert got["mean_class_acc"] == pytest.approx(balanced_accuracy_score(labels, pred),
                                                      abs=1e-12)
    assert got["n"] == 300
    assert abs(got["top1"] - got["mean_class_acc"]) > 1e-3  # the two metrics differ here
    empty = accuracy(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert empty["n"] == 0 and empty["top1"] is None and empty["mean_class_acc"] is None


def test_cotuning_relationship_is_the_mean_softmax_per_class():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4, size=(30, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 30)  # class 3 has no sample
    rel = cotuning_relationship(logits, labels, 4)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = np.stack([p[labels == c].mean(axis=0) for c in range(3)] + [np.full(6, 1 / 6)])
    np.testing.assert_allclose(rel, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rel.sum(axis=1), 1.0, atol=1e-9)


def _reverse_reference(train_z, train_y, val_z, val_y, c, scale=0.884):
    """The reverse relationship written with scikit-learn and scipy (independent reference)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax, softmax
    from sklearn.linear_model import LogisticRegression

    p_train, p_val = softmax(scale * train_z, axis=1), softmax(scale * val_z, axis=1)
    lr = LogisticRegression(C=c, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(p_train, train_y)
    w = lr.coef_.T  # (K_s, K_t)

    def val_ce(log_t):
        return -log_softmax(p_val @ w / np.exp(log_t), axis=1)[np.arange(len(val_y)), val_y].mean()

    t = np.exp(minimize_scalar(val_ce, bounds=(-5, 5), method="bounded",
                               options={"xatol": 1e-10}).x)
    # thuml's source marginal: the mean over the training and validation images
    joint = softmax(w / t, axis=1) * np.concatenate([p_train, p_val]).mean(0)[:, None]
    return (joint / joint.sum(0, keepdims=True)).T


def test_cotuning_reverse_relationship_matches_sklearn_and_scipy():
    rng = np.random.default_rng(3)
    k_s, k_t = 8, 3
    train_y, val_y = rng.integers(0, k_t, 120), rng.integers(0, k_t, 60)
    # target class c lights up source classes 2c and 2c+1: a planted relationship
    def logits(y):
        z = rng.normal(size=(len(y), k_s))
        z[np.arange(len(y)), 2 * y] += 1.5
        z[np.arange(len(y)), 2 * y + 1] += 1.0
        return z

    train_z, val_z = logits(train_y), logits(val_y)
    got = cotuning_reverse_relationship(train_z, train_y, val_z, val_y, k_t, cs=(1.0,))
    np.testing.assert_allclose(got, _reverse_reference(train_z, train_y, val_z, val_y, 1.0),
                               atol=2e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
    # with the C search, each target class puts most of its mass on its planted source classes
    rel = cotuning_reverse_relationship(train_z, train_y, val_z, val_y, k_t)
    for c in range(k_t):
        assert set(np.argsort(-rel[c])[:2]) == {2 * c, 2 * c + 1}
    with pytest.raises(PretrainReuseError, match="val_fraction"):
        cotuning_reverse_relationship(train_z, train_y, val_z[:0], val_y[:0], k_t)


# --------------------------------------------------------------------------------------------
# Selected source data
# --------------------------------------------------------------------------------------------


def pool(labelled=True, n=24, n_classes=6):
    imgs = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(n) % n_classes if labelled else None
    names = [f"k{c}" for c in range(n_classes)] if labelled else None
    return ArrayDataset(imgs, labels, class_names=names, name="pool")


def selection(selected, n_units):
    return Selection(selected=list(selected), scores=np.linspace(1, 0, n_units), params={})


def test_class_selection_picks_the_selected_classes_and_remaps_labels():
    p = pool()
    src = selected_source(p, selection([4, 1], 6), None, source_head="selected")
    expected = [i for i in range(24) if i % 6 in (4, 1)]
    assert src.dataset.ids == [f"pool/{i}" for i in expected]
    assert src.groups.tolist() == [i % 6 for i in expected]
    assert src.labels.tolist() == [0 if i % 6 == 4 else 1 for i in expected]  # selection order
    assert src.num_classes == 2
    full = selected_source(p, selection([4, 1], 6), None, source_head="full")
    assert full.dataset.ids == src.dataset.ids
    assert full.labels.tolist() == [i % 6 for i in expected] and full.num_classes == 6
    # the dataset yields the pool's images
    img, _, _ = src.dataset[0]
    assert torch.equal(img, p[expected[0]][0])


@pytest.mark.parametrize("shuffled", [False, True])
def test_cluster_selection_maps_units_to_samples_by_id(shuffled):
    p = pool(labelled=False)
    rng = np.random.default_rng(2)
    # the units file lists the samples in the pool's order (units built from it), or another
    order = rng.permutation(24) if shuffled else np.arange(24)
    assignment = rng.integers(0, 3, 24)
    units = Units(prototypes=rng.normal(size=(3, 4)), kind="cluster", assignment=assignment,
                  sample_ids=[p.ids[i] for i in order])
    src = selected_source(p, selection([2, 0], 3), units, source_head="selected")
    unit_of = {p.ids[order[j]]: int(assignment[j]) for j in range(24)}
    expected = [i for i in range(24) if unit_of[p.ids[i]] in (2, 0)]
    assert src.dataset.ids == [p.ids[i] for i in expected]
    assert src.groups.tolist() == [unit_of[p.ids[i]] for i in expected]
    assert src.labels.tolist() == [-1] * len(expected) and src.num_classes == 0


def test_selection_out_of_range_or_of_other_data_is_an_error():
    p = pool()
    with pytest.raises(PretrainReuseError, match=r"ranks 7 units, but .* has 6 classes.*--units"):
        selected_source(p, selection([1, 6], 7), None, source_head="selected")
    # a selection over another pool's units, even with ids in range (here: 10 units)
    with pytest.raises(PretrainReuseError, match=r"ranks 10 units, but .* has 6 classes"):
        selected_source(p, selection([1, 2], 10), None, source_head="selected")
    # as many units, but other classes (e.g. the target's own class means)
    other_names = Selection(selected=[1], scores=np.zeros(6), params={},
                            unit_names=["k0", "k1", "t2", "k3", "k4", "k5"])
    with pytest.raises(PretrainReuseError, match=r"unit 2 is 't2', but class 2 .* is 'k2'"):
        selected_source(p, other_names, None, source_head="selected")
    # units named by the lines of a names file that start with the classes' folder names
    described = Selection(selected=[1], scores=np.zeros(6), params={},
                          unit_names=[f"k{i} the class {i}" for i in range(6)])
    src = selected_source(p, described, None, source_head="selected")
    assert src.dataset.ids == [p.ids[i] for i in np.flatnonzero(p.labels == 1)]
    # units renamed line by line (--class-names "alpha", ...) are the classes their data names:
    # the selection records those names (they were refused as other classes)
    renamed = Selection(selected=[1], scores=np.zeros(6), params={},
                        unit_names=[f"name {i}" for i in range(6)],
                        meta={"data_class_names": [f"k{i}" for i in range(6)]})
    src = selected_source(p, renamed, None, source_head="selected")
    assert src.dataset.ids == [p.ids[i] for i in np.flatnonzero(p.labels == 1)]
    # "k1x ..." does not name the class k1
    with pytest.raises(PretrainReuseError, match=r"unit 1 is 'k1x the class', but class 1"):
        selected_source(p, Selection(selected=[1], scores=np.zeros(6), params={},
                                     unit_names=["k0", "k1x the class", *described.unit_names[2:]]),
                        None, source_head="selected")
    rng = np.random.default_rng(3)
    units = Units(prototypes=rng.normal(size=(3, 4)), kind="cluster",
                  assignment=rng.integers(0, 3, 24), sample_ids=list(p.ids))
    with pytest.raises(PretrainReuseError, match="ranks 4 units, but the units file has 3"):
        selected_source(p, selection([0, 3], 4), units, source_head="selected")
    other = Units(prototypes=rng.normal(size=(3, 4)), kind="cluster",
                  assignment=np.zeros(5, np.int64), sample_ids=[f"elsewhere/{i}" for i in range(5)])
    with pytest.raises(PretrainReuseError, match="not in the pre-training data"):
        selected_source(p, selection([0], 3), other, source_head="selected")
    with pytest.raises(PretrainReuseError, match="--units"):
        selected_source(pool(labelled=False), selection([0], 6), None, source_head="selected")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _sgd_step(net, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


def test_checkpoint_round_trip_model_optimizer_and_tuples(tmp_path):
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for s in range(2):
        _sgd_step(net, opt, s)
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "pair": (1, "two", torch.arange(3)), "nested": [{"a": None, "b": 2.5}, (True,)],
             "history": json.dumps([{"step": 3, "top1": 0.5}])}
    save_state(tmp_path / "ck.safetensors", state)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left
    back = load_state(tmp_path / "ck.safetensors")
    assert back["step"] == 7 and back["history"] == state["history"]
    assert isinstance(back["pair"], tuple) and back["pair"][:2] == (1, "two")
    assert torch.equal(back["pair"][2], torch.arange(3))
    assert back["nested"] == [{"a": None, "b": 2.5}, (True,)]
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])
    assert all(isinstance(k, int) for k in back["optimizer"]["state"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v)

    # restoring both and stepping on gives the same weights as never stopping
    net2 = _net()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=1e-4)
    net2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    _sgd_step(net, opt, 9)
    _sgd_step(net2, opt2, 9)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resumed_momentum_buffers_are_laid_out_as_their_channels_last_parameters(
        files, tmp_path, capsys):
    # a checkpoint stores tensors contiguous; a resumed run whose momentum buffers kept that
    # layout beside channels-last weights lost the optimiser's batched (foreach) update
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "2"]
    reference = run_ok(capsys, *_with_out(argv, tmp_path / "reference"))
    _stop_during_step(3, argv, capsys)
    layouts = []

    def record(opt, args, kwargs):
        layouts.extend((tuple(p.stride()), tuple(opt.state[p]["momentum_buffer"].stride()))
                       for group in opt.param_groups for p in group["params"] if p in opt.state)

    handle = register_optimizer_step_pre_hook(record)
    try:
        run_ok(capsys, *argv)
    finally:
        handle.remove()
    assert layouts and any(len(p) == 4 and p != tuple(sorted(p, reverse=True))
                           for p, _ in layouts)  # some weights are channels-last
    assert all(param == buffer for param, buffer in layouts), layouts
    assert_same_run(tmp_path / "run", reference)  # bitwise


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    good = save_state(tmp_path / "good.safetensors", {"w": torch.ones(100)})
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 not a checkpoint")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-50])
    save_file({"w": torch.ones(3)}, str(tmp_path / "foreign.safetensors"))
    for name in ("garbage", "cut", "foreign", "missing"):
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(PretrainReuseError, match=path.name):
            load_state(path)


# --------------------------------------------------------------------------------------------
# Runs through the CLI on tiny image folders
# --------------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, colour: int, seed: int, side: int = SIDE) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = np.full((side, side, 3), 0.15)
        base[..., colour % 3] += 0.45
        img = np.clip(base + rng.uniform(0, 0.4, (side, side, 3)), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def pretrained_weights(path: Path, seed: int = 11) -> Path:
    """A 'pre-trained' smallcnn-s with its 10-way classifier: BatchNorm statistics randomised and
    conv weights scaled x3 (far outside the layers' own initialisation range)."""
    torch.manual_seed(seed)
    backbone = create_backbone("smallcnn-s")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    assert backbone.num_classes == 10
    save_backbone(backbone, path, {"test": "pretrained"})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for c in range(3):
        write_images(root / "train" / f"t{c}", 10, c, seed=c)
        write_images(root / "test" / f"t{c}", 4, c, seed=50 + c)
    for c in range(4):
        write_images(root / "source" / f"s{c}", 6, c, seed=100 + c)
    write_images(root / "pool", 12, 0, seed=200)  # flat folder: unlabelled
    weights = pretrained_weights(root / "pretrained.safetensors")
    Selection(selected=[3, 1], scores=np.array([0.1, 0.5, 0.2, 0.9]), params={"method": "test"}
              ).save(root / "sel_class.json")
    pool_ids = sorted(p.name for p in (root / "pool").iterdir())
    assignment = np.arange(12) % 3
    Units(prototypes=np.random.default_rng(0).normal(size=(3, 4)), kind="cluster",
          assignment=assignment, sample_ids=pool_ids).save(root / "units.safetensors")
    Selection(selected=[2, 0], scores=np.array([0.5, 0.1, 0.9]), params={"method": "test"}
              ).save(root / "sel_cluster.json")
    return {"root": root, "train": root / "train", "test": root / "test", "weights": weights,
            "source": root / "source", "pool": root / "pool", "sel_class": root / "sel_class.json",
            "units": root / "units.safetensors", "sel_cluster": root / "sel_cluster.json"}


def base_args(files, out, *, steps=4, batch=8):
    return ["finetune", "--model", "smallcnn-s", "--weights", files["weights"],
            "--target", files["train"], "--target-test", files["test"], "--batch-size", batch,
            "--max-steps", steps, "--eval-every", 1, "--quiet", "--out", out]


MODE_ARGS = {
    "vanilla": lambda f: [],
    "linear-probe": lambda f: [],
    "scratch": lambda f: [],
    "co-tuning": lambda f: [],
    "reuse": lambda f: ["--source", f["source"], "--selection", f["sel_class"]],
    "reuse-unlabeled": lambda f: ["--source", f["pool"], "--selection", f["sel_cluster"],
                                  "--units", f["units"]],
}


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_ok(capsys, *argv) -> Path:
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    return Path(argv[list(argv).index("--out") + 1])


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_images(root: Path, ids: list[str]) -> torch.Tensor:
    x = torch.stack([torch.from_numpy(np.array(Image.open(root / i).convert("RGB"))).float()
                     .permute(2, 0, 1) / 255 for i in ids])
    mean = torch.tensor(SPEC.mean)[:, None, None]
    std = torch.tensor(SPEC.std)[:, None, None]
    return (x - mean) / std


def folder_ids(root: Path) -> tuple[list[str], np.ndarray]:
    ids, labels = [], []
    for c, cls in enumerate(sorted(p.name for p in root.iterdir())):
        names = sorted(p.name for p in (root / cls).iterdir())
        ids += [f"{cls}/{n}" for n in names]
        labels += [c] * len(names)
    return ids, np.asarray(labels)


def exported_network(out: Path, num_classes: int) -> SmallCNN:
    net = smallcnn_from_file(out / "model.safetensors")
    assert net.fc.out_features == num_classes
    return net


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_every_mode_trains_and_reports_honest_test_metrics(files, tmp_path, capsys, mode):
    out = run_ok(capsys, *base_args(files, tmp_path / "run"), "--mode", mode,
                 *MODE_ARGS[mode](files))
    result = json.loads((out / "result.json").read_text())
    records = metrics(out)
    assert [r["step"] for r in records] == [3, 4]  # 27 training images // 8 = 3 steps per epoch
    assert result["history"] == records
    # final: the last evaluation; at_best_val: the best validation top-1 (earliest on ties)
    best = max(records, key=lambda r: (r["val"]["top1"], -r["step"]))
    assert result["final"]["step"] == 4 and result["at_best_val"]["step"] == best["step"]
    for key in ("top1", "mean_class_acc", "n"):
        assert result["final"][key] == records[-1]["test"][key]
        assert result["at_best_val"][key] == best["test"][key]
    assert result["final"]["n"] == 12 and records[-1]["val"]["n"] == 3
    # the reported final test accuracy is that of the exported network, recomputed here
    test_ids, test_labels = folder_ids(files["test"])
    with torch.no_grad():
        logits = exported_network(out, 3)(load_images(files["test"], test_ids)).numpy()
    pred = logits.argmax(axis=1)
    assert result["final"]["top1"] == pytest.approx((pred == test_labels).mean(), abs=1e-9)
    per_class = [(pred[test_labels == c] == c).mean() for c in range(3)]
    assert result["final"]["mean_class_acc"] == pytest.approx(np.mean(per_class), abs=1e-9)

    state = load_state(out / "checkpoint.safetensors")
    assert state["step"] == 4
    model_state = state["model"]
    extra = {"reuse": "ce_source", "reuse-unlabeled": "soft_ce_source", "co-tuning": "soft_ce_source"}
    if mode in extra:
        assert all(extra[mode] in r for r in records)
    if mode == "reuse":
        assert tuple(model_state["source_head.weight"].shape) == (2, FEAT)  # 2 selected classes
    elif mode == "co-tuning":
        assert tuple(model_state["source_head.weight"].shape) == (10, FEAT)  # pre-trained head
        assert tuple(model_state["relationship"].shape) == (3, 10)
    else:
        assert not any(k.startswith("source_head") for k in model_state)

    trained = load_file(str(out / "model.safetensors"))
    pretrained = load_file(str(files["weights"]))
    body = [k for k in pretrained if not k.startswith("fc.")]
    if mode == "linear-probe":  # weights and BatchNorm statistics untouched
        for k in body:
            assert torch.equal(trained[k], pretrained[k]), k
    else:
        conv = [k for k in body if pretrained[k].dim() == 4]
        stats = [k for k in body if k.endswith("running_mean")]
        assert conv and stats
        assert all(not torch.equal(trained[k], pretrained[k]) for k in conv)
        assert all(not torch.equal(trained[k], pretrained[k]) for k in stats)
    assert tuple(trained["fc.weight"].shape) == (3, FEAT)


def test_result_reports_final_and_best_validation_test_metrics_never_best_test():
    from pretrain_reuse.finetune.loop import _result

    def rec(step, val, test):
        return {"step": step, "val": {"top1": val, "mean_class_acc": val, "n": 3},
                "test": {"top1": test, "mean_class_acc": test / 2, "n": 12}}

    history = [rec(3, 0.5, 0.9), rec(6, 0.8, 0.4), rec(9, 0.8, 0.6), rec(12, 0.2, 0.7)]
    result = _result(FinetuneConfig(), history, {}, 1.0)
    assert result.final["step"] == 12 and result.final["top1"] == 0.7
    assert result.final["mean_class_acc"] == 0.35
    # best validation top-1 is 0.8, first reached at step 6 (test 0.4), not the best test (0.9)
    assert result.at_best_val["step"] == 6 and result.at_best_val["top1"] == 0.4
    assert result.at_best_val["val"]["top1"] == 0.8


def test_result_prints_a_short_summary_and_plot_names_the_metrics_it_has():
    from pretrain_reuse.finetune.loop import _result

    history = [{"step": 10 * (i + 1), "loss": 1.0,
                "val": {"top1": 0.5 + i / 1000, "mean_class_acc": 0.5, "n": 30},
                "test": {"top1": 0.25 + i / 400, "mean_class_acc": 0.5, "n": 40}} for i in range(300)]
    history[99]["val"]["top1"] = 0.99  # the best validation: step 1000, test top-1 0.4975
    result = _result(FinetuneConfig(mode="vanilla"), history, {}, 1.0)
    assert repr(result) == ("RunResult(mode='vanilla', steps=3000, evaluations=300, final test "
                            "top1=0.998, test top1 at best val=0.497 (step 1000))")
    with pytest.raises(PretrainReuseError, match=r"metric='top-1' is not one of 'top1', "
                                                 r"'mean_class_acc' \(did you mean 'top1'\?\)"):
        result.plot(metric="top-1")


def test_a_result_replaces_a_result_but_no_other_file(tmp_path):
    # it replaced a selection (any file) silently, and wrote JSON under any suffix
    from pretrain_reuse.finetune.loop import RunResult, _result

    rec = {"step": 1, "val": {"top1": 0.5, "n": 2}, "test": {"top1": 0.5, "n": 2}}
    result = _result(FinetuneConfig(), [rec], {}, 1.0)
    path = result.save(tmp_path / "result.json")
    assert RunResult.load(result.save(path)).final == result.final  # a resumed run rewrites it
    selection = Selection(selected=[0], scores=np.zeros(2), params={}).save(tmp_path / "sel.json")
    before = selection.read_bytes()
    with pytest.raises(PretrainReuseError, match=r"sel\.json' exists and is not a finetune-result "
                                                 "file; choose another output path"):
        result.save(selection)
    assert selection.read_bytes() == before
    with pytest.raises(PretrainReuseError, match=r"finetune-result files are saved as \.json"):
        result.save(tmp_path / "result.txt")


def test_reuse_full_source_head_spans_all_pretraining_classes(files, tmp_path, capsys):
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=1), "--mode", "reuse",
                 *MODE_ARGS["reuse"](files), "--source-head", "full", "--source-sampling", "units")
    assert tuple(load_state(out / "checkpoint.safetensors")["model"]["source_head.weight"].shape
                 ) == (4, FEAT)


def test_scratch_starts_from_a_fresh_initialisation(files, tmp_path, capsys):
    # lr 1e-9: after one step the weights are the initial ones up to ~1e-9
    common = ["--lr", "1e-9", "--weight-decay", "0"]
    scratch = run_ok(capsys, *base_args(files, tmp_path / "s", steps=1), "--mode", "scratch",
                     *common)
    vanilla = run_ok(capsys, *base_args(files, tmp_path / "v", steps=1), "--mode", "vanilla",
                     *common)
    again = run_ok(capsys, *base_args(files, tmp_path / "s2", steps=1), "--mode", "scratch",
                   *common)
    pre = load_file(str(files["weights"]))
    s, v = load_file(str(scratch / "model.safetensors")), load_file(str(vanilla / "model.safetensors"))
    conv = [k for k in pre if k.endswith(".weight") and pre[k].dim() == 4]
    for k in conv:
        assert (v[k] - pre[k]).abs().max() < 1e-6  # vanilla starts from the pre-trained weights
        fan_in = pre[k][0].numel()
        assert s[k].abs().max() <= 1 / math.sqrt(fan_in) + 1e-6  # Conv2d's own init range
        assert (s[k] - pre[k]).abs().max() > 0.1
    bn_w = [k for k in pre if k.endswith(".weight") and pre[k].dim() == 1]
    for k in bn_w:  # BatchNorm affine parameters reset to (1, 0)
        assert torch.allclose(s[k], torch.ones_like(s[k]), atol=1e-6)
    s2 = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(s[k], s2[k]) for k in s)  # seeded


def test_new_heads_train_at_the_head_rate_and_a_kept_classifier_at_the_backbone_rate():
    # thuml/CoTuning and tllib train the pre-trained source classifier with the backbone; only
    # freshly initialised heads get the larger rate (Liu et al.'s official code: 10x).
    def groups(model):
        return {id(p): g["lr"] for g in model.param_groups(0.01, 10.0, 1e-4) for p in g["params"]}

    reuse = FinetuneModel(create_backbone("smallcnn-s", num_classes=6), 3, source_classes=4)
    lrs = groups(reuse)
    assert {lrs[id(p)] for p in reuse.source_head.parameters()} == {0.1}
    assert {lrs[id(p)] for p in reuse.head.parameters()} == {0.1}
    assert {lrs[id(p)] for p in reuse.backbone.body.parameters()} == {0.01}
    # the backbone's own pre-training classifier computes nothing: not trained
    assert not any(id(p) in lrs or p.requires_grad for p in reuse.backbone.head.parameters())
    cotune = FinetuneModel(create_backbone("smallcnn-s", num_classes=6), 3)
    cotune.keep_source_classifier(nn.Linear(cotune.backbone.feature_dim, 6))
    lrs = groups(cotune)
    assert {lrs[id(p)] for p in cotune.source_head.parameters()} == {0.01}
    assert {lrs[id(p)] for p in cotune.head.parameters()} == {0.1}
    # every trainable parameter in exactly one group
    assert len(lrs) == len([p for p in cotune.parameters() if p.requires_grad])


@pytest.mark.parametrize("form", ["direct", "reverse"])
def test_cotuning_relationship_comes_from_pretrained_predictions_on_the_splits(
        files, tmp_path, capsys, form):
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=1), "--mode", "co-tuning",
                 "--cotuning-relationship", form)
    rel = load_state(out / "checkpoint.safetensors")["model"]["relationship"].numpy()
    split = json.loads((out / "split.json").read_text())
    net = smallcnn_from_file(files["weights"])

    def logits_labels(ids):
        with torch.no_grad():
            z = net(load_images(files["train"], ids)).double().numpy()
        return z, np.asarray([int(i.split("/")[0][1:]) for i in ids])  # "t<c>/..."

    z, labels = logits_labels(split["train"])
    if form == "direct":
        probs = torch.softmax(torch.from_numpy(z), 1).numpy()
        expected = np.stack([probs[labels == c].mean(axis=0) for c in range(3)])
    else:
        expected = cotuning_reverse_relationship(z, labels, *logits_labels(split["val"]), 3)
    np.testing.assert_allclose(rel, expected, atol=1e-4)
    np.testing.assert_allclose(rel.sum(axis=1), 1.0, atol=1e-5)


def test_cotuning_relationship_is_computed_on_the_device_of_the_process(files, tmp_path, capsys,
                                                                         monkeypatch):
    # under torchrun each process has its own GPU (process_device: cuda:<LOCAL_RANK>); the
    # relationship pass used torch.device(--device), so every process put a context on one GPU
    import pretrain_reuse.finetune.run as run_module

    asked = []

    def process_device(device: str) -> torch.device:
        asked.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(run_module, "process_device", process_device)
    run_ok(capsys, *base_args(files, tmp_path / "run", steps=1), "--mode", "co-tuning",
           "--device", "cpu:0")
    assert asked == ["cpu:0"]


def _with_a_broken_image(tmp_path) -> list:
    """finetune arguments on 2 classes of 6 images plus one unreadable file, c1/zz-broken.png."""
    root = tmp_path / "t2"
    for c in range(2):
        write_images(root / f"c{c}", 6, c, seed=400 + c)
    (root / "c1" / "zz-broken.png").write_bytes(b"not a png")
    shutil.copytree(root, tmp_path / "test")  # the same images as test data, in other files
    return ["finetune", "--model", "smallcnn-s", "--target", root, "--target-test",
            tmp_path / "test", "--val-fraction", "0", "--epochs", "1"]


def test_unreadable_training_images_are_reported_and_a_batch_of_only_them_is_an_error(
        tmp_path, capsys):
    args = _with_a_broken_image(tmp_path)
    # warned of even with --quiet, which hides progress and notes only
    rc, _, err = cli(capsys, *args, "--batch-size", "4", "--quiet", "--out", tmp_path / "ok")
    assert rc == 0 and ("warning: target training data: skipped 1 unreadable image(s) of 13: "
                        "c1/zz-broken.png (left out of training)") in err
    # the test data is a copy: its accuracy is over the 12 readable images, and says so
    assert ("warning: test data: skipped 1 unreadable image(s) of 13: c1/zz-broken.png (left out "
            "of its accuracy)") in err
    # and the result records it, which a --quiet run of a script printed only as a warning
    final = json.loads((tmp_path / "ok" / "result.json").read_text())["final"]
    assert (final["n"], final["unreadable"], final["classes"]) == (12, 1, 2)
    rc, _, err = cli(capsys, *args, "--batch-size", "1", "--quiet", "--out", tmp_path / "bad")
    assert_one_line_error(rc, err, "every image of a training batch is unreadable")
    assert "c1/zz-broken.png" in err


def test_training_images_none_of_which_can_be_read_are_refused_before_the_run_folder(
        tmp_path, capsys):
    # the first batch failed after run.json and split.json were written, advising a larger
    # --batch-size
    for c in "ab":
        (tmp_path / "bad" / c).mkdir(parents=True)
        (tmp_path / "bad" / c / "1.png").write_bytes(b"not a png")
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", tmp_path / "bad",
                     "--target-test", tmp_path / "bad", "--batch-size", "1", "--val-fraction", "0",
                     "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "none of the 2 training images can be read (first: 'a/1.png'); "
                          "check that the files exist and are images")
    assert not (tmp_path / "run").exists()


def test_unreadable_images_are_a_data_warning_in_the_python_api(tmp_path):
    # they were printed to stderr, which warnings.catch_warnings and filters could not see
    from pretrain_reuse.data.datasets import DataWarning
    from pretrain_reuse.finetune import FinetuneConfig, finetune_datasets

    root = Path(_with_a_broken_image(tmp_path)[4])
    cfg = FinetuneConfig(mode="vanilla", epochs=1, batch_size=4, val_fraction=0)
    with pytest.warns(DataWarning) as caught:
        finetune_datasets(cfg, model="smallcnn-s", train_pool=open_dataset(str(root)),
                          test_set=open_dataset(str(tmp_path / "test")), out=tmp_path / "run",
                          progress=False)
    assert [str(w.message).split(":")[0] for w in caught] == ["target training data", "test data"]
    assert all(w.filename == __file__ for w in caught)  # named where the caller called


def test_a_class_whose_training_images_all_fail_is_warned_of(tmp_path, capsys):
    # its images were counted among the unreadable ones, but that the class was never trained
    # went unsaid
    args = _with_a_broken_image(tmp_path)
    for name in ("a.png", "b.png"):
        (args[4] / "c9-broken" / name).parent.mkdir(exist_ok=True)
        (args[4] / "c9-broken" / name).write_bytes(b"not a png")
    rc, _, err = cli(capsys, *args, "--batch-size", "4", "--quiet", "--out", tmp_path / "run")
    assert rc == 0, err
    assert ("warning: no training image of 1 class(es) could be read (c9-broken): their "
            "outputs were never trained; repair or replace their images") in err


@pytest.fixture(scope="module")
def made_for(files, tmp_path_factory):
    """A class selection made for ``target`` (2 classes of 6 and 5 images, plus an unreadable one
    in the second that embed leaves out of the features), embedded and selected from inside its
    parent folder by relative paths, as a user in a project folder does; and ``other``, another
    folder of the same file names and class sizes as those features (6 and 5 images: the labels
    too are the same), of other images."""
    root = tmp_path_factory.mktemp("made-for")
    for c in range(2):
        write_images(root / "target" / f"c{c}", 6 - c, c, seed=600 + c)
        write_images(root / "other" / f"c{c}", 6 - c, c, seed=700 + c)
        write_images(root / "test" / f"c{c}", 3, c, seed=800 + c)
    (root / "target" / "c1" / "zz-broken.png").write_bytes(b"not a png")
    with contextlib.chdir(root), contextlib.redirect_stderr(io.StringIO()):
        for name, data in (("source", files["source"]), ("target", "target")):
            assert main(["embed", "--model", "smallcnn-s", "--data", str(data), "--out",
                         f"f-{name}", "--quiet"]) == 0
        assert main(["select", "--source", "f-source", "--target", "f-target", "--k", "2",
                     "--out", "sel.json", "--quiet"]) == 0
    return root


def _reuse(made_for, files, target, selection, out, *extra) -> list:
    return ["finetune", "--model", "smallcnn-s", "--weights", files["weights"], "--mode", "reuse",
            "--target", made_for / target, "--target-test", made_for / "test", "--source",
            files["source"], "--selection", selection, "--batch-size", 4, "--max-steps", 1,
            "--quiet", "--out", out, *extra]


def _another_target(err: str) -> list[str]:
    return [line for line in err.splitlines() if "selection for another target" in line]


def test_a_selection_for_the_target_folder_is_not_warned_of_though_embed_skipped_an_image(
        made_for, files, tmp_path, capsys):
    # the features lack the unreadable image that the --target folder lists: the selection
    # recorded their labels, which differ from the folder's, and was warned of as made for
    # another target
    rc, _, err = cli(capsys, *_reuse(made_for, files, "target", made_for / "sel.json",
                                     tmp_path / "run"))
    assert rc == 0, err
    assert json.loads((made_for / "f-target" / "index.json").read_text())["meta"]["skipped"] == 1
    assert _another_target(err) == [], err


def test_a_selection_for_another_folder_of_the_same_class_sizes_is_warned_of_once(
        made_for, files, tmp_path, capsys):
    # the same labels (and file names) as the features the selection was made for: the labels
    # it recorded matched, and the selection was taken without a word
    rc, _, err = cli(capsys, *_reuse(made_for, files, "other", made_for / "sel.json",
                                     tmp_path / "grid", "--grid", "lr=0.01,0.02"))
    assert rc == 0, err
    warned = _another_target(err)
    assert len(warned) == 1, err  # once for the grid: its runs are checked before the first
    assert warned[0].startswith(
        f"warning: selection for another target: the selection "
        f"({str(made_for / 'sel.json')!r}) was made for the 11 samples of "
        f"{str((made_for / 'target').resolve())!r} (ids sha256:")
    assert (f"--target {str(made_for / 'other')!r} has the same sample ids in "
            f"{str((made_for / 'other').resolve())!r} (other files, or other labels, of the same "
            "names)") in warned[0]
    assert "select for this target (embed it, then select --target its features)" in warned[0]


def test_a_selection_for_a_list_file_names_another_list_of_the_same_paths_as_such(
        made_for, files, tmp_path, capsys):
    # it printed the two (equal) id hashes, as if the lists held other samples; such a list may
    # give the same images other labels, so it is warned of, saying what is the same
    lists = tmp_path / "lists"
    shutil.copytree(made_for / "target", lists)
    rows = "".join(f"{f.relative_to(lists)},{f.parent.name}\n" for f in sorted(lists.rglob("*.png")))
    for name in ("a.csv", "b.csv"):
        (lists / name).write_text(rows)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["embed", "--model", "smallcnn-s", "--data", str(lists / "a.csv"), "--out",
                     str(tmp_path / "f-a"), "--quiet"]) == 0
        assert main(["select", "--source", str(made_for / "f-source"), "--target",
                     str(tmp_path / "f-a"), "--k", "2", "--out", str(tmp_path / "sel.json"),
                     "--quiet"]) == 0
    for target, warned in ((lists / "a.csv", []), (lists / "b.csv", [
            f"has the same sample ids in {str(lists / 'b.csv')!r} (other files, or other labels, "
            "of the same names)"])):
        rc, _, err = cli(capsys, *_reuse(made_for, files, target, tmp_path / "sel.json",
                                         tmp_path / f"run-{target.name}"))
        lines = _another_target(err)
        assert rc == 0 and len(lines) == len(warned) and all(
            w in line for w, line in zip(warned, lines, strict=True)), (target, err)


def test_a_selection_that_records_no_target_samples_is_not_warned_of(made_for, files, tmp_path,
                                                                     capsys):
    # a selection file of an earlier version records its target's labels only, which differ
    # from the folder's where embed skipped an image: nothing reliable to compare
    sel = json.loads((made_for / "sel.json").read_text())
    for role in ("source", "target"):
        sel["meta"]["inputs"][role].pop("data", None)
    (tmp_path / "old.json").write_text(json.dumps(sel))
    rc, _, err = cli(capsys, *_reuse(made_for, files, "target", tmp_path / "old.json",
                                     tmp_path / "run"))
    assert rc == 0, err
    assert _another_target(err) == [], err


def test_train_fraction_keeps_half_of_every_class(tmp_path, capsys):
    root = tmp_path / "t4"
    for c in range(4):
        write_images(root / f"c{c}", 20, c, seed=300 + c)
    args = ["finetune", "--model", "smallcnn-s", "--target", root, "--target-test", root,
            "--batch-size", 4, "--max-steps", 1, "--quiet"]
    plain = run_ok(capsys, *args, "--out", tmp_path / "plain")
    half = run_ok(capsys, *args, "--train-fraction", 0.5, "--out", tmp_path / "half")
    p, h = (json.loads((d / "split.json").read_text()) for d in (plain, half))
    by_class = [sum(i.startswith(f"c{c}/") for i in h["train"]) for c in range(4)]
    # the regime draws from the whole pool: floor(0.5 * 20) = 10 of every class train, as the
    # paper's "50 % of the images"; validation takes round(0.1 * 20) = 2 of the other 10
    assert by_class == [10, 10, 10, 10]
    assert h["sampler"]["per_class"] == [10, 10, 10, 10]
    assert [sum(i.startswith(f"c{c}/") for i in h["val"]) for c in range(4)] == [2, 2, 2, 2]
    assert not set(h["val"]) & set(h["train"])
    assert len(p["train"]) == 72 and len(p["val"]) == 8  # without a regime: 18 + 2 per class


def test_long_tail_ratio_follows_the_exponential_profile(tmp_path, capsys):
    root = tmp_path / "t4"
    for c in range(4):
        write_images(root / f"c{c}", 20, c, seed=300 + c)
    out = run_ok(capsys, "finetune", "--model", "smallcnn-s", "--target", root, "--target-test",
                 root, "--batch-size", 4, "--max-steps", 1, "--quiet", "--long-tail-ratio", 10,
                 "--out", tmp_path / "lt")
    split = json.loads((out / "split.json").read_text())
    # n_c = floor(20 * 10^(-c/3)) for class rank c = 0..3 (Cui et al.): 20, 9, 4, 2, so the
    # largest / smallest class is exactly the ratio
    expected = [math.floor(20 * 10 ** (-c / 3) + 1e-9) for c in range(4)]
    assert expected == [20, 9, 4, 2]
    assert [sum(i.startswith(f"c{c}/") for i in split["train"]) for c in range(4)] == expected
    # validation: 2 per class from the images left out; the largest class has none left
    assert [sum(i.startswith(f"c{c}/") for i in split["val"]) for c in range(4)] == [0, 2, 2, 2]
    assert not set(split["val"]) & set(split["train"])


def test_long_tail_order_random_trains_on_the_samplers_seeded_class_order(tmp_path, capsys):
    from pretrain_reuse.data.samplers import subsample_long_tail

    root = tmp_path / "t4"
    for c in range(4):
        write_images(root / f"c{c}", 20, c, seed=300 + c)
    shutil.copytree(root, tmp_path / "test")  # other files: the rerun's error is its one line
    args = ["finetune", "--model", "smallcnn-s", "--target", root, "--target-test",
            tmp_path / "test", "--batch-size", 4, "--max-steps", 1, "--quiet",
            "--long-tail-ratio", 10, "--seed", 3]
    index, rand = (run_ok(capsys, *args, "--long-tail-order", order, "--out", tmp_path / order)
                   for order in ("index", "random"))
    train = {d: json.loads((d / "split.json").read_text())["train"] for d in (index, rand)}
    # the reference: the sampler called directly on the folder's labels, with the run's seed
    pool = open_dataset(root)
    sub = subsample_long_tail(pool.labels, 10, seed=3, order="random")
    assert sub.params["rank"] != [0, 1, 2, 3]  # seed 3 permutes the classes
    assert train[rand] == [pool.ids[i] for i in sub.indices]
    assert sorted(train[rand]) != sorted(train[index])
    # the order is part of the run: a rerun into the folder with the other order is refused
    rc, _, err = cli(capsys, *args, "--long-tail-order", "index", "--out", rand)
    assert_one_line_error(rc, err, "different config (long_tail_order)", "--out")


def test_yaml_config_with_flag_overrides_is_saved_with_the_run(files, tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 0.01, "weight_decay": 0.0005, "milestones": [0.5, 0.9]}))
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=1), "--config", cfg,
                 "--lr", 0.02)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lr"] == 0.02 and run["config"]["weight_decay"] == 0.0005
    assert run["config"]["milestones"] == [0.5, 0.9]
    cfg.write_text(yaml.safe_dump({"lr": 0.01, "learning_rate": 0.5}))
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "bad", steps=1), "--config", cfg)
    assert_one_line_error(rc, err, "learning_rate")


@pytest.mark.parametrize("key", ["model", "target_test"])
def test_a_flag_of_finetune_in_its_config_is_named_as_a_flag(files, tmp_path, capsys, key):
    """An experiment's YAML copied as a recipe: 'model' was "not one of ... (did you mean
    'mode'?)"."""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 0.01, key: "x"}))
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run", steps=1), "--config", cfg)
    flag = "--" + key.replace("_", "-")
    assert_one_line_error(rc, err, f"{key} is a flag of finetune ({flag}), not a field of its "
                          f"--config; pass {flag} on the command line ({key}= to run_finetune in "
                          "Python) and drop it from the config")


def test_the_run_arguments_are_the_flags_and_arguments_of_finetune_besides_the_recipe():
    import inspect

    from pretrain_reuse.cli import build_parser
    from pretrain_reuse.finetune.config import RUN_ARGUMENTS

    keywords = set(inspect.signature(run_finetune).parameters) - {"cfg", "progress", "check_only"}
    assert set(RUN_ARGUMENTS) == keywords
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {a.dest for a in verbs.choices["finetune"]._actions}
    assert set(RUN_ARGUMENTS) <= flags


@pytest.mark.parametrize("extra, needle", [
    (["--mode", "reuse", "--source", "SOURCE"], "--selection"),
    (["--lam", "-1"], "lam"),
    (["--strong-ops", "-1"], "strong_ops"),
    (["--mode", "finetune-all"], "mode"),
    (["--mode", "reuse", "--source", "SOURCE", "--selection", "BADSEL"], "ranks 8 units"),
    (["--batch-size", "64"], "batch size"),
    (["--seed", "-1"], "seed"),
    (["--lr", "inf"], "lr"),
    (["--weight-decay", "nan"], "weight_decay"),
    (["--workers", "-1"], "workers"),
    (["--warmup-steps", "-1"], "warmup_steps"),
    (["--long-tail-ratio", "inf"], "long_tail_ratio must be a finite number"),
    (["--long-tail-ratio", "10", "--train-fraction", "0.5"], "two data regimes; give one"),
    (["--source", "SOURCE", "--selection", "BADSEL"],
     "--source, --selection would be ignored; pass --mode reuse or reuse-unlabeled, or drop them"),
    (["--mode", "co-tuning", "--source", "SOURCE"],
     "--source would be ignored; pass --mode reuse or reuse-unlabeled, or drop it"),
    (["--grid", "lr=0.1", "--grid", "lr=0.2"], "names 'lr' twice"),
    (["--grid", "lr=0.1,0.1"], "repeats a value"),
    # options the recipe never reads, refused instead of silently ignored
    (["--lam", "0.5"], "lam=0.5 has no effect in mode 'vanilla'"),
    (["--epochs", "3"], "epochs=3 has no effect beside max_steps=4"),
    (["--schedule", "cosine", "--milestones", "0.5"], "milestones [0.5] have no effect"),
    (["--long-tail-order", "random"],
     "long_tail_order='random' has no effect without long_tail_ratio"),
    (["--grid", "lam=0.1,1"], "lam=0.1 has no effect in mode 'vanilla'"),
    # refused before the first run of the grid, not after all of them
    (["--val-fraction", "0", "--grid", "lr=0.1,0.2"], "picks on the validation split"),
    (["--train-fraction", "1", "--grid", "lr=0.01,0.1"], "run lr=0.01 would have no validation images"),
    # checks against the data too: the warmup_steps=1 run used to train before 50 failed
    (["--grid", "warmup_steps=1,50"], "warmup_steps=50 exceeds the 4 training steps"),
    # a flag the grid would override unseen
    (["--lr", "0.05", "--grid", "lr=0.001,0.01"], "--grid varies lr, but the config also sets lr=0.05"),
    # also at the default value (0.003): it was overridden unseen
    (["--lr", "0.003", "--grid", "lr=0.001,0.1"], "--grid varies lr, but the config also sets lr=0.003"),
    (["--warmup-steps", "5"], "warmup_steps=5 exceeds the 4 training steps"),
    (["--image-size", "1"], "image_size 1 does not fit backbone 'smallcnn-s'"),
    (["--image-size", "100000"], "image_size must be between 1 and 4096"),
    (["--mode", "reuse", "--source", "SOURCE", "--selection", "SEL", "--units", "CLASSUNITS"],
     "--units holds class units"),
    # 4 clusters of a pool of 4 classes: their ids were read as the classes' (K = 1000 on
    # ImageNet-1k), and the run trained on other images than the selected ones
    (["--mode", "reuse", "--source", "SOURCE", "--selection", "CLUSTERSEL"],
     "the selection ranks k-means clusters, whose samples only their units file knows; pass "
     "the clusters' units file (--units)"),
    (["--mode", "reuse-unlabeled", "--source", "SOURCE", "--selection", "CLUSTERSEL"],
     "the selection ranks k-means clusters"),
])
def test_bad_arguments_exit_2_with_one_line(files, tmp_path, capsys, extra, needle):
    bad_sel = tmp_path / "bad_sel.json"
    Selection(selected=[7], scores=np.zeros(8), params={}).save(bad_sel)
    class_units = Units(prototypes=np.ones((4, 2)), kind="class").save(tmp_path / "cu.safetensors")
    cluster_sel = Selection(selected=[3, 1], scores=np.array([0.1, 0.5, 0.2, 0.9]), params={},
                            unit_kind="cluster").save(tmp_path / "cluster_sel.json")
    extra = [{"SOURCE": str(files["source"]), "BADSEL": str(bad_sel), "SEL": str(files["sel_class"]),
              "CLASSUNITS": str(class_units), "CLUSTERSEL": str(cluster_sel)}.get(a, a)
             for a in extra]
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run"), *extra)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()  # nothing half-written, not even split.json


@pytest.mark.parametrize("extra, needle", [
    # each was a FileNotFoundError traceback from hashing the file
    (["--weights", "MISSING"], "--weights: file 'MISSING' does not exist"),
    (["--weights", "FOLDER"], "--weights: 'FOLDER' is a folder; pass the path of a file"),
    (["--mode", "reuse", "--source", "SOURCE", "--selection", "MISSING"],
     "--selection: file 'MISSING' does not exist"),
    (["--mode", "reuse", "--source", "SOURCE", "--selection", "FOLDER"], "--selection: 'FOLDER' is a folder"),
    (["--mode", "reuse-unlabeled", "--source", "POOL", "--selection", "SEL", "--units", "MISSING"],
     "--units: file 'MISSING' does not exist"),
])
def test_a_missing_or_folder_file_input_exits_2_with_one_line(files, tmp_path, capsys, extra, needle):
    names = {"MISSING": str(tmp_path / "nope.json"), "FOLDER": str(files["root"]),
             "SOURCE": str(files["source"]), "POOL": str(files["pool"]),
             "SEL": str(files["sel_cluster"])}
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run"), *[names.get(a, a) for a in extra])
    for name in ("MISSING", "FOLDER"):
        needle = needle.replace(name, names[name])
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


def _api_run(files, out, **kwargs):
    mode = kwargs.pop("mode", "vanilla")
    workers = kwargs.pop("workers", 0)
    cfg = FinetuneConfig(mode=mode, max_steps=4, batch_size=8, eval_every=1, workers=workers)
    return run_finetune(cfg, model="smallcnn-s", target=files["train"], target_test=files["test"],
                        out=out, progress=False, **{"weights": files["weights"], **kwargs})


def test_the_result_a_run_returns_equals_the_one_it_saved(files, tmp_path):
    # the returned config held tuples (milestones), the saved one lists: == was False until a
    # rerun returned the loaded copy
    result = _api_run(files, tmp_path / "run")
    loaded = pretrain_reuse.load(tmp_path / "run")
    assert result.config == loaded.config and result.config["milestones"] == [0.6, 0.8]
    assert (result.final, result.at_best_val) == (loaded.final, loaded.at_best_val)


def test_run_finetune_with_a_missing_weights_file_raises_the_package_error(files, tmp_path):
    with pytest.raises(PretrainReuseError, match=r"--weights: file 'nope\.safetensors' does not exist"):
        _api_run(files, tmp_path / "run", weights="nope.safetensors")
    with pytest.raises(PretrainReuseError, match="--selection must be a file path or a Selection "
                                                 "object, got int"):
        _api_run(files, tmp_path / "run", mode="reuse", source=files["source"], selection=3)
    assert not (tmp_path / "run").exists()


def test_run_finetune_takes_the_selection_and_units_objects_themselves(files, tmp_path):
    paths = {"selection": files["sel_cluster"], "units": files["units"]}
    objects = {"selection": Selection.load(paths["selection"]), "units": Units.load(paths["units"])}
    results = {name: _api_run(files, tmp_path / name, mode="reuse-unlabeled", source=files["pool"],
                              **given)
               for name, given in (("paths", paths), ("objects", objects))}
    assert results["objects"].history == results["paths"].history
    w_paths = load_file(str(tmp_path / "paths" / "model.safetensors"))
    w_objects = load_file(str(tmp_path / "objects" / "model.safetensors"))
    assert w_objects.keys() == w_paths.keys()
    assert all(torch.equal(w_objects[k], w_paths[k]) for k in w_paths)
    # recorded as what they hold: the selected units, the prototypes (as a selection records
    # them), the same for a file and the object it holds
    inputs = results["objects"].meta["inputs"]
    assert inputs["selection"] == hash_array(np.array([2, 0]))
    assert inputs["units"] == hash_array(objects["units"].prototypes)
    assert results["paths"].meta["inputs"] == inputs


@pytest.mark.parametrize("mode, workers", [("vanilla", 1), ("reuse-unlabeled", 0), ("co-tuning", 0)])
def test_run_finetune_leaves_the_callers_global_random_state_as_it_was(files, tmp_path, mode, workers):
    extra = {"source": files["pool"], "selection": files["sel_cluster"],
             "units": files["units"]} if mode == "reuse-unlabeled" else {}
    torch.manual_seed(7)
    before = torch.get_rng_state()
    _api_run(files, tmp_path / "run", mode=mode, workers=workers, **extra)
    assert torch.equal(torch.get_rng_state(), before)


def test_new_heads_are_seeded_normals_drawn_without_the_global_generator():
    backbone = create_backbone("smallcnn-s")
    before = torch.get_rng_state()
    net = FinetuneModel(backbone, 3, source_classes=4, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    g = torch.Generator().manual_seed(5)  # the official N(0, sqrt(2/2048)) initialisation
    head, source = (torch.randn(k, FEAT, generator=g) * math.sqrt(2 / 2048) for k in (3, 4))
    assert torch.equal(net.head.weight, head) and torch.equal(net.source_head.weight, source)
    assert not net.head.bias.any() and not net.source_head.bias.any()


@pytest.mark.parametrize("settings, needle", [
    ({"mode": "reuse-unlabeled", "source_head": "full"}, "source_head='full' has no effect"),
    ({"mode": "co-tuning", "source_batch_size": 16}, "source_batch_size=16 has no effect"),
    ({"mode": "reuse", "cutout": 0.2}, "cutout=0.2 has no effect"),
    ({"mode": "reuse", "cotuning_relationship": "reverse"}, "cotuning_relationship='reverse'"),
    ({"mode": "linear-probe", "source_sampling": "units"}, "source_sampling='units'"),
])
def test_options_the_mode_never_reads_are_refused(settings, needle):
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        FinetuneConfig(**settings).check_options_used()


def test_options_the_mode_reads_are_accepted():
    for cfg in (FinetuneConfig(mode="reuse", lam=1.0, source_head="full", source_batch_size=16),
                FinetuneConfig(mode="reuse-unlabeled", cutout=0.2, strong_ops=1),
                FinetuneConfig(mode="co-tuning", lam=2.3, cotuning_relationship="reverse"),
                FinetuneConfig(max_steps=10), FinetuneConfig(schedule="cosine")):
        cfg.check_options_used()


@pytest.mark.parametrize("settings, message", [
    # each was accepted and failed in training, or a raw TypeError, when built in Python
    ({"epochs": "1"}, "epochs must be an integer, got '1'"),
    ({"lr": "0.01"}, "lr must be a number, got '0.01'"),
    ({"max_steps": 2, "batch_size": 32.0}, "batch_size must be an integer, got 32.0"),
    ({"max_steps": 2.5}, "max_steps must be an integer or None, got 2.5"),
    ({"nesterov": 1}, "nesterov must be true or false, got 1"),
    ({"seed": np.float64(1)}, "seed must be an integer, got np.float64(1.0)"),
    ({"milestones": (0.5, "0.8")}, "milestones must be a list of numbers, got (0.5, '0.8')"),
])
def test_a_config_built_in_python_names_a_field_of_the_wrong_type(settings, message):
    with pytest.raises(PretrainReuseError) as e:
        FinetuneConfig(**settings)
    assert str(e.value) == message


def test_a_config_takes_numpy_numbers_as_python_ones():
    cfg = FinetuneConfig(seed=np.int64(1), max_steps=np.int32(2), lr=np.float32(0.5),
                         lam=np.int64(1), milestones=[0.5, np.float64(0.75)])
    assert cfg == FinetuneConfig(seed=1, max_steps=2, lr=0.5, lam=1, milestones=(0.5, 0.75))
    assert [type(v) for v in (cfg.seed, cfg.max_steps, cfg.lr, cfg.lam)] == [int, int, float, int]


@pytest.mark.parametrize("sizes, needle", [
    (dict(batch_size=4, grad_accum=8), "grad_accum=8 exceeds batch_size=4"),
    # the source batch is the small one: it said "exceeds the batch size" of a batch of 16
    (dict(batch_size=16, source_batch_size=10, grad_accum=16), "grad_accum=16 exceeds "
                                                               "source_batch_size=10")])
def test_more_micro_batches_than_samples_names_the_batch_too_small(sizes, needle):
    with pytest.raises(PretrainReuseError, match=needle + "; each micro-batch needs a sample"):
        FinetuneConfig(mode="reuse", **sizes)


def test_repeated_milestones_are_refused():
    with pytest.raises(PretrainReuseError, match="increasing"):
        FinetuneConfig(milestones=(0.6, 0.6))


def test_resuming_after_the_data_changed_on_disk_is_refused(files, tmp_path, capsys):
    """The paths are the same, the samples are not: resuming would train the rest of the run on
    other data (and mix evaluations on two test sets) without a word."""
    train = tmp_path / "train"
    shutil.copytree(files["train"], train)
    argv = [*base_args(files, tmp_path / "run", steps=2), "--target", train,
            "--checkpoint-every", "1"]
    run_ok(capsys, *argv)
    shutil.copy(train / "t0" / "000.png", train / "t1" / "999.png")  # one image more
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "the sample ids or labels", "--out")


def test_a_run_resumes_however_its_unchanged_inputs_are_given(files, tmp_path, capsys, monkeypatch):
    """Rerunning a pipeline script gives the same inputs anew: a selection saved again (select
    run again: a new creation time in its bytes), the same weights saved again, the data by
    another path. A run begun in Python with the Selection object resumes from the command line
    with its file; each of these was refused as 'a different input'. Another selection is not."""
    selection = Selection.load(files["sel_class"])
    first = _api_run(files, tmp_path / "run", mode="reuse", source=files["source"], selection=selection)
    marker = (tmp_path / "run" / "run.json").read_bytes()
    resaved = tmp_path / "sel.json"
    Selection(selected=selection.selected, scores=selection.scores, params=selection.params,
              meta={"created": "2099-01-01T00:00:00+00:00"}).save(resaved)
    weights = tmp_path / "weights.safetensors"
    save_backbone(create_backbone("smallcnn-s", weights=files["weights"]), weights, {"saved": "again"})
    assert resaved.read_bytes() != files["sel_class"].read_bytes()
    assert weights.read_bytes() != files["weights"].read_bytes()
    (tmp_path / "source").symlink_to(files["source"])
    monkeypatch.chdir(files["root"])
    argv = [*base_args(files, tmp_path / "run"), "--weights", weights, "--target", "train",
            "--target-test", "./test", "--mode", "reuse", "--source", tmp_path / "source",
            "--selection", resaved]
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    assert (tmp_path / "run" / "run.json").read_bytes() == marker
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final"] == first.final
    Selection(selected=[1, 3], scores=selection.scores, params=selection.params).save(resaved)
    rc, _, err = cli(capsys, *argv)
    # the other selection is named, not "the sample ids or labels changed", which it implies
    assert_one_line_error(rc, err, "holds a run with a different input (selection);")
    # both kinds of change are named at once
    rc, _, err = cli(capsys, *argv, "--lr", "0.5")
    assert_one_line_error(rc, err, "holds a run with a different config (lr) and input "
                          "(selection);")


def test_a_run_recorded_by_an_earlier_version_resumes_with_the_same_inputs(files, tmp_path, capsys,
                                                                           monkeypatch):
    """Earlier versions recorded files by their bytes and data by the path as written: a run
    they began resumes with the same files and the same data (however its path is written now),
    its record kept as it is; other files are refused."""
    from pretrain_reuse.artifacts import hash_file

    monkeypatch.chdir(files["root"])
    selection = tmp_path / "sel.json"
    selection.write_bytes(files["sel_class"].read_bytes())
    argv = [*base_args(files, tmp_path / "run", steps=2), "--target", "train", "--mode", "reuse",
            "--source", "source", "--selection", selection]
    out = run_ok(capsys, *argv)
    marker = json.loads((out / "run.json").read_text())
    marker["inputs"].update(weights=hash_file(files["weights"]), selection=hash_file(selection),
                            target="train", source="source", target_test=str(files["test"]))
    (out / "run.json").write_text(json.dumps(marker))
    before = (out / "run.json").read_bytes()
    for target in ("train", files["train"]):  # the record "train", read from here
        rc, _, err = cli(capsys, *argv, "--target", target)
        assert rc == 0, err
        assert (out / "run.json").read_bytes() == before
    Selection(selected=[1, 3], scores=np.array([0.1, 0.5, 0.2, 0.9]), params={"method": "test"}
              ).save(selection)
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "holds a run with a different input (", "selection)")


def test_out_naming_a_file_is_a_one_line_error(files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's")
    rc, _, err = cli(capsys, *base_args(files, taken))
    assert_one_line_error(rc, err, "is a file; pass a folder")
    assert taken.read_text() == "a file of the user's"


def test_out_naming_a_foreign_non_empty_folder_is_refused(files, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("the user's")
    rc, _, err = cli(capsys, *base_args(files, foreign))
    assert_one_line_error(rc, err, "is not empty and not a fine-tuning run", "new or empty folder")
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]


def test_cotuning_without_a_classifier_head_exits_2(files, tmp_path, capsys):
    headless = tmp_path / "headless.safetensors"
    state = {k: v for k, v in load_file(str(files["weights"])).items() if not k.startswith("fc.")}
    save_file(state, str(headless))
    args = base_args(files, tmp_path / "run")
    args[args.index("--weights") + 1] = headless
    rc, _, err = cli(capsys, *args, "--mode", "co-tuning")
    assert_one_line_error(rc, err, "co-tuning needs a backbone with its pre-training classifier "
                                   "head; smallcnn-s has none; pass --weights of a classifier")
    assert not (tmp_path / "run").exists()


def test_cotuning_on_a_hugging_face_base_model_names_a_classifier_folder(files, tmp_path, capsys):
    # the head of a Hugging Face model comes with its folder, not with --weights
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    capsys.readouterr()  # transformers' progress bar of the saving
    args = base_args(files, tmp_path / "run")
    del args[args.index("--weights"):args.index("--weights") + 2]
    args[args.index("--model") + 1] = f"hf:{tmp_path / 'vit'}"
    rc, _, err = cli(capsys, *args, "--mode", "co-tuning")
    assert_one_line_error(rc, err, f"hf:{tmp_path / 'vit'} has none; pass as --model the folder "
                                   "of a Hugging Face *ForImageClassification model (its "
                                   "classifier is the source head)")
    assert not (tmp_path / "run").exists()


def test_empty_target_folder_exits_2(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = base_args(files, tmp_path / "run")
    args[args.index("--target") + 1] = tmp_path / "empty"
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "no images")


def test_an_unlabelled_target_folder_exits_2_saying_how_to_label_it(files, tmp_path, capsys):
    args = base_args(files, tmp_path / "run")
    args[args.index("--target") + 1] = files["pool"]  # a flat folder: images without classes
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "empty or unlabelled", "a sub-folder of images per class",
                          "a list file of path,label rows")


def test_test_data_of_other_classes_exits_2(files, tmp_path, capsys):
    """Label c must mean the same class in the training and the test data: a test folder with
    other class names (here the pre-training folder's), or more classes, is refused."""
    args = base_args(files, tmp_path / "run")
    args[args.index("--target-test") + 1] = files["source"]
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "(s0, s1, s2, s3)", "(t0, t1, t2)", "--target-test")
    assert not (tmp_path / "run").exists()


def test_a_folder_of_split_folders_gives_its_train_and_test_splits(files, tmp_path, capsys):
    """Was refused with "pass --split NAME", a flag finetune does not have. Its test/ is the
    default test data, as an embedded set's test split is."""
    (tmp_path / "tt").mkdir()
    (tmp_path / "tt" / "train").symlink_to(files["train"])
    (tmp_path / "tt" / "test").symlink_to(files["test"])
    for extra in ([], ["--target-test", tmp_path / "tt"]):
        args = base_args(files, tmp_path / f"run{len(extra)}", steps=1)
        del args[args.index("--target-test"):args.index("--target-test") + 2]
        out = run_ok(capsys, *args, "--target", tmp_path / "tt", *extra)
        inputs = json.loads((out / "run.json").read_text())["inputs"]
        assert (inputs["target"], inputs["target_test"]) == (str(files["train"].resolve()),
                                                             str(files["test"].resolve()))
        assert json.loads((out / "result.json").read_text())["final"]["n"] == 12
    (tmp_path / "tt" / "test").unlink()  # tt/train alone: no test data
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run", steps=1), "--target", tmp_path / "tt",
                     "--target-test", tmp_path / "tt")
    assert_one_line_error(rc, err, "--target-test: ", "holds the split folders train, none named "
                          "'test'; pass the folder or list file of the test images (--target-test)")


def test_test_images_that_are_training_images_are_warned_of(files, tmp_path, capsys):
    """--target-test naming the training folder (here through a link) was taken without a word;
    separate test data gives no warning."""
    from pretrain_reuse.data import DataWarning

    (tmp_path / "link").symlink_to(files["train"])
    cfg = FinetuneConfig(max_steps=1, batch_size=8)
    with pytest.warns(DataWarning) as caught:
        run_finetune(cfg, model="smallcnn-s", target=files["train"], target_test=tmp_path / "link",
                     out=tmp_path / "api", progress=False)
    assert [str(w.message) for w in caught] == [
        "30 of the 30 test images are training images too (the same files; first: 't0/000.png'), "
        "so the test accuracy is partly that of images the model was trained on; pass held-out "
        "test data (--target-test)"]
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "cli", steps=1), "--target-test",
                     tmp_path / "link")
    assert rc == 0, err
    assert err.splitlines() == ["warning: " + str(caught[0].message)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        _api_run(files, tmp_path / "separate")


SHAPES = ["triangle", "circle", "square"]  # a list file's order: classes.txt


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Training data: a list file with integer labels named by classes.txt (triangle, circle,
    square); test data: an image folder of the same classes (numbered in sorted order: circle,
    square, triangle), 1, 2 and 3 images of triangle, circle, square, and one without squares."""
    root = tmp_path_factory.mktemp("shapes")
    lines = []
    for c, name in enumerate(SHAPES):
        write_images(root / "train" / name, 8, c, seed=700 + c)
        lines += [f"train/{name}/{i:03d}.png,{c}" for i in range(8)]
        write_images(root / "test" / name, c + 1, c, seed=800 + c)
        if name != "square":
            write_images(root / "test_no_squares" / name, c + 1, c, seed=800 + c)
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    return root


@pytest.mark.parametrize("test_folder, note", [
    ("test", None),
    ("test_no_squares", "note: the test data has no images of 1 of the 3 training classes (square); its "
                        "accuracy counts its own images, and its mean per-class accuracy averages "
                        "over the 2 classes it has")])
def test_test_classes_are_matched_to_the_training_classes_by_name(shapes, tmp_path, capsys,
                                                                  test_folder, note):
    """Was refused: 'the test data's classes (circle, square, triangle) are not the training
    data's (triangle, circle, square)'. The accuracy is recomputed here from the exported model
    and the class of each test image's folder, numbered as classes.txt numbers it."""
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", shapes / "list.csv",
                     "--target-test", shapes / test_folder, "--batch-size", 4, "--max-steps", 2,
                     "--out", tmp_path / "run")
    assert rc == 0, err
    assert (note in err) if note else "test data has no images" not in err
    ids = sorted(str(p.relative_to(shapes / test_folder)) for p in (shapes / test_folder).rglob("*.png"))
    labels = np.asarray([SHAPES.index(i.split("/")[0]) for i in ids])
    with torch.no_grad():
        pred = exported_network(tmp_path / "run", 3)(load_images(shapes / test_folder, ids)).numpy().argmax(1)
    final = json.loads((tmp_path / "run" / "result.json").read_text())["final"]
    present = np.unique(labels)
    assert (final["n"], final["classes"]) == (len(ids), len(present))  # 2 without squares
    assert final["top1"] == pytest.approx((pred == labels).mean(), abs=1e-9)
    assert final["mean_class_acc"] == pytest.approx(
        np.mean([(pred[labels == c] == c).mean() for c in present]), abs=1e-9)
    assert model_class_names(tmp_path / "run") == SHAPES  # output i of the head is class i


def model_class_names(out: Path) -> list[str] | None:
    """The class names a fine-tuned model file records (for knowledge to check its data by)."""
    meta = json.loads(safetensors_header(out / "model.safetensors")["meta"])
    return json.loads(meta["inputs"]["class_names"])


def test_test_classes_the_training_data_lacks_are_refused(shapes, tmp_path, capsys):
    write_images(tmp_path / "test" / "circle", 2, 0, seed=900)
    write_images(tmp_path / "test" / "hexagon", 2, 1, seed=901)
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", shapes / "list.csv",
                     "--target-test", tmp_path / "test", "--batch-size", 4, "--max-steps", 2,
                     "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "the test data's classes (hexagon) are not classes of the "
                          "training data (triangle, circle, square)", "--target-test")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode,weights,note", [
    ("vanilla", False, "no --weights: smallcnn-s starts from a random initialisation"),
    ("scratch", True, "--mode scratch re-initialises every layer, so --weights is not used"),
    ("vanilla", True, None),
])
def test_a_backbone_without_pretrained_weights_is_noted(files, tmp_path, capsys, mode, weights,
                                                        note):
    args = [a for a in base_args(files, tmp_path / "run", steps=1) if a != "--quiet"]
    if not weights:
        i = args.index("--weights")
        del args[i:i + 2]
    rc, _, err = cli(capsys, *args, "--mode", mode)
    assert rc == 0
    notes = [line for line in err.splitlines() if "pretrain-reuse: note:" in line]
    assert len(notes) == (1 if note else 0)
    assert all(line.startswith(f"pretrain-reuse: note: {note}") for line in notes)


def test_val_fraction_zero_still_writes_a_result_and_says_nothing_was_picked(files, tmp_path, capsys):
    rc, out, err = cli(capsys, *base_args(files, tmp_path / "run", steps=1), "--val-fraction", 0)
    assert rc == 0, err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["at_best_val"]["val"]["top1"] is None
    # not "... at the best-validation evaluation": there was none
    assert "no validation samples to pick an evaluation" in out and "best-validation" not in out


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------


def _probe_weights(files, out, capsys, batch, accum):
    # linear probe, no augmentation: the backbone is frozen in eval mode, so splitting a batch
    # only changes the summation order of the head's gradient (differences ~1e-9)
    run_ok(capsys, *base_args(files, out, steps=3, batch=batch), "--mode", "linear-probe",
           "--augment", "none", "--grad-accum", accum)
    return load_file(str(out / "model.safetensors"))


def test_grad_accumulation_equals_the_full_batch(files, tmp_path, capsys):
    a = _probe_weights(files, tmp_path / "a", capsys, 8, 1)
    b = _probe_weights(files, tmp_path / "b", capsys, 8, 2)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, rtol=0)
    assert (a["fc.weight"] - load_file(str(files["weights"]))["fc.weight"][:3]).abs().max() > 1e-4


def test_grad_accumulation_with_uneven_chunks_equals_the_full_batch(files, tmp_path, capsys):
    a = _probe_weights(files, tmp_path / "a", capsys, 10, 1)
    b = _probe_weights(files, tmp_path / "b", capsys, 10, 4)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, rtol=0)


class _MicroObjective(nn.Module):
    """A linear classifier's mean cross-entropy, called as the loop calls a mode's objective."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, parts):
        loss = F.cross_entropy(self.linear(parts["x"]), parts["y"])
        return loss, {}


@pytest.mark.parametrize("rows", [12, 2])  # 2 rows: the last of 3 micro-batches is empty
def test_ddp_gradient_accumulation_all_reduces_once_per_step(tmp_path, rows):
    # the micro-batches before the last run under DDP's no_sync(), which only accumulates; the
    # gradient is the same as without DDP (one process: DDP's average is over itself)
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from pretrain_reuse.finetune.loop import _accumulate

    g = torch.Generator().manual_seed(0)
    parts = {"x": torch.randn(rows, 4, generator=g), "y": torch.randint(0, 3, (rows,), generator=g)}
    cfg = FinetuneConfig(grad_accum=3)
    torch.manual_seed(0)
    plain = _MicroObjective()
    ddp_module = _MicroObjective()
    ddp_module.load_state_dict(plain.state_dict())
    _accumulate(plain, parts, min(3, rows), cfg, torch.device("cpu"))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_module)
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        _accumulate(ddp, parts, min(3, rows), cfg, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert reductions == [0]  # one bucket (a small model), reduced once
    for a, b in zip(plain.parameters(), ddp_module.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_precision_auto_on_a_gpu_without_native_bf16_trains_in_float32(monkeypatch):
    from pretrain_reuse.finetune.loop import _precision

    cfg = FinetuneConfig()  # precision auto
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)  # a V100, a T4
    assert isinstance(_precision(cfg, torch.device("cuda")), contextlib.nullcontext)
    assert isinstance(_precision(FinetuneConfig(precision="bf16"), torch.device("cpu")),
                      torch.autocast)
    assert isinstance(_precision(cfg, torch.device("cpu")), contextlib.nullcontext)


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------

# The real CLI; an optimiser-step hook (no effect on the numbers) pauses after every step so
# that an external SIGKILL lands in the middle of the run.
SLOW_WRAPPER = """
import os, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
PAUSE = float(os.environ.get("PAUSE_PER_STEP", "0"))
register_optimizer_step_post_hook(lambda opt, args, kwargs: time.sleep(PAUSE))
from pretrain_reuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise
    ma, mb = metrics(a), metrics(b)
    steps = [r["step"] for r in ma]
    assert len(steps) == len(set(steps)), f"duplicate evaluation steps {steps}"
    assert ma == mb
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert ra["final"] == rb["final"] and ra["at_best_val"] == rb["at_best_val"]
    assert ra["history"] == rb["history"]


RESUME_CASES = {
    "vanilla": lambda f: ["--mode", "vanilla"],
    "reuse-unlabeled": lambda f: ["--mode", "reuse-unlabeled", *MODE_ARGS["reuse-unlabeled"](f)],
}


@pytest.mark.parametrize("case", [
    "vanilla", pytest.param("reuse-unlabeled", marks=pytest.mark.slow)])
def test_kill_9_then_rerun_is_bit_identical(files, tmp_path, capsys, case):
    out = tmp_path / "run"
    argv = [str(a) for a in base_args(files, out, steps=12)] + [
        "--checkpoint-every", "2", "--lr", "0.05", *map(str, RESUME_CASES[case](files))]
    wrapper = tmp_path / "slow_cli.py"
    wrapper.write_text(SLOW_WRAPPER)
    kill_when([sys.executable, str(wrapper), *argv],
              lambda: (out / "checkpoint.safetensors").exists(),
              env={**SUBPROCESS_ENV, "PAUSE_PER_STEP": "0.15"})
    assert not (out / "result.json").exists(), "killed too late: the run had finished"
    assert 2 <= load_state(out / "checkpoint.safetensors")["step"] < 12
    # a run begun by 2 torchrun processes is not resumed by 1: its steps would go on with other
    # batch shares, augmentations and BatchNorm statistics (it was, without a word)
    marker = json.loads((out / "run.json").read_text())
    assert marker["processes"] == 1
    (out / "run.json").write_text(json.dumps({**marker, "processes": 2}))
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "holds a run begun by 2 process(es), resumed here by 1: resume "
                          "it with as many (torchrun --nproc_per_node 2), or pass a new --out")
    (out / "run.json").write_text(json.dumps(marker))

    run_ok(capsys, *argv)  # the same command resumes
    assert json.loads((out / "result.json").read_text())["meta"]["processes"] == 1
    ref_argv = list(argv)
    ref_argv[ref_argv.index("--out") + 1] = str(tmp_path / "reference")
    run_ok(capsys, *ref_argv)
    assert_same_run(out, tmp_path / "reference")
    assert [r["step"] for r in metrics(out)] == [3, 6, 9, 12]


def test_ctrl_c_checkpoints_the_step_under_way_and_a_rerun_is_bit_identical(files, tmp_path, capsys):
    # no regular checkpoint in the 12 steps: the interrupted run used to keep none, and its
    # rerun started again from step 0
    out = tmp_path / "run"
    argv = [str(a) for a in base_args(files, out, steps=12)] + ["--checkpoint-every", "100",
                                                                 "--lr", "0.05"]
    argv.remove("--quiet")  # to see what it says
    argv += ["--workers", "2"]  # loader processes get the Ctrl-C too
    wrapper = tmp_path / "slow_cli.py"
    wrapper.write_text(SLOW_WRAPPER)
    rc, err = kill_when([sys.executable, str(wrapper), *argv],
                        lambda: (out / "metrics.jsonl").exists(), sig=signal.SIGINT, group=True,
                        env={**SUBPROCESS_ENV, "PAUSE_PER_STEP": "0.15"})
    step = load_state(out / "checkpoint.safetensors")["step"]
    assert rc == 130 and f"stopped after step {step} of 12, checkpointed" in err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert 3 <= step < 12 and not (out / "result.json").exists()

    run_ok(capsys, *argv)  # the same command resumes at that step
    ref_argv = list(argv)
    ref_argv[ref_argv.index("--out") + 1] = str(tmp_path / "reference")
    run_ok(capsys, *ref_argv)
    assert_same_run(out, tmp_path / "reference")


def test_ctrl_c_during_the_last_evaluation_finishes_the_run_then_stops(files, tmp_path, capsys,
                                                                       monkeypatch):
    # it was swallowed: the run returned normally, and an experiment went on to its next run
    from pretrain_reuse.finetune import loop

    evaluate = loop._evaluate
    calls = []

    def interrupted_on_the_last(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the validation split's, at the last step (the only evaluation)
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "_evaluate", interrupted_on_the_last)
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run", steps=4), "--eval-every", "100")
    assert rc == 130 and "interrupted" in err
    assert (tmp_path / "run" / "result.json").exists()  # finished and saved first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_during_training():
    # a background job of a script (or nohup) ignores SIGINT; training must not take it over
    from pretrain_reuse.finetune.loop import _StopAfterStep

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = _StopAfterStep()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_rerunning_a_finished_run_changes_nothing(files, tmp_path, capsys):
    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "2"]
    out = run_ok(capsys, *argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()
              if p.name in ("metrics.jsonl", "model.safetensors", "split.json", "run.json")}
    result = json.loads((out / "result.json").read_text())
    (tmp_path / "first.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    run_ok(capsys, *argv)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name in before}
    assert after.keys() == before.keys()
    for name in ("metrics.jsonl", "split.json", "run.json"):
        assert after[name] == before[name], name
    w0 = load_file(str(out / "model.safetensors"))
    w1 = load_file(str(tmp_path / "first.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w1)
    again = json.loads((out / "result.json").read_text())
    assert again["final"] == result["final"] and again["history"] == result["history"]


def test_resume_with_a_changed_config_exits_2_and_leaves_the_run_as_it_was(files, tmp_path, capsys):
    argv = [*base_args(files, tmp_path / "run", steps=2), "--checkpoint-every", "1"]
    out = run_ok(capsys, *argv)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, _, err = cli(capsys, *argv, "--lr", "0.1")
    assert_one_line_error(rc, err, "lr", "--out")
    # split.json too: it was rewritten with the refused run's split (here another seed's)
    rc, _, err = cli(capsys, *argv, "--seed", "5", "--val-fraction", "0.5")
    assert_one_line_error(rc, err, "seed", "val_fraction")
    # and the finished run given again is not redone: result.json keeps its training time
    run_ok(capsys, *argv)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_training_time_counts_every_process_of_a_resumed_run(files, tmp_path, capsys):
    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "1"]
    out = run_ok(capsys, *argv)
    seconds = json.loads((out / "result.json").read_text())["meta"]["train_seconds"]
    state = load_state(out / "checkpoint.safetensors")
    # as if killed after step 2 of a process that had trained for 1000 s
    state.update(step=2, seconds=1000.0, history=json.dumps(json.loads(state["history"])[:2]))
    save_state(out / "checkpoint.safetensors", state)
    (out / "result.json").unlink()
    run_ok(capsys, *argv)
    resumed = json.loads((out / "result.json").read_text())["meta"]["train_seconds"]
    assert 1000.0 < resumed < 1000.0 + 10 * seconds + 5


def test_a_selection_made_on_other_clusters_is_refused(files, tmp_path, capsys):
    # as many clusters, but another k-means run: its ids name other images
    Selection(selected=[2, 0], scores=np.array([0.5, 0.1, 0.9]), params={},
              meta={"inputs": {"source": {"units": "sha256:0123456789abcdef"}}}
              ).save(tmp_path / "sel.json")
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run", steps=2), "--mode",
                     "reuse-unlabeled", "--source", files["pool"], "--selection",
                     tmp_path / "sel.json", "--units", files["units"])
    assert_one_line_error(rc, err, "the selection was made on other units than the units file")
    assert not (tmp_path / "run").exists()


def test_a_source_batch_larger_than_the_selected_source_names_its_flag(files, tmp_path, capsys):
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "run", steps=2), "--mode", "reuse",
                     *MODE_ARGS["reuse"](files), "--source-batch-size", 100000)
    assert_one_line_error(rc, err, "batch size 100000 exceeds the", "selected source samples",
                          "--source-batch-size")
    assert not (tmp_path / "run").exists()



def test_a_run_from_before_an_option_existed_resumes_with_its_default(files, tmp_path, capsys):
    """A version that adds an option writes it into run.json; a run folder written before it
    lacks the key, and it ran with the option's default (the earlier behaviour). Likewise an
    input recorded since (the data's fingerprint)."""
    argv = [*base_args(files, tmp_path / "run", steps=2), "--checkpoint-every", "1"]
    out = run_ok(capsys, *argv)
    marker = json.loads((out / "run.json").read_text())
    assert marker["config"].pop("augment") == FinetuneConfig().augment
    assert marker["inputs"].pop("data")
    assert marker.pop("precision") == "fp32"  # recorded since: the precision computed in
    (out / "run.json").write_text(json.dumps(marker))
    before = json.loads((out / "result.json").read_text())["final"]
    run_ok(capsys, *argv)
    assert json.loads((out / "result.json").read_text())["final"] == before
    rc, _, err = cli(capsys, *argv, "--augment", "none")
    assert_one_line_error(rc, err, "augment", "--out")


def test_a_config_that_is_not_a_finetune_config_is_one_line(tmp_path):
    # a dict (as select() takes) failed with "AttributeError: 'dict' object has no attribute"
    from pretrain_reuse.data import open_dataset
    from pretrain_reuse.finetune import finetune_datasets, run_finetune

    message = "cfg must be a FinetuneConfig, got dict; build it with FinetuneConfig"
    with pytest.raises(PretrainReuseError, match=message):
        run_finetune({"mode": "vanilla"}, model="smallcnn-s", target="synthetic:target",
                     out=tmp_path / "run")
    data = open_dataset("synthetic:target", split="test")
    with pytest.raises(PretrainReuseError, match=message):
        finetune_datasets({"mode": "vanilla"}, model="smallcnn-s", train_pool=data, test_set=data,
                          out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


#: What the Python API's finetune_datasets refuses, as run_finetune does: it dropped the source
#: data and selection of a vanilla run unsaid.
SOURCE_INPUTS_REFUSED = [
    ({}, {"source_pool": "POOL", "selection": "SEL"},
     "mode 'vanilla' reuses no pre-training data, so source_pool, selection would be ignored; "
     "pass mode reuse or reuse-unlabeled, or drop them"),
    ({"mode": "co-tuning"}, {"units": "UNITS"}, "so units would be ignored; pass mode reuse or "
                                                "reuse-unlabeled, or drop it"),
    ({"mode": "reuse"}, {"source_pool": "POOL"},
     r"mode 'reuse' needs a selection of its units \(selection\), which was not given$"),
    ({"mode": "reuse"}, {},  # the message named both, also where one was given
     r"mode 'reuse' needs the pre-training data \(source_pool\) and a selection of its units"),
    # both were dropped unsaid: vanilla has no source loss, and class units map by labels
    ({"lam": 1.0}, {}, r"lam=1.0 has no effect in mode 'vanilla' \(only in reuse, "),
    ({"mode": "reuse"}, {"source_pool": "POOL", "selection": "SEL", "units": "CLASSES"},
     r"units holds class units, which map to samples by their labels, so it would be ignored"),
]


@pytest.mark.parametrize("settings, given, needle", SOURCE_INPUTS_REFUSED)
def test_finetune_datasets_refuses_source_inputs_the_mode_would_ignore_or_lacks(
        tmp_path, settings, given, needle):
    from pretrain_reuse.finetune import finetune_datasets

    data = open_dataset("synthetic:target", split="test")
    objects = {"POOL": open_dataset("synthetic:pretrain", split="test"),
               "SEL": Selection(selected=[0], scores=np.zeros(10), params={}),
               "UNITS": Units(prototypes=np.eye(10, dtype=np.float32), kind="cluster"),
               "CLASSES": Units(prototypes=np.eye(10, dtype=np.float32), kind="class")}
    cfg = FinetuneConfig(**{"max_steps": 2, "batch_size": 16, **settings})
    with pytest.raises(PretrainReuseError, match=needle):
        finetune_datasets(cfg, model="smallcnn-s", train_pool=data, test_set=data,
                          out=tmp_path / "run", progress=False,
                          **{name: objects[value] for name, value in given.items()})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, value, needle", [
    # each was an AttributeError from deep in the run ('str' object has no attribute 'selected')
    ("selection", "sel.json", r"selection must be a Selection, got str; open the file with "
                              r"Selection.load\(path\), or give run_finetune its path"),
    ("units", "u.safetensors", r"units must be a Units, got str; open the file with Units.load"),
    ("source_pool", "synthetic:pretrain", r"source_pool must be an ImageDataset or TextDataset, "
                                          r"got str; open it with pretrain_reuse.data.open_dataset"),
    ("train_pool", "synthetic:target", "train_pool must be an ImageDataset or TextDataset, got str"),
    ("test_set", Path("test"), "test_set must be an ImageDataset or TextDataset, got PosixPath"),
])
def test_finetune_datasets_names_a_path_given_for_a_data_object(tmp_path, name, value, needle):
    from pretrain_reuse.finetune import finetune_datasets

    data = open_dataset("synthetic:target", split="test")
    args = {"train_pool": data, "test_set": data, "source_pool": open_dataset("synthetic:pretrain"),
            "selection": Selection(selected=[0], scores=np.zeros(10), params={}),
            "units": Units(prototypes=np.eye(10, dtype=np.float32), kind="cluster"), name: value}
    with pytest.raises(PretrainReuseError, match=needle):
        finetune_datasets(FinetuneConfig(mode="reuse", max_steps=2, batch_size=16),
                          model="smallcnn-s", out=tmp_path / "run", progress=False, **args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode, precision, advice", [
    # the error told a run without a source loss to lower --lam, and one in float32 to train in it
    ("vanilla", "auto", "lower --lr"),
    ("reuse", "fp32", "lower --lr (or --lam)"),
    ("co-tuning", "bf16", "lower --lr (or --lam), or train in float32 (--precision fp32)"),
    ("linear-probe", "bf16", "lower --lr, or train in float32 (--precision fp32)"),
])
def test_the_advice_for_a_diverged_loss_names_only_the_settings_of_the_run(mode, precision, advice):
    from pretrain_reuse.finetune.loop import _divergence_advice

    cfg = FinetuneConfig(mode=mode, precision=precision)
    assert _divergence_advice(cfg, torch.device("cpu")) == advice


def test_a_diverged_run_exits_2_at_the_next_checkpoint(files, tmp_path, capsys):
    # lr 1e12: the loss is inf or nan within a few steps; the losses are read every few steps
    # and always before an evaluation or a checkpoint (here after every step): the run stops at
    # the first step whose loss is not finite, and its last checkpoint is of the step before
    argv = [*base_args(files, tmp_path / "run", steps=6), "--checkpoint-every", "1",
            "--lr", "1e12"]
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "training diverged", "lower --lr")
    step = int(re.search(r"the loss was (nan|inf) by step (\d+)", err).group(2))
    out = tmp_path / "run"
    assert load_state(out / "checkpoint.safetensors")["step"] == step - 1
    assert not (out / "model.safetensors").exists() and not (out / "result.json").exists()


class _Crash(Exception):
    pass


def _with_out(argv: list, out: Path) -> list:
    """The command ``argv`` with another --out folder."""
    argv = list(argv)
    argv[argv.index("--out") + 1] = out
    return argv


def _stop_during_step(step: int, argv: list, capsys) -> Path:
    """Run the finetune command ``argv`` and stop it in optimiser step ``step`` (1-based), as a
    kill -9 would; returns its --out folder."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = {"n": 0}

    def stop(opt, args, kwargs):
        count["n"] += 1
        if count["n"] == step:
            raise _Crash

    handle = register_optimizer_step_post_hook(stop)
    try:
        with pytest.raises(_Crash):
            main([str(a) for a in argv])
    finally:
        handle.remove()
    capsys.readouterr()
    return Path(argv[argv.index("--out") + 1])


def test_rerun_after_a_stop_before_the_first_checkpoint_has_no_duplicate_metrics(
        files, tmp_path, capsys):
    # evaluation after step 3 (1 epoch), first checkpoint at step 5, stop during step 4: the same
    # files on disk as a kill -9 at that moment (no write is in flight)
    argv = [*base_args(files, tmp_path / "run", steps=8), "--checkpoint-every", "5"]
    out = _stop_during_step(4, argv, capsys)
    assert [r["step"] for r in metrics(out)] == [3]
    assert not (out / "checkpoint.safetensors").exists()
    run_ok(capsys, *argv)
    assert [r["step"] for r in metrics(out)] == [3, 6, 8]


def test_a_run_stopped_before_its_first_checkpoint_can_be_rerun_with_other_settings(
        tmp_path, capsys):
    # a bad setting stops the run after run.json is written (a batch of only an unreadable
    # image); the fixed command has another config, and nothing was trained: it starts afresh
    args = [*_with_a_broken_image(tmp_path), "--quiet", "--out", tmp_path / "run"]
    rc, _, err = cli(capsys, *args, "--batch-size", "1")
    assert "unreadable" in err
    assert rc == 2 and (tmp_path / "run" / "run.json").exists()
    run_ok(capsys, *args, "--batch-size", "4")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["batch_size"] == 4


def test_a_resume_checkpoint_given_as_weights_is_named_as_such(files, tmp_path, capsys):
    # the only model file of an interrupted run; its keys (t0, t1, ...) were blamed on a prefix
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=2))
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn-s", "--weights",
                     out / "checkpoint.safetensors", "--data", files["test"])
    assert_one_line_error(rc, err, "is a fine-tuning run's resume checkpoint (model, optimiser and "
                          "sampler state), not a model's weights; pass the run's model.safetensors")


def test_weights_with_nan_are_refused_naming_the_tensor_before_anything_is_written(
        files, tmp_path, capsys):
    # the run started and stopped at its first read of the loss: "training diverged ...; lower
    # --lr", which no learning rate fixes
    state = load_file(files["weights"])
    name = sorted(k for k, v in state.items() if v.is_floating_point())[1]
    state[name].view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args = base_args(files, tmp_path / "run", steps=2)
    args[args.index("--weights") + 1] = tmp_path / "nan.pth"
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, f"weights file {str(tmp_path / 'nan.pth')!r} holds NaN values in "
                          f"1 tensor(s) (first: {name!r}): a damaged file or a diverged training")
    assert not (tmp_path / "run").exists()


def test_a_log_file_gets_the_training_bar_without_the_evaluations_cursor_codes(files, tmp_path, capsys):
    # the evaluation's bar, cleared at the end and drawn under the training bar, left cursor-up
    # codes and blank lines in a log (stderr not a terminal, as under capsys)
    args = [a for a in base_args(files, tmp_path / "run", steps=2) if a != "--quiet"]
    rc, _, err = cli(capsys, *args)
    assert rc == 0 and "run: vanilla: 100%" in err, err
    assert "\x1b" not in err and "evaluating on" not in err


def test_a_runs_metadata_leaves_out_the_inputs_it_was_not_given(files, tmp_path, capsys):
    # a vanilla run recorded "source": "None" and "selection": "None" as text
    from pretrain_reuse.finetune import RunResult

    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=2))
    inputs = RunResult.load(out).meta["inputs"]
    assert "source" not in inputs and "selection" not in inputs and "None" not in inputs.values()
    assert inputs["model"] == "smallcnn-s" and inputs["weights"].startswith("sha256:")


def test_weights_with_an_infinite_parameter_are_refused_before_anything_is_written(
        files, tmp_path, capsys):
    # the run stopped at its first read of the loss: "training diverged ...; lower --lr"
    state = load_file(files["weights"])
    name = next(k for k in sorted(state) if k.endswith("weight") and state[k].ndim == 4)
    state[name].view(-1)[3] = float("-inf")
    save_file(state, tmp_path / "inf.safetensors")
    args = base_args(files, tmp_path / "run", steps=2)
    args[args.index("--weights") + 1] = tmp_path / "inf.safetensors"
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, f"weights file {str(tmp_path / 'inf.safetensors')!r} holds infinite "
                          "values in 1 parameter(s) (first: '")
    assert name.split(".", 1)[1] in err and "pass finite weights" in err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_whose_checkpoint_was_deleted_is_still_finished(files, tmp_path, capsys):
    # the checkpoint serves only a resume; deleted to save disk, the run was trained again from
    # scratch, silently, and its files rewritten
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=4))
    (out / "checkpoint.safetensors").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, printed, err = cli(capsys, *base_args(files, out, steps=4))
    assert rc == 0, err
    assert f"{out} is finished (same settings); nothing to do" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    rc, _, err = cli(capsys, *base_args(files, out, steps=4), "--lr", "0.5")  # still its settings
    assert rc == 2 and "holds a run with a different config (lr)" in err


def test_a_run_begun_afresh_keeps_no_snapshot_of_the_run_it_replaces(files, tmp_path, capsys):
    # a run with other settings, killed before its first checkpoint: it starts afresh, and the
    # snapshots of the killed run (read by `knowledge --checkpoints`) must not join its own
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=4), "--snapshots")
    assert (out / "snapshots" / "step-0000004.safetensors").exists()
    for name in ("checkpoint.safetensors", "result.json", "model.safetensors"):
        (out / name).unlink()
    run_ok(capsys, *base_args(files, out, steps=2), "--snapshots", "--lr", "0.1")
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-0000002.safetensors"]


def test_a_run_resumes_on_another_device_of_its_type_but_not_of_another_type(
        files, tmp_path, capsys):
    # cuda -> cuda:0 -> cuda:1, and torchrun's GPU per process, compute the same steps; the
    # CPU's spellings stand for them here. The CPU and a GPU do not (bf16 under precision auto).
    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "2",
            "--device", "cpu"]
    reference = run_ok(capsys, *_with_out(argv, tmp_path / "reference"))
    out = _stop_during_step(3, argv, capsys)
    run_ok(capsys, *argv[:-1], "cpu:0")
    assert_same_run(out, reference)
    marker = json.loads((out / "run.json").read_text())
    marker["config"]["device"] = "cuda:1"  # as a run begun on a GPU records it
    (out / "run.json").write_text(json.dumps(marker))
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "different config (device)", "--out")


def test_a_run_begun_in_bf16_by_precision_auto_resumes_only_in_bf16(files, tmp_path, capsys,
                                                                     monkeypatch):
    # a mixed-GPU host: begun on a GPU with native bf16 (precision auto -> bf16), resumed on one
    # without (auto -> fp32), it switched to float32 mid-run. The CPU stands in for both GPUs.
    import pretrain_reuse.finetune.loop as loop

    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "2"]
    reference = run_ok(capsys, *_with_out(argv, tmp_path / "reference"), "--precision", "bf16")
    with monkeypatch.context() as m:
        m.setattr(loop, "uses_bf16", lambda precision, device: precision != "fp32")
        out = _stop_during_step(3, argv, capsys)
    marker = json.loads((out / "run.json").read_text())
    assert marker["config"]["precision"] == "auto" and marker["precision"] == "bf16"
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "holds a run trained in bf16, but precision 'auto' computes in "
                          "fp32 on this device; pass --precision bf16 to resume it, or a new --out")
    rc, _, err = cli(capsys, *argv, "--precision", "fp32")
    assert_one_line_error(rc, err, "precision 'fp32' computes in fp32", "--precision bf16")
    # the fix resumes it, and it ends as a run trained in bf16 from start to end
    run_ok(capsys, *argv, "--precision", "bf16")
    assert_same_run(out, reference)


def test_workers_and_checkpoint_interval_may_change_on_resume(files, tmp_path, capsys):
    argv = [*base_args(files, tmp_path / "run", steps=4), "--checkpoint-every", "2"]
    out = run_ok(capsys, *argv)
    result = json.loads((out / "result.json").read_text())["final"]
    run_ok(capsys, *argv[:-2], "--checkpoint-every", "3", "--workers", "1")
    assert json.loads((out / "result.json").read_text())["final"] == result


# --------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------


def _two_and_one_process_runs(files, tmp_path, capsys, *args) -> tuple[dict, dict]:
    """The same finetune command under ``torchrun --nproc_per_node 2`` (into tmp_path/two) and
    as one process (tmp_path/one); returns the two runs' model weights."""
    args = [*map(str, base_args(files, tmp_path / "two", steps=6)[1:]), *map(str, args)]
    proc = torchrun(["-m", "pretrain_reuse", "finetune", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test top-1") == 1, proc.stdout  # rank 0 reports for both
    one_args = list(args)
    one_args[one_args.index("--out") + 1] = str(tmp_path / "one")
    run_ok(capsys, "finetune", *one_args)
    assert [r["step"] for r in metrics(tmp_path / "two")] == [r["step"] for r in
                                                               metrics(tmp_path / "one")]
    return tuple(load_file(str(tmp_path / d / "model.safetensors")) for d in ("two", "one"))


@pytest.mark.parametrize("accum", ["1", "2"])
def test_torchrun_two_processes_match_one_process(files, tmp_path, capsys, accum):
    # Linear probe without augmentation: the frozen backbone runs in eval mode (running BN
    # statistics, so per-rank batches change nothing) and DDP averages the head's gradients over
    # two equal half-batches, which is the full-batch mean up to float summation order; the
    # 1-process and 2-process weights then agree to ~1e-8 (measured 2e-9), 1e-6 leaves margin.
    # With gradient accumulation each process all-reduces once per step, after its last
    # micro-batch (no_sync before): the same gradient.
    two, one = _two_and_one_process_runs(files, tmp_path, capsys, "--mode", "linear-probe",
                                         "--augment", "none", "--grad-accum", accum)
    for k in one:
        np.testing.assert_allclose(two[k].numpy(), one[k].numpy(), atol=1e-6, rtol=0)


# The real CLI under torchrun; after it ends, each process writes the parameters of its last
# optimiser step to $WEIGHTS/rank<RANK>.safetensors (the run folder holds rank 0's only).
RANK_WEIGHTS_WRAPPER = """
import os, sys
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_post_hook
last, steps = {}, []
def keep(opt, args, kwargs):
    steps.append(1)
    last.update({f"{i}.{j}": p.detach().contiguous().clone() for i, g in enumerate(opt.param_groups)
                 for j, p in enumerate(g["params"])})
register_optimizer_step_post_hook(keep)
from pretrain_reuse.cli import main
rc = main(sys.argv[1:])
save_file(last, os.path.join(os.environ["WEIGHTS"], f"rank{os.environ['RANK']}.safetensors"),
          metadata={"steps": str(len(steps))})
sys.exit(rc)
"""


def _two_classes(root: Path, seed: int) -> list[str]:
    """2 class folders of 6 images in ``root``; returns the ids in the data's order."""
    for c in range(2):
        write_images(root / f"c{c}", 6, c, seed=seed + c)
    return open_dataset(root).ids


def test_torchrun_with_a_micro_batch_left_without_a_source_image_keeps_the_ranks_equal(
        tmp_path):
    # 4 source images per step on 2 processes in 2 micro-batches: one per micro-batch. The
    # first source image of step 0 (rank 0's first) is unreadable, so rank 0's second
    # micro-batch held a target image and no source image: its source loss was NaN, and the
    # rank that read it (every step is read before its checkpoint) stopped ("training
    # diverged") while the other waited for it
    _two_classes(tmp_path / "target", seed=400)
    shutil.copytree(tmp_path / "target", tmp_path / "test")
    source = _two_classes(tmp_path / "source", seed=500)
    broken = source[StepBatches(len(source), 4, seed=0, stream=1).batch(0)[0]]
    (tmp_path / "source" / broken).write_bytes(b"not a png")
    Selection(selected=[0, 1], scores=np.array([0.9, 0.5]), params={}).save(tmp_path / "sel.json")
    weights = tmp_path / "weights"
    weights.mkdir()
    (tmp_path / "wrapper.py").write_text(RANK_WEIGHTS_WRAPPER)
    proc = torchrun([tmp_path / "wrapper.py", "finetune", "--model", "smallcnn-s", "--target",
                     tmp_path / "target", "--target-test", tmp_path / "test", "--mode", "reuse",
                     "--source", tmp_path / "source", "--selection", tmp_path / "sel.json",
                     "--val-fraction", "0", "--batch-size", "4", "--grad-accum", "2",
                     "--max-steps", "3", "--checkpoint-every", "1", "--augment", "none",
                     "--quiet", "--out", tmp_path / "run"], tmp_path, env={"WEIGHTS": str(weights)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"source data: skipped 1 unreadable image(s) of 12: {broken}" in proc.stderr
    rank0, rank1 = (load_file(str(weights / f"rank{r}.safetensors")) for r in (0, 1))
    for r in (0, 1):
        assert safetensors_header(weights / f"rank{r}.safetensors")["steps"] == "3"
    # DDP gives every process the same averaged gradient, so their weights stay bit-equal
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for k in rank0:
        assert torch.isfinite(rank0[k]).all() and torch.equal(rank0[k], rank1[k]), k


def test_torchrun_with_a_share_of_only_unreadable_images_stops_every_process_with_the_error(
        tmp_path):
    # rank 0's share of step 0 (images 0 and 2 of its batch of 4) is unreadable: it alone
    # stopped with the error, and the other process waited for it in its next all-reduce
    ids = _two_classes(tmp_path / "target", seed=400)
    shutil.copytree(tmp_path / "target", tmp_path / "test")
    broken = [ids[i] for i in StepBatches(len(ids), 4, seed=0, stream=0).batch(0)[0::2]]
    for name in broken:
        (tmp_path / "target" / name).write_bytes(b"not a png")
    proc = torchrun(["-m", "pretrain_reuse", "finetune", "--model", "smallcnn-s", "--target",
                     tmp_path / "target", "--target-test", tmp_path / "test", "--val-fraction",
                     "0", "--batch-size", "4", "--max-steps", "3", "--quiet", "--out",
                     tmp_path / "run"], tmp_path, timeout=120)
    error = "pretrain-reuse: error: every image of a process's share of a training batch is unreadable"
    # the process without an image names them; the other says where they are. Both stop at once
    # (no hang), but torchrun terminates a worker once the other has failed, so its line may not
    # get out; the processes' lines may also share one line of the joint stderr
    said = [message for message in (
        " (on another process); remove or repair the unreadable images, or use a larger "
        "--batch-size",
        f" (skipped 2 unreadable image(s) of 12: {', '.join(sorted(broken))}); remove or repair "
        "the unreadable images, or use a larger --batch-size") if error + message in proc.stderr]
    assert proc.returncode != 0 and said, proc.stderr[-3000:]
    assert proc.stderr.count(error) == len(said)


@pytest.mark.parametrize("mode", [
    "vanilla",
    pytest.param("reuse", marks=pytest.mark.slow),
    pytest.param("reuse-unlabeled", marks=pytest.mark.slow),
    pytest.param("co-tuning", marks=pytest.mark.slow),
])
def test_torchrun_trains_every_mode_that_trains_the_backbone(files, tmp_path, capsys, mode):
    # every parameter that gets a gradient on one rank must get one on all: the backbone's own
    # pre-training classifier, unused but trainable, made DDP stop after the first step
    two, one = _two_and_one_process_runs(files, tmp_path, capsys, "--mode", mode, "--augment",
                                         "none", *MODE_ARGS[mode](files))
    # BatchNorm normalises each rank's half-batch with its own statistics (no SyncBN, as the
    # official code), so the runs differ by more than summation order; equality is tested on a
    # linear probe above. Here: both trained the same parameters, and nothing else.
    start = load_file(str(files["weights"]))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.isfinite(two[k].float()).all(), k
        if k in start:
            assert torch.equal(one[k], start[k]) == torch.equal(two[k], start[k]), k


def test_grid_search_picks_the_best_validation_run_and_never_the_test(files, tmp_path, capsys):
    out = tmp_path / "grid"
    run_ok(capsys, *base_args(files, out, steps=3), "--grid", "lr=0.0001,0.05")
    summary = json.loads((out / "grid.json").read_text())
    rows = summary["rows"]
    assert [r["lr"] for r in rows] == [0.0001, 0.05]
    for r in rows:  # each row is the real run's best-validation record
        res = json.loads((out / r["run"] / "result.json").read_text())
        assert r["val_top1"] == res["at_best_val"]["val"]["top1"]
        assert r["test_top1_at_best_val"] == res["at_best_val"]["top1"]
        # a run folder opens as its result
        assert pretrain_reuse.load(out / r["run"]).at_best_val == res["at_best_val"]
    best = max(rows, key=lambda r: r["val_top1"])
    assert summary["best"]["run"] == best["run"]
    assert summary["meta"]["seed"] == 0 and summary["meta"]["params"]["grid"] == {"lr": [0.0001, 0.05]}
    # the data and weights every run was trained on, as the runs record them
    first = json.loads((out / rows[0]["run"] / "result.json").read_text())["meta"]["inputs"]
    assert summary["meta"]["inputs"] == first and first["data"]
    lines = (out / "grid.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("lr,run,val_top1")
    # the same grid again: nothing to do; a smaller one reuses the finished runs, and says which
    # of them is best on validation among its own (it said "nothing to do" and rewrote grid.json)
    rc, printed, _ = cli(capsys, *base_args(files, out, steps=3), "--grid", "lr=0.0001,0.05")
    assert rc == 0 and "is finished (same settings); nothing to do" in printed
    # and still names the winner, without claiming to have written anything
    assert f"best on validation: {best['run']} (val top-1 {best['val_top1']:.4f}" in printed
    assert f"in {out / 'grid.csv'}" in printed and "wrote" not in printed
    rc, printed, _ = cli(capsys, *base_args(files, out, steps=3), "--grid", "lr=0.05")
    assert rc == 0 and "nothing to do" not in printed
    assert "best on validation: lr=0.05 (val top-1" in printed
    assert json.loads((out / "grid.json").read_text())["best"]["run"] == "lr=0.05"


def test_grid_search_names_the_runs_tied_with_the_best_and_keeps_the_first(tmp_path):
    # five of six runs tied on a 10-image validation split and the first was kept unsaid
    from types import SimpleNamespace

    from pretrain_reuse.finetune import FinetuneConfig
    from pretrain_reuse.finetune.grid import grid_search

    val = {0.001: 0.5, 0.01: 0.7, 0.1: 0.7, 1.0: 0.2}

    def run(cfg, folder):
        record = {"val": {"top1": val[cfg.lr]}, "top1": 0.0, "step": 1}
        return SimpleNamespace(at_best_val=record, final={"top1": 0.0}, meta={"inputs": {}})

    summary = grid_search(FinetuneConfig(), {"lr": list(val)}, tmp_path / "grid", run,
                          check=lambda cfg: 10)
    assert summary["best"]["run"] == "lr=0.01" and summary["tied_with_best"] == ["lr=0.1"]
    assert json.loads((tmp_path / "grid" / "grid.json").read_text())["tied_with_best"] == ["lr=0.1"]
    val[0.1] = 0.6
    assert grid_search(FinetuneConfig(), {"lr": list(val)}, tmp_path / "grid", run,
                       check=lambda cfg: 10)["tied_with_best"] == []


def test_the_grid_command_says_when_the_best_run_is_tied(files, tmp_path, capsys):
    # learning rates too small to change a prediction in one step: both runs score the same
    rc, out, err = cli(capsys, *base_args(files, tmp_path / "grid", steps=1), "--grid", "lr=1e-12,2e-12")
    assert rc == 0, err
    assert ("tied with 1 other run (lr=2e-12), the first in grid order is kept: a larger "
            "--val-fraction may separate them") in out


def test_a_grid_run_without_validation_images_stops_the_grid_at_once(files, tmp_path, capsys):
    # a long tail of ratio 1 on a balanced target trains on every image, leaving none to pick on
    out = tmp_path / "grid"
    rc, _, err = cli(capsys, *base_args(files, out, steps=1), "--long-tail-ratio", "1", "--grid",
                     "lr=0.01,0.02")
    assert_one_line_error(rc, err, "run lr=0.01 would have no validation images")
    assert not (out / "lr=0.02").exists() and not (out / "grid.json").exists()


@pytest.mark.parametrize("grid, message", [
    # each seed (and regime) validates on other images: the "best" was picked across them
    ("seed=0,1", "--grid cannot vary seed: it also decides which images validate, so the runs "
                 "would be picked on different validation sets; run one grid per --seed value"),
    ("val_fraction=0.1,0.5", "--grid cannot vary val_fraction: it also decides which images"),
    ("train_fraction=0.5,0.8", "--grid cannot vary train_fraction: it also decides"),
    ("long_tail_ratio=2,10", "--grid cannot vary long_tail_ratio: it also decides"),
    # runs that compute the same were run and one of them "picked"
    ("checkpoint_every=1,2", "--grid cannot vary checkpoint_every: it does not change what a run "
                             "computes; set it once with --checkpoint-every"),
    ("workers=0,1", "--grid cannot vary workers: it does not change what a run computes"),
])
def test_a_grid_over_the_validation_images_or_over_nothing_is_refused(files, tmp_path, capsys,
                                                                       grid, message):
    out = tmp_path / "grid"
    rc, _, err = cli(capsys, *base_args(files, out, steps=1), "--grid", grid)
    assert_one_line_error(rc, err, message)
    assert not out.exists()


def test_grid_with_an_unknown_field_is_a_user_error(files, tmp_path, capsys):
    rc, _, err = cli(capsys, *base_args(files, tmp_path / "g", steps=1), "--grid", "lrr=0.1,0.2")
    assert rc == 2 and "did you mean 'lr'" in err and err.count("\n") == 1


@pytest.mark.parametrize("geometry", ["flip", "weak"])
def test_strong_view_erases_a_box_of_the_configured_side(geometry):
    spec = create_backbone("smallcnn-s").spec
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    erased_value = (127 / 255 - mean) / std  # FixMatch's CutoutAbs fills with (127, 127, 127)
    for cutout, side in ((0.5, 16), (0.25, 8), (0.0, 0)):
        torch.manual_seed(1)
        x = View(spec, geometry, 32, strong=True, cutout=cutout, ops=0)(images)
        erased = torch.isclose(x, erased_value.expand_as(x), atol=1e-6).all(dim=1)  # (B, H, W)
        rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
        assert torch.equal(erased.flatten(1).sum(1), rows * cols)  # one box per image
        # side + 1 pixels (PIL's rectangle includes both corners), cut at the bottom / right edge
        for extent in (rows, cols):
            assert ((extent <= side + 1) & (extent >= min(side // 2 + 1, side))).all()


@pytest.mark.parametrize("geometry", ["flip", "weak"])
def test_strong_view_without_operations_or_cutout_is_its_plain_view(geometry):
    spec = create_backbone("smallcnn-s").spec
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    views = {}
    for ops in (0, 2):
        torch.manual_seed(1)
        views[ops] = View(spec, geometry, 32, strong=True, cutout=0.0, ops=ops)(images)
    torch.manual_seed(1)
    plain = View(spec, geometry, 32)(images)
    torch.testing.assert_close(views[0], plain, rtol=0, atol=0)
    assert not torch.allclose(views[2], plain)  # RandAugment changed some images


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_joint_features_mixed_is_one_pass_and_target_keeps_target_statistics():
    import copy

    x, s1, s2 = images(4, 1), images(4, 2) * 3 + 1, images(4, 3) * 3 + 1  # sources: other stats
    model = tiny_model().train()
    reference = copy.deepcopy(model)

    model.source_bn = "mixed"
    z = model.joint_features(x, s1, s2)
    whole = reference.features(torch.cat([x, s1, s2]))
    torch.testing.assert_close(torch.cat(z), whole)
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(model).values(),
                                                  _bn_state(reference).values(), strict=True))

    model, reference = copy.deepcopy(reference), copy.deepcopy(reference)
    target_only, sources_alone = copy.deepcopy(reference), copy.deepcopy(reference)
    model.source_bn = "target"
    z_t, z1, z2 = model.joint_features(x, s1, s2)
    torch.testing.assert_close(z_t, target_only.features(x))
    # running statistics: exactly those of a pass over the target batch alone
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(model).values(),
                                                  _bn_state(target_only).values(), strict=True))
    # source features: normalised with the source batch's own statistics
    torch.testing.assert_close(torch.cat([z1, z2]), sources_alone.features(torch.cat([s1, s2])))
    key = "backbone.body.blocks.1.running_mean"  # and they differ from the sources' statistics
    assert not torch.allclose(_bn_state(model)[key], _bn_state(sources_alone)[key])


def _list_file(tmp_path, labels) -> Path:
    """A list file of ``path,label`` lines over small real images, one per label."""
    write_images(tmp_path / "imgs", len(labels), 0, seed=600)
    paths = sorted((tmp_path / "imgs").iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p},{y}\n" for p, y in zip(paths, labels, strict=True)))
    return listing


@pytest.mark.parametrize("labels, needle", [
    ([0] * 8, "one class only"),
    ([0, 1] * 4 + [10**12], "go up to 1000000000000"),
])
def test_a_target_of_one_class_or_of_absurd_labels_is_refused(tmp_path, capsys, labels, needle):
    listing = _list_file(tmp_path, labels)
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", listing,
                     "--target-test", listing, "--batch-size", "2", "--epochs", "1", "--quiet",
                     "--out", tmp_path / "run")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


def test_classes_without_a_training_image_are_noted(tmp_path, capsys):
    listing = _list_file(tmp_path, [0, 3] * 5)
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", listing,
                     "--target-test", listing, "--batch-size", "4", "--max-steps", "1",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    assert "note: 2 of 4 classes have no training image (label 1, label 2)" in err
    assert model_class_names(tmp_path / "run") is None  # integer labels without classes.txt


def test_an_embedded_set_of_one_split_is_training_data_and_asks_for_test_data(tmp_path, capsys):
    # was "split='train' is not one of 'all'", with no fix, for digits, mnist-5k, ...
    from pretrain_reuse.finetune import open_split

    assert len(open_split("digits", "train")) == 1797
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn-s", "--target", "digits",
                     "--max-steps", 1, "--quiet", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "digits is one set of images, with no test split",
                          "--target-test")
    assert not (tmp_path / "run").exists()


def test_a_model_fine_tuned_at_another_image_size_is_saved_with_it(files, tmp_path, capsys):
    # it was saved with the backbone's own 32 px, so explain / knowledge / embed reloaded it at
    # a size it never saw; and the eval view took the centre 24 px of the 32 px resize
    out = run_ok(capsys, *base_args(files, tmp_path / "run", steps=1), "--image-size", 24)
    spec = create_backbone("smallcnn-s", weights=out / "model.safetensors").spec
    assert (spec.input_size, spec.resize_size) == ((24, 24), 24)  # smallcnn: no crop margin


def test_evaluate_gives_the_test_accuracy_the_run_reported(quick_demo, capsys, tmp_path):
    """The same model, data and eval view as the run's own final evaluation: equal numbers."""
    demo, _, _ = quick_demo
    for run in ("vanilla-seed0", "linear-probe-seed0"):
        reported = json.loads((demo / "finetune" / run / "result.json").read_text())["final"]
        rc, out, _ = cli(capsys, "evaluate", "--model", "smallcnn", "--weights",
                         demo / "finetune" / run / "model.safetensors", "--data", "synthetic:target",
                         "--quiet", "--out", tmp_path / f"{run}.json")
        assert rc == 0 and out.startswith(f"top-1 {reported['top1']:.4f}, mean per-class "
                                          f"{reported['mean_class_acc']:.4f} on 400 images"), out
        saved = json.loads((tmp_path / f"{run}.json").read_text())
        assert (saved["kind"], saved["top1"], saved["n"]) == ("evaluation", reported["top1"], 400)
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", "synthetic:target",
                     "--out", tmp_path / "e.txt")
    assert_one_line_error(rc, err, "evaluation files are saved as .json")


def test_evaluate_names_unreadable_images_and_the_classes_the_data_lacks(quick_demo, capsys, tmp_path):
    # a test folder of 2 of the run's 10 classes, one file corrupt: finetune notes both, and
    # evaluate said only "1 unreadable images left out"
    demo, _, _ = quick_demo
    test = open_dataset("synthetic:target", split="test")
    keep = test.class_names[:2]
    for c, name in enumerate(keep):
        (tmp_path / "sub" / name).mkdir(parents=True)
        for i in np.flatnonzero(test.labels == c)[:3]:
            pixels = (test.load(int(i)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "sub" / name / f"{i}.png")
    (tmp_path / "sub" / keep[0] / "broken.png").write_bytes(b"not a png")
    rc, out, err = cli(capsys, "evaluate", "--model", "smallcnn", "--weights",
                       demo / "finetune" / "vanilla-seed0" / "model.safetensors",
                       "--data", tmp_path / "sub", "--out", tmp_path / "e.json")
    assert rc == 0 and "on 6 images" in out and "1 unreadable images left out" in out
    assert f"unreadable images left out: {keep[0]}/broken.png" in err
    assert "no readable image of 8 of the model's 10 classes" in err
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["unreadable_ids"] == [f"{keep[0]}/broken.png"]
    assert saved["classes_without_images"] == test.class_names[2:]
    assert saved["classes_matched_by"] == "name"


def test_evaluate_refuses_integer_labels_of_another_number_of_classes(quick_demo, tmp_path,
                                                                     capsys):
    # labels 0 and 3 scored on a 10-way classifier as its outputs 0 and 3, silently where the
    # model names its classes (and reported as matched by name): another task's 4 classes, or 2
    # of the model's, which only names tell apart
    demo, _, _ = quick_demo
    named = demo / "finetune" / "vanilla-seed0" / "model.safetensors"  # 10 named classes
    test = open_dataset("synthetic:target", split="test")
    (tmp_path / "img").mkdir()
    rows = []
    for c in (0, 3):
        for i in np.flatnonzero(test.labels == c)[:2]:
            pixels = (test.load(int(i)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
            rows.append((f"img/{i}.png", c))
    (tmp_path / "list.csv").write_text("".join(f"{f},{c}\n" for f, c in rows))
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--weights", named,
                     "--data", tmp_path / "list.csv")
    assert_one_line_error(rc, err, "they go up to 3 and the model has 10 outputs",
                          f"labels that are the model's class names ({test.class_names[0]}, ")
    # named by a classes.txt (of the synthetic classes, the fine-tuned model's): scored as those
    # classes, by name for the model that names them, by position for the unnamed one
    (tmp_path / "classes.txt").write_text("\n".join(test.class_names) + "\n")
    reference = {}
    for weights in ((), ("--weights", named)):
        rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", *weights,
                         "--data", tmp_path / "list.csv", "--out", tmp_path / "e.json")
        assert rc == 0, err
        scores = json.loads((tmp_path / "e.json").read_text())
        assert scores["n"] == 4
        assert scores["classes_matched_by"] == ("name" if weights else "position")
        assert len(scores["classes_without_images"]) == 8
        reference[bool(weights)] = scores
    # the same images in a folder of the model's classes give the same accuracy
    for c in (0, 3):
        (tmp_path / "folder" / test.class_names[c]).mkdir(parents=True)
    for f, c in rows:
        (tmp_path / f).rename(tmp_path / "folder" / test.class_names[c] / Path(f).name)
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--weights", named,
                     "--data", tmp_path / "folder", "--out", tmp_path / "f.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "f.json").read_text())["top1"] == reference[True]["top1"]


@pytest.mark.parametrize("last", [9, 3])
def test_evaluate_scores_integer_labels_of_an_unnamed_model_as_class_indices(tmp_path, capsys,
                                                                            last):
    # a list file of some ImageNet-val images with their ImageNet indices is the way to score an
    # unnamed 1000-way classifier on part of it: not refused for its fewer classes (labels up to
    # 3 of 10); labels beyond its outputs are
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "list.csv").write_text(f"img/0.png,0\nimg/1.png,0\nimg/2.png,3\nimg/3.png,{last}\n")
    rc, out, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", tmp_path / "list.csv")
    assert rc == 0 and "on 4 images" in out
    assert "the data's integer labels name no classes, so they were scored by position" in err
    (tmp_path / "list.csv").write_text("img/0.png,0\nimg/1.png,10\n")
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", tmp_path / "list.csv")
    assert_one_line_error(rc, err, "the data's integer labels name no classes, so its label i "
                          "would be scored as the model's output i, but they go up to 10 and the "
                          "model has 10 outputs", "a classes.txt of the model's 10 class names",
                          # without --weights the head is random: that is named first
                          "error: smallcnn holds no weights (a random network; nothing is "
                          "downloaded): pass the classifier's weights (--weights)")


def test_evaluate_names_the_absent_classes_of_data_matched_by_position():
    # an unnamed model on a folder of its 10 classes listed the absent ones as "2", "3", ...
    from pretrain_reuse.finetune.evaluate import evaluate_model

    names = [f"class {c}" for c in range(10)]
    data = ArrayDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), class_names=names)
    scores = evaluate_model(create_backbone("smallcnn"), data)
    assert scores["classes_matched_by"] == "position"
    assert scores["classes_without_images"] == names[2:]


def test_evaluate_gives_the_model_back_in_the_train_or_eval_mode_it_came_in(monkeypatch):
    # it left a model in the middle of training (or with frozen parts) in eval mode
    from pretrain_reuse.finetune import evaluate

    names = [f"class {c}" for c in range(10)]
    data = ArrayDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), class_names=names)
    net = create_backbone("smallcnn").train()
    next(iter(net.body.children())).eval()  # a frozen first block
    modes = [m.training for m in net.modules()]
    assert evaluate.evaluate_model(net, data)["n"] == 2
    assert [m.training for m in net.modules()] == modes

    def fails(model, *args, **kwargs):
        assert not any(m.training for m in model.modules())  # scored in eval mode
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "predict", fails)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_model(net, data)
    assert [m.training for m in net.modules()] == modes


def test_evaluate_matches_the_classes_a_model_records_by_name_unless_told_otherwise(tmp_path):
    # the Python call scored a fine-tuned model by output position unless given its names,
    # where the evaluate command matched them by name: 0.01 against 0.31 in an audit
    from pretrain_reuse.finetune.evaluate import evaluate_model
    from pretrain_reuse.models import save_backbone

    torch.manual_seed(0)
    path = save_backbone(create_backbone("smallcnn", num_classes=2), tmp_path / "m.safetensors",
                         {"inputs": {"class_names": json.dumps(["b", "a"])}})
    net = create_backbone("smallcnn", weights=path)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    data = ArrayDataset(images, np.array([0, 1] * 4), class_names=["a", "b"])
    recorded = evaluate_model(net, data)
    assert recorded["classes_matched_by"] == "name"
    assert recorded == evaluate_model(net, data, class_names=["b", "a"])
    by_position = evaluate_model(net, data, class_names=None)
    assert by_position["classes_matched_by"] == "position"
    assert by_position["top1"] == pytest.approx(1 - recorded["top1"])  # two classes, swapped
    with pytest.raises(PretrainReuseError, match="class_names"):
        evaluate_model(net, data, class_names="names")


def test_evaluate_refuses_class_names_of_another_number_than_the_outputs():
    # they would number the data's labels beyond the head (scored against no output)
    from pretrain_reuse.finetune.evaluate import evaluate_model

    data = ArrayDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]),
                        class_names=["a", "b"])
    with pytest.raises(PretrainReuseError, match="class_names names 11 classes but the model has "
                       "10 outputs; pass one name per output"):
        evaluate_model(create_backbone("smallcnn"), data, class_names=[*"cdefghijk", "b", "a"])


def test_labels_are_matched_to_the_models_classes_by_name():
    from pretrain_reuse.data.datasets import labels_by_name

    data = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 1, 0]),
                        class_names=["square", "circle"])
    assert labels_by_name(data, ["circle", "square"], "data (--data)").tolist() == [1, 0, 0, 1]
    assert labels_by_name(data, ["square", "circle"], "data (--data)").tolist() == [0, 1, 1, 0]
    assert labels_by_name(data, None, "data (--data)").tolist() == [0, 1, 1, 0]
    with pytest.raises(PretrainReuseError, match=r"the data's classes \(circle\) are not classes of "
                       r"the training data \(square, star\); pass data \(--data\)"):
        labels_by_name(data, ["square", "star"], "data (--data)")


def test_evaluate_on_data_without_a_readable_image_is_one_line(tmp_path, capsys):
    for c in "abcdefghij":  # the 10 classes of the unnamed smallcnn's outputs
        (tmp_path / "bad" / c).mkdir(parents=True)
        (tmp_path / "bad" / c / "0.png").write_bytes(b"not a png")
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", tmp_path / "bad", "--quiet")
    assert_one_line_error(rc, err, "none of the 10 images of the data can be read")


def test_evaluate_without_recorded_class_names_says_it_scores_by_position(tmp_path, capsys):
    # a classifier not written by finetune: its outputs have no names, so nothing can match the
    # data's classes by name; another number of classes was scored silently (0.33 on 3 classes
    # of another task)
    rc, out, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", "synthetic:target")
    assert rc == 0 and out.startswith("top-1 ") and "on 400 images" in out
    assert "the model names none of the data's classes" in err and "its class i as output i" in err
    for c in "abc":
        (tmp_path / "three" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(tmp_path / "three" / c / "0.png")
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", tmp_path / "three")
    assert_one_line_error(rc, err, "the model names none of the data's classes, so the data's class i would "
                                   "be scored as its output i, but the data has 3 classes and the "
                                   "model 10 outputs")


def test_a_target_that_does_not_exist_is_named_as_such(tmp_path, capsys):
    # it was told to pass --target-test, as if the folder only lacked its test split
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn", "--target", tmp_path / "cubX",
                     "--out", tmp_path / "run")
    assert_one_line_error(rc, err, f"--target '{tmp_path / 'cubX'}' does not exist")


def test_evaluate_of_an_image_model_on_sentences_says_it_needs_a_text_classifier(tmp_path, capsys):
    (tmp_path / "s.jsonl").write_text('{"text": "a fine film", "label": 0}\n')
    rc, _, err = cli(capsys, "evaluate", "--model", "smallcnn", "--data", tmp_path / "s.jsonl")
    assert_one_line_error(rc, err, "smallcnn is an image model but the data are sentences; pass "
                                   "a text classifier")
    rc, _, err = cli(capsys, "finetune", "--model", "smallcnn", "--target", tmp_path / "s.jsonl",
                     "--target-test", tmp_path / "s.jsonl", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "smallcnn is an image model but --target holds sentences; pass "
                                   "images or a text model (--model)")


def test_evaluate_matches_classes_by_a_hugging_face_classifiers_id2label(tmp_path, capsys):
    # the outputs are named t_red, t_green, t_blue; the folder sorts its classes t_blue, t_green,
    # t_red: scored by position, output 0 (t_red) was taken for t_blue
    transformers = pytest.importorskip("transformers")
    names = ["t_red", "t_green", "t_blue"]
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 id2label=dict(enumerate(names)),
                                 label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for name in names:
        for i in range(4):
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    # reference: the HF model's own processor and logits, its id2label naming the prediction
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "vit", local_files_only=True)
    hits = []
    for f in sorted((tmp_path / "data").glob("*/*.png")):
        with torch.no_grad():
            out = hf(**proc(images=[Image.open(f)], return_tensors="pt")).logits
        hits.append(names[int(out.argmax())] == f.parent.name)
    rc, _, err = cli(capsys, "evaluate", "--model", f"hf:{tmp_path / 'vit'}", "--data",
                     tmp_path / "data", "--out", tmp_path / "ev.json")
    scores = json.loads((tmp_path / "ev.json").read_text())
    assert rc == 0 and "by position" not in err
    assert scores["classes_matched_by"] == "name"
    assert scores["top1"] == pytest.approx(np.mean(hits))
    # names that match none of the data's classes (an ImageNet config's "tench, Tinca tinca" on
    # a folder of WordNet ids) leave the data scored by position, as before, with the note
    for i, name in enumerate(names):
        (tmp_path / "data" / name).rename(tmp_path / "data" / f"n0{i}")
    rc, _, err = cli(capsys, "evaluate", "--model", f"hf:{tmp_path / 'vit'}", "--data",
                     tmp_path / "data")
    assert rc == 0 and "the model names none of the data's classes" in err


@pytest.mark.parametrize("settings, world, message", [
    # found with torchrun on 2 processes: the second micro-batch's source share was empty (NaN
    # loss, "training diverged"), or a rank had no source image at all
    (dict(mode="reuse", batch_size=8, source_batch_size=2, grad_accum=2), 2,
     "--grad-accum 2 leaves micro-batches without a sample: each of the 2 processes takes 1 of "
     "the 2 images of --source-batch-size"),
    (dict(mode="reuse", batch_size=8, source_batch_size=1), 2,
     "--source-batch-size 1 is not divisible by the 2 processes"),
    (dict(mode="vanilla", batch_size=6), 4, "--batch-size 6 is not divisible by the 4 processes"),
    (dict(mode="vanilla", batch_size=8, grad_accum=4), 4, "--grad-accum 4 leaves micro-batches"),
])
def test_every_process_gets_an_equal_share_of_each_stream_per_micro_batch(settings, world, message):
    from pretrain_reuse.finetune.loop import check_shares

    with pytest.raises(PretrainReuseError, match=re.escape(message)):
        check_shares(FinetuneConfig(**settings), world)
    # the sizes that give every process and micro-batch a sample pass, for both streams
    check_shares(FinetuneConfig(mode="reuse", batch_size=8, source_batch_size=4, grad_accum=2), 2)
    check_shares(FinetuneConfig(mode="vanilla", batch_size=8, grad_accum=2), 2)


def test_shares_that_torchrun_cannot_split_are_refused_before_the_run_folder(
        files, tmp_path, capsys, monkeypatch):
    # checked once training began, they left an empty --out behind under torchrun
    from pretrain_reuse.finetune import run

    monkeypatch.setattr(run, "rank_world", lambda: (0, 2))
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *[str(a) for a in base_args(files, out, steps=2)], "--batch-size", "7")
    assert_one_line_error(rc, err, "--batch-size 7 is not divisible by the 2 processes")
    assert not out.exists()


def test_torchrun_with_a_loss_diverged_on_one_process_stops_every_process_with_the_error(
        tmp_path):
    # A network whose every BatchNorm scales by 1e30 (eval mode: a linear probe): a white image
    # overflows its features to inf, and the head's logits to nan, while a black one keeps them
    # 0. Rank 1's share of step 0 is white, rank 0's black: rank 1's loss alone was nan, it
    # alone stopped ("training diverged"), and the other waited for it in its next collective.
    backbone = create_backbone("smallcnn-s")
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1.0), m.bias.zero_()
                m.weight.fill_(1e30)
    save_backbone(backbone, tmp_path / "overflowing.safetensors", {"test": "overflowing"})
    root = tmp_path / "target"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (SIDE, SIDE)).save(root / f"c{c}" / f"{i:03d}.png")
    ids = open_dataset(root).ids
    for i in StepBatches(len(ids), 4, seed=0, stream=0).batch(0)[1::2]:
        Image.new("RGB", (SIDE, SIDE), "white").save(root / ids[i])
    # each process's stderr into its own file (torchrun's --redirects): in one pipe, two lines
    # written at once may interleave
    proc = torchrun(["--log-dir", tmp_path / "logs", "--redirects", "2", "-m", "pretrain_reuse",
                     "finetune", "--model", "smallcnn-s", "--weights",
                     tmp_path / "overflowing.safetensors", "--mode", "linear-probe", "--target",
                     root, "--target-test", root, "--val-fraction", "0", "--batch-size", "4",
                     "--max-steps", "3", "--checkpoint-every", "1", "--augment", "none",
                     "--quiet", "--out", tmp_path / "run"], tmp_path, timeout=60)
    # torchrun's summary of the failed processes. The first to exit did so with the CLI's error
    # code; the agent sends SIGTERM to the others as soon as it sees that exit, so a process may
    # be killed (-15) while it exits, or before its line gets out (seen in CI)
    exit_codes = dict(re.findall(r"local_rank: (\d+)\)\s*exitcode\s*: (-?\d+) \(pid",
                                 proc.stderr))
    root_cause = re.search(r"Root Cause.*?exitcode\s*: (-?\d+)", proc.stderr, re.DOTALL)
    assert proc.returncode != 0 and root_cause and root_cause[1] == "2", proc.stderr[-3000:]
    assert set(exit_codes.values()) <= {"2", "-15"}, proc.stderr[-3000:]
    logs = sorted((tmp_path / "logs").glob("*/attempt_0/*/stderr.log"))
    assert len(logs) == 2, proc.stderr[-3000:]
    for log in logs:
        err = log.read_text()
        lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
        if not lines and exit_codes.get(log.parent.name) == "-15":
            continue
        # each names the process whose loss diverged, at the step both read their losses (the
        # first), in one line without a traceback
        assert lines == [f"{ERROR_PREFIX}training diverged: the loss was nan by step 1 on process "
                         "1 of 2; lower --lr"], err
        assert "Traceback" not in err, err


def test_a_step_with_fewer_readable_source_images_than_micro_batches_trains_on_every_image():
    # grad_accum 4, 8 readable target images, 2 readable source images of 8: the step ran the
    # first 2 of 4 micro-batches and left target images 4-7 out without a word
    from pretrain_reuse.data.datasets import collate
    from pretrain_reuse.finetune.loop import _accumulate, _micro_batches

    image = torch.zeros(3, 4, 4)
    target = collate([(image, 0, i) for i in range(8)])
    source = collate([(image if i < 2 else None, 0, i) for i in range(8)])
    n = _micro_batches([target, source], [None, None], 4, None)

    class Rows(torch.nn.Module):  # an objective that records the rows of each micro-batch
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, micro):
            self.seen.append((micro["y"].tolist(), micro["sy"].tolist()))
            return self.w * len(micro["y"]), {}

    objective = Rows()
    parts = {"x": target.images, "y": torch.arange(8), "sx": source.images,
             "sy": torch.arange(2)}
    _accumulate(objective, parts, n, FinetuneConfig(mode="reuse", grad_accum=4), torch.device("cpu"))
    assert n == 2 and [t for t, _ in objective.seen] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [s for _, s in objective.seen] == [[0], [1]]
    # each micro-batch's loss (w times its 4 target rows) weighed by its half of the batch
    assert float(objective.w.grad) == pytest.approx(4.0)


def test_a_selection_from_another_pool_is_warned_of_as_one_for_another_target(
        made_for, files, tmp_path, capsys):
    # the selected classes of a pool of the same class names are other images than those
    # selected: the target side was compared, the source side was not
    import shutil

    rc, _, err = cli(capsys, *_reuse(made_for, files, "target", made_for / "sel.json",
                                     tmp_path / "same"))
    assert rc == 0 and "selection from another pool" not in err, err
    shutil.copytree(files["source"], tmp_path / "pool")
    for image in sorted((tmp_path / "pool").rglob("*.png"))[:3]:  # other images, same names
        image.write_bytes(sorted((tmp_path / "pool").rglob("*.png"))[-1].read_bytes())
    argv = _reuse(made_for, files, "target", made_for / "sel.json", tmp_path / "other")
    argv[argv.index("--source") + 1] = tmp_path / "pool"
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    warned = [line for line in err.splitlines() if "selection from another pool" in line]
    assert len(warned) == 1 and warned[0].startswith(
        f"warning: selection from another pool: the selection ({str(made_for / 'sel.json')!r}) "
        f"was made for the 24 samples of {str(files['source'].resolve())!r} (ids sha256:"), err
    assert (f"--source {str(tmp_path / 'pool')!r} has the same sample ids in "
            f"{str((tmp_path / 'pool').resolve())!r} (other files, or other labels, of the same "
            "names)") in warned[0]
    assert "select from this pool (embed it, build its units, then select --source them)" \
        in warned[0]
