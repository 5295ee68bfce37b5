"""What every artifact shares: its metadata block, atomic writes, content hashes, and ``load``.

Every file the package writes carries ``meta``: the producer, its parameters, hashes of its inputs,
the seed, the package version and the numerical environment. Files are written to a temporary
name in the target folder and renamed into place, so an interrupted run never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import glob
import hashlib
import importlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None

from . import __version__
from .errors import PretrainReuseError, check_file, check_regular_file


def make_meta(producer: str, params: dict[str, Any], *, inputs: dict[str, str] | None = None,
              seed: int | None = None) -> dict[str, Any]:
    """The metadata block of an artifact (JSON-serialisable)."""
    return {
        "producer": producer,
        "params": _jsonable(params),
        "inputs": dict(inputs or {}),
        "seed": seed,
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # the device the params name, if any: the GPU that computed, not the current one
        "environment": environment(params.get("device") if isinstance(params, dict) else None),
    }


def environment(device: Any = None) -> dict[str, Any]:
    """What besides the seed decides the numbers: library versions and the CPU thread count (a
    parallel reduction sums in an order that depends on the threads, so a CPU run repeats
    bit for bit only with as many threads). torch is described only if something imported it.
    ``gpu`` names the GPU of ``device`` (None for the CPU), or the current GPU where no device
    is given (None without one)."""
    env: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                           "machine": platform.machine()}
    torch = sys.modules.get("torch")
    if torch is not None:
        on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        # by its own index: cuda:1 of a host of mixed GPUs is not the current device, GPU 0
        gpu = torch.cuda.get_device_name(None if device is None else torch.device(device)) \
            if on_gpu else None
        env.update(torch=torch.__version__, threads=torch.get_num_threads(), gpu=gpu)
    return env


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)) and math.isinf(x):
        return str(float(x))  # "inf" (e.g. a hard marginal, tau = inf): JSON has no infinity
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def hash_array(x: np.ndarray) -> str:
    """Short content hash of an array (dtype, shape and bytes in C order).

    Hashed in blocks of rows: a Fortran-order or strided memmap is copied one block at a time,
    never whole (at 1.3M x 128 float32, 665 MB of RAM).
    """
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    if x.ndim == 0:
        x = x.reshape(1)
    rows = max(1, (1 << 24) // max(1, x[:1].nbytes))  # about 16 MB per block
    for s in range(0, len(x), rows):
        h.update(np.ascontiguousarray(x[s:s + rows]).reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()[:16]


def hash_file(path: str | Path) -> str:
    """Short content hash of a file (or of a FeatureStore folder's index)."""
    p = Path(path)
    if p.is_dir():
        p = p / "index.json"
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The file ends up with the mode a plain ``open(path, "w")`` gives (``0o666`` less the umask),
    whatever the block's writer does to the temporary file. ``path`` being an existing folder is
    refused before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise PretrainReuseError(
            f"output {str(path)!r} is a folder; pass a file path, such as a new file name inside it"
        )
    parent = path.parent if str(path.parent) else Path(".")
    _refuse_file_on_the_way(path)  # mkdir would say only "File exists"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_orphan_temps(parent, path.name)  # a killed earlier write of this file
        tmp_path, mode = _create_temp(parent, path.name)
    except OSError as e:
        raise PretrainReuseError(
            f"cannot write {str(path)!r}: {e.strerror}; choose a writable output path"
        ) from None
    try:
        yield tmp_path
        # Set again: a writer may replace the temporary file with its own (safetensors writes a
        # file of its own, mode 0600, and renames it onto the path it was given).
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def link_file(source: str | Path, path: str | Path) -> None:
    """Make ``path`` a hard link to ``source`` (a copy on a file system without hard links),
    replacing what is there in one rename: a reader never sees half a file."""
    source, path = Path(source), Path(path)
    tmp, _ = _create_temp(path.parent, path.name)  # a free name that remove_orphan_temps knows
    try:
        tmp.unlink()  # os.link makes the name itself
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_temp(parent: Path, name: str) -> tuple[Path, int]:
    """Create an empty ``parent/.name.<owner>.<random>.tmp`` and return it with its permission
    bits; ``<owner>`` names the writing process (see :func:`remove_orphan_temps`).

    Created with ``os.open(..., 0o666)`` rather than ``mkstemp`` (always 0600) so that the kernel
    applies the umask (and a default ACL) exactly as for a plain ``open``; reading the umask in
    Python would mean setting it, which races with other threads.
    """
    for _ in range(100):  # as mkstemp does; with 64 random bits a clash is all but impossible
        tmp = parent / f".{name}.{_host_tag()}-{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {name!r} in {str(parent)!r}")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


