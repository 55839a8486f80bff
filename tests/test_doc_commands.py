"""The manual can't rot: it builds with `mkdocs build --strict`, and every shell command shown in the README and
the recipes runs, at smoke scale (a few images, one epoch), so a renamed flag breaks the build, not the user.

Smoke scale appends flags to each command (argparse keeps the last value of a flag) and points the placeholder
folders (`~/photos`, `/data/imagenet`) at a small folder of real photographs. torchrun commands are parsed by
torchrun's own parser and their `moco pretrain` runs in this one process: GPUs and clusters are not here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.photos import write_photo_folder
from moco.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/recipes.md")
PLACEHOLDERS = ("~/photos", "/data/imagenet", "~/imagenet")
# Set-up and the suite itself: CI runs them (`bash .ci/run` runs `bash scripts/setup`, then these tests).
RUN_BY_CI = {"bash scripts/setup", "bash .ci/run"}
SMOKE = {
    "pretrain": ["--epochs", "1", "--warmup-epochs", "0", "--train-subset", "128", "--batch-size", "64", "--knn-every", "-1",
                 "--no-baselines", "--no-tensorboard"],
    "knn": ["--no-baselines"],
    "lincls": ["--epochs", "1", "--no-baselines"],
}
LARGE_PRESETS = {"v1", "v2", "v3-resnet50", "v3-vit-small", "v3-vit-base"}  # 224 px


def shell_commands(page: Path) -> list[str]:
    """The commands of the page's ```bash blocks: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def smoke(argv: list[str], photos: Path) -> list[str]:
    """`moco` arguments at smoke scale: placeholders pointed at the photo folder, flags appended."""
    argv = [str(photos) if a in PLACEHOLDERS else a for a in argv]
    extra = list(SMOKE.get(argv[0], []))
    if argv[0] == "pretrain":
        preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "cpu"
        if preset in LARGE_PRESETS or "folder" in argv or "shards" in argv:
            extra += ["--image-size", "32"]
    return argv + extra


def moco_arguments(command: str) -> list[str] | None:
    """The `moco` argv of a command line (after `moco`, `.venv/bin/moco` or torchrun's `-m moco`); None for
    commands of other programs."""
    words = shlex.split(command)
    if words[0] == "srun":  # SLURM starts torchrun on each node
        words = words[1:]
    if words[0] in ("moco", ".venv/bin/moco"):
        return words[1:]
    if words[0] in ("torchrun", ".venv/bin/torchrun"):
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])  # torchrun's own flags, as torchrun reads them
        assert args.module and args.training_script == "moco", command
        return args.training_script_args
    return None


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root, 96, "train")
    write_photo_folder(root, 32, "test", seed=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs(page, photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = shell_commands(ROOT / page)
    assert commands, f"no commands found in {page}"
    for command in commands:
        if command in RUN_BY_CI:
            continue
        argv = moco_arguments(command)
        assert argv is not None, f"{page}: a command the test does not know how to run: {command}"
        code = main(smoke(argv, photos))
        assert code == 0, f"{page}: `{command}` exited {code}:\n{capsys.readouterr().err[-2000:]}"


def test_the_manual_builds_strictly(tmp_path):
    """Broken links, missing pages and docstrings that do not parse fail the build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "recipes" / "index.html").is_file() and (tmp_path / "api" / "index.html").is_file()
