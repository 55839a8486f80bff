"""`python -m benchmarks ablate`: which runs it makes (and keeps), and how it decides that a claim is shown."""

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

    def fake_pretrain(cfg: C.PretrainConfig, resume=None, echo=None) -> SimpleNamespace:
        calls.append(cfg)
        run = Path(cfg.run.out_dir)
        run.mkdir(parents=True, exist_ok=True)
        rows = [{"tag": "train", "step": 1, "acc": 50.0}, {"tag": "epoch", "epoch": 1, "step": 234, "acc": 40.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return SimpleNamespace(knn={"top1": 80.0 + len(calls), "top5": 99.0}, loss=5.0,
                               baselines={"random encoder": {"top1": 75.0}, "raw pixels": {"top1": 78.9}})

    monkeypatch.setattr(A, "pretrain", fake_pretrain)
    return calls


def test_every_point_runs_with_every_seed_and_finished_runs_are_kept(tmp_path: Path, trained, monkeypatch) -> None:
    A.ablate(tmp_path, studies=("v1_v2",), seeds=(0, 1), echo=lambda s: None)
    assert [(c.model.head, c.model.temperature, c.data.augment, c.model.last_width, c.run.seed) for c in trained] == [
        (head, t, aug, last, seed) for head, t, aug, last in (
            ("linear", 0.07, "v1", None), ("mlp", 0.2, "v1", None), ("mlp", 0.2, "v2", None),
            ("mlp", 0.07, "v1", None), ("linear", 0.1, "v2", None), ("mlp", 0.1, "v2", None),
            ("linear", 0.1, "v2", 256), ("mlp", 0.1, "v2", 256))
        for seed in (0, 1)]
    rows = A.read_rows(tmp_path / "results.csv")
    assert [r["knn_top1"] for r in rows] == [f"{80.0 + n}" for n in range(1, 17)]
    assert {r["random_encoder"] for r in rows} == {"75.0"}

    A.ablate(tmp_path, studies=("v1_v2",), seeds=(0, 1), echo=lambda s: None)
    assert len(trained) == 16  # all kept
    A.ablate(tmp_path, studies=("queue",), seeds=(0, 1), train=False, echo=lambda s: None)
    page = (tmp_path / "results.md").read_text()
    assert len(trained) == 16 and "| K=256 |" not in page  # nothing trained
    # the page holds every study's finished runs, not only the command's: the base is also K=4096 and m=0.99
    assert "## v1_v2" in page and "| K=4096 |" in page and "| m=0.99 |" in page

    monkeypatch.setattr(A, "BASE", {**A.BASE, "jitter_strength": 0.3})
    A.ablate(tmp_path, studies=("v1_v2",), seeds=(0,), echo=lambda s: None)
    assert len(trained) == 24 and trained[-1].data.jitter_strength == 0.3  # measured again under the new recipe


def test_the_base_is_the_main_jobs_recipe_at_the_time() -> None:
    cfg = A.run_config(A.Point("x", "y", {}), 0, 10, Path("out"))
    assert (cfg.model.temperature, cfg.data.crop_min_scale, cfg.data.blur_sigma) == (0.1, 0.6, [0.1, 1.0])
    assert (cfg.model.queue_size, cfg.model.key_momentum, cfg.optim.epochs) == (4096, 0.99, 10)


def test_a_run_shared_by_two_studies_is_made_once(tmp_path: Path, trained) -> None:
    A.ablate(tmp_path, studies=("momentum", "queue"), seeds=(0,), echo=lambda s: None)
    # m=0.99 with K=4096 is the preset itself, a point of both studies
    assert len(trained) == 5 + len(A.QUEUE_SIZES) - 1
    table = (tmp_path / "results.md").read_text()
    assert "| m=0.99 |" in table and "| K=4096 |" in table


def test_stopped_runs_continue_and_runs_of_another_config_do_not(tmp_path: Path, monkeypatch) -> None:
    seen = []

    def fake_pretrain(cfg, resume=None, echo=None):
        seen.append((Path(cfg.run.out_dir).name, resume))
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "pretrain", fake_pretrain)
    with pytest.raises(KeyboardInterrupt):
        A.ablate(tmp_path, studies=("v1_v2",), seeds=(0,), echo=lambda s: None)
    cfg = A.run_config(A.plan(("v1_v2",), 10)[0], 0, 10, tmp_path)
    other = A.run_config(A.Point("shuffle_bn", "x", {"shuffle_bn": False}), 0, 10, tmp_path)
    assert seen == [(Path(cfg.run.out_dir).name, "auto")]  # continues its own folder's checkpoint if there is one
    assert cfg.run.out_dir != other.run.out_dir


def test_a_config_field_added_later_keeps_finished_runs(tmp_path: Path, trained) -> None:
    A.ablate(tmp_path, studies=("v1_v2",), seeds=(0,), echo=lambda s: None)
    rows = A.read_rows(tmp_path / "results.csv")
    for r in rows:  # as written before ModelConfig had last_width (runs at its default)
        stored = json.loads(r["config"])
        if stored["model"]["last_width"] is None:
            del stored["model"]["last_width"]
        r["config"] = json.dumps(stored, sort_keys=True)
    A.write_rows(tmp_path / "results.csv", rows)
    A.ablate(tmp_path, studies=("v1_v2",), seeds=(0,), echo=lambda s: None)
    assert len(trained) == 8  # all eight kept


def test_end_to_end_trains_as_many_steps_as_moco() -> None:
    # 10 epochs of 234 steps (60000 // 256) = 2340 steps; a batch of 1024 makes 58 steps an epoch: 2340 / 58 = 40.3
    assert A.equal_steps_epochs(10, 1024) == 40
    assert A.equal_steps_epochs(10, 256) == 10
    e2e = [p for p in A.plan(("mechanisms",), 10) if p.name == "end_to_end K=1023"][0]
    assert e2e.overrides == {"method": "end_to_end", "batch_size": 1024, "epochs": 40}


def row(study: str, name: str, seed: int, knn: float, pretext: float = 20.0) -> dict:
    return {"study": study, "name": name, "seed": seed, "knn_top1": knn, "random_encoder": 75.0,
            "final_pretext_acc": pretext}


def test_an_effect_is_shown_only_beyond_the_seed_spread() -> None:
    s = A.stats([row("queue", "a", 0, 84.0), row("queue", "a", 1, 84.6), row("queue", "b", 0, 83.0),
                 row("queue", "b", 1, 83.2)])
    assert s["a"].mean == pytest.approx(84.3) and s["a"].spread == pytest.approx(0.6)
    assert s["a"].margin == pytest.approx(9.0)  # 84.0 - 75.0, the worse seed
    assert A.beats(s["a"], s["b"])  # 1.1 apart, spreads 0.6 and 0.2
    s = A.stats([row("queue", "a", 0, 84.0), row("queue", "a", 1, 85.2), row("queue", "b", 0, 83.6),
                 row("queue", "b", 1, 83.8)])
    assert not A.beats(s["a"], s["b"])  # 0.9 apart, but the seeds of a differ by 1.2
    one_seed = A.stats([row("queue", "a", 0, 90.0), row("queue", "b", 0, 80.0)])
    assert not A.beats(one_seed["a"], one_seed["b"])  # no spread to compare with


def test_claims_are_judged_from_the_means_and_spreads() -> None:
    knn = {"m=0.0": 60.0, "m=0.9": 82.0, "m=0.99": 84.0, "m=0.999": 83.5, "m=0.9999": 80.0}
    table = [row("momentum", n, seed, v + 0.2 * seed) for n, v in knn.items() for seed in (0, 1)]
    for group in (32, 8):  # without the shuffle: higher pretext accuracy, but kNN no lower
        table += [row("shuffle_bn", f"shuffle, groups of {group}", seed, 84.0 + 0.1 * seed, 30.0) for seed in (0, 1)]
        table += [row("shuffle_bn", f"no shuffle, groups of {group}", seed, 84.1 + 0.1 * seed, 35.0) for seed in (0, 1)]
    verdicts = {claim.split(":")[0]: shown for claim, _, _, shown in A.claims(table)}
    assert verdicts == {"a slowly moving key encoder": "**shown**",
                        "without shuffling BN the pretext task is cheated": "not shown"}


def test_the_queue_mechanism_and_v2_claims() -> None:
    table = [row("queue", f"K={K}", seed, v + 0.1 * seed)
             for K, v in ((16, 82.0), (64, 82.7), (256, 83.0), (1024, 83.2), (4096, 83.3), (16384, 83.5))
             for seed in (0, 1)]
    for K, moco, bank, e2e in ((256, 83.0, 80.0, 83.1), (1024, 83.2, 80.5, 84.5)):
        table += [row("mechanisms", n, seed, v + 0.1 * seed) for n, v in
                  ((f"moco K={K}", moco), (f"memory_bank K={K}", bank), (f"end_to_end K={K - 1}", e2e))
                  for seed in (0, 1)]
    table += [row("v1_v2", n, seed, v + 0.1 * seed) for n, v in (("v1: linear head, T=0.07, aug v1", 80.0),
                                                                  ("+ MLP head, T=0.2", 83.0), ("+ aug+ (v2)", 83.05))
              for seed in (0, 1)]
    verdicts = [shown for _, _, _, shown in A.claims(table)]
    # K grows and so does kNN; K=16384 is 1.5 above K=16, with seed ranges of 0.1: shown. The memory bank is 3 below MoCo at both K: shown.
    # End-to-end is 1.3 above MoCo at K=1023: not "on par". The MLP head gains 3: shown; aug+ 0.05: not.
    assert verdicts == ["**shown**", "**shown**", "not shown", "**shown**", "not shown"]


def test_a_larger_queue_must_be_a_trend_not_two_end_points() -> None:
    # the largest K beats the smallest by more than the seeds' range, but K=256 also beats K=1024: no trend
    table = [row("queue", f"K={K}", seed, v + 0.2 * seed)
             for K, v in ((16, 83.1), (64, 83.2), (256, 83.3), (1024, 82.9), (4096, 83.0), (16384, 83.6))
             for seed in (0, 1)]
    assert [shown for _, _, _, shown in A.claims(table)] == ["not shown"]


def test_a_larger_queue_is_shown_up_to_where_it_saturates() -> None:
    knn = {16: 78.0, 64: 81.0, 256: 83.4, 1024: 83.15, 4096: 83.2, 16384: 83.6}
    table = [row("queue", f"K={K}", seed, v + 0.1 * seed) for K, v in knn.items() for seed in (0, 1)]
    # 16 < 64 < 256, each by more than the seed range; above, 1024 is 0.25 below 256 (beyond the range of 0.1)
    # but every size from 1024 on beats K=64: larger is never worse than the rise, no longer better
    assert A.claims(table)[0][3] == ("**shown** up to K=256 (78.05 -> 83.45); saturated from there "
                                     "(K=256-16384 within 0.45)")
    knn[4096] = 80.5  # a larger K below K=64: not a saturation
    table = [row("queue", f"K={K}", seed, v + 0.1 * seed) for K, v in knn.items() for seed in (0, 1)]
    assert A.claims(table)[0][3] == "not shown"


def test_the_head_alone_is_judged_at_equal_temperature_and_augmentation() -> None:
    knn = {"v1: linear head, T=0.07, aug v1": 83.9, "MLP head, T=0.07, aug v1": 84.5,
           "linear head, the base's T=0.1 and aug": 83.5, "MLP head, the base's T=0.1 and aug": 83.2}
    table = [row("v1_v2", n, seed, v + 0.1 * seed) for n, v in knn.items() for seed in (0, 1)]
    claims = A.claims(table)
    # 84.55 - 83.95 = 0.6 > the seed range 0.1 at T=0.07; a loss at T=0.1: shown where it holds, and said so
    assert [(c[0], c[3]) for c in claims] == [("the MLP head alone, at equal temperature and augmentation",
                                               "**shown** at T=0.07, aug v1 only")]
    assert "T=0.1, the base's aug: linear 83.55 ± 0.05 -> MLP 83.25 ± 0.05" in claims[0][2]


def test_the_head_alone_is_not_shown_where_no_pair_gains() -> None:
    knn = {"linear head, 256 features": 84.0, "MLP head, 256 features": 84.1,  # within the seed range of 0.2
           "linear head, the base's T=0.1 and aug": 83.5, "MLP head, the base's T=0.1 and aug": 83.2}
    table = [row("v1_v2", n, seed, v + 0.2 * seed) for n, v in knn.items() for seed in (0, 1)]
    assert [c[3] for c in A.claims(table)] == ["not shown"]


def test_a_claim_resting_on_one_seed_is_not_judged_yet() -> None:
    table = [row("v1_v2", "v1: linear head, T=0.07, aug v1", seed, 80.0) for seed in (0, 1)]
    table += [row("v1_v2", "+ MLP head, T=0.2", seed, 83.0) for seed in (0, 1)]
    table += [row("v1_v2", "+ aug+ (v2)", 0, 90.0)]
    assert [shown for _, _, _, shown in A.claims(table)] == ["**shown**", "not yet (one seed)"]