#: A temporary file of :func:`atomic_path`: ``.<name>.<host>-<pid>.<random>.tmp``; the owner part
#: is absent in the files of versions before it.
_TEMP = re.compile(r"^\..+?(?:\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+))?\.[0-9a-f]{16}\.tmp$")


def remove_orphan_temps(folder: Path, name: str | None = None) -> None:
    """Delete the temporary files under ``folder`` (only those for the file ``name`` directly in
    it, if given) whose writer is gone: a process killed while writing (``kill -9``, a power
    cut) leaves its temporary file behind, and a rerun must neither mistake it for someone
    else's file nor keep it (a model checkpoint's can be hundreds of MB). Files of live
    processes on this host (the other ranks of a torchrun job) and of other hosts (a shared file
    system) are left alone."""
    if not folder.is_dir():
        return
    here = _host_tag()
    for path in folder.glob(f".{glob.escape(name)}.*.tmp") if name else folder.rglob(".*.tmp"):
        m = _TEMP.match(path.name)
        if m is None or (m["host"] is not None and (m["host"] != here or _alive(int(m["pid"])))):
            continue
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def to_json(obj: Any) -> str:
    """JSON text of ``obj`` (numpy scalars and paths converted, infinities written as "inf"; NaN
    refused)."""
    try:
        return json.dumps(_jsonable(obj), indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:  # a NaN or an array, e.g. in metadata a caller gave
        raise PretrainReuseError(
            f"cannot write as JSON: {e}; metadata and parameters may hold numbers (not NaN), "
            "strings, lists and dicts only") from None


#: Entries of a metadata block that say when a result was made and how long it took, not what
#: was computed: two runs of the same seed differ there, and ``==`` leaves them out.
CIRCUMSTANTIAL_META = ("created", "train_seconds")


class ValueEquality:
    """``==`` by value for a dataclass with array fields (declared with ``eq=False``, so that
    the generated ``__eq__``, which cannot compare arrays, is not made): fields are equal as
    :func:`same_values` says, a ``meta`` field less its :data:`CIRCUMSTANTIAL_META` (the same
    computation repeated a second later is equal). Such objects are not hashable, as they
    compare by value."""

    __hash__ = None

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented

        def value(obj, name: str):
            x = getattr(obj, name)
            if name == "meta" and isinstance(x, dict):
                return {k: v for k, v in x.items() if k not in CIRCUMSTANTIAL_META}
            return x

        return all(same_values(value(self, f.name), value(other, f.name))
                   for f in dataclasses.fields(self))


def same_values(a: Any, b: Any) -> bool:
    """Whether two values are equal: dicts, lists and tuples item by item; arrays (and what NumPy
    reads as one) by shape and element, NaN equal to NaN; other values by ``==``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(same_values, a, b))
    if hasattr(a, "__array__") or hasattr(b, "__array__"):
        x, y = np.asarray(a), np.asarray(b)
        return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc" and y.dtype.kind in "fc"))
    return bool(a == b) or (a != a and b != b)  # NaN


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(obj) + "\n")


def claim_folder(out: Path, kind: str, params: dict, *, what: str, marker: str = "run.json",
                 early: tuple[str, ...] = ()) -> None:
    """Mark the folder ``out`` as holding a ``kind`` made with ``params`` (the JSON file
    ``out/marker``), so that rerunning the same command resumes it.

    Refused, with one line naming ``what`` the folder should hold ("a demo run"): ``out`` is a
    file; ``out`` holds a run made with other ``params`` (the changed keys are named), as resuming
    would mix two runs' outputs; ``out`` holds anything else (:func:`make_run_folder`, which lets
    ``early`` files through).
    """
    params = json.loads(to_json(params))  # as stored: tuples become lists
    path = make_run_folder(out, what, marker, early, kind=kind)
    if path.exists():
        old_params = read_json(path, f"the marker of {what}").get("params", {})
        if old_params != params:
            changed = _changed_keys(params, old_params)
            raise PretrainReuseError(
                f"{str(out)!r} holds {what} made with other settings or inputs "
                f"({', '.join(changed)}); rerun with the same settings and inputs to resume, or "
                "pass another out folder (--out)")
        return
    write_json(path, {"kind": kind, "params": params})


def _changed_keys(new: dict, old: dict) -> list[str]:
    """The keys whose values differ, nested ones by their dotted path (``config.batch_size``)."""
    return [key for key, _, _ in _changes(new, old)]


def _changes(new: dict, old: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key whose values differ; a missing key's
    value is None."""
    changed = []
    for k in sorted(set(new) | set(old)):
        a, b = new.get(k), old.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changed.append((prefix + k, b, a))
    return changed


