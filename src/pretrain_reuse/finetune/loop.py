"""The training loop: one ``for step in range(start, total)`` loop, every moving part visible.

Per step: the learning rate from the pure :func:`~.config.lr_at`, the step's target (and source)
samples from deterministic :class:`~.data.StepBatches`, augmentation on the device under a
per-step seed, the mode's loss from :data:`~.losses.LOSSES`, gradient accumulation, an optimiser
step. Evaluation runs every ``eval_every`` epochs and at the end on the validation split (model
selection) and the test split (reporting); checkpoints are written atomically every
``checkpoint_every`` steps. Rerunning the same command resumes from the last checkpoint and, on
CPU, ends with bit-identical weights. Under ``torchrun`` each rank takes its share of every
step's batch (DDP averages the gradients); evaluation and checkpoints happen on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..artifacts import (
    ValueEquality,
    atomic_path,
    check_output_file,
    hash_file,
    make_meta,
    read_json,
    require_keys,
    to_json,
    write_json,
)
from ..data.datasets import DataWarning, ImageDataset, describe_skipped, inputs_to, unread_classes
from ..data.text import TextDataset
from ..distributed import (
    bf16_autocast,
    new_host_group,
    process_device,
    rank_world,
    to_device,
    uses_bf16,
)
from ..errors import PretrainReuseError, check_choice, preview, user_stacklevel
from ..models import save_backbone
from .augment import View, input_size
from .checkpoint import load_optimizer_state, load_state, save_state
from .config import MODE_OPTIONS, FinetuneConfig, lr_at
from .data import SourceData, StepBatches, step_loader
from .evaluate import accuracy, predict, sentence_view
from .losses import LOSSES, SOURCE_VIEWS
from .model import FinetuneModel

CHECKPOINT = "checkpoint.safetensors"
#: Steps between readings of the losses (each reading waits for the device to finish its queue).
READ_EVERY = 10


@dataclass(frozen=True, eq=False)
class RunResult(ValueEquality):
    """What a fine-tuning run reports. Test accuracy is given twice, honestly labelled:
    ``final`` at the last step, and ``at_best_val`` at the evaluation with the best validation
    top-1 (model selection never looks at the test split).

    Attributes:
        config: the resolved :class:`FinetuneConfig` as a dict.
        history: one record per evaluation: step, epoch, val and test metrics.
        final: test (and val) metrics after the last step.
        at_best_val: test metrics at the best-validation evaluation, with its step.
        meta: metadata block (inputs, seed, version, timing).
    """

    config: dict[str, Any]
    history: list[dict[str, Any]]
    final: dict[str, Any]
    at_best_val: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``result.json`` (atomically); returns the path. An existing file there is
        replaced only if it is a fine-tuning result too (a selection, say, is refused)."""
        path = check_output_file(path, ".json", "finetune-result")
        write_json(path, {"kind": "finetune-result", "config": self.config, "history": self.history,
                          "final": self.final, "at_best_val": self.at_best_val, "meta": self.meta})
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """Read a ``result.json`` written by :meth:`save`, or the one in a run folder."""
        if isinstance(path, str | os.PathLike) and Path(path).is_dir():
            path = Path(path) / "result.json"
        d = read_json(path, "fine-tuning result")
        if d.get("kind") != "finetune-result":
            raise PretrainReuseError(f"{str(path)!r} is not a fine-tuning result.json")
        require_keys(d, ("config", "history", "final", "at_best_val"), path, "fine-tuning result.json")
        d.setdefault("meta", {})
        # what the summary and the plot read: an edited file fails here, not in them
        needed = {"config": (dict, ("mode",)), "history": (list, ()), "final": (dict, ("step", "top1")),
                  "at_best_val": (dict, ("step", "top1")), "meta": (dict, ())}
        wrong = next((key for key, (kind, names) in needed.items()
                      if not isinstance(d[key], kind) or any(n not in d[key] for n in names)), None)
        if wrong is None and not all(isinstance(h, dict) and isinstance(h.get("test"), dict)
                                     and isinstance(h.get("val"), dict) for h in d["history"]):
            wrong = "history"
        if wrong is not None:
            raise PretrainReuseError(f"{str(path)!r} is not a readable fine-tuning result.json "
                                     f"({wrong!r} lacks a field or is of another type); it was "
                                     "edited or written by something else: run finetune again")
        return cls(d["config"], d["history"], d["final"], d["at_best_val"], d["meta"])

    def __repr__(self) -> str:
        # a summary: the history (one record per evaluation) would fill a notebook cell
        best = self.at_best_val
        return (f"RunResult(mode={self.config['mode']!r}, steps={self.final['step']}, "
                f"evaluations={len(self.history)}, final test top1={_fmt(self.final['top1'])}, "
                f"test top1 at best val={_fmt(best['top1'])} (step {best['step']}))")

    def plot(self, ax=None, *, metric: str = "top1", label: str | None = None):
        """Validation and test ``metric`` (``top1`` or ``mean_class_acc``) over training steps."""
        import matplotlib.pyplot as plt

        check_choice("metric", metric, ("top1", "mean_class_acc"))
        ax = ax or plt.gca()
        steps = [h["step"] for h in self.history]
        name = label or self.config["mode"]
        # markers: a run of one evaluation is a point, which a line alone does not draw
        line, = ax.plot(steps, [h["test"][metric] for h in self.history], marker=".",
                        label=f"{name} (test)")
        ax.plot(steps, [h["val"][metric] for h in self.history], ls="--", marker=".",
                color=line.get_color(), label=f"{name} (val)")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        return ax


