"""Checkpoints: complete (everything a resumed run needs), atomic, and safe to load.

A checkpoint is a dict of tensors and plain Python values saved with `torch.save`:
    format, version     what kind of file this is
    config              the run's config as a dict (dataclasses.asdict)
    epoch, step         completed epochs and optimizer steps
    model               MoCo state_dict: encoder_q.*, encoder_k.*, queue, queue_ptr
    optimizer           SGD state (momentum buffers)
    rng                 torch RNG states (CPU, CUDA) of every process, in rank order
    metrics             the last epoch's metrics
    data                channels, crop size, normalisation mean/std: what evaluation must feed the encoder
Loading uses `torch.load(weights_only=True)`, which cannot execute code from the file.
"""

import errno
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = "moco-pretrain"
SUPERVISED = "moco-supervised"  # `moco supervised` checkpoints: the same layout, a backbone + fc model
VERSION = 1
LAST = "checkpoint.pt"
BEST = "checkpoint_best.pt"


def atomic_write(path: str | Path, write: Callable[[Path], object], check: Callable[[Path], None] | None = None) -> Path:
    """Write `path` through `write(tmp)` to a temporary file in the same folder, fsynced, optionally
    `check`ed, then renamed into place (and the folder fsynced).

    A crash at any moment leaves either the previous file or the new one, never a partial one; a failed
    write or check leaves the previous file and no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"the disk is full: could not write {path} ({e.strerror}); the previous {path.name} is intact. "
                "Free some space (or point --out-dir elsewhere) and continue with --resume auto"
            ) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path, kind: str = FORMAT) -> Path:
    """Write `state` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save({"format": kind, "version": VERSION, **state}, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", kind: str = FORMAT) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`; CheckpointError if it is missing, corrupt or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects that a safe load refuses (it may run code), so it was not loaded: {e}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or state.get("format") != kind:
        found = state.get("format", "unknown") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a momentum-contrast {kind} checkpoint (format: {found}); "
            "to evaluate weights from elsewhere use the evaluation commands"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {state.get('version')}; this moco reads version {VERSION}")
    return state


def find_resume(spec: str, out_dir: str | Path) -> Path | None:
    """The checkpoint meant by --resume: a path, a run folder, or `auto`.

    `auto` (and a run folder) take the newest valid checkpoint of the folder, by optimizer step: the
    last one, or a kept one if the last is unreadable. `auto` with none gives None (a new run).
    """
    path = Path(out_dir if spec == "auto" else spec)
    if path.is_dir() or spec == "auto":
        newest = None
        for candidate in sorted(path.glob("checkpoint*.pt")):
            try:
                step = load_checkpoint(candidate)["step"]
            except CheckpointError:
                continue
            if newest is None or step > newest[0]:
                newest = (step, candidate)
        if newest is None and spec != "auto":
            raise CheckpointError(f"--resume {spec}: no valid checkpoint in that folder")
        return None if newest is None else newest[1]
    if not path.is_file():
        raise CheckpointError(f"--resume {spec}: no checkpoint at {path}")
    return path
