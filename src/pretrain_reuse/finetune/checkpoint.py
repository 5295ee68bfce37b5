"""Training checkpoints as safetensors: any nested state (model, optimiser, RNG) without pickle.

A state is a tree of dicts, lists and tuples whose leaves are tensors or JSON values. Tensors go
into the safetensors body under generated keys; the tree itself, with each tensor replaced by its
key, goes into the header as JSON. Loading never executes code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..artifacts import atomic_path, read_safetensors, to_json
from ..errors import PretrainReuseError

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):  # keys may be ints (optimiser state), so keep them typed
        return {_DICT: [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _DICT in obj:
            return {k: _decode(v, tensors) for k, v in obj[_DICT]}
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a nested state atomically (temp file, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": to_json(tree), "artifact": "checkpoint"})
    return Path(path)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, with every per-parameter state tensor (SGD's momentum
    buffers) laid out in memory as its parameter is.

    A checkpoint stores tensors contiguous, and ``load_state_dict`` keeps that layout, while the
    training loop's parameters are channels-last: the optimiser's batched (``foreach``) update
    needs every buffer to have its parameter's strides, and would fall back to one update per
    tensor for the rest of the run. The values are copied unchanged, so a resumed run stays
    bit-identical."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            per_param = optimizer.state.get(param, {})
            for key, value in list(per_param.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    per_param[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state`; a corrupt file is a clear error."""
    fix = "delete it to restart the run"
    tensors, header = read_safetensors(path, "checkpoint", fix, framework="pt",
                                       artifact="checkpoint")
    try:
        return _decode(json.loads(header["state"]), tensors)
    except (ValueError, KeyError) as e:
        raise PretrainReuseError(f"checkpoint {str(path)!r} is unreadable ({e}); {fix}") from None