def _fmt(accuracy: float | None) -> str:
    """An accuracy in a summary line; None where no image could be read."""
    return "n/a" if accuracy is None else f"{accuracy:.3f}"


def _precision(cfg: FinetuneConfig, device: torch.device):
    """bf16 autocast on ``device`` where ``cfg.precision`` asks for it
    (:func:`~..distributed.uses_bf16`), else nothing (float32)."""
    return bf16_autocast(device, uses_bf16(cfg.precision, device))


class _StopAfterStep:
    """While training, Ctrl-C asks the loop to stop after the step under way, which it then
    checkpoints (a checkpoint of a half-done step would not resume bit for bit, and the steps
    since the last regular checkpoint, up to ``checkpoint_every - 1``, would be lost); a second
    Ctrl-C stops at once. The processes of a torchrun job agree on it when they read their
    losses (:func:`_read`). Only the main thread can take signals; elsewhere nothing changes."""

    def __init__(self):
        self.requested = False
        self.previous = None
        # an ignored Ctrl-C (a background job of a script, nohup) stays ignored; a handler not
        # set from Python (None) could not be put back
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def check_shares(cfg: FinetuneConfig, world: int) -> None:
    """Each of the ``world`` processes takes an equal share of every batch (DDP averages their
    gradients with equal weights), and each of its ``grad_accum`` micro-batches needs a sample
    of every stream (an empty source micro-batch has a NaN mean loss)."""
    sizes = {"--batch-size": cfg.batch_size}
    if cfg.uses_source:
        sizes["--source-batch-size"] = cfg.source_batch_size or cfg.batch_size
    for flag, size in sizes.items():
        if size % world:
            raise PretrainReuseError(f"{flag} {size} is not divisible by the {world} processes; "
                                     f"pass a multiple of {world}")
        if size // world < cfg.grad_accum:
            raise PretrainReuseError(
                f"--grad-accum {cfg.grad_accum} leaves micro-batches without a sample: each of "
                f"the {world} processes takes {size // world} of the {size} images of "
                f"{flag}; lower --grad-accum or raise {flag}")


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the augmentations (and dropout) of one step on one rank."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


