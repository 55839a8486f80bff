"""The GPU check's dry run (`python -m benchmarks gpu-check --device cpu`): every step runs at tiny sizes, so the
script that a lent GPU will run unchanged can't rot between visits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser
from benchmarks.gpu_check import publish

ROOT = Path(__file__).resolve().parents[1]


def test_the_help_says_what_it_measures_and_how_long_it_takes():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["gpu-check"]
    text = sub.format_help()
    for words in ("8", "budget", "throughput", "reference", "out-of-memory", "NCCL", "data path", "time to accuracy",
                  "dry run"):
        assert words in text, words


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_publishes(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu-check", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert steps["environment"]["matmul_peak_bf16_tflops"] > 0
    assert steps["tests"]["failures"] == steps["tests"]["errors"] == 0 and steps["tests"]["tests"] >= 9
    assert steps["tests"]["cases"]["test_the_augmentation_on_the_device_equals_the_cpu_one_on_the_same_parameters"] \
        == "passed"
    models = {row["model"]: row["entry"] for row in steps["throughput"]}
    assert all("result" in entry for entry in models.values()), models
    assert models["small CNN, 28 px"]["result"]["speedup"] > 0  # the reference ran beside ours
    assert steps["data"]["result"]["ours_img_s"] > 0 and steps["data"]["decode_on_device"]["img_s"] > 0
    assert steps["accuracy"][0]["entry"]["result"]["ours"]["curve"][-1]["knn_top1"] > 10  # better than chance
    assert (out / "summary.md").is_file() and (out / "log.txt").is_file() and (out / "tests.xml").is_file()
    page = publish(out / "results.json", tmp_path / "docs" / "benchmarks")
    assert "small CNN" in page.read_text() or "Throughput" in page.read_text()
