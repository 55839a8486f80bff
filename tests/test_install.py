"""A lean install: the base dependencies pretrain; each optional feature names the extra that installs it.

The commands run in a child Python whose packages are this environment's minus the optional ones (a folder of
links to site-packages without them, Python started with -S), as on a machine that installed no extra.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from moco.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
# The optional packages' folders in site-packages (with their .dist-info and their own helpers).
OPTIONAL = ("matplotlib", "mpl_toolkits", "sklearn", "scikit_learn", "tensorboard", "pycocotools", "webdataset",
            "timm")


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """A folder of links to every entry of site-packages but the optional packages."""
    site, folder = Path(torch.__file__).parents[1], tmp_path_factory.mktemp("lean-site")
    for entry in site.iterdir():
        if not entry.name.lower().startswith(OPTIONAL) and not entry.name.endswith(".pth"):
            (folder / entry.name).symlink_to(entry)
    return folder


def run(lean: Path, *argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from moco.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": f"{lean}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.run([sys.executable, "-S", "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_base_dependencies_are_the_lean_list_and_every_extra_exists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]]
    assert sorted(names) == sorted(["torch", "torchvision", "numpy", "pyyaml", "tqdm", "safetensors", "pillow"])
    extras = project["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras) and "all" in extras


def test_the_lean_environment_lacks_the_optional_packages(lean):
    code = "import importlib.util as u; print([m for m in ('matplotlib', 'sklearn', 'timm') if u.find_spec(m)])"
    env = {**os.environ, "PYTHONPATH": str(lean)}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_pretraining_and_evaluation_need_no_extra(lean, tmp_path):
    r = run(lean, "pretrain", "--preset", "smoke", "--train-subset", "512", "--tensorboard", "--out-dir", str(tmp_path),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "TensorBoard events are off" in r.stderr and "momentum-contrast[tensorboard]" in r.stderr
    assert (tmp_path / "checkpoint.pt").is_file()
    r = run(lean, "knn", str(tmp_path / "checkpoint.pt"), "--k", "5", "--no-baselines")
    assert r.returncode == 0 and "top-1" in r.stdout, r.stderr
    r = run(lean, "export", str(tmp_path / "checkpoint.pt"), "--format", "safetensors", "--out", str(tmp_path / "e.st"))
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def run_dir(lean, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    r = run(lean, "pretrain", "--preset", "smoke", "--train-subset", "256", "--out-dir", str(out), "--no-progress",
            "--no-baselines")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("argv,extra", [
    (["report", "{run}"], "report"),
    (["shard", "{tmp}", "{tmp}/shards"], "shards"),
    (["pretrain", "--dataset", "digits", "--preset", "smoke", "--out-dir", "{tmp}/digits"], "report"),
    (["finetune", "scenes", "{tmp}/scenes", "--train-scenes", "2", "--test-scenes", "1"], "transfer"),
    (["export", "{run}/checkpoint.pt", "--format", "timm", "--out", "{tmp}/t.pth"], "timm"),
])
def test_each_optional_feature_names_its_extra(lean, run_dir, tmp_path, argv, extra):
    r = run(lean, *(a.format(run=run_dir, tmp=tmp_path) for a in argv))
    assert r.returncode == 2, (argv, r.stderr)
    assert f"pip install 'momentum-contrast[{extra}]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
