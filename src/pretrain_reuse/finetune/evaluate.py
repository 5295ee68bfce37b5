"""Evaluation: top-1 and mean per-class accuracy, and the batched inference they rest on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.datasets import ImageDataset, inputs_to, labels_by_name, make_loader, require_labels
from ..data.text import TextDataset
from ..errors import PretrainReuseError, check_choice, check_device, check_seed, preview
from ..models import Backbone, output_class_names
from ..units import class_count
from .augment import View, input_size
from .corruptions import corrupt, parse_corruption
from .data import resize_transform


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then each of its modules back in the mode the caller
    had it in, also when the block raises: a model in the middle of training, or one whose
    frozen parts stay in eval mode while the rest trains, must come back as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def predict(fn: Callable[[Any], torch.Tensor], dataset: ImageDataset | TextDataset,
            view: Callable[[Any], Any], *, batch_size: int,
            device: torch.device, workers: int = 0, skipped: list[int] | None = None,
            progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of ``fn`` on every readable sample (eval view), with the samples' labels; the
    positions of unreadable samples are appended to ``skipped`` when it is given. Sentences are
    tokenized a batch at a time by the data's transform (the model's tokenizer). ``progress``:
    the description of a progress bar over the batches (cleared at the end), or None for none."""
    if isinstance(dataset, TextDataset):
        batches = map(dataset.load_batch, (range(s, min(s + batch_size, len(dataset)))
                                           for s in range(0, len(dataset), batch_size)))
    else:
        batches = make_loader(dataset, batch_size=batch_size, workers=workers)
    outs, labels = [], []
    for batch in tqdm(batches, total=-(-len(dataset) // batch_size), desc=progress, unit="batch",
                      disable=progress is None, leave=False):
        if skipped is not None:
            skipped.extend(batch.skipped.tolist())
        if len(batch.labels) == 0:
            continue
        outs.append(fn(view(inputs_to(batch.images, device))).float().cpu())
        labels.append(batch.labels)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1`` (share of correct predictions) and ``mean_class_acc`` (accuracy averaged over the
    classes present in ``labels``, the metric of Aircraft/Pets/Caltech/Flowers), over ``n``
    samples of ``classes`` classes."""
    if len(labels) == 0:
        return {"top1": None, "mean_class_acc": None, "n": 0, "classes": 0}
    correct = logits.argmax(axis=1) == labels
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(correct.mean()), "mean_class_acc": float(np.mean(per_class)),
            "n": len(labels), "classes": len(per_class)}


def evaluate_model(model: Backbone, data: ImageDataset | TextDataset, *,
                   class_names: list[str] | str | None = "recorded", batch_size: int = 256,
                   device: str = "cpu",
                   workers: int = 0, corruption: str | None = None, seed: int = 0,
                   progress: bool = False) -> dict:
    """Top-1 and mean per-class accuracy of the classifier ``model`` on the labelled images
    ``data``, computed as fine-tuning computes its test accuracy: each image resized and
    centre-cropped to the model's input (the ``eval`` view), unreadable images left out; or of a
    text classifier on labelled sentences, tokenized by its own tokenizer.

    Args:
        model: a classifier, e.g. ``create_backbone(name, weights="runs/x/model.safetensors")``,
            or a Hugging Face sequence classifier (``hf:<folder>``).
        data: labelled images (:func:`~pretrain_reuse.data.open_dataset`), or labelled sentences
            (:func:`~pretrain_reuse.data.text.text_file`) for a text classifier.
        class_names: the names of the model's outputs (output i = class i), by which the data's
            labels are matched; ``"recorded"`` (default): those the model records, as the
            ``evaluate`` command takes them (:func:`~pretrain_reuse.models.output_class_names`:
            the classes a ``finetune`` model was trained on, or a Hugging Face classifier's
            ``id2label`` that names one of the data's classes), else by position; None: by
            position (the data's class i is output i).
        batch_size, device, workers: inference settings; the model is moved to ``device``
            (and stays there), evaluated in eval mode and left in the train/eval mode it came in.
        corruption: ``"NAME:SEVERITY"``, e.g. ``"gaussian-noise:3"``: score the images corrupted
            on the fly (:mod:`~pretrain_reuse.finetune.corruptions`) after the centre crop, as
            ImageNet-C corrupts its crops; None: as they are.
        seed: seed of a random corruption's draws (the same seed and batch size give the same
            corrupted images).
        progress: show a progress bar over the batches.

    Returns:
        ``top1``, ``mean_class_acc`` (over the ``classes`` the data has), ``n`` (images scored),
        ``unreadable`` and ``unreadable_ids`` (images left out), ``classes_without_images``
        (the model's classes the data has no readable image of) and ``classes_matched_by``:
        ``"name"``, or
        ``"position"`` where the model or the data names no classes (the data's class i is
        output i; the data must then have exactly the model's number of classes: as many
        names, or integer labels up to the last output).
    """
    if not isinstance(model, Backbone) or model.num_classes is None:
        raise PretrainReuseError("the model must be a classifier (a Backbone with a Linear head), "
                                 "e.g. the model.safetensors of a finetune run")
    text = isinstance(data, TextDataset)
    if isinstance(data, (ImageDataset, TextDataset)):
        require_labels(data, "evaluating")
    if not isinstance(data, (ImageDataset, TextDataset)) or len(data) == 0:
        raise PretrainReuseError("the data must be labelled images or sentences; open them with "
                                 "pretrain_reuse.data.open_dataset(path or name, split=...) or "
                                 "pretrain_reuse.data.text.text_file(path)")
    if model.spec.modality != ("text" if text else "image"):
        raise PretrainReuseError(
            f"{model.spec.name} is {'an image' if text else 'a text'} model but the data are "
            f"{'sentences' if text else 'images'}; pass {'a text' if text else 'an image'} classifier")
    if corruption is not None and text:
        raise PretrainReuseError("corruptions apply to images, not sentences; leave --corruption out")
    if corruption is not None:
        name, severity = parse_corruption(corruption)
    seed = check_seed("seed", seed)
    if isinstance(class_names, str):
        check_choice("class_names", class_names, ("recorded",))
        class_names = output_class_names(model, data.class_names)
    if class_names is not None and len(class_names) != model.num_classes:
        raise PretrainReuseError(f"class_names names {len(class_names)} classes but the model has "
                                 f"{model.num_classes} outputs; pass one name per output")
    by_name = bool(class_names) and bool(data.class_names)
    if not by_name:
        try:
            _check_classes_by_position(data, model.num_classes, class_names)
        except PretrainReuseError as e:
            if model.load_report is not None or model.spec.name.startswith(("hf:", "python:")):
                raise
            # a head that no weights file filled is random: that is the problem to name first
            raise PretrainReuseError(f"{model.spec.name} holds no weights (a random network; "
                                     "nothing is downloaded): pass the classifier's weights "
                                     f"(--weights). ({e})") from None
    labels = labels_by_name(data, class_names, "data (--data)", owner="model",
                            fix="pass data of the model's classes (--data), or the weights of a "
                            "classifier of the data's (--weights)")
    dev = torch.device(check_device(device))
    model = model.to(dev)
    skipped: list[int] = []
    scored = data.subset(range(len(data)))  # a view: the caller's data keeps its transform
    scored.labels = labels
    if text:
        scored.transform, view = model.preprocess, sentence_view
    else:
        scored.transform = resize_transform(model.spec.resize_side)
        side = input_size(model.spec, None)
        damage = None
        if corruption is not None:
            damage = partial(corrupt, name=name, severity=severity,
                             generator=torch.Generator(dev).manual_seed(seed), input_size=side)
        view = View(model.spec, "eval", side, corrupt=damage).to(dev)
    with evaluating(model):
        logits, labels = predict(model, scored, view, batch_size=batch_size, device=dev,
                                 workers=workers, skipped=skipped,
                                 progress="evaluate" if progress else None)
    if len(labels) == 0:
        raise PretrainReuseError(f"none of the {len(data)} images of the data can be read; check "
                                 "its files (corrupt or not images)")
    absent = sorted(set(range(model.num_classes)) - set(labels.tolist()))
    names = class_names or data.class_names  # output i's, matched by name or by position
    return {**accuracy(logits, labels), "unreadable": len(skipped),
            "unreadable_ids": [data.ids[i] for i in sorted(skipped)],
            "classes_matched_by": "name" if by_name else "position",
            "classes_without_images": [names[c] if names else str(c) for c in absent]}


def _check_classes_by_position(data: ImageDataset | TextDataset, num_classes: int,
                               output_names: list[str] | None) -> None:
    """Refuse data whose class i, scored as the model's output i, cannot be the model's class
    i: data of another number of classes. Named classes (folders, a classes.txt) in another
    number cannot be the model's in its order; integer labels beyond the outputs cannot be its
    classes. Integer labels of fewer classes are class indices as given for a model that names
    none (ImageNet indices of part of its validation set, say), but for a model that names its
    classes they may be another task's as well as part of the model's, which only names tell
    apart (a part named by a classes.txt of the model's classes is then scored as such)."""
    count = class_count(data)
    if count == num_classes or (count < num_classes and not data.class_names and not output_names):
        return
    if data.class_names:  # the model names none of the data's classes (or none at all)
        raise PretrainReuseError(
            f"the model names none of the data's classes, so the data's class i would be scored as its "
            f"output i, but the data has {count} classes and the model {num_classes} outputs; "
            "pass data of exactly the model's classes, in its order")
    names = (f"labels that are the model's class names ({preview(output_names)}), or a "
             "classes.txt of them" if output_names else
             f"a classes.txt of the model's {num_classes} class names")
    raise PretrainReuseError(
        f"the data's integer labels name no classes, so its label i would be scored as the "
        f"model's output i, but they go up to {count - 1} and the model has {num_classes} "
        f"outputs; pass data of exactly the model's classes, or name the data's classes "
        f"({names} beside the data file, line i naming label i)")


def sentence_view(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The view of sentences in training and evaluation alike: their tokens as the tokenizer
    gives them (no augmentation of text is defined here)."""
    return tokens


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


#: Fixed calibration temperature of the source logits in thuml/CoTuning (their ResNet-50).
COTUNING_SOURCE_SCALE = 0.884
#: Inverse regularisation strengths searched on the validation split, in thuml/CoTuning's order
#: (the first of equally accurate fits wins).
COTUNING_CS = (1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4,
               1e-4)


def cotuning_reverse_relationship(train_logits: np.ndarray, train_labels: np.ndarray,
                                  val_logits: np.ndarray, val_labels: np.ndarray,
                                  num_classes: int, *, cs: tuple[float, ...] = COTUNING_CS,
                                  scale: float = COTUNING_SOURCE_SCALE) -> np.ndarray:
    r"""Co-Tuning's category relationship, reverse form (You et al., NeurIPS 2020, as the
    original code: thuml/CoTuning, ``module/relationship_learning.py``).

    With calibrated source probabilities ``p_s(x) = softmax(scale · h_s(x))``:

    1. a multinomial logistic regression without intercept predicts ``y_t`` from ``p_s``,
       ``min_W  mean_i CE(W p_s(x_i), y_i) + ||W||² / (2 C n)`` (scikit-learn's objective),
       with ``C`` in ``cs`` chosen by validation accuracy;
    2. a temperature ``T`` on its logits minimises the validation cross-entropy;
    3. ``p(y_t | y_s = s) = softmax(W e_s / T)`` and, by Bayes with the empirical source
       marginal ``p(y_s) = mean_i p_s(x_i)`` over the training and validation images (as
       thuml), ``p(y_s | y_t) ∝ p(y_t | y_s) p(y_s)``, each row normalised over the source
       classes.

    Returns the (num_classes, K_s) row-stochastic matrix.
    """
    if len(val_labels) == 0:
        raise PretrainReuseError("the reverse Co-Tuning relationship is fitted on the validation "
                                 "split; set val_fraction > 0 or use cotuning_relationship=direct")
    p_train = torch.softmax(scale * torch.from_numpy(train_logits).double(), dim=1)
    p_val = torch.softmax(scale * torch.from_numpy(val_logits).double(), dim=1)
    y_train = torch.from_numpy(train_labels).long()
    y_val = torch.from_numpy(val_labels).long()
    fits = [_multinomial_regression(p_train, y_train, num_classes, c) for c in cs]
    w = max(fits, key=lambda w: ((p_val @ w).argmax(1) == y_val).double().mean().item())
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _lbfgs([log_t], lambda: torch.nn.functional.cross_entropy(p_val @ w / log_t.exp(), y_val))
    t_given_s = torch.softmax(w / log_t.detach().exp(), dim=1)  # row s: W applied to e_s
    joint = t_given_s * torch.cat([p_train, p_val]).mean(0)[:, None]
    return (joint / joint.sum(0, keepdim=True)).T.numpy()


def _multinomial_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                            c: float) -> torch.Tensor:
    """Weights (d, num_classes) of an L2-regularised multinomial logistic regression without
    intercept, the objective of scikit-learn's ``LogisticRegression(C=c, fit_intercept=False)``."""
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    _lbfgs([w], lambda: torch.nn.functional.cross_entropy(x @ w, y)
           + (w * w).sum() / (2 * c * len(y)))
    return w.detach()


def _lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=500, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
