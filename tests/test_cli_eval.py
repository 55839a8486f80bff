"""The evaluation commands end to end through the command line, on a real tiny checkpoint."""

import numpy as np
import pytest

from moco import config as C
from moco.cli import main
from moco.pipeline import pretrain


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "dim": 16, "queue_size": 256, "bn_splits": 4,
                                                  "train_subset": 1024, "epochs": 2, "knn_every": 1,
                                                  "out_dir": str(out), "progress": False})
    pretrain(cfg, baselines=False, echo=lambda s: None)
    return out


def rows(text: str) -> dict[str, float]:
    """{name: top-1} of the result lines a command prints."""
    out = {}
    for line in text.splitlines():
        if "top-1" in line and line.startswith("  "):
            name = line.split("  top-1")[0].split("  best top-1")[0].strip()
            out[name] = float(line.split("top-1")[1].split("%")[0])
    return out


def test_knn_command_prints_the_encoder_and_both_baselines(run_dir, capsys):
    assert main(["knn", str(run_dir / "checkpoint.pt"), "--k", "20", "--device", "cpu"]) == 0
    result = rows(capsys.readouterr().out)
    assert len(result) == 3 and "raw pixels" in result and "random encoder" in result
    assert all(0 < v <= 100 for v in result.values())


def test_knn_command_majority_vote(run_dir, capsys):
    assert main(["knn", str(run_dir / "checkpoint.pt"), "--k", "5", "--vote", "majority", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = rows(out)
    assert "majority of the 5 cosine-nearest" in out and "top-5" not in out
    assert len(result) == 3 and all(0 < v <= 100 for v in result.values())


def test_lincls_command_prints_the_encoder_and_both_baselines(run_dir, capsys):
    assert main(["lincls", str(run_dir / "checkpoint.pt"), "--epochs", "2", "--lr-steps", "1", "--no-progress",
                 "--batch-size", "1024", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = rows(out)
    assert len(result) == 3 and "linear classification on fashion-mnist/test" in out
    assert result["raw pixels"] > 60  # a linear classifier on pixels is a strong baseline


@pytest.mark.parametrize("command", ["knn", "lincls", "embed", "report"])
def test_evaluation_help_prints(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: moco {command}")
    if command == "lincls":  # a "%" in a help text must not break argparse's formatting
        assert "--lr-search" in out and "held-out 10%, the one" in " ".join(out.split())


def test_embed_and_report_commands(run_dir, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    assert main(["embed", str(run_dir / "checkpoint.pt"), "fashion-mnist", "--split", "test", "--out", str(out)]) == 0
    feats = np.load(out)
    assert feats.shape == (10000, 32) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-4)
    assert main(["report", str(run_dir), "--tsne-points", "300", "--queries", "2", "--neighbours", "3"]) == 0
    assert (run_dir / "report" / "report.html").is_file()