def describe_changes(new: dict, old: dict, *, shown: int = 3, width: int = 40) -> str:
    """The settings that differ between ``old`` and ``new``, for a message: each by its dotted
    key with its old and new value as JSON cut to ``width`` characters (``samples: 4 before, 2
    now; models.finetuned.state: "sha256:1c0…" before, ...``), the first ``shown`` of them and
    how many more."""
    def short(value: Any) -> str:
        text = json.dumps(_jsonable(value))
        return text if len(text) <= width else text[:width - 1] + "…"

    changes = _changes(new, old)
    parts = [f"{key}: {short(a)} before, {short(b)} now" for key, a, b in changes[:shown]]
    more = len(changes) - shown
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def make_folder(out: Path, what: str) -> Path:
    """Create the output folder ``out`` for ``what``; a file in its place or a folder that cannot
    be created (read-only, no permission) is a one-line error."""
    if out.exists() and not out.is_dir():
        raise PretrainReuseError(f"out (--out) {str(out)!r} is a file; pass a folder for {what}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PretrainReuseError(f"cannot create out (--out) {str(out)!r}: {e.strerror}; choose a "
                                 "writable folder") from None
    return out


#: What an output folder holds, in words, by the ``kind`` its marker (or index) records.
FOLDER_KINDS = {"finetune-run": "a fine-tuning run", "grid-run": "a grid search",
                "experiment-run": "an experiment", "demo-run": "a demo run",
                "features": "a FeatureStore", "embedding": "an embedding",
                "explanations": "an explanation run", "knowledge-report": "a knowledge analysis",
                "sensitivity-run": "a knowledge sensitivity analysis"}

#: The files that say what an output folder holds (a FeatureStore's index before its marker).
FOLDER_MARKERS = ("run.json", "index.json", "embed.json", "explain.json", "knowledge.json")


#: The run folders this process has locked (:func:`lock_folder`), each with the open directory
#: whose lock it holds (closing it unlocks).
_LOCKED: dict[Path, int] = {}


def lock_folder(out: Path, what: str) -> Path:
    """Create the folder ``out`` for ``what`` (:func:`make_folder`) and return it, locked
    against other processes until the call of a
    :func:`releases_folders` function that locked it returns: two commands writing one run
    folder at once (the same command started twice, a second experiment on a running one's
    folder) would overwrite each other's checkpoints and delete each other's files.

    A folder another process holds is a one-line error. The lock is the kernel's (``flock`` on
    the folder), so a process killed in any way leaves none behind (its data-loading workers,
    which inherit it, hold it until they exit, seconds later). Only the first process of a
    distributed job locks (the others write into the same folder by design), and a folder that
    cannot be locked (NFS and some other network mounts, a folder without read permission) is
    left unlocked.
    """
    key = make_folder(out, what).resolve()
    if key in _LOCKED or fcntl is None or _process_rank() != 0:
        return out
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return out
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise PretrainReuseError(
                f"out (--out) {str(out)!r} is in use by another process writing {what} there; "
                "wait for it to finish (then rerun to resume or reuse it), or pass another "
                "folder") from None
        return out  # no locks on this file system
    _LOCKED[key] = fd
    return out


