"""Checkpoints: written atomically, read without running code from the file.

Writing: :func:`atomic_save` writes to a temporary file beside the target and renames it,
so a crash mid-write never leaves a corrupt checkpoint (a killed process can leave the
``*.tmp`` file: :func:`clean_stale_temp_files` removes them when a run starts). A write the
storage refuses (disk full, quota, I/O error) removes the temporary file, leaves the previous
checkpoint at the target untouched and raises :class:`CheckpointWriteError` naming the path
and the cause. Payloads are
made plain first: numpy scalars become Python numbers, and RNG states are stored as plain
ints/lists/tensors (:func:`rng_state`), so a checkpoint holds only tensors, dicts, lists,
tuples, str/int/float/bool/None.

Reading: :func:`load_checkpoint` uses ``torch.load(weights_only=True)``: the unpickler
accepts only tensors, storages, dtypes, ``torch.Size`` and plain containers/scalars (the
allow-list below adds nothing: our checkpoints need nothing else). A pickle that names any
other global (``os.system``, a class with ``__reduce__``, a numpy array) is refused before
anything is constructed. Every failure — missing, unreadable, truncated, not a checkpoint,
unsafe content, missing keys, or weights of another architecture
(:func:`load_state_checked`) — raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from cfcml.engine.errors import TrainingFailed

# Globals the weights-only unpickler may construct beyond torch's built-in safe set
# (tensors, storages, dtypes, torch.Size, OrderedDict, plain containers and scalars).
# Empty on purpose: model/optimizer/scheduler/sampler state dicts, RNG states as stored by
# rng_state(), histories of floats and config dicts need nothing more. Add a type here only
# with a test that a checkpoint needs it.
SAFE_GLOBALS: list = []


class CheckpointError(ValueError):
    """A checkpoint cannot be used: the message names the file and what is wrong."""


class CheckpointWriteError(TrainingFailed):
    """The storage refused a checkpoint write (disk full, quota, I/O error): the message names
    the path and the cause; the previous file at the path is left as it was."""

    def __init__(self, message: str, path: Path, errno_: int | None):
        super().__init__(message)
        self.path, self.errno = path, errno_


# --------------------------------------------------------------------------- writing


def to_plain(obj):
    """``obj`` with numpy scalars as Python numbers and numpy arrays as tensors (recursively
    through dicts, lists and tuples), so that ``torch.load(weights_only=True)`` reads it.
    Containers without anything to convert are returned as they are (a module state dict
    keeps its type and ``_metadata``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        new = {k: to_plain(v) for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        out = copy.copy(obj)  # same type, same attributes (OrderedDict._metadata)
        out.update(new)
        return out
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        new = [to_plain(v) for v in obj]
        if all(a is b for a, b in zip(new, obj, strict=True)):
            return obj
        return new if isinstance(obj, list) else tuple(new)
    return obj


def atomic_save(obj, path: Path) -> None:
    """``torch.save(to_plain(obj))`` to ``path`` through a temporary file and a rename (fsynced).

    Raises :class:`CheckpointWriteError` when the storage refuses the write (the previous
    ``path`` is untouched and no temporary file is left); other errors (an unpicklable
    payload) pass through, also leaving nothing behind.
    """
    path = Path(path)
    tmp = stream = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with open(fd, "wb") as f:
            stream = _Recorder(f)
            torch.save(to_plain(obj), stream)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        cause = stream.error if stream is not None and stream.error is not None else e
        if isinstance(cause, OSError) or _is_writer_failure(cause):
            raise _write_error(path, cause) from e
        raise


class _Recorder:
    """A file's ``write``/``flush`` that remember the OSError they raised: torch's writer
    turns a failed write into "unexpected pos ..." without the errno (a full disk, when a
    large tensor is written, or the file name given to ``torch.save``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _is_writer_failure(e: BaseException) -> bool:
    """torch's zip writer failing on the stream (its own wording, no errno)."""
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("inline_container", "PytorchStreamWriter"))


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    code = getattr(e, "errno", None)
    cause = getattr(e, "strerror", None) or _first_line(e, 200)
    if code is not None and code in errno.errorcode:
        cause = f"{cause} ({errno.errorcode[code]})"
    free = _free_space(path.parent)
    full = code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or (
        code is None and free is not None and free < 1 << 20
    )
    hint = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
    advice = (
        "free space there and resume the run (--resume)" if full else "resume the run (--resume) once the storage works"
    )
    message = (
        f"cannot write checkpoint {path}: {cause}{hint}; the previous {path.name} (if any) is unchanged — {advice}"
    )
    return CheckpointWriteError(message, path, code)


def _free_space(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def clean_stale_temp_files(run_dir) -> list[Path]:
    """Remove ``*.tmp`` files directly in ``run_dir`` (left by a process killed mid-write:
    SIGKILL or a default-handled SIGTERM runs no cleanup). Call it when a run starts, before
    anything of that run writes. Symlinks are removed, never followed; sub-folders are left
    alone. Returns what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.glob("*.tmp")):
        if p.is_symlink() or p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as plain data (weights-only safe).

    numpy's legacy MT19937 state ``(name, keys[624] uint32, pos, has_gauss, cached)`` is
    stored as a dict of a str, an int64 tensor and Python numbers.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_python_state(state["python"]))
    np_state = state["numpy"]
    if isinstance(np_state, Mapping):
        keys = np.asarray(np_state["keys"].cpu().numpy() if torch.is_tensor(np_state["keys"]) else np_state["keys"])
        np_state = (
            np_state["bit_generator"],
            keys.astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _python_state(s):
    # (version, tuple of 625 ints, gauss_next); lists after a round trip through some codecs
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- reading

_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand (\d+)")


def _why_refused(e: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, in one short clause."""
    text = str(e)
    m = _UNSUPPORTED_GLOBAL.search(text)
    if m:
        hint = (
            "; checkpoints of cfcml before weights-only loading stored numpy RNG state: train into another --out"
            if m.group(1).startswith("numpy")
            else ""
        )
        return (
            f"it refers to {m.group(1)}, which a checkpoint may not contain (loading it could run code); "
            f"nothing from it was run{hint}"
        )
    m = _UNSUPPORTED_OPCODE.search(text)
    if m:
        return f"it is corrupt or not a PyTorch checkpoint (unexpected pickle opcode {m.group(1)}); nothing from it was run"
    return f"it holds something other than tensors and plain data ({_first_line(e)}); nothing from it was run"


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def load_checkpoint(path, map_location="cpu", *, required: Iterable[str] = ()) -> dict:
    """The dict saved at ``path``, read with ``torch.load(weights_only=True)``.

    ``map_location`` as for ``torch.load``. ``required``: keys the dict must have.
    Raises :class:`CheckpointError` (never a raw traceback) when the file is missing, is a
    directory, cannot be read, is truncated or corrupt, holds anything but tensors and plain
    data (nothing from it is run), is not a dict, or lacks a required key.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write that made it did not finish")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} refused: {_why_refused(e)}") from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
    ) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_line(e, 120)})") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a cfcml checkpoint (a dict)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a cfcml training checkpoint: missing {', '.join(map(repr, missing))} "
            f"(has {', '.join(map(repr, sorted(map(str, state))[:8]))})"
        )
    return state


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) if torch.is_tensor(t) else type(t).__name__


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping) -> str:
    """What differs between ``model`` and a state dict: missing/unexpected keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} ({_shape(state_dict[k])} in the file, {_shape(own[k])} in the model)"
        for k in own
        if k in state_dict and torch.is_tensor(state_dict[k]) and state_dict[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("size mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:2])}{more}")
    return "; ".join(parts)


def load_state_checked(target, state, path, what: str = "model") -> None:
    """``target.load_state_dict(state)``, turning a mismatch into a :class:`CheckpointError`.

    ``target``: a module (compared strictly: every key and shape must match), an optimizer,
    a scheduler or a sampler. The message names the file and, for a module, the first
    differing keys and shapes — typically a checkpoint of another preset or ``--set``.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: '{what}' is a {type(state).__name__}, not a state dict")
    if isinstance(target, torch.nn.Module):
        diff = describe_mismatch(target, state)
        if diff:
            raise CheckpointError(
                f"checkpoint {path} does not fit this {what} ({diff}); it was written by another model "
                "configuration (preset or --set) — use the same configuration or another --out"
            )
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {path}: its {what} state does not fit this run ({_first_line(e, 300)}); it was written by another "
            "configuration — use the same configuration or another --out"
        ) from None
