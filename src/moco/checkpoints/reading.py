"""Reading a file that claims to be a checkpoint: once, safely, and with an error that says what it is.

`torch.load(weights_only=True)` can never run code from a file, but what it says about a file it refuses
is advice to load it unsafely. `read_state` names the problem instead: not a PyTorch file at all, a file
cut short, or one that holds Python objects beyond tensors and plain values.
"""

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

_ZIP = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY = b"\x80\x02"  # a pickle, protocol 2: the format before it


def is_safetensors(path: Path) -> bool:
    """Whether `path` starts like a safetensors file: an 8-byte header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_state(path: str | Path) -> dict[str, Any]:
    """The dict a `torch.save` file holds, loaded on the CPU without unpickling code; CheckpointError else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file (a run folder's is checkpoint.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith((_ZIP, _LEGACY)):
        raise CheckpointError(f"{path} is not a checkpoint: it is not a file written by torch.save "
                              f"(it starts with {head!r}); pass a .pt/.pth/.tar checkpoint or a .safetensors export")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found[1]})" if found else ""
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain values{what}, which moco never loads (loading "
            "them can run code); save the model's state_dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state
