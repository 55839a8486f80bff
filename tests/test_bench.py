"""`python -m benchmarks bench`: the reference is faithful, FLOPs are counted sensibly, results files drive the table."""

import copy
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench as B
from benchmarks.__main__ import main
from benchmarks.reference import FoldedSplitBatchNorm2d, ReferenceMoCo, reference_model
from moco import config as C
from moco.model import SplitBatchNorm2d, build_method

FMNIST = Path("/usr/share/datasets/fashion-mnist")
BATCH, QUEUE = 16, 64  # the queue wraps around after 4 steps


def small_config(shuffle_bn: bool, bn_splits: int = 4) -> C.PretrainConfig:
    return C.apply_overrides(C.preset("smoke"), {"width": 4, "dim": 16, "queue_size": QUEUE, "batch_size": BATCH,
                                                  "bn_splits": bn_splits, "shuffle_bn": shuffle_bn})


@pytest.mark.parametrize(("shuffle_bn", "bn_splits"), [(False, 4), (True, 1)])
def test_reference_matches_library_over_steps(shuffle_bn, bn_splits):
    """Same weights, queue and inputs: the same logits, key encoder and queue after every step.

    The two draw different key permutations, so each case makes the keys independent of the order:
    split BN without the shuffle (the same split BN arithmetic on both sides), or the shuffle with
    whole-batch BN (the unshuffle must put every key back in front of its query).
    """
    cfg = small_config(shuffle_bn, bn_splits)
    ours = build_method(cfg.model, 1, 28)
    ref = ReferenceMoCo(copy.deepcopy(ours.encoder_q), cfg.model.dim, QUEUE, cfg.model.key_momentum,
                        cfg.model.temperature, shuffle_bn)
    with torch.no_grad():
        ref.queue.copy_(ours.queue.keys.T)  # (dim, K) <- (K, dim)
    opt_ours = torch.optim.SGD(ours.encoder_q.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for step in range(6):
        x_q, x_k = torch.randn(2, BATCH, 1, 28, 28)  # (B, 1, 28, 28) each
        logits, labels = ours(x_q, x_k)  # (B, 1 + K), (B,)
        ref_logits, ref_labels = ref(x_q, x_k)  # (B, 1 + K), (B,)
        torch.testing.assert_close(ref_logits, logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(ref_labels, labels)
        for model, opt, out in ((ours, opt_ours, logits), (ref, opt_ref, ref_logits)):
            opt.zero_grad()
            F.cross_entropy(out, labels).backward()
            opt.step()
        torch.testing.assert_close(ref.queue.T, ours.queue.keys, rtol=1e-5, atol=1e-5)
        assert int(ref.queue_ptr) == int(ours.queue.ptr) == (step + 1) * BATCH % QUEUE
        for p_ref, p_ours in zip(ref.encoder_k.parameters(), ours.encoder_k.parameters(), strict=True):
            torch.testing.assert_close(p_ref, p_ours, rtol=1e-5, atol=1e-5)
        for p_ref, p_ours in zip(ref.encoder_q.parameters(), ours.encoder_q.parameters(), strict=True):
            torch.testing.assert_close(p_ref, p_ours, rtol=1e-4, atol=1e-5)


def test_official_folded_split_bn_is_ours_on_the_batch_in_group_order():
    """The demo's groups are samples j, j+G, ...; ours are blocks: equal once the batch is reordered."""
    torch.manual_seed(0)
    folded, ours = FoldedSplitBatchNorm2d(3, splits=4), SplitBatchNorm2d(3, splits=4)
    with torch.no_grad():
        folded.weight.uniform_(0.5, 2)
        folded.bias.uniform_(-1, 1)
    ours.load_state_dict(folded.state_dict())
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    group_order = torch.arange(16).view(4, 4).T.flatten()  # samples 0, 4, 8, 12, 1, 5, ...
    torch.testing.assert_close(folded(x)[group_order], ours(x[group_order]))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(folded, name), getattr(ours, name))


def test_reference_needs_batch_dividing_queue():
    cfg = C.apply_overrides(small_config(True), {"queue_size": 72})
    with pytest.raises(C.ConfigError, match="multiple of batch_size"):
        reference_model(cfg, 1, 28)
    ref = ReferenceMoCo(build_method(cfg.model, 1, 28).encoder_q, 16, K=72, shuffle_bn=False)
    with pytest.raises(AssertionError, match="multiple of the batch"):
        ref(*torch.randn(2, BATCH, 1, 28, 28))


def test_flops_plausible_equal_and_linear_in_batch():
    cfg = small_config(True)
    ours = build_method(cfg.model, 1, 28)
    per_image = {b: B.flops_per_image(ours, b, 1, 28, torch.device("cpu")) for b in (8, 16)}
    assert per_image[8] > 0 and per_image[8] == pytest.approx(per_image[16], rel=1e-9)
    # One step is a query forward (F), its backward (< 2F: no input gradient at the first layer), a key
    # forward (F), and q . queue forward and backward (2 x 2 * dim * K per image).
    with FlopCounterMode(display=False) as counter:
        ours.encoder_q(torch.randn(8, 1, 28, 28))
    forward = counter.get_total_flops() / 8
    logits = 4 * cfg.model.dim * QUEUE
    assert 3 * forward + logits < per_image[8] <= 4 * forward + logits + 4 * cfg.model.dim
    # The model state is untouched: counting works on a copy.
    assert int(ours.queue.ptr) == 0
    reference = B.flops_per_image(reference_model(cfg, 1, 28), 8, 1, 28, torch.device("cpu"))
    assert reference == pytest.approx(per_image[8], rel=1e-3)  # the same architecture and head


def test_deadline_excludes_evaluation_from_budget(monkeypatch):
    """Evaluations land on the first step past each mark; their time does not count as training."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def evaluate(model) -> dict:
        now[0] += 100.0
        return {"knn_top1": 50.0}

    hook = B.Deadline(evaluate, budget=10.0, every=3.0, device=torch.device("cpu"))
    stopped_at = None
    for step in range(1, 30):
        now[0] += 1.0  # one second of training per step
        if hook(step, None):
            stopped_at = step
            break
    assert stopped_at == 10
    assert [p["step"] for p in hook.points] == [3, 6, 9, 10]
    assert [p["minutes"] for p in hook.points] == [0.05, 0.1, 0.15, round(10 / 60, 3)]
    assert hook.eval_seconds == 400.0
    hook.finish()  # the last step was evaluated already
    assert len(hook.points) == 4


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """One tiny throughput run through the command line, into a fresh results folder."""
    if not FMNIST.is_dir():
        pytest.skip(f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("bench") / "benchmarks"
    code = main(["bench", "--preset", "smoke", "--train-subset", "2048", "--warmup", "1", "--steps", "2",
                 "--windows", "2", "--workers", "1", "--threads", "1", "--out", str(out)])
    assert code == 0
    return out


def test_cli_throughput_run_writes_results_and_table(cli_run):
    (path,) = cli_run.glob("throughput-*.json")
    (entry,) = json.loads(path.read_text())["entries"]
    r = entry["result"]
    assert len(r["ours"]["windows"]) == len(r["reference"]["windows"]) == 2
    assert r["ours"]["img_s"] > 0 and r["reference"]["img_s"] > 0
    assert r["speedup"] == pytest.approx(r["ours"]["img_s"] / r["reference"]["img_s"], rel=1e-2)
    assert r["ours"]["flops_per_image"] > 0 and 0 < r["fraction_of_peak"] < 1
    assert r["ours"]["peak_rss_mib"] > 0
    assert entry["machine"]["threads"] == 1 and entry["machine"]["slug"] in path.name
    assert entry["command"].startswith("python -m benchmarks bench --mode throughput --preset smoke")
    table = B.table_path(cli_run).read_text()
    assert f"| {r['ours']['img_s']:.0f} (" in table and entry["commit"] in table


def test_results_replace_append_and_table_is_built_from_files(cli_run, tmp_path):
    out = tmp_path / "benchmarks"
    shutil.copytree(cli_run, out)
    (path,) = out.glob("throughput-*.json")
    (entry,) = B.read_results(path)

    same = copy.deepcopy(entry)
    same["result"]["ours"]["img_s"] = 4321.0
    assert B.save_result(out, same) == path
    assert [e["result"]["ours"]["img_s"] for e in B.read_results(path)] == [4321.0]  # same setup: replaced

    other = copy.deepcopy(entry)
    other["setup"]["batch_size"] = 32
    other["result"]["ours"]["img_s"] = 8765.0
    B.save_result(out, other)
    assert [e["result"]["ours"]["img_s"] for e in B.read_results(path)] == [4321.0, 8765.0]  # new setup: appended

    # Editing a results file and regenerating changes the table: it holds what the files hold.
    data = json.loads(path.read_text())
    data["entries"][0]["result"]["ours"]["img_s"] = 1357.0
    data["entries"][0]["result"]["ours"]["compile_s"] = 41.2  # as a run with --set compile=true records
    data["entries"][0]["result"]["matmul_peak_dtype"] = "bf16"  # ours under bf16 autocast: the bf16 peak
    data["entries"][1]["result"]["matmul_peak_dtype"] = "fp32"
    path.write_text(json.dumps(data))
    table = B.write_table(out).read_text()
    assert table.count("| smoke, 64 |") == 2
    assert "| 1357 (" in table and "| 8765 (" in table and "| 4321 (" not in table
    assert table.count("; compile 41.2 s |") == 1
    assert table.count(" bf16) |") == 1


def test_cli_time_to_accuracy_run_records_curves_for_both(tmp_path):
    """A tiny budget through the command line: both implementations get a curve, scored by every protocol."""
    if not FMNIST.is_dir():
        pytest.skip(f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "benchmarks"
    code = main(["bench", "--mode", "time-to-accuracy", "--preset", "smoke", "--train-subset", "1024",
                 "--warmup", "1", "--steps", "2", "--windows", "1", "--workers", "1", "--threads", "1",
                 "--minutes", "0.1", "--every", "2", "--out", str(out)])
    assert code == 0
    (path,) = out.glob("time-to-accuracy-*.json")
    (entry,) = json.loads(path.read_text())["entries"]
    r = entry["result"]
    names = [p["name"] for p in r["knn_protocols"]]
    assert names == ["knn_top1", "knn20_top1", "knn5_top1"]
    assert 70 < r["raw_pixels"]["plain_5nn_top1"] < 90  # 1,024 Fashion-MNIST images as the memory
    for impl in ("ours", "reference"):
        curve = r[impl]["curve"]
        assert curve and all(10 < p[n] <= 100 for p in curve for n in names)
        assert [p["minutes"] for p in curve] == sorted(p["minutes"] for p in curve)
        assert 2 <= len(curve) <= 4 and curve[-1]["minutes"] < 0.1 + 0.02  # stops at the first step past the budget
    assert (out / entry["plot"]).is_file()
    table = B.table_path(out).read_text()
    assert "## Time to accuracy" in table and f"{r['ours']['curve'][0]['knn5_top1']:.2f}%" in table
    assert "ours: minutes, step, k=200 / k=20 / 5-NN |" in table


def test_cli_per_epoch_run_scores_both_after_every_epoch(tmp_path):
    """Two epochs of the same schedule: a kNN point after each for both implementations, and their difference."""
    if not FMNIST.is_dir():
        pytest.skip(f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "benchmarks"
    code = main(["bench", "--mode", "per-epoch", "--preset", "smoke", "--train-subset", "1024", "--epochs", "2",
                 "--workers", "1", "--threads", "1", "--out", str(out)])
    assert code == 0
    (path,) = out.glob("per-epoch-*.json")
    (entry,) = json.loads(path.read_text())["entries"]
    r = entry["result"]
    assert r["epochs"] == 2 and "--epochs 2" in entry["command"]
    for impl in ("ours", "reference"):  # 1024 // 64 = 16 steps an epoch
        assert [(p["epoch"], p["step"]) for p in r[impl]["curve"]] == [(1, 16), (2, 32)]
        assert all(10 < p["knn_top1"] <= 100 for p in r[impl]["curve"])
    assert (out / entry["plot"]).is_file() and entry["plot"].startswith("per-epoch-")
    table = B.table_path(out).read_text()
    gap = r["ours"]["curve"][1]["knn_top1"] - r["reference"]["curve"][1]["knn_top1"]
    assert "## Accuracy per epoch" in table and f"| {gap:+.2f} |" in table and ", seed 0, " in table


def test_another_seed_is_kept_beside_seed_0s_result():
    zero, one = B.BenchSettings(mode="per-epoch", epochs=8), B.BenchSettings(mode="per-epoch", epochs=8, seed=1)
    assert "seed" not in zero.setup() and one.setup() == {**zero.setup(), "seed": 1}  # seed 0: as stored before
    assert "seed" not in replace(one, mode="throughput").setup()  # throughput does not depend on it


def test_set_changes_the_recipe_and_a_bad_field_is_named(tmp_path, capsys):
    s = B.BenchSettings(preset="smoke", overrides={"width": "4", "queue_size": "128"})
    cfg = B.bench_config(s, str(tmp_path), 1)
    assert (cfg.model.width, cfg.model.queue_size, cfg.run.knn_every) == (4, 128, -1)  # bench's own fields still win
    assert s.setup()["overrides"] == {"width": "4", "queue_size": "128"}
    assert "--set width=4 --set queue_size=128" in s.command()
    assert "overrides" not in B.BenchSettings(preset="smoke").setup()  # older results keep matching
    assert B.recipe(asdict(s)) == "smoke (width=4, queue_size=128)"
    assert main(["bench", "--preset", "smoke", "--set", "widht=4", "--out", str(tmp_path)]) == 2
    assert "widht" in capsys.readouterr().err
    assert main(["bench", "--preset", "smoke", "--set", "width", "--out", str(tmp_path)]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err


def test_the_data_path_benchmark_writes_every_figure(tmp_path):
    """`python -m benchmarks data` at a tiny size: both loaders, decode alone, peak RSS at two sizes, cores per GPU."""
    out = tmp_path / "benchmarks"
    assert main(["data", "--files", "24", "--large", "48", "--images", "16", "--batch-size", "8", "--workers", "1",
                 "--size", "64", "--folders", str(tmp_path / "photos"), "--out", str(out)]) == 0
    (path,) = out.glob("data-*.json")
    (entry,) = json.loads(path.read_text())["entries"]
    r = entry["result"]
    assert r["ours_img_s"] > 0 and r["official_img_s"] > 0 and r["decode_img_s_per_core"] > 0
    assert set(r["peak_rss"]) == {"24", "48"} and all(v["process_mib"] > 0 for v in r["peak_rss"].values())
    assert r["cores_per_gpu"]["ours"] == pytest.approx(1850 / r["per_core"]["ours"], abs=0.06)  # rounded to 0.1
    table = B.table_path(out).read_text()
    assert "## Data path" in table and f"| {r['ours_img_s']:.0f} (" in table


def _epoch_run(seed: int, ours: list[float], reference: list[float], slug: str = "cpu-2c") -> dict:
    """A per-epoch results entry as `bench` saves it, with only the fields the summary reads."""
    setup = {"preset": "cpu", "epochs": len(ours), **({"seed": seed} if seed else {})}

    def curve(values: list[float]) -> list[dict]:
        return [{"epoch": i + 1, "knn_top1": v} for i, v in enumerate(values)]

    return {"setup": setup, "settings": {"seed": seed, "preset": "cpu"}, "commit": f"c{seed}",
            "machine": {"cpu": "Some CPU", "slug": slug},
            "result": {"epochs": len(ours), "ours": {"curve": curve(ours)}, "reference": {"curve": curve(reference)}}}


def test_the_seed_summary_pairs_runs_by_seed():
    """Differences (ours - reference) of 3 seeds: epoch 1: +1, -1, +3 (mean 1, SD 2, SE 2/sqrt 3);
    epoch 2: 0, 0, -0.5. Another machine's run and a run without the reference are not in the group."""
    runs = [_epoch_run(0, [81, 82], [80, 82]), _epoch_run(1, [80, 83], [81, 83]), _epoch_run(2, [85, 84], [82, 84.5]),
            _epoch_run(3, [50, 50], [10, 10], slug="other-2c")]
    alone = _epoch_run(4, [50, 50], [10, 10])
    del alone["result"]["reference"]
    (group,) = B.seed_groups(runs + [alone])
    assert [e["settings"]["seed"] for e in group] == [0, 1, 2]
    first, second = B.seed_summary(group)
    assert first["epoch"] == 1 and first["ours"] == pytest.approx(82) and first["reference"] == pytest.approx(81)
    assert (first["diff"], first["sd"], first["se"]) == pytest.approx((1.0, 2.0, 2 / 3**0.5))
    assert first["at_or_above"] == 2 and second["at_or_above"] == 2
    assert second["diff"] == pytest.approx(-0.5 / 3)
    table = "\n".join(B.seed_table(runs))
    assert "### Over 3 seeds: Some CPU, cpu, 2 epochs" in table
    assert "| 1 | 82.00 | 81.00 | +1.00 | 2.00 | 1.15 | 2 of 3 |" in table


def test_runs_of_ours_alone_pair_with_the_stored_reference_of_their_seed():
    """Ours alone, seeds 0 and 1, against the stored reference runs of those seeds: differences +2, +1 at epoch 1
    (mean 1.5). A seed with no stored reference, another machine's reference and the pairs' own group stay apart."""
    stored = [_epoch_run(0, [81, 82], [80, 82]), _epoch_run(1, [80, 83], [81, 83]),
              _epoch_run(2, [50, 50], [10, 10], slug="other-2c")]
    alone = [_epoch_run(seed, ours, [0, 0]) for seed, ours in ((0, [82, 83]), (1, [82, 84]), (2, [90, 90]))]
    for e in alone:
        del e["result"]["reference"]
        e["setup"]["reference"], e["commit"] = False, "new"
    for e in stored:
        e["setup"]["reference"] = True
    paired = B.with_stored_reference(stored + alone)
    assert [(e["settings"]["seed"], e["reference_commit"]) for e in paired] == [(0, "c0"), (1, "c1")]
    assert "reference" not in alone[0]["result"]  # the runs themselves are left as they are
    old, new = B.seed_groups(stored + alone)
    assert [e["commit"] for e in old] == ["c0", "c1"] and [e["commit"] for e in new] == ["new", "new"]
    first, second = B.seed_summary(new)
    assert (first["ours"], first["reference"], first["diff"]) == pytest.approx((82.0, 80.5, 1.5))
    assert second["diff"] == pytest.approx(1.0) and second["at_or_above"] == 2
    table = "\n".join(B.seed_table(stored + alone))
    assert "2 epochs, ours alone against the stored reference" in table
    assert "the reference: the stored runs of the same seeds, commits `c0`, `c1`" in table