def folder_in_use(folder: Path) -> bool:
    """Whether another process holds the lock of ``folder`` (:func:`lock_folder`): a command is
    writing there now. False where locks do not work (as :func:`lock_folder` leaves such folders
    unlocked) and for a folder this process locked."""
    key = Path(folder).resolve()
    if key in _LOCKED or fcntl is None:
        return False
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return False
    try:  # a shared lock is granted unless someone holds the exclusive one; closing drops it
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def _process_rank() -> int:
    """This process's rank in a distributed job: its process group's where one is started (also
    by ``mp.spawn`` or ``srun``, which may set no ``RANK``), else torchrun's ``RANK``, else 0."""
    torch = sys.modules.get("torch")  # only a process that imported torch can be in a group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def releases_folders(fn):
    """Decorate a function that writes run folders: when it returns or raises, the folders it
    locked (:func:`lock_folder`) are unlocked, those an outer call locked stay locked. (A warning
    raised in its body names its caller with ``stacklevel=3``: this wrapper is a frame.)"""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = set(_LOCKED)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_LOCKED) - before:
                os.close(_LOCKED.pop(key))
    return run


def make_run_folder(out: Path, what: str, marker: str, early: tuple[str, ...] = (), *,
                    kind: str) -> Path:
    """Create the folder ``out`` for ``what``, locked (:func:`lock_folder`), and return the
    path of its marker file ``out/marker``, which records ``kind`` once written.

    Refused, naming what the folder holds where its markers tell: a marker of another kind (a
    demo's ``run.json`` for a fine-tuning run), as the run would take that folder for a run of
    its own; a non-empty folder without the marker, which holds someone else's files that a run
    would mix with its own or delete as stale, unless it holds only ``early`` (files a run writes
    before its marker, left by a run stopped in between). A marker that records no kind (an
    earlier version's) or cannot be read is left to the caller."""
    path = lock_folder(out, what) / marker
    remove_orphan_temps(out)
    # what is left of temporary files is being written now (another rank of this job). Listed
    # before the marker is looked for: a run writes its files (but early ones) after its marker,
    # so that another rank of the job that sees them sees the marker too
    foreign = any(p.name not in early and not _TEMP.match(p.name) for p in out.iterdir())
    found = _json_entry(path)
    if (foreign and not path.exists()) or found not in (None, kind):
        holds = _holds(out)
        raise PretrainReuseError(
            f"out (--out) {str(out)!r} "
            + (f"holds {holds}, not {what}" if holds else f"is not empty and not {what}")
            + "; pass a new or empty folder")
    return path


def _holds(folder: Path) -> str | None:
    """What ``folder`` holds by its markers, in words (:data:`FOLDER_KINDS`); None when none
    says."""
    kinds = (_json_entry(folder / name) for name in FOLDER_MARKERS)
    return next((FOLDER_KINDS[k] for k in kinds if k in FOLDER_KINDS), None)


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object, turning a corrupt file into a clear error."""
    p = check_regular_file(what, path)
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainReuseError(f"{what}: {str(p)!r} is not valid JSON ({e}); regenerate it") from None
    if not isinstance(obj, dict):
        raise PretrainReuseError(f"{what}: {str(p)!r} does not hold a JSON object; regenerate it")
    return obj


def require_keys(record: dict, keys: tuple[str, ...], path: str | Path, what: str) -> None:
    """A record read from ``path`` missing one of ``keys`` is a clear error, not a KeyError."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise PretrainReuseError(f"{str(path)!r} is not a complete {what} (no {missing[0]!r}); it "
                                 "was cut short or written by something else: regenerate it")


def encode_ids(ids: list[str]) -> np.ndarray:
    """Sample ids as one uint8 array (newline-joined UTF-8), storable in safetensors."""
    if any("\n" in s for s in ids):
        raise PretrainReuseError("sample ids must not contain newlines; rename those files")
    return np.frombuffer("\n".join(ids).encode(), dtype=np.uint8).copy()


def decode_ids(blob: np.ndarray, n: int, source: str | Path) -> list[str]:
    try:
        ids = bytes(blob).decode().split("\n") if n else []
    except UnicodeDecodeError:
        ids = None
    if ids is None or len(ids) != n:
        found = "sample ids that are not UTF-8" if ids is None else f"{len(ids)} sample ids"
        raise PretrainReuseError(
            f"{str(source)!r} stores {found} for {n} rows; the file is corrupt, rebuild it")
    return ids


