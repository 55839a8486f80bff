"""The training loop's parts: schedule, checkpoints, diagnostics, kNN."""

import math
import warnings

import pytest
import torch

from moco.checkpoints import find_resume, load_checkpoint, save_checkpoint
from moco.config import OptimConfig
from moco.errors import CheckpointError, MocoWarning
from moco.evaluate.knn import knn_accuracy, knn_scores, plain_knn_accuracy, vote_accuracy
from moco.train.diagnostics import LossWatch, check_collapse, check_queue_size, key_spread
from moco.train.optim import pretrain_lr
from moco.train.schedule import lr_at, scaled_lr


def test_lr_scales_linearly_with_the_batch():
    assert scaled_lr(0.03, 1024, 256) == pytest.approx(0.12)


def test_cosine_schedule_with_warmup_per_iteration():
    cfg = OptimConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=2)
    lr = [pretrain_lr(s, 100, cfg, 256) for s in range(1000)]
    assert lr[0] == 0 and lr[100] == pytest.approx(0.05) and lr[200] == pytest.approx(0.1)
    assert lr[600] == pytest.approx(0.05)  # halfway through the cosine part
    assert lr[999] < 1e-4 and all(a >= b for a, b in zip(lr[200:], lr[201:]))


def test_step_schedule_drops_tenfold_at_each_milestone():
    cfg = OptimConfig(epochs=200, lr=0.03, schedule="step", lr_steps=[120, 160])
    assert pretrain_lr(119 * 10, 10, cfg, 256) == pytest.approx(0.03)
    assert pretrain_lr(120 * 10, 10, cfg, 256) == pytest.approx(0.003)
    assert pretrain_lr(199 * 10, 10, cfg, 256) == pytest.approx(0.0003)


def test_one_schedule_serves_every_loop():
    """Warm-up from a fraction (fine-tuning's), then the step decay; a constant schedule; cosine from the end of
    the warm-up to 0."""
    lr = [lr_at(s, 100, 0.02, "step", [60, 80], warmup=10, warmup_factor=0.001) for s in range(100)]
    assert lr[0] == pytest.approx(0.02 * 0.001) and lr[5] == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr[10] == lr[59] == pytest.approx(0.02) and lr[60] == pytest.approx(0.002) and lr[99] == pytest.approx(2e-4)
    assert lr_at(7, 10, 0.5, "constant") == 0.5
    cosine = [lr_at(s, 20, 1.0, "cosine", warmup=4) for s in range(21)]
    assert cosine[2] == pytest.approx(0.5) and cosine[4] == 1.0 and cosine[12] == pytest.approx(0.5)
    assert cosine[20] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 10, 1.0, "linear")


