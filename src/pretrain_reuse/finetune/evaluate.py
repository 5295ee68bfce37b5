"""Evaluation: top-1 and mean per-class accuracy, and the batched inference they rest on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.datasets import ImageDataset, make_loader


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset,
            view: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int,
            device: torch.device, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of ``fn`` on every readable sample (eval view), with the samples' labels."""
    outs, labels = [], []
    for batch in make_loader(dataset, batch_size=batch_size, workers=workers):
        if len(batch.images) == 0:
            continue
        outs.append(fn(view(batch.images.to(device))).float().cpu())
        labels.append(batch.labels)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1`` (share of correct predictions) and ``mean_class_acc`` (accuracy averaged over the
    classes present in ``labels``, the metric of Aircraft/Pets/Caltech/Flowers)."""
    if len(labels) == 0:
        return {"top1": None, "mean_class_acc": None, "n": 0}
    correct = logits.argmax(axis=1) == labels
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(correct.mean()), "mean_class_acc": float(np.mean(per_class)),
            "n": len(labels)}


def cotuning_relationship(source_logits: np.ndarray, labels: np.ndarray,
                          num_classes: int) -> np.ndarray:
    r"""Co-Tuning's category relationship, direct form (as Transfer-Learning-Library):
    ``p(y_s | y_t = c) = mean_{x in c} softmax(h_s(x))``, a (num_classes, K_s) row-stochastic
    matrix from the pre-trained classifier's outputs on the target training images."""
    z = torch.from_numpy(source_logits).double()
    probs = torch.softmax(z, dim=1).numpy()
    rel = np.zeros((num_classes, probs.shape[1]))
    for c in range(num_classes):
        rows = probs[labels == c]
        rel[c] = rows.mean(axis=0) if len(rows) else 1.0 / probs.shape[1]
    return rel
