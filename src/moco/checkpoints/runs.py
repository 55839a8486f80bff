"""Training checkpoints: complete (everything a resumed run needs), atomic, and safe to load.

A checkpoint is a dict of tensors and plain Python values saved with `torch.save`:
    format, version     what kind of file this is (moco-pretrain, or moco-supervised)
    config              the run's config as a dict (dataclasses.asdict)
    epoch, step         completed epochs and optimizer steps
    model               the method's state_dict (pretraining: encoder_q.*, encoder_k.*, queue.* ...)
    optimizer           optimizer state (momentum buffers)
    rng                 torch RNG states (CPU, CUDA) of every process, in rank order
    metrics             the last epoch's metrics
    data                channels, crop size, normalisation mean/std: what evaluation must feed the encoder
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, warn
from ..files import atomic_write
from .reading import read_state

PRETRAIN = "moco-pretrain"
SUPERVISED = "moco-supervised"  # `moco supervised` checkpoints: the same layout, a backbone + fc model
VERSION = 2  # 2: the key queue is a module (queue.keys, queue.ptr); version 1 files still evaluate and export
ENCODER_VERSIONS = (1, 2)  # versions whose encoder evaluation and export read
LAST = "checkpoint.pt"
BEST = "checkpoint_best.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path, kind: str = PRETRAIN) -> Path:
    """Write `state` to `path` atomically (see `files.atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save({"format": kind, "version": VERSION, **state}, tmp))


def check_checkpoint(state: dict[str, Any], path: str | Path, kind: str = PRETRAIN,
                     versions: tuple[int, ...] = (VERSION,)) -> dict[str, Any]:
    """`state` (read from `path`) if it is a checkpoint of `kind` in one of `versions`; CheckpointError else."""
    if state.get("format") != kind:
        raise CheckpointError(f"{path} is not a momentum-contrast {kind} checkpoint (format: "
                              f"{state.get('format', 'unknown')})")
    if state.get("version") not in versions:
        raise CheckpointError(f"{path} is a version {state.get('version')} {kind} checkpoint, written by another "
                              f"version of moco; this one continues version {VERSION} runs (it still evaluates "
                              "and exports version 1 checkpoints): start a new run")
    return state


def load_checkpoint(path: str | Path, kind: str = PRETRAIN) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`; CheckpointError if it is missing, corrupt or of another kind."""
    return check_checkpoint(read_state(path), path, kind)


@dataclass
class Resume:
    """The checkpoint a run continues from, read once, and the unreadable checkpoints passed over in its folder."""

    path: Path
    state: dict[str, Any]
    unreadable: list[Path] = field(default_factory=list)


def find_resume(spec: str, out_dir: str | Path) -> Resume | None:
    """The checkpoint meant by --resume: a path, a run folder, or `auto` (the run folder `out_dir`).

    A folder gives its newest valid checkpoint by optimizer step: the last one, or a kept one (best,
    every N epochs) when the last is unreadable, with a warning. `auto` with no checkpoint at all gives None
    (a new run); a folder whose checkpoints are all unreadable is an error, so that nothing is overwritten.
    """
    path = Path(out_dir if spec == "auto" else spec)
    if not path.is_dir() and spec != "auto":
        if not path.is_file():
            raise CheckpointError(f"--resume {spec}: no checkpoint at {path}")
        return Resume(path, load_checkpoint(path))
    # The last checkpoint is written at every save, so it is the newest when it can be read; the kept ones
    # (best, every N epochs) are read only when it cannot, one at a time.
    candidates = sorted(path.glob("checkpoint*.pt"), key=lambda p: p.name != LAST) if path.is_dir() else []
    newest: Resume | None = None
    broken: dict[Path, str] = {}
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except CheckpointError as e:
            broken[candidate] = str(e)
            continue
        if newest is None or state["step"] > newest.state["step"]:
            newest = Resume(candidate, state)
        if candidate.name == LAST:
            break
    if newest is None:
        if broken:
            why = next(iter(broken.values()))
            raise CheckpointError(
                f"--resume {spec}: no checkpoint in {path} can be read ({len(broken)} tried; {why}); nothing was "
                f"changed. Move them out of {path} to start a new run there, or use another --out-dir")
        if spec != "auto":
            raise CheckpointError(f"--resume {spec}: no checkpoint in that folder")
        return None
    if broken:
        newest.unreadable = list(broken)
        warn(f"{', '.join(p.name for p in broken)} in {path} cannot be read ({next(iter(broken.values()))}); "
             f"resuming from {newest.path.name} (step {newest.state['step']}), the newest readable checkpoint; the "
             "unreadable files are kept aside as *.unreadable")
    return newest


def set_aside(paths: list[Path]) -> None:
    """Rename unreadable checkpoints to NAME.unreadable (numbered if taken), so that a resumed run's writes never
    replace them."""
    for path in paths:
        target, n = path.with_name(path.name + ".unreadable"), 1
        while target.exists():
            target, n = path.with_name(f"{path.name}.unreadable{n}"), n + 1
        path.rename(target)