def test_checkpoint_round_trip_and_refusals(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 3, "model": {"w": torch.arange(4.0)}, "config": {"a": [1, 2]}}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0)) and state["config"] == {"a": [1, 2]}
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a momentum-contrast moco-pretrain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_a_malicious_pickle_checkpoint_is_refused_without_running(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "moco-pretrain", "version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"Python objects beyond tensors and plain values \(posix.system\)") as e:
        load_checkpoint(path)
    assert not MARKER.exists()
    assert "weights_only" not in str(e.value)  # never advice to load unsafely


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_find_resume_takes_the_newest_valid_checkpoint(tmp_path):
    assert find_resume("auto", tmp_path) is None
    save_checkpoint({"step": 10}, tmp_path / "checkpoint_epoch0001.pt")
    save_checkpoint({"step": 30}, tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 20}, tmp_path / "checkpoint_best.pt")
    assert find_resume("auto", tmp_path).path == tmp_path / "checkpoint.pt"
    resume = find_resume(str(tmp_path), "elsewhere")
    assert resume.path == tmp_path / "checkpoint.pt" and resume.state["step"] == 30  # read once, handed on
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04garbage")  # e.g. a disk that lost the last write
    assert "resuming from checkpoint_best.pt" in warned(lambda: find_resume("auto", tmp_path))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_resume("auto", tmp_path).path == tmp_path / "checkpoint_best.pt"
    with pytest.raises(CheckpointError):
        find_resume(str(tmp_path / "nope.pt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in that folder"):
        find_resume(str(tmp_path / "empty"), tmp_path)


def test_a_folder_of_unreadable_checkpoints_is_never_taken_for_a_new_run(tmp_path):
    save_checkpoint({"step": 30}, tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read .*nothing was changed"):
        find_resume("auto", tmp_path)


def warned(fn, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn(*args)
    return [str(x.message) for x in w if issubclass(x.category, MocoWarning)]


def test_queue_size_warnings():
    assert warned(check_queue_size, 4096, 60000) == []
    assert "close to" in warned(check_queue_size, 40000, 60000)[0]
    assert "every image's own earlier key" in warned(check_queue_size, 65536, 60000)[0]


def test_loss_watch_compares_the_first_full_queue_losses_with_chance():
    chance = math.log(4097)

    def run(losses):
        watch = LossWatch(4097, 16, window=5)
        assert watch.first_full_step == 16
        return warned(lambda: [watch.step(16 + i, x) for i, x in enumerate(losses)])

    assert run([chance - 0.3] * 5) == []
    assert "well above" in run([chance + 2] * 5)[0]
    assert "far below" in run([1.0] * 5)[0]
    watch = LossWatch(4097, 16)
    assert warned(lambda: watch.step(3, 100.0)) == []  # the queue still holds its random initial keys
    assert "stuck" in warned(watch.epoch_end, chance - 0.05)[0]
    assert warned(watch.epoch_end, chance - 1.0) == []


def test_collapse_is_detected_from_the_keys_spread():
    spread_out = torch.nn.functional.normalize(torch.randn(4096, 128), dim=1)
    collapsed = torch.nn.functional.normalize(torch.ones(4096, 128) + 1e-3 * torch.randn(4096, 128), dim=1)
    assert key_spread(spread_out) == pytest.approx(1.0, abs=0.05)
    assert key_spread(collapsed) < 0.05
    assert warned(check_collapse, key_spread(spread_out)) == []
    assert "collapsing" in warned(check_collapse, key_spread(collapsed))[0]


def test_weighted_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (50,), generator=g)
    k, t = 5, 0.1
    scores = knn_scores(train, labels, test, 3, k, t, chunk=3)
    for i in range(7):
        sims = [(float(test[i] @ train[j]), j) for j in range(50)]
        expected = [0.0, 0.0, 0.0]
        for s, j in sorted(sims, reverse=True)[:k]:
            expected[int(labels[j])] += math.exp(s / t)
        assert scores[i].tolist() == pytest.approx(expected, rel=1e-5)
    acc = knn_accuracy(train, labels, test, scores.argmax(1), k, t)
    assert acc == {"top1": 100.0}  # no top-5 with 5 classes or fewer: it would be 100% by construction


def test_plain_knn_is_a_euclidean_majority_vote():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(60, 6, generator=g) * 3
    labels = torch.randint(0, 4, (60,), generator=g)
    test = torch.randn(40, 6, generator=g) * 3
    k = 4  # even: ties happen
    predicted, ties = [], 0
    for x in test:
        nearest = sorted(range(60), key=lambda j: float(((train[j] - x) ** 2).sum()))[:k]
        counts = [sum(int(labels[j]) == c for j in nearest) for c in range(4)]
        best = max(counts)
        ties += counts.count(best) > 1
        # ties: the tied class with the nearest voter
        predicted.append(next(int(labels[j]) for j in nearest if counts[int(labels[j])] == best))
    predicted = torch.tensor(predicted)
    assert ties > 0
    assert plain_knn_accuracy(train, labels, test, predicted, k, chunk=4) == 100.0
    flipped = (predicted + 1) % 4
    assert plain_knn_accuracy(train, labels, test, flipped, k, chunk=4) == 0.0


def test_weighted_and_majority_votes_disagree_where_one_neighbour_is_much_nearer():
    """One very near neighbour of class 0 and four farther of class 1: exp(sim/t) lets the near one win, one
    vote each lets the four win."""
    angles = torch.tensor([0.0, 0.6, -0.6, 0.65, -0.65])  # cos 1.0, then about 0.8 for the four
    train = torch.stack([angles.cos(), angles.sin()], dim=1)  # (5, 2), unit vectors
    labels = torch.tensor([0, 1, 1, 1, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert vote_accuracy(train, labels, query, truth, k=5, t=0.07, vote="weighted")["top1"] == 100.0
    assert vote_accuracy(train, labels, query, truth, k=5, t=0.07, vote="majority") == {"top1": 0.0}
    with pytest.raises(ValueError, match="majority"):
        vote_accuracy(train, labels, query, truth, k=5, t=0.07, vote="mean")


def test_precision_auto_is_bf16_only_on_gpus_and_cpus_where_it_pays(monkeypatch):
    from moco import runtime

    def cpuinfo(vendor: str, *flags: str) -> str:
        return f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse avx2 fma {' '.join(flags)}\n"

    assert not runtime.cpu_prefers_bf16(cpuinfo("AuthenticAMD"))  # Zen 3: emulated, 10-60x slower
    assert not runtime.cpu_prefers_bf16(cpuinfo("GenuineIntel", "avx512f", "avx512_bf16"))  # measured 27% slower
    assert runtime.cpu_prefers_bf16(cpuinfo("AuthenticAMD", "avx512f", "avx512_bf16"))  # Zen 4: 30-48% faster
    assert runtime.cpu_prefers_bf16(cpuinfo("GenuineIntel", "avx512_bf16", "amx_bf16", "amx_tile"))
    assert not runtime.cpu_prefers_bf16("")  # no flags line: fp32

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_prefers_bf16", lambda: False)
    assert runtime.autocast_dtype("auto", cpu) is None
    assert runtime.autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for explicitly
    monkeypatch.setattr(runtime, "cpu_prefers_bf16", lambda: True)
    assert runtime.autocast_dtype("auto", cpu) == torch.bfloat16
    assert runtime.autocast_dtype("fp32", cpu) is None


FAULTS_PER_STEP = """
import resource, sys, torch
import moco.pipeline  # what a training process has loaded: the heap's layout depends on it
from moco.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():  # a step's activations, allocated, written and freed
    ts = [torch.ones(12_000_000) for _ in range(2)]  # 2 x 48 MB: above glibc's largest mmap threshold
    del ts
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_activations_are_reused_without_page_faults():
    """keep_freed_memory: a step that reallocates what the last one freed does not fault its pages in again."""
    import subprocess
    import sys

    def faults(mode: str) -> tuple[bool, float]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", float(out[1])

    pages = 2 * 12_000_000 * 4 / 4096  # of one step
    kept, with_keep = faults("keep")
    if not sys.platform.startswith("linux"):
        assert not kept  # glibc only: elsewhere nothing changes
        return
    _, default = faults("default")
    assert kept
    assert default > 10 * 0.5 * pages  # glibc's default: unmapped on free, faulted in again every step
    assert with_keep < pages  # in 10 steps, less than one step's worth
