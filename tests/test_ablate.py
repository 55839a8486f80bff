"""`python -m benchmarks ablate` keeps a finished run only while its whole config is unchanged."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import ablate as A
from moco import config as C


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[C.PretrainConfig]:
    """Replace pretraining by a stand-in that records its configs and writes a one-epoch metrics file."""
    calls: list[C.PretrainConfig] = []

    def fake_pretrain(cfg: C.PretrainConfig, baselines: bool, echo) -> SimpleNamespace:
        calls.append(cfg)
        run = Path(cfg.run.out_dir)
        run.mkdir(parents=True, exist_ok=True)
        rows = [{"tag": "train", "step": 1, "acc": 50.0}, {"tag": "epoch", "epoch": 1, "acc": 40.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return SimpleNamespace(knn={"top1": 70.0 + len(calls), "top5": 99.0}, loss=5.0)

    monkeypatch.setattr(A, "pretrain", fake_pretrain)
    return calls


def test_finished_runs_are_kept_until_the_preset_changes(tmp_path: Path, trained, monkeypatch) -> None:
    A.ablate(tmp_path, studies=("shuffle_bn",), echo=lambda s: None)
    assert [c.model.shuffle_bn for c in trained] == [True, False]
    rows = A.read_rows(tmp_path / "results.csv")
    assert [r["knn_top1"] for r in rows] == ["71.0", "72.0"]

    A.ablate(tmp_path, studies=("shuffle_bn",), echo=lambda s: None)
    assert len(trained) == 2  # both kept

    cpu = {**C.PRESETS["cpu"], "model": {**C.PRESETS["cpu"].get("model", {}), "temperature": 0.3}}
    monkeypatch.setitem(C.PRESETS, "cpu", cpu)
    A.ablate(tmp_path, studies=("shuffle_bn",), echo=lambda s: None)
    assert len(trained) == 4 and trained[-1].model.temperature == 0.3  # measured again under the new preset
    assert [r["knn_top1"] for r in A.read_rows(tmp_path / "results.csv")] == ["73.0", "74.0"]


def test_run_key_ignores_only_the_output_folder() -> None:
    a = C.apply_overrides(C.preset("cpu"), {"out_dir": "x"})
    b = C.apply_overrides(C.preset("cpu"), {"out_dir": "y"})
    c = C.apply_overrides(C.preset("cpu"), {"out_dir": "x", "crop_min_scale": 0.2})
    assert A.run_key(a) == A.run_key(b) != A.run_key(c)
