"""The package's one exception type and the small validators every public boundary uses.

Every mistake a user can cause (bad path, wrong shape, NaN, unknown name, k too large) raises
:class:`PretrainReuseError` with a message naming the parameter, what was expected, what was
received and how to fix it. The CLI prints it on one line and exits with status 2.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class PretrainReuseError(Exception):
    """A problem with the user's input or files; the message says what is wrong and how to fix it."""


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise, suggesting the closest."""
    choices = list(choices)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PretrainReuseError(
        f"{name}={value!r} is not one of {', '.join(map(repr, choices))}{hint}"
    )


def lookup(registry: Mapping[str, T], name: str, param: str) -> T:
    """``registry[name]``, or an error listing the registered names and the closest match."""
    return registry[check_choice(param, name, registry.keys())]


def as_array(name: str, x) -> np.ndarray:
    """``x`` as a NumPy array: arrays (memmaps included) as they are, torch tensors copied to the
    CPU, nested lists and other array-likes through ``np.asarray``. Rows of unequal length are
    an error naming ``name``."""
    if isinstance(x, np.ndarray):
        return x
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # NumPy has no bfloat16
    try:
        return np.asarray(x)
    except ValueError:  # ragged nested lists
        raise PretrainReuseError(f"{name} is not a rectangular array (its rows differ in "
                                 "length); pass a NumPy array or a torch tensor") from None


#: The package's folder: frames of its files are the package's own.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called from the function that warns, that names
    the first caller outside this package: the user's line, however deep in the package the
    warning is raised (``select`` calls ``select_many``, which warns)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def frozen_copy(x: np.ndarray, dtype=None) -> np.ndarray:
    """A read-only copy of ``x`` (as ``dtype``), for the arrays of a result object: the object
    is a value, which the caller's array changed later must not change."""
    out = np.array(x, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


def check_matrix(name: str, x, *, ndim: int = 2, finite: bool = True) -> np.ndarray:
    """``x`` as a NumPy array (:func:`as_array`), after checking that it has ``ndim``
    dimensions, real numbers, at least one row, and (optionally) no NaN/inf."""
    x = as_array(name, x)
    if np.dtype(x.dtype).kind not in "biuf":  # strings, objects, complex numbers
        raise PretrainReuseError(f"{name} holds {np.dtype(x.dtype)} values, not real numbers; pass "
                                 "a float array")
    if x.ndim != ndim:
        raise PretrainReuseError(
            f"{name} must be a {ndim}-d array, got shape {tuple(x.shape)}; "
            + ("pass one row per unit/sample" if ndim == 2 else "reshape it")
        )
    if x.shape[0] == 0:
        raise PretrainReuseError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one row")
    if ndim == 2 and x.shape[1] == 0:
        raise PretrainReuseError(f"{name} has no columns (shape {tuple(x.shape)}); pass at least "
                                 "one feature per row")
    if finite:
        bad = ~np.isfinite(np.asarray(x))
        if bad.any():
            rows = np.unique(np.nonzero(bad.reshape(x.shape[0], -1))[0])
            raise PretrainReuseError(
                f"{name} has NaN/inf values in {len(rows)} row(s) (first: row {rows[0]}); "
                "remove or recompute those rows"
            )
    return x


def check_strings(name: str, values) -> list[str]:
    """``values`` (a list, tuple or 1-d NumPy array of strings) as a list of str."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()  # np.str_ -> str, so that messages and JSON show plain strings
    if not isinstance(values, list | tuple):
        raise PretrainReuseError(f"{name} must be a list of strings, got {str(values)[:60]}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise PretrainReuseError(f"{name} must be a list of strings; entry {bad[0]} is "
                                 f"{type(values[bad[0]]).__name__} {values[bad[0]]!r}")
    return list(values)


def preview(names: list[str], first: int = 4) -> str:
    """The first names of a list for a message: ``a, b, c, d, ... (12)``."""
    return ", ".join(names[:first]) + (f", ... ({len(names)})" if len(names) > first else "")


def is_integer(value) -> bool:
    """A Python or NumPy integer; not a bool (True as a count is a mistake)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python or NumPy real number (np.float32 included); not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    """``value`` as a float, after checking that it is a number > 0 (and finite unless
    ``allow_inf``, which also takes the string ``"inf"``: JSON has no infinity, so the package's
    own files, a Selection's ``params`` among them, write it so)."""
    if allow_inf and value == "inf":
        return math.inf
    if not (is_number(value) and value > 0 and (allow_inf or np.isfinite(value))):
        raise PretrainReuseError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_int(name: str, value: int, *, minimum: int) -> int:
    """``value`` as an int, after checking that it is a (Python or NumPy) integer >= ``minimum``."""
    if not (is_integer(value) and value >= minimum):
        raise PretrainReuseError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


#: The largest input side ``--image-size`` takes: 8x the usual 224 (one 3 x 4096 x 4096 image is
#: 200 MB).
MAX_IMAGE_SIZE = 4096


def check_image_size(side: int) -> None:
    """An input side in 1..:data:`MAX_IMAGE_SIZE` pixels."""
    if not 1 <= side <= MAX_IMAGE_SIZE:
        raise PretrainReuseError(f"image_size must be between 1 and {MAX_IMAGE_SIZE} pixels (a "
                                 f"batch of larger images would not fit in memory), got {side}")


def check_seed(name: str, value: int) -> int:
    """``value`` as an int, after checking that it is a seed NumPy and torch accept: a (Python or
    NumPy) integer in [0, 2**63)."""
    if not (is_integer(value) and 0 <= value < 2**63):
        raise PretrainReuseError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def check_device(device: str, float64: str | None = None) -> str:
    """Check that ``device`` names a torch device that exists here (cpu, cuda, cuda:N, mps).
    ``float64``: what computes in float64 on it (e.g. "selection"), which the Apple GPU (mps)
    cannot."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PretrainReuseError(f"device={device!r} is not a device name; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PretrainReuseError(f"device={device!r} but no CUDA GPU is visible; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PretrainReuseError(f"device={device!r} but only {torch.cuda.device_count()} CUDA "
                                 f"GPUs are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PretrainReuseError(f"device={device!r} but this machine has no Apple GPU; use cpu")
    if dev.type == "mps" and float64:
        raise PretrainReuseError(f"device={device!r}: the Apple GPU has no float64, which the "
                                 f"{float64} computes in; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PretrainReuseError(f"device={device!r} is not supported; use cpu or cuda")
    return device


def parse_ids(text: str, flag: str) -> tuple[int, ...]:
    """Unit ids written as ``"3,7-9"`` -> (3, 7, 8, 9); ``flag`` names the option in the error."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi or lo)
            if hi < lo:
                raise ValueError
            ids.extend(range(lo, hi + 1))
    except ValueError:
        raise PretrainReuseError(
            f"{flag} {text!r} is not a list of unit ids; write e.g. 7-24,80-100"
        ) from None
    return tuple(ids)


def check_ids_below(name: str, ids: Iterable[int], n: int, what: str) -> None:
    """Refuse an id among ``ids`` (the value of ``name``) that is not one of the ``n`` ``what``
    (ids 0..n-1), naming the largest valid id."""
    outside = [i for i in ids if not 0 <= i < n]
    if outside:
        raise PretrainReuseError(f"{name} id {outside[0]} is out of range for the {n} {what}; "
                                 f"pass ids 0..{n - 1}")


def refuse_path(x, expected: str) -> None:
    """Refuse a file path passed where ``expected`` (an in-memory object) belongs, saying how to
    open the file."""
    if isinstance(x, str | os.PathLike):
        raise PretrainReuseError(f"got the path {str(x)!r} where {expected} belong; open the file "
                                 "with pretrain_reuse.load(path) and pass the result")


def check_file(name: str, path: str | Path) -> Path:
    """Check that ``path`` is a path (str or os.PathLike) that exists; return it as a Path."""
    if not isinstance(path, str | os.PathLike):
        raise PretrainReuseError(f"{name} must be a file path (str or pathlib.Path), got "
                                 f"{type(path).__name__} {path!r}")
    p = Path(path)
    if not p.exists():
        raise PretrainReuseError(f"{name}: file {str(p)!r} does not exist; check the path")
    return p


def check_regular_file(name: str, path: str | Path) -> Path:
    """:func:`check_file`, refusing a folder in the file's place (its read would be an OS
    error, or a decoder's complaint about a corrupt file)."""
    p = check_file(name, path)
    if p.is_dir():
        raise PretrainReuseError(f"{name}: {str(p)!r} is a folder; pass a file")
    return p


def read_text(name: str, path: str | Path) -> str:
    """The text of the file ``path``; a missing file, a folder or a binary file in its place is
    a one-line error naming ``name``."""
    p = check_regular_file(name, path)
    try:
        return p.read_text()
    except UnicodeDecodeError:
        raise PretrainReuseError(f"{name}: {str(p)!r} is not a text file; check the path") from None
