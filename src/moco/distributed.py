"""torch.distributed for MoCo: process-group set-up from torchrun's environment, and the collectives
the algorithm needs (gather of keys, a shared permutation).

One process per device, started by `torchrun` (never by this package). With one process every
function here degrades to its single-process meaning, so the model code has one path.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str = "auto") -> torch.device:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    Backend: NCCL with one GPU per process when CUDA is available (and not refused by `device`), gloo on
    CPUs. Without torchrun's environment (WORLD_SIZE unset or 1) nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or is_distributed():
        return torch.device("cpu")  # the caller resolves the device itself
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of `x` (B, ...) from every process in rank order, (W*B, ...); no gradient."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`x` replaced, in place, by process `src`'s `x`."""
    if is_distributed():
        dist.broadcast(x, src)
    return x


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if `flag` is True on any: to agree on stopping at the same step."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object) -> list:
    """`obj` of every process, in rank order (e.g. RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
