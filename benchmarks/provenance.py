"""Where a result came from (the commit of the code, the machine, the command that repeats it), and the
results CSV files the studies keep."""

import csv
import io
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moco.files import write_text

# The x86 vector extensions that decide fp32 and bf16 speed on a CPU.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit hash of the checkout, with "+dirty" when the code (src/, benchmarks/, pyproject.toml)
    differs from it: results files and docs that a measurement itself rewrites do not count."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)src",
                                ":(top)benchmarks", ":(top)pyproject.toml"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command(name: str) -> str:
    """The command line of this run, as a user would type it."""
    return " ".join(["python -m benchmarks", *(sys.argv[1:] or [name])])


def machine() -> str:
    """One line: CPU model, torch threads, torch version."""
    info = machine_info(torch.device("cpu"))
    return f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}"


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, vector extensions, torch version and threads, device (and GPU name)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "isa": [f for f in _ISA_FLAGS if f in flags],
                            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["slug"] = machine_slug(info)
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of a machine, e.g. intel-xeon-processor-2c (or the GPU's name on CUDA). CPUs sold
    under one name differ in their matrix units: "-amx" marks those with AMX (bf16 tiles)."""
    amx = "-amx" if "amx_bf16" in info.get("isa", []) else ""
    name = info.get("gpu") or f"{info['cpu']}{amx}-{info['cores']}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*?(?=-\d+c$|$)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")




def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results CSV (none if it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A results CSV, written atomically (after every run: an interrupted study keeps what it measured)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
