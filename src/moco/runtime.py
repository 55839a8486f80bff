"""The machine a run uses: device choice, CPU threads, seeding, RNG state."""

import ctypes
import random
import sys

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA if present, else MPS, else CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is unknown; choose auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use device=auto or cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Torch's CPU and CUDA RNG states, as tensors (safe to store with weights_only checkpoints)."""
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that tensors free, instead of handing it back to the kernel.

    A training step frees and reallocates the same activations every step. By default glibc serves
    blocks above a (dynamic) threshold with mmap and unmaps them on free, and trims the top of its
    heap when enough of it is free, so the next step page-faults and zeroes those pages again; which
    of the two happens depends on the order of earlier frees, so it varies from run to run: of nine
    benchmark runs of the default model on 2 cores, one took 963k page faults instead of 248k-289k
    and was the slowest (2,695 img/s against 2,824-3,586); with this setting, 202k-207k.
    With mmap and trimming off, freed blocks are reused: the process keeps its high-water mark of
    memory, which a training process reaches in its first steps anyway. The same effect as running
    under jemalloc or tcmalloc, which PyTorch's CPU tuning guides recommend.

    Returns whether it took effect (glibc on Linux); elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, -1) == 1


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_prefers_bf16(cpuinfo: str | None = None) -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU, judged from its vendor and flags.

    Measured with the default model on 2 cores (`python -m benchmarks bench --no-reference --set precision=...`):
    without native bf16, autocast is emulated and 10-60x slower (an AVX2 Zen 3); on an Intel Xeon with
    AVX512-BF16 but no AMX it was 27% slower (2,254 vs 3,069 img/s), the conversions around the
    normalisation layers costing more than the faster products; on an AMD EPYC Zen 4 with AVX512-BF16
    it was 30-48% faster (3,435-4,738 vs 2,810-3,191 img/s in three interleaved pairs). AMX-BF16 tiles
    (Intel, Sapphire Rapids on) do bf16 products several times faster than fp32 (not measured here).
    So: AMX, or AMD with AVX512-BF16. `cpuinfo`: the text of /proc/cpuinfo (read when None).
    """
    try:
        info = (open("/proc/cpuinfo").read() if cpuinfo is None else cpuinfo).splitlines()
        flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in info)
    return "amx_bf16" in flags or (amd and "avx512_bf16" in flags)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`, or None for fp32.

    auto: bf16 on CUDA GPUs that support it (else fp16) and on CPUs where it pays (`cpu_prefers_bf16`);
    fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_prefers_bf16():
        return torch.bfloat16
    return None
