"""Resuming from the command line: a run folder is never overwritten by mistake, and every refusal says why."""

import pytest

from moco.checkpoints import load_checkpoint
from moco.cli import main
from moco.errors import MocoWarning

COMMON = ["--preset", "smoke", "--width", "4", "--train-subset", "256", "--knn-every", "-1", "--no-progress",
          "--no-baselines"]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *COMMON, "--out-dir", str(out)]) == 0
    return out


def pretrain(out, *argv: str) -> int:
    return main(["pretrain", *COMMON, "--out-dir", str(out), "--resume", "auto", *argv])


def test_an_unreadable_checkpoint_stops_the_run_and_every_file_stays(run_dir, capsys):
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])  # cut short
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert pretrain(run_dir) == 2
    err = capsys.readouterr().err
    assert "can be read" in err and "nothing was changed" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_kept_checkpoint_is_the_fallback(run_dir, capsys):
    assert pretrain(run_dir, "--epochs", "2", "--keep-every", "1") == 0
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.warns(MocoWarning, match=r"resuming from checkpoint_epoch0002.pt \(step 8\)"):
        assert pretrain(run_dir, "--epochs", "3", "--keep-every", "1") == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 3
    assert (run_dir / "checkpoint.pt.unreadable").read_bytes() == b"PK\x03\x04 cut"  # set aside, never overwritten


def test_the_library_resumes_from_a_run_folder(run_dir):
    from moco.checkpoints import load_checkpoint as load
    from moco.config import from_dict
    from moco.pipeline import pretrain as library_pretrain

    cfg = from_dict(load(run_dir / "checkpoint.pt")["config"])
    cfg.optim.epochs = 2
    result = library_pretrain(cfg, resume=run_dir, baselines=False, echo=lambda s: None)
    assert result.epochs == 2 and load(result.checkpoint)["step"] == 8


def test_supervised_ignores_the_methods_fields(tmp_path):
    # supervised pre-training has no queue and no split BN: their fields are not checked
    assert main(["supervised", "--preset", "smoke", "--queue-size", "8", "--bn-splits", "3", "--out-dir",
                 str(tmp_path), "--print-config"]) == 0


def test_a_complete_run_says_there_is_nothing_to_train(run_dir, capsys):
    capsys.readouterr()
    assert pretrain(run_dir) == 0
    assert "the run is complete: 1 of 1 epochs are done, nothing to train" in capsys.readouterr().out


def test_another_preset_is_refused_and_the_same_one_continues(run_dir, capsys):
    capsys.readouterr()
    assert main(["pretrain", "--preset", "cpu", "--out-dir", str(run_dir), "--resume", "auto"]) == 2
    assert "is a run of preset smoke" in capsys.readouterr().err
    assert pretrain(run_dir, "--epochs", "2") == 0  # the README's way: the same command with --resume auto
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2


def test_another_model_is_summarised_with_its_cause(run_dir, capsys):
    capsys.readouterr()
    assert pretrain(run_dir, "--arch", "resnet18", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 800  # a summary, not the list of every tensor
    assert "arch='resnet18' (stored: 'small_cnn')" in err and "of this model's tensors are not in it" in err
