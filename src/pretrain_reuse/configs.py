"""Settings of the package's config classes: YAML ``--config`` files and typed fields.

Every config (``FinetuneConfig``, ``EmbedConfig``, ``ExperimentConfig``, ...) is a frozen
dataclass whose annotations say what each field holds. :func:`checked_values` checks a mapping
read from a YAML file or flags against them before the config is built, and :func:`check_fields`
checks a config built in Python: either way a value of the wrong type (an ``lr`` of "0.01", a
``batch_size`` of 32.0) is one line naming the field, not a traceback deep in a run.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Hashable
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np
import yaml

from .errors import PretrainReuseError, check_choice, read_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML would keep the
    last value and drop the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def config_values(path: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The field: value mapping of a YAML ``--config`` file (optional) with the ``overrides``
    that are not None on top (a CLI flag left unset keeps the file's value)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(read_text("--config", path), _UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            # PyYAML's own text spans several lines (the source line and a caret); keep the
            # problem and its position, on the one line the CLI prints
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            detail = where + (problem or " ".join(str(e).split()))
            raise PretrainReuseError(f"--config {str(path)!r} is not valid YAML ({detail})") from None
        if not isinstance(loaded, dict):
            raise PretrainReuseError(f"--config {str(path)!r} must hold a mapping of field: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def checked_values(values: dict[str, Any], cls: type, what: str = "config key") -> dict[str, Any]:
    """``values`` (field: value, from a YAML file or flags) checked against the fields of the
    dataclass ``cls`` and their annotations; lists become tuples.

    The loaders call it once, at the boundary: without it a YAML ``epochs: one`` or ``lr: abc``
    fails as a traceback deep in training. An unknown key or a value of the wrong type raises one
    line naming the key (``what`` says whose key), what it must be and what it got.
    """
    hints = get_type_hints(cls)
    known = sorted(f.name for f in fields(cls))
    checked = {}
    for key, value in values.items():
        check_choice(what, key, known)
        try:
            checked[key] = _typed(value, hints[key])
        except _WrongType:
            raise PretrainReuseError(f"{what} {key!r} must be {_describe(hints[key])}, got "
                                     f"{value!r}{_number_hint(value, hints[key])}") from None
    return checked


class _WrongType(Exception):
    """A value does not fit its annotation (turned into a PretrainReuseError naming the key)."""


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as a field annotated ``hint`` holds it (lists become tuples); raises _WrongType.

    Handles the annotations config classes use: str, int, float, bool, Any, ``X | None``,
    ``tuple[X, ...]`` and ``dict[str, X]``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is types.UnionType:  # every union of a config field is `X | None`
        return None if value is None else _typed(value, _not_none(args))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _WrongType
        return tuple(_typed(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _WrongType
        return {k: _typed(v, args[1]) for k, v in value.items()}
    if hint is Any:
        return value
    if hint in (int, float) and isinstance(value, np.integer | np.floating):
        value = value.item()  # a NumPy number (from an array or a sweep) as the Python one
    if hint is str and isinstance(value, os.PathLike):
        value = os.fspath(value)  # a data folder or weights file given as a Path
    # bool is a subclass of int, so True would otherwise pass as the integer 1
    if isinstance(value, bool) != (hint is bool):
        raise _WrongType
    # a float field also takes an int (lr: 1), kept as written so that saved configs do not change
    if not isinstance(value, int | float if hint is float else hint):
        raise _WrongType
    return value


def _not_none(args: tuple) -> Any:
    return next(a for a in args if a is not type(None))


#: How an error names each scalar type: (one, many).
_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
               bool: ("true or false", "true/false values"), str: ("a string", "strings"),
               Any: ("any value", "values")}


def _describe(hint: Any, plural: bool = False, none: str = "null") -> str:
    """What an annotation asks for, in words: ``tuple[float, ...]`` -> "a list of numbers";
    ``none``: how the reader writes None (YAML: null)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is types.UnionType:
        return f"{_describe(_not_none(args), plural)} or {none}"
    if origin is tuple:
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}"
    if origin is dict:
        return f"{'mappings' if plural else 'a mapping'} of names to {_describe(args[1], True)}"
    return _TYPE_NAMES[hint][plural]


def _number_hint(value: Any, hint: Any) -> str:
    """PyYAML reads ``3e-3`` (no dot, YAML 1.1) and quoted numbers as text: say how to write it."""
    if not isinstance(value, str) or hint not in (float, float | None):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    return f" (YAML reads it as text; write {number!r})" if math.isfinite(number) else ""


def check_fields(config: Any) -> None:
    """Check every field of the dataclass instance ``config`` against its annotation, in place:
    NumPy numbers become Python ones, paths strings and lists tuples (frozen or not)."""
    for name, hint in get_type_hints(type(config)).items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, _typed(value, hint))
        except _WrongType:
            raise PretrainReuseError(
                f"{name} must be {_describe(hint, none='None')}, got {value!r}") from None


def parse_sweep(specs: list[str], hints: dict[str, Any], flag: str, example: str
                ) -> dict[str, list[Any]]:
    """The fields and values of a sweep flag given as ``FIELD=V1,V2`` strings, each value typed
    like the field it sets (``hints``: the fields' annotations; an ``X | None`` field takes X
    values): ``["lr=0.001,0.01", "lam=0.3,1"]`` -> ``{"lr": [0.001, 0.01], "lam": [0.3, 1.0]}``.

    ``flag`` names the flag in errors and ``example`` is a valid spec of it. A field named twice,
    a value repeated (it would be run twice) and a field that is not a number or a string are
    one line each."""
    sweep: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise PretrainReuseError(f"{flag} {spec!r}: write FIELD=V1,V2 (e.g. {example})")
        check_choice(f"{flag} field", name, hints)
        if name in sweep:
            raise PretrainReuseError(f"{flag} names {name!r} twice; list all its values in one "
                                     f"{flag} {name}=V1,V2")
        hint = hints[name]
        cast = _not_none(get_args(hint)) if get_origin(hint) is types.UnionType else hint
        if cast not in (int, float, str):
            raise PretrainReuseError(f"{flag} cannot vary {name!r}; vary a number or a string field")
        try:
            sweep[name] = [cast(v.strip()) for v in values.split(",")]
        except ValueError:
            raise PretrainReuseError(f"{flag} {spec!r}: the values must be of type {cast.__name__}") from None
        if len(set(sweep[name])) < len(sweep[name]):
            raise PretrainReuseError(f"{flag} {spec!r} repeats a value; each would be run twice")
    return sweep
