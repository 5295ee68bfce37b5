"""Fine-tuning with reuse of selected pre-training data (Liu et al., NeurIPS 2022, §3.3), and the
baselines: vanilla, co-tuning, linear probe and training from scratch.

:func:`~.run.run_finetune` assembles a run from names and paths (what the CLI calls);
:func:`~.loop.train` is the loop itself, for users who build their own model and datasets.

Only the torch-free config is imported with the package; the rest loads on first use (PEP 562),
so that the command line's parser, which builds its flags from :class:`FinetuneConfig`, answers
``--help`` without loading torch.
"""

import importlib
from typing import TYPE_CHECKING

from .config import MODES, FinetuneConfig, load_config

if TYPE_CHECKING:  # what __getattr__ loads, for type checkers and editors
    from .evaluate import evaluate_model
    from .loop import RunResult, train
    from .run import finetune_datasets, open_split, run_finetune, target_splits

_LAZY = {"evaluate_model": ".evaluate", "RunResult": ".loop", "train": ".loop",
         "finetune_datasets": ".run", "open_split": ".run", "run_finetune": ".run",
         "target_splits": ".run"}

__all__ = ["MODES", "FinetuneConfig", "RunResult", "evaluate_model", "finetune_datasets", "load_config",
           "open_split", "run_finetune", "target_splits", "train"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