def read_safetensors(path: str | Path, what: str, fix: str, *, framework: str = "numpy",
                     artifact: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors and the header metadata of a ``.safetensors`` file (nothing is unpickled).

    A missing, truncated or foreign file (header ``artifact`` other than ``artifact``, when given)
    is a :class:`PretrainReuseError` naming ``what`` and the ``fix``.
    """
    from safetensors import SafetensorError, safe_open

    p = check_regular_file(what, path)
    try:
        with safe_open(str(p), framework=framework) as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainReuseError(
            f"{what} {str(p)!r} is corrupt: not a readable safetensors file ({e}); {fix}") from None
    if artifact is not None and header.get("artifact") != artifact:
        raise PretrainReuseError(f"{str(p)!r} is not {_a(artifact)} file written by pretrain-reuse; {fix}")
    return tensors, header


def safetensors_header(path: Path) -> dict[str, str] | None:
    """The string metadata of a safetensors file's header; None when the file is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def _safetensors_artifact(path: Path) -> str | None:
    """What a safetensors file holds: its header's ``artifact`` entry, or ``kind`` (model weights
    say ``backbone`` there); None when absent or unreadable."""
    header = safetensors_header(path) or {}
    return header.get("artifact") or header.get("kind")


def _json_record(path: Path) -> dict | None:
    """The JSON record (mapping) in ``path``; None when the file is unreadable, not JSON or not
    a mapping."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _json_entry(path: Path, key: str = "kind") -> Any:
    """The entry ``key`` of a JSON record, such as its ``kind`` (None when absent, or when the
    file is unreadable, not JSON or not a mapping)."""
    record = _json_record(path)
    return None if record is None else record.get(key)


def check_output_file(path: str | Path, suffix: str, artifact: str) -> Path:
    """``path`` as a Path, after checking that an ``artifact`` file can be written there: it ends
    in ``suffix``, it is no folder, no folder on its way is a file, and it does not replace a file
    of another kind (:func:`refuse_foreign`). Commands call it before their work, so that a
    mistyped ``--out`` fails at once, not after minutes of clustering."""
    path = Path(path)
    if path.is_dir():
        raise PretrainReuseError(f"output {str(path)!r} is a folder; pass a file path ending in "
                                 f"{suffix}, such as a new file name inside it")
    if path.suffix.lower() != suffix:
        raise PretrainReuseError(f"{artifact} files are saved as {suffix}, got {str(path)!r}; pass "
                                 f"a path ending in {suffix}")
    _refuse_file_on_the_way(path)
    refuse_foreign(path, artifact)
    return path


def _refuse_file_on_the_way(path: Path) -> None:
    """Refuse ``path`` when a folder it would be written into is an existing file."""
    for folder in path.parents:
        if folder.is_file():
            raise PretrainReuseError(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not "
                                     "a folder; choose another output path")


def refuse_foreign(path: str | Path, artifact: str) -> None:
    """Refuse to replace an existing file that is not an ``artifact`` of the same kind (the
    ``artifact`` entry of a safetensors header, the ``kind`` of a JSON file): a mistyped
    ``--out`` must not destroy a trained model or a result."""
    path = Path(path)
    if not path.is_file():
        return
    found = _safetensors_artifact(path) if path.suffix.lower() == ".safetensors" else _json_entry(path)
    if found != artifact:
        raise PretrainReuseError(
            f"{str(path)!r} exists and is not {_a(artifact)} file; choose another output path")


#: What opens as an artifact, for a message about a path that does not: it also reaches the
#: users of the command line (their data arguments), so it does not name ``load``.
OPENS = ("pass an artifact: a FeatureStore, fine-tuning run or experiment folder, Units "
         "(.safetensors or .npy), Interactions (.safetensors), a selection (.json) or a saved "
         "knowledge result (.json)")

#: The knowledge results saved as JSON, by their kind: the module of pretrain_reuse.knowledge and
#: the class in it that loads them.
#: The JSON artifacts that :func:`load` opens by their ``kind`` whatever the file's name:
#: kind -> (module, class).
JSON_ARTIFACTS = {"knowledge-sets": ("knowledge.metrics", "KnowledgeReport"),
                  "knowledge-convergence": ("knowledge.metrics", "Convergence"),
                  "accuracy-correlation": ("knowledge.metrics", "AccuracyCorrelation"),
                  "set-discrimination": ("knowledge.metrics", "SetDiscrimination"),
                  "set-ablation": ("knowledge.metrics", "SetAblation"),
                  "knowledge-sensitivity": ("knowledge.sensitivity", "KnowledgeSensitivity"),
                  "finetune-result": ("finetune.loop", "RunResult"),
                  "experiment": ("experiments", "ExperimentTable")}


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "a units", "an interactions" (the artifacts' names
    starting with u sound like "you")."""
    return f"{'an' if noun[:1].lower() in 'aeio' else 'a'} {noun}"


def load(path: str | Path, *, what: str = "path", lazy: bool = False):
    """Open any artifact of the package and return its typed object.

    A folder with ``index.json`` is a :class:`~pretrain_reuse.features.FeatureStore` (``lazy``:
    its features are read from the shard files when indexed, see
    :meth:`~pretrain_reuse.features.FeatureStore.load`); a
    fine-tuning run folder (or its ``result.json``) a :class:`~pretrain_reuse.finetune.RunResult`;
    an experiment folder (or its ``experiment.json``) an
    :class:`~pretrain_reuse.experiments.ExperimentTable`; a ``.safetensors`` file a
    :class:`~pretrain_reuse.units.Units` or, by its header,
    :class:`~pretrain_reuse.knowledge.Interactions`; ``.npy`` a prototype matrix (as Units); a
    selection ``.json`` file a :class:`~pretrain_reuse.selection.Selection`; a saved
    :class:`~pretrain_reuse.knowledge.KnowledgeReport`, :class:`~pretrain_reuse.knowledge.Convergence`,
    :class:`~pretrain_reuse.knowledge.AccuracyCorrelation`,
    :class:`~pretrain_reuse.knowledge.SetDiscrimination`,
    :class:`~pretrain_reuse.knowledge.SetAblation` or
    :class:`~pretrain_reuse.knowledge.sensitivity.KnowledgeSensitivity` as such. The folders of
    ``explain`` and ``knowledge`` hold one Interactions file per sample, and those of ``demo``
    and ``finetune --grid`` several artifacts: open those. ``what`` is how errors name the
    path (a command line passes its flag); the artifact's type is read from the file.
    """
    p = check_file(what, path)
    _refuse_knowledge_outputs(p)
    # Imported here: these modules sit above this one in the dependency order.
    if p.is_dir():
        for result, marker, holds in (("result.json", "finetune-run", "fine-tuning run"),
                                      ("experiment.json", "experiment-run", "experiment")):
            if (p / result).is_file():
                p = p / result
                break
            if _json_entry(p / "run.json") == marker:
                raise PretrainReuseError(f"{str(p)!r} holds a {holds} that has not finished (no "
                                         f"{result}); rerun its command to resume it")
    if p.name == "result.json":
        from .finetune.loop import RunResult

        return RunResult.load(p)
    if p.name == "experiment.json":
        from .experiments import ExperimentTable

        return ExperimentTable.load(p)
    if p.is_dir() or p.name == "index.json":
        from .features import FeatureStore

        if p.is_dir() and not (p / "index.json").exists():
            raise PretrainReuseError(_what_folder(p))
        return FeatureStore.load(p.parent if p.name == "index.json" else p, lazy=lazy)
    kind = None
    if p.suffix.lower() == ".safetensors":
        header = safetensors_header(p)
        if header is None:
            raise PretrainReuseError(f"{str(p)!r} is not a readable safetensors file (cut short or "
                                     "corrupt); write it again with the command that made it")
        kind = header.get("artifact") or header.get("kind")
    if kind == "interactions":
        from .knowledge.values import Interactions

        return Interactions.load(p)
    if p.suffix.lower() == ".npy" or (p.suffix.lower() == ".safetensors" and kind in (None, "units")):
        from .units import Units

        return Units.load(p)  # None: unreadable, and Units.load says how
    if p.suffix.lower() == ".safetensors":
        weights = "; model weights load with create_backbone(name, weights=path)"
        raise PretrainReuseError(f"{str(p)!r} holds a {kind}, not an artifact to load; {OPENS}"
                                 + (weights if kind == "backbone" else ""))
    if p.suffix.lower() == ".json":
        kind = _json_entry(p)
        if kind in JSON_ARTIFACTS:
            module, name = JSON_ARTIFACTS[kind]
            return getattr(importlib.import_module(f".{module}", __package__), name).load(p)
        if kind not in (None, "selection"):
            raise PretrainReuseError(f"{str(p)!r} holds a {kind!r} record, not an artifact to "
                                     f"load; it is plain JSON (json.load reads it); {OPENS}")
        if kind is None:  # a file cut short is named so (by read_json), not as a selection
            read_json(p, what)
            raise PretrainReuseError(f"{str(p)!r} is JSON but no artifact of this package; "
                                     f"json.load reads it; {OPENS}")
        from .selection import Selection

        return Selection.load(p)
    raise PretrainReuseError(f"do not know how to open {str(p)!r}; {OPENS}")


def _what_folder(p: Path) -> str:
    """Why the folder ``p`` (no ``index.json``, no result of a run) opens as no artifact, as a
    message that says what to pass instead."""
    from .data.datasets import IMG_EXTENSIONS

    kind = _json_entry(p / "run.json")
    if kind == "demo-run":
        return (f"{str(p)!r} is a demo run, a folder of artifacts: pass one of them, such as a "
                "FeatureStore (features_target), Units (units_classes.safetensors) or a "
                "fine-tuning run (finetune/<run>); its numbers are in summary.json once it has "
                "finished (plain JSON, json.load reads it)")
    # by its marker, or by its results in the folder of a version that wrote no marker
    if kind == "grid-run" or _json_entry(p / "grid.json") == "grid":
        return (f"{str(p)!r} is a grid search, a folder of fine-tuning runs (one per combination): "
                "pass one of them; grid.json, once the search has finished, names the one "
                "validation picked (plain JSON, json.load reads it)")
    if kind == "sensitivity-run":
        return (f"{str(p)!r} is a knowledge sensitivity analysis, a folder of knowledge analyses "
                "(one per setting): load its sensitivity.json"
                + ("" if (p / "sensitivity.json").is_file() else
                   " once it has finished (rerun its knowledge --vary command to finish it)"))
    if (p / "embed.json").exists():
        return (f"{str(p)!r} is an unfinished embedding (no index.json yet): rerun its embed "
                "command to finish it")
    # images at its top or in class sub-folders, as image folders are laid out; deeper down lie
    # the figures of a run's parts, not data (glob passes over folders it cannot read)
    if any(f.name.lower().endswith(IMG_EXTENSIONS) for pattern in ("*", "*/*") for f in p.glob(pattern)):
        return (f"{str(p)!r} is a folder of images, not a FeatureStore: embed it first "
                f"(`pretrain-reuse embed --data {p} --out STORE`) and pass the store")
    return f"{str(p)!r} is a folder without index.json, not a FeatureStore; {OPENS}"


def _refuse_knowledge_outputs(p: Path) -> None:
    """The folders of ``explain`` and ``knowledge`` hold many artifacts, not one: say how to open
    them (one sample's interactions, the summary) instead of calling them something else."""
    folder = p if p.is_dir() else p.parent
    one = "pretrain_reuse.load(<folder>/interactions-0000.safetensors) opens one sample's interactions"
    if folder.name == "games" and (folder.parent / "explain.json").is_file():
        raise PretrainReuseError(
            f"{str(p)!r} is a cached game of explain (the model's output on every coalition of "
            f"players; numpy.load or json.load reads it), not an artifact to load; in "
            f"{str(folder.parent)!r}, {one}")
    if p.name == "split.json" and (folder / "run.json").is_file():
        raise PretrainReuseError(f"{str(p)!r} is the record of a fine-tuning run's split (plain "
                                 "JSON, json.load reads it); load the run folder for its result")
    for marker, verb in (("knowledge.json", "knowledge"), ("explain.json", "explain")):
        path = folder / marker
        if (p.is_dir() or p.name == marker) and path.is_file() and _json_entry(path, "finished") is False:
            raise PretrainReuseError(f"{str(p)!r} holds a {verb} run that has not finished (a rerun "
                                     "stopped halfway); rerun its command to finish it")
    if (folder / "knowledge.json").is_file() and (p.is_dir() or p.name == "knowledge.json"):
        raise PretrainReuseError(
            f"{str(p)!r} is the output of knowledge: its numbers are in knowledge.json (plain JSON, "
            "json.load reads it; its figures are beside it), and in each model's folder "
            f"(pretrained/, finetuned/, ...) {one}")
    if (folder / "explain.json").is_file() and (p.is_dir() or p.name == "explain.json"):
        raise PretrainReuseError(f"{str(p)!r} is the output of explain, a folder of per-sample "
                                 f"files: {one}")