def _seed(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for a step on ``device``; on the CPU only the CPU generator's
    part of it: seeding the other backends' generators while they are not initialised queues
    each call with a captured traceback (0.15 ms a step)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def total_steps(cfg: FinetuneConfig, n_train: int, *, run: str = "",
                flag: str = "--warmup-steps") -> int:
    """Optimiser steps of a run on ``n_train`` (>= batch size) target samples; a warm-up longer
    than training is refused, as the learning rate would never reach ``lr`` (``run`` and
    ``flag`` name the run and the setting in the message)."""
    total = cfg.max_steps or cfg.epochs * (n_train // cfg.batch_size)
    if cfg.warmup_steps > total:
        raise PretrainReuseError(
            f"warmup_steps={cfg.warmup_steps} exceeds the {total} training steps{run}, so the "
            f"learning rate would never reach lr; pass fewer {flag} (or train longer)")
    return total


def train(cfg: FinetuneConfig, model: FinetuneModel, train_set: ImageDataset | TextDataset,
          val_set: ImageDataset | TextDataset, test_set: ImageDataset | TextDataset,
          source: SourceData | None, out: Path,
          *, inputs: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
          progress: bool = True) -> RunResult:
    """Fine-tune ``model`` on ``train_set`` (+ ``source`` for the reuse modes); write the run
    folder ``out`` (config, metrics.jsonl, checkpoint, result.json) and return the result.

    The datasets must yield equally sized square images (see :func:`~.data.resize_transform`),
    or be sentences tokenized by the model's tokenizer (a text model: no augmentation).
    ``inputs`` (hashes, paths, selection) are recorded in the run's metadata and must match when
    resuming. ``split`` (the sample ids of each split) is written as ``split.json`` when the run
    starts. A finished run given again is not trained or written again: its result is returned.
    """
    rank, world = rank_world()
    device = process_device(cfg.device)
    if cfg.uses_source and source is None:
        raise PretrainReuseError(f"mode {cfg.mode!r} needs selected source data (--selection)")
    if train_set.labels is None or len(train_set) == 0:
        raise PretrainReuseError("the target training split is empty or unlabelled; pass a "
                                 "training set with a label for every sample")
    batch = cfg.batch_size
    check_shares(cfg, world)
    target_batches = StepBatches(len(train_set), batch, cfg.seed, stream=0)
    steps_per_epoch = target_batches.steps_per_epoch
    total = total_steps(cfg, len(train_set))
    eval_every = cfg.eval_every * steps_per_epoch

    out.mkdir(parents=True, exist_ok=True)
    # through JSON, so that it compares equal to what run.json holds (tuples become lists);
    # precision: what the setting computes in on this device (auto: bf16 on a GPU with native
    # bf16, else fp32), which a resume on another GPU of a mixed host must keep
    # processes: how many share each step (torchrun), which decides the batch shares, each
    # share's augmentations and BatchNorm statistics
    run_identity = json.loads(to_json({"config": cfg.to_dict(), "inputs": inputs or {},
                                       "precision": computes_in(cfg.precision, device),
                                       "processes": world}))
    start = _resume_point(out, run_identity)
    if start == total and (out / "result.json").exists():
        return RunResult.load(out / "result.json")
    # channels_last: the fast layout for convolutions on GPUs and on CPUs (oneDNN) alike
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.head_lr_mult, cfg.weight_decay),
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
    history: list[dict] = []
    seconds_before = 0.0  # training time of the run's earlier processes (killed, resumed)
    if start > 0:
        state = load_state(out / CHECKPOINT)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        history = json.loads(state["history"])
        seconds_before = float(state.get("seconds", 0.0))  # checkpoints of earlier versions lack it
        if rank == 0:  # drop evaluations logged after the checkpoint (they will be redone)
            _rewrite_jsonl(out / "metrics.jsonl", history)
    elif rank == 0:
        # only now, once the folder is known to take this run: a refused rerun leaves the
        # split of the run the folder holds
        if split is not None:
            write_json(out / "split.json", split)
        write_json(out / "run.json", {"kind": "finetune-run", **run_identity})
        # evaluations and snapshots of a run killed before its first checkpoint are redone (it
        # may have had other settings: its snapshots must not join this run's)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "snapshots", ignore_errors=True)
    objective = _Objective(model, LOSSES[cfg.mode], cfg.lam)
    if world > 1:  # gradients are averaged by DDP's hooks, so the loss must go through its forward
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            # a Hugging Face text model holds parameters its pooled features never use (BERT's
            # pooler, when the tokens are mean-pooled), whose gradients DDP would wait for
            find_unused_parameters=model.backbone.spec.modality == "text")

    spec = model.backbone.spec
    if spec.modality == "text":
        weak = strong = evaluate_view = sentence_view
    else:
        size = input_size(spec, cfg.image_size)
        geometry = {"standard": "weak", "flip": "flip", "none": "eval"}[cfg.augment]
        weak = View(spec, geometry, size).to(device)
        strong = View(spec, geometry, size, strong=True, cutout=cfg.cutout,
                      ops=cfg.strong_ops).to(device)
        evaluate_view = View(spec, "eval", size).to(device)

    def share(b: StepBatches) -> StepBatches:  # each rank takes every world-th sample of a step
        return _RankBatches(b, rank, world) if world > 1 else b

    pin = device.type == "cuda"  # page-locked batches: the non-blocking copies overlap compute
    loaders = [step_loader(train_set, share(target_batches), start, total, cfg.workers, pin)]
    if cfg.uses_source:
        src_batches = StepBatches(
            len(source.dataset), cfg.source_batch_size or batch, cfg.seed, stream=1,
            balanced_groups=source.groups if cfg.source_sampling == "units" else None)
        loaders.append(step_loader(source.dataset, share(src_batches), start, total, cfg.workers,
                                   pin))
        source_labels = torch.as_tensor(source.labels)

    # named by the run folder too: an experiment or the demo's pre-training runs many in a row
    desc = out.name if out.name == cfg.mode else f"{out.name}: {cfg.mode}"  # not "vanilla: vanilla"
    bar = tqdm(total=total, initial=start, desc=desc, unit="step",
               disable=not progress or rank != 0)
    t0 = time.perf_counter()
    model.train()
    streams = {"target training": train_set, **({"source": source.dataset} if cfg.uses_source else {})}
    skipped = {what: set() for what in streams}  # unreadable images met (reported at the end)
    # zip starts the loaders; a DataLoader then draws its workers' base seed from the global
    # generator, which is the caller's (their batches do not depend on it)
    with torch.random.fork_rng(devices=[]):
        step_batches = zip(*loaders, strict=True)
    stop = _StopAfterStep()
    advice = _divergence_advice(cfg, device)
    host_group = None
    try:
        if world > 1:  # each step the processes agree on what to run (_micro_batches)
            host_group = new_host_group()
        for step, batches in enumerate(step_batches, start):
            for what, b in zip(streams, batches, strict=True):
                skipped[what].update(b.skipped.tolist())
            micro_batches = _micro_batches(batches, streams.values(), cfg.grad_accum, host_group)
            factor = lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                _seed(_step_seed(cfg.seed, step, rank), device)
                parts = _compose(batches, device, weak, strong, cfg.mode,
                                 source_labels if cfg.uses_source else None)
                optimizer.zero_grad(set_to_none=True)
                stats = _accumulate(objective, parts, micro_batches, cfg, device)
                optimizer.step()
            done = step + 1
            evaluate = done % eval_every == 0 or done == total
            checkpoint = done % cfg.checkpoint_every == 0 or done == total
            # Ctrl-C (see _StopAfterStep) ends the run here, checkpointed: no step is lost (read
            # once: a request during this step's evaluation stops after the next step). A single
            # process stops at once, several when they next read their losses (_read).
            requested = stop.requested
            stopping = False
            # the same steps on every rank, and always before an evaluation or a checkpoint: a run
            # whose loss diverged stops there
            if evaluate or checkpoint or done % READ_EVERY == 0 or (requested and world == 1):
                values, stopping = _read(stats, done, requested, host_group, advice)
                checkpoint = checkpoint or stopping
                # refresh=False: update() redraws at most every 0.1 s (a redraw costs 60 us in a
                # terminal, more in a notebook)
                # the last group: the backbone's lr (the first holds the heads, at head_lr_mult x)
                bar.set_postfix(loss=f"{values['loss']:.3f}",
                                lr=f"{optimizer.param_groups[-1]['lr']:.2g}", refresh=False)
            bar.update(1)
            if rank == 0 and evaluate:
                record = {"step": done, "epoch": done / steps_per_epoch, **values}
                # a bar under the training bar, cleared at the end: in a log file (no
                # terminal) it would leave only cursor-movement codes and blank lines
                nested = progress and sys.stderr.isatty()
                record["val"], record["test"] = (
                    _evaluate(model, s, evaluate_view, cfg, device,
                              f"evaluating on {what}" if nested else None)
                    for s, what in ((val_set, "validation"), (test_set, "test")))
                history.append(record)
                _append_jsonl(out / "metrics.jsonl", record)
                if cfg.snapshots:
                    # the run's identity (run.json, kept on resume) beside the step: knowledge
                    # refuses snapshots of several runs in one folder and orders them by step
                    save_backbone(model.backbone.with_head(model.head),
                                  out / "snapshots" / f"step-{done:07d}.safetensors",
                                  {**_run_meta("finetune.snapshot", cfg, inputs),
                                   "step": done, "run": hash_file(out / "run.json")})
                model.train()
            if rank == 0 and checkpoint:
                save_state(out / CHECKPOINT, {"model": model.state_dict(),
                                              "optimizer": optimizer.state_dict(), "step": done,
                                              "history": json.dumps(history),
                                              "seconds": seconds_before + time.perf_counter() - t0})
            if stopping:
                bar.close()
                if progress and rank == 0:
                    print(f"\n{out.name}: stopped after step {done} of {total}, checkpointed",
                          file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        stop.restore()
        if host_group is not None:  # a grid trains several runs in one process
            dist.destroy_process_group(host_group)
    bar.close()
    # a Ctrl-C during the last evaluation: the run is finished and saved below, then stops
    # whatever runs it next (an experiment's next run, the demo's next stage)
    interrupted_at_end = stop.requested
    for what, data in streams.items():
        # warnings, not notes: --quiet must not hide that the data is not what was meant
        if skipped[what] and rank == 0:
            warnings.warn(f"{what} data: {describe_skipped(data, skipped[what])} (left out of "
                          "training)", DataWarning, stacklevel=user_stacklevel())
            lost = unread_classes(data, skipped[what])
            if lost and what == "target training":
                warnings.warn(f"no training image of {len(lost)} class(es) could be read "
                              f"({preview(lost)}): their outputs were never trained; repair or "
                              "replace their images", DataWarning, stacklevel=user_stacklevel())
    for what, key, data in (("validation", "val", val_set), ("test", "test", test_set)):
        unread = len(data) - history[-1][key]["n"] if history else 0
        if unread and rank == 0:
            # named as the training data's are; found again by reading (rare: only when some
            # image failed), as the evaluations keep counts, not positions
            missing = [i for i in range(len(data)) if data.load(i) is None]
            warnings.warn(f"{what} data: {describe_skipped(data, missing)} (left out of its "
                          "accuracy)", DataWarning, stacklevel=user_stacklevel())
    if rank == 0:
        result = _result(cfg, history, inputs, seconds_before + time.perf_counter() - t0)
        # the fine-tuned network as a backbone whose head is the target classifier, loadable by
        # name: create_backbone(<model>, weights=out/"model.safetensors")
        save_backbone(model.backbone.with_head(model.head), out / "model.safetensors", result.meta)
        result.save(out / "result.json")
    if world > 1:
        dist.barrier()  # the other ranks read what rank 0 evaluated and wrote
    if interrupted_at_end:
        raise KeyboardInterrupt
    return result if rank == 0 else RunResult.load(out / "result.json")


class _RankBatches(StepBatches):
    """This rank's slice of another StepBatches' batches."""

    def __init__(self, base: StepBatches, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def batch(self, step: int) -> np.ndarray:
        return self.base.batch(step)[self.rank::self.world]


def _micro_batches(batches, datasets, grad_accum: int, group) -> int:
    """How many micro-batches this process splits the step's batch into: ``grad_accum``, or
    fewer, the fewest readable samples of its streams (unreadable images are left out of a
    batch), so that every micro-batch holds a sample of every stream (a source loss over no
    sample is NaN) and no readable sample is left out. ``group``: the processes of a torchrun
    job (None: this process alone).

    Processes may run different numbers of micro-batches: DDP's collectives
    of a step, rank 0's buffers broadcast in the first forward and the gradients' all-reduce in
    the last backward (the passes between run under ``no_sync()``), are the same for any number
    but none. A process with none would leave the others waiting in them, so the processes
    agree by one all-reduce (between their CPUs) whether each has one, and otherwise all stop
    with the error. (A zero-weight pass of a stand-in instead would need an input where the
    process has no sample, and would move BatchNorm's running statistics.)"""
    n = min(grad_accum, *(len(b.indices) for b in batches))
    fewest = n
    if group is not None:
        agreed = torch.tensor([n])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        fewest = int(agreed.item())
    if fewest == 0:
        unread = [describe_skipped(data, b.skipped)
                  for b, data in zip(batches, datasets, strict=True) if len(b.indices) == 0]
        whose = "a training batch" if group is None else "a process's share of a training batch"
        raise PretrainReuseError(
            f"every image of {whose} is unreadable ({unread[0] if unread else 'on another process'});"
            " remove or repair the unreadable images, or use a larger --batch-size")
    return n


def _compose(batches, device, weak: View | Callable, strong: View | Callable, mode: str,
             source_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The step's batch dict: augmented target images and labels, plus the source views."""
    target = batches[0]
    # every copy from the host without waiting (to_device): a blocking one would wait for the
    # GPU to finish the queued work of the step before
    parts = {"x": weak(inputs_to(target.images, device, non_blocking=True)),
             "y": to_device(target.labels, device)}
    if mode in SOURCE_VIEWS:
        src = batches[1]
        images = inputs_to(src.images, device, non_blocking=True)
        parts["sx"] = weak(images)
        parts["sy"] = to_device(source_labels[src.indices], device)
        if "strong" in SOURCE_VIEWS[mode]:
            parts["sx_strong"] = strong(images)
    return parts


class _Objective(torch.nn.Module):
    """The mode's loss as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: FinetuneModel, loss_fn, lam: float):
        super().__init__()
        self.model, self.loss_fn, self.lam = model, loss_fn, lam

    def forward(self, parts: dict[str, torch.Tensor]):
        return self.loss_fn(self.model, parts, self.lam)


def _accumulate(objective, parts: dict, micro_batches: int, cfg: FinetuneConfig,
                device) -> dict[str, torch.Tensor]:
    """Forward/backward over the step's batch in ``micro_batches`` micro-batches
    (:func:`_micro_batches`; ``grad_accum`` unless images were unreadable); returns the step's
    losses as device scalars (reading them would wait for the device, see :func:`_read`).

    Each micro-batch's mean loss is weighted by its share of the target batch, so the gradient
    is that of the full batch whenever ``micro_batches`` divides the batch sizes (and for the
    target term always); only BatchNorm statistics see the smaller batches.

    Under DDP the gradients are averaged over the processes once per step, in the backward pass
    of the last micro-batch: the earlier ones run under ``no_sync()``, which only accumulates
    (an all-reduce per micro-batch would send the whole gradient ``grad_accum`` times).
    """
    chunks = {k: _split(v, micro_batches) for k, v in parts.items()}
    total = len(parts["y"])
    ddp = isinstance(objective, torch.nn.parallel.DistributedDataParallel)
    totals: dict[str, torch.Tensor] = {}
    for i in range(micro_batches):
        micro = {k: c[i] for k, c in chunks.items()}
        share = len(micro["y"]) / total
        # the forward too: DDP prepares its all-reduce in the forward pass
        with objective.no_sync() if ddp and i < micro_batches - 1 else contextlib.nullcontext():
            with _precision(cfg, device):
                loss, stats = objective(micro)
            (loss * share).backward()
        for k, v in {"loss": loss.detach(), **stats}.items():
            totals[k] = totals.get(k, 0.0) + v.float() * share
    return totals


def _split(inputs: torch.Tensor | dict[str, torch.Tensor], n: int) -> list:
    """``n`` micro-batches of a batch's rows: of a tensor, or of a dict of token tensors."""
    if not isinstance(inputs, dict):
        return list(inputs.tensor_split(n))
    parts = {k: v.tensor_split(n) for k, v in inputs.items()}
    return [{k: p[i] for k, p in parts.items()} for i in range(n)]


def _divergence_advice(cfg: FinetuneConfig, device: torch.device) -> str:
    """What may keep this run's loss finite: a lower lr, a lower λ where the mode has one, and
    float32 where the run computes in bf16."""
    fixes = ["lower --lr" + (" (or --lam)" if cfg.mode in MODE_OPTIONS["lam"] else "")]
    if uses_bf16(cfg.precision, device):
        fixes.append("train in float32 (--precision fp32)")
    return ", or ".join(fixes)


def _read(stats: dict[str, torch.Tensor], step: int, stop_requested: bool, group,
          advice: str) -> tuple[dict[str, float], bool]:
    """The step's losses as floats (one transfer from the device), and whether to stop after
    the step (a Ctrl-C: :class:`_StopAfterStep`); a diverged loss is an error. ``group``: the
    processes of a torchrun job, between their CPUs (None: this process alone). ``advice``
    ends the error of a diverged loss (:func:`_divergence_advice`).

    Each process has the losses of its own share of the batch, and its own Ctrl-C, but all
    must stop after the same step: one that went on would wait for the others in its next
    collective. So on the steps they read their losses (the same on every process) they
    all-gather each one's loss and stop request, over gloo: one small exchange between the
    CPUs, on steps whose reading has waited for the device anyway (the agreement on the next
    step's micro-batches, :func:`_micro_batches`, would come a step late, and never after the
    last). A loss that diverged on any process then stops every one, with the same error."""
    values = dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))
    shared = torch.tensor([values["loss"], stop_requested], dtype=torch.float64)
    gathered = [shared]
    if group is not None:
        gathered = [torch.empty_like(shared) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, shared, group=group)
    losses, requests = torch.stack(gathered).T.tolist()
    diverged = [(rank, loss) for rank, loss in enumerate(losses) if not math.isfinite(loss)]
    if diverged:
        rank, loss = diverged[0]
        where = f" on process {rank} of {len(losses)}" if group is not None else ""
        raise PretrainReuseError(
            f"training diverged: the loss was {loss} by step {step}{where}; {advice}")
    return values, any(requests)


@torch.no_grad()
def _evaluate(model: FinetuneModel, dataset: ImageDataset | TextDataset, view, cfg: FinetuneConfig,
              device: torch.device, progress: str | None = None) -> dict[str, float]:
    model.eval()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        # the backbone at the training precision, the head in float32: bf16 logits (steps of
        # 1/16 between 8 and 16) would flip the top-1 of samples with a close runner-up
        with _precision(cfg, device):
            features = model.features(x)
        return model.head(features.float())

    logits, labels = predict(logits_of, dataset, view, batch_size=cfg.batch_size, device=device,
                             workers=cfg.workers, progress=progress)
    # recorded, as --quiet runs print only a warning of them
    return {**accuracy(logits, labels), "unreadable": len(dataset) - len(labels)}


#: Settings that do not change what a run computes: a run may resume with other values. (The
#: device may change too, within its type: see :func:`_same_setting`.)
RESUMABLE_WITH_OTHER = ("workers", "checkpoint_every")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    """Whether a run recorded with setting ``key`` = ``old`` may resume with ``new``. A device is
    the same by its type: another GPU (``cuda`` -> ``cuda:0`` -> ``cuda:1``, or the GPU of each
    process under torchrun, whatever the device was written as) computes the same steps, but the
    CPU and a GPU do not (``precision auto`` may train in bf16 on a GPU)."""
    if key == "device" and old is not None and new is not None:
        return torch.device(old).type == torch.device(new).type
    return old == new


def computes_in(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what a run with the setting ``precision`` computes in on
    ``device`` (``auto``: bf16 on a GPU with native bf16). A run records it in its run.json and
    resumes only in the same."""
    return "bf16" if uses_bf16(precision, device) else "fp32"


def recorded_precision(out: Path) -> str | None:
    """What the run in folder ``out`` computes in, as its run.json records it (None: no run
    there, or one begun before runs recorded it)."""
    marker = out / "run.json"
    return read_json(marker, "run marker").get("precision") if marker.exists() else None


#: How a resume error names the "data" input (the fingerprint of the samples of every split).
DATA_CHANGED = ("data: the sample ids or labels (or sentences) of the target, test or source data "
                "changed")


def _resume_point(out: Path, identity: dict) -> int:
    """The step to start from: 0 for a new run, else the checkpoint's (same config and inputs
    required, and the same precision computed in; an unfinished run, the same processes)."""
    marker = out / "run.json"
    checkpoint = out / CHECKPOINT
    if not marker.exists():
        if checkpoint.exists():
            raise PretrainReuseError(f"{str(out)!r} has a checkpoint but no run.json; pass a new --out")
        return 0
    if not checkpoint.exists() and not (out / "result.json").exists():
        return 0  # stopped before its first checkpoint (e.g. by a bad input): nothing to keep
    old = read_json(marker, "run marker")
    # An option added since the run began is missing from its run.json. Options are only added
    # with a default that keeps the earlier behaviour, so the default is what that run used.
    defaults = json.loads(to_json(FinetuneConfig().to_dict()))
    old_config = {**defaults, **old.get("config", {})}
    # where the run recorded the precision it computes in, the setting may change (auto ->
    # bf16 on a GPU with native bf16), and what it resolves to is compared below
    recorded = old.get("precision")
    resumable = (*RESUMABLE_WITH_OTHER, "precision") if recorded else RESUMABLE_WITH_OTHER
    changed = sorted(k for k in identity["config"] if k not in resumable
                     and not _same_setting(k, old_config.get(k), identity["config"][k]))
    # an input recorded since the run began (like "data") is missing from its run.json: not a change
    old_inputs = old.get("inputs", {})
    changed_inputs = sorted(k for k in old_inputs if old_inputs[k] != identity["inputs"].get(k))
    if len(changed_inputs) > 1 and "data" in changed_inputs:
        # the samples follow from the other inputs (another --selection or --target-test): the
        # data changed on disk only where nothing else did
        changed_inputs.remove("data")
    if changed or changed_inputs:
        what = [f"config ({', '.join(changed)})"] if changed else []
        if changed_inputs:
            what.append(f"input ({', '.join(DATA_CHANGED if k == 'data' else k for k in changed_inputs)})")
        raise PretrainReuseError(
            f"{str(out)!r} holds a run with a different {' and '.join(what)}; rerun with the same "
            "settings to resume, or pass a new --out")
    if recorded and recorded != identity["precision"]:
        raise PretrainReuseError(
            f"{str(out)!r} holds a run trained in {recorded}, but precision "
            f"{identity['config']['precision']!r} computes in {identity['precision']} on this "
            f"device; pass --precision {recorded} to resume it, or a new --out")
    # an unfinished run (a checkpoint, no result) goes on only with the processes it began with:
    # other batch shares, augmentations and BatchNorm statistics would mix two runs (a run of an
    # earlier version records none, and resumes as before)
    began, world = old.get("processes", identity["processes"]), identity["processes"]
    if began != world and not (out / "result.json").exists():
        raise PretrainReuseError(
            f"{str(out)!r} holds a run begun by {began} process(es), resumed here by {world}: "
            f"resume it with as many (torchrun --nproc_per_node {began}"
            + (", or without torchrun" if began == 1 else "") + "), or pass a new --out")
    if not checkpoint.exists():
        if (out / "result.json").exists() and (out / "model.safetensors").exists():
            # finished: a finished run's checkpoint (twice the model's size) may be deleted
            return int(RunResult.load(out / "result.json").final["step"])
        return 0
    return int(load_state(checkpoint)["step"])


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run_meta(producer: str, cfg: FinetuneConfig, inputs) -> dict[str, Any]:
    """The meta block of what a run writes (its result, model and snapshots): the config, its
    seed and the inputs it was given as text (a weights file's header holds text; one not given
    is left out, not written "None")."""
    return make_meta(producer, cfg.to_dict(), seed=cfg.seed,
                     inputs={k: str(v) for k, v in (inputs or {}).items() if v is not None})


def _result(cfg: FinetuneConfig, history: list[dict], inputs, seconds: float) -> RunResult:
    # without a validation split every record ties, and the last one is taken
    best = max(history, key=lambda h: (h["val"]["top1"] if h["val"]["n"] else -1,
                                       -h["step"] if h["val"]["n"] else h["step"]))
    meta = _run_meta("finetune", cfg, inputs)
    meta["train_seconds"] = round(seconds, 2)
    meta["processes"] = rank_world()[1]  # torchrun's processes, which shared each step
    # as result.json holds it (tuples as lists): the result returned equals the one loaded
    return RunResult(config=json.loads(to_json(cfg.to_dict())), history=history,
                     final={"step": history[-1]["step"], **history[-1]["test"],
                            "val": history[-1]["val"]},
                     at_best_val={"step": best["step"], **best["test"], "val": best["val"]},
                     meta=meta)
