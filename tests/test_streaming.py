"""The full-resolution data path: folders listed once, crops cut from the original images while decoding,
streamed in workers with bounded memory, resumable exactly, robust to bad files."""

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from benchmarks.photos import write_photo_folder
from moco.checkpoints import load_checkpoint
from moco.cli import main
from moco.data import order
from moco.data.decode import EVAL_RATIO, centre_box, centre_crop, crop_box, decode, two_crops
from moco.data.folders import list_folder
from moco.data.sources import load_images
from moco.data.streaming import FolderStream
from moco.errors import MocoWarning


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """120 ImageNet-sized JPEGs of real photographs in train/<photo>/, and 24 in val/."""
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root, 120, "train", seed=0)
    return write_photo_folder(root, 24, "val", seed=1)


# ---------------------------------------------------------------------------------------------------------
# Decoding and cropping


def test_the_crop_boxes_follow_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    rng, image = random.Random(0), torch.zeros(3, 375, 500)
    ours = [crop_box(500, 375, rng) for _ in range(4000)]
    theirs = [RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)]
    for boxes in (ours, theirs):
        assert all(0 <= top <= 375 - h and 0 <= left <= 500 - w for top, left, h, w in boxes)
    stats = [(np.mean(a), np.std(a)) for a in ([h * w for _, _, h, w in b] for b in (ours, theirs))]
    assert abs(stats[0][0] - stats[1][0]) < 0.02 * stats[1][0] and abs(stats[0][1] - stats[1][1]) < 0.04 * stats[1][1]
    aspects = [w / h for _, _, h, w in ours]
    assert min(aspects) > 0.74 and max(aspects) < 1.35
    assert all(0 <= top <= 375 - h and 0 <= left <= 500 - w for top, left, h, w in boxes)
    assert crop_box(1000, 10, rng) == (0, 493, 10, 13)  # no box fits 10 attempts: the central crop of ratio 4/3
    assert centre_box(500, 375, EVAL_RATIO) == (23, 86, 328, 328)  # side 375 * 224/256 = 328.1, top (375 - 328.1) / 2


def test_two_crops_are_torchvisions_resized_crops_of_the_original(photos, monkeypatch):
    from moco.data import decode as decode_module

    path = sorted((photos / "train").rglob("*.jpg"))[0]
    with Image.open(path) as image:
        pil = image.convert("RGB")
    for size, tolerance in ((224, 0.5), (64, 3.0)):  # at 64 px the JPEG is decoded at half scale: mean 2.3 levels
        box = crop_box(*pil.size, random.Random(size))
        expected = TF.pil_to_tensor(TF.resized_crop(pil, *box, [size, size], antialias=True)).float()
        image, original, _ = decode(path, 3, size, lambda w, h: [box])
        scaled = not isinstance(image, torch.Tensor)
        monkeypatch.setattr(decode_module, "crop_box", lambda *a, box=box: box)
        got = two_crops(path, size, 3, random.Random(0)).float()  # both crops from the box
        assert got.shape == (2, 3, size, size) and torch.equal(got[0], got[1])
        assert (got[0] - expected).abs().mean() < tolerance, (size, scaled)
        assert scaled == (size == 64)


def test_the_crops_come_from_the_whole_original_not_its_centre_square(tmp_path):
    """A wide image with a red left border and a blue right border: crops of the original show both, over many
    draws; the centre square that an in-memory folder is cut to never shows either."""
    image = np.full((100, 300, 3), 128, dtype=np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, -30:] = (0, 0, 255)
    (tmp_path / "train" / "wide").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "train" / "wide" / "0.png")
    rng = random.Random(0)
    crops = torch.cat([two_crops(tmp_path / "train" / "wide" / "0.png", 32, 3, rng) for _ in range(100)])  # (200,..)
    red = ((crops[:, 0] > 200) & (crops[:, 2] < 50)).flatten(1).any(1)
    blue = ((crops[:, 2] > 200) & (crops[:, 0] < 50)).flatten(1).any(1)
    assert red.sum() > 10 and blue.sum() > 10
    square = load_images("folder", "train", tmp_path, 32).images[0]  # (3, 32, 32): the centre 100 x 100
    assert not ((square[0] > 200) & (square[2] < 50)).any() and not ((square[2] > 200) & (square[0] < 50)).any()
    assert torch.equal(centre_crop(tmp_path / "train" / "wide" / "0.png", 32, 3), square)


# ---------------------------------------------------------------------------------------------------------
# Listing


def test_a_folder_is_listed_once_even_through_a_link_loop(tmp_path):
    write_photo_folder(tmp_path, 6, seed=2)
    first = sorted((tmp_path / "train").iterdir())[0]
    os.symlink(tmp_path / "train", first / "loop")  # a link back up the tree
    os.symlink(sorted(first.iterdir())[0], first / "same.jpg")  # the same file under another name
    listing = list_folder(tmp_path, "train")
    assert len(listing.files) == 6 and len({Path(f).name for f in listing.files}) == 6


def test_the_listing_is_cached_and_made_again_when_a_folder_changes(tmp_path, monkeypatch):
    write_photo_folder(tmp_path, 4, seed=3)
    assert len(list_folder(tmp_path, "train").files) == 4
    from moco.data import folders

    calls = []
    real = folders._list
    monkeypatch.setattr(folders, "_list", lambda *a: calls.append(a) or real(*a))
    assert len(list_folder(tmp_path, "train").files) == 4 and not calls  # from the cache
    photo = next((tmp_path / "train").rglob("*.jpg"))
    (photo.parent / "new.jpg").write_bytes(photo.read_bytes())
    assert len(list_folder(tmp_path, "train").files) == 5 and len(calls) == 1


# ---------------------------------------------------------------------------------------------------------
# Streaming


def test_every_process_takes_its_block_of_every_global_batch(monkeypatch):
    seen = {}
    for rank in range(2):
        monkeypatch.setattr(order.dist, "rank", lambda r=rank: r)
        monkeypatch.setattr(order.dist, "world_size", lambda: 2)
        batches = order.process_batches(40, 8, seed=1, epoch=3, first=1)
        seen[rank] = [next(batches) for _ in range(6)]  # 4 more steps of epoch 3, then 2 of epoch 4
    for (e0, a), (e1, b) in zip(seen[0], seen[1]):
        assert e0 == e1 and len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
    assert [e for e, _ in seen[0]] == [3, 3, 3, 3, 4, 4]
    monkeypatch.setattr(order.dist, "world_size", lambda: 1)
    whole = order.epoch_order(40, 1, 3)
    assert torch.equal(torch.cat([seen[0][0][1], seen[1][0][1]]), whole[8:16])


def test_a_stream_resumed_mid_epoch_sees_exactly_the_rest(photos):
    stream = FolderStream.open(photos, 32, (0.2, 1.0), workers=1)
    straight = stream.batches(epoch=0, first=0, batch_size=16, seed=5)
    whole = [next(straight) for _ in range(10)]  # 7 steps an epoch: into epoch 1
    resumed = stream.batches(epoch=0, first=4, batch_size=16, seed=5)
    for views, index in whole[4:]:
        again, again_index = next(resumed)
        assert torch.equal(views, again) and torch.equal(index, again_index)
    assert whole[0][0].shape == (16, 2, 3, 32, 32) and whole[0][0].dtype == torch.uint8


def test_unreadable_files_are_skipped_and_counted_in_the_workers(photos, tmp_path):
    root = tmp_path / "mixed"
    (root / "train" / "a").mkdir(parents=True)
    good = sorted((photos / "train").rglob("*.jpg"))[:14]
    for i, path in enumerate(good):
        (root / "train" / "a" / f"{i:02d}.jpg").write_bytes(path.read_bytes())
    (root / "train" / "a" / "zero.jpg").write_bytes(b"")
    (root / "train" / "a" / "cut.jpg").write_bytes(good[0].read_bytes()[:3000])
    (root / "train" / "a" / "text.png").write_bytes(b"not an image at all")
    stream = FolderStream.open(root, 24, (0.2, 1.0), workers=2)
    with pytest.warns(MocoWarning, match=r"skipped [1-3] unreadable image file"):
        batches = stream.batches(epoch=0, first=0, batch_size=17, seed=0)
        views, index = next(batches)  # the one step of the epoch: all 17 files
        next(batches)  # into the next epoch: the first's count is reported
    assert views.shape == (17, 2, 3, 24, 24) and sorted(index.tolist()) == list(range(17))


STREAM_RSS = """
import resource, sys
from benchmarks.photos import write_photo_folder
from moco.data.streaming import FolderStream
stream = FolderStream.open(sys.argv[1], 224, (0.2, 1.0), workers=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = stream.batches(0, 0, 50, 0)
for _ in range(len(stream) // 50):
    next(batches)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_streaming_memory_does_not_grow_with_the_number_of_images(photos, tmp_path):
    """An epoch of 100 and of 1,000 images at 224 px (the second would be 150 MB decoded): the same peak RSS."""
    write_photo_folder(tmp_path / "big", 1000, seed=4)
    peaks = []
    for root in (photos, tmp_path / "big"):
        out = subprocess.run([sys.executable, "-c", STREAM_RSS, str(root)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}).stdout
        before, after, workers = map(int, out.split())
        peaks.append((after - before, workers))
    (small, small_workers), (big, big_workers) = peaks
    assert abs(big - small) < 30_000 and abs(big_workers - small_workers) < 30_000, peaks  # KiB


# ---------------------------------------------------------------------------------------------------------
# Training on a folder


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "smoke", "--dataset", "folder", "--data-root", str(root), "--image-size", "32",
            "--train-subset", "none", "--batch-size", "16", "--bn-splits", "4", "--queue-size", "64", "--width", "4",
            "--epochs", "3", "--workers", "1", "--threads", "1", "--knn-every", "-1", "--no-progress",
            "--no-baselines", "--no-tensorboard", "--out-dir", str(out), *extra]


def test_a_folder_over_its_memory_budget_streams_and_says_why(photos, tmp_path, capsys):
    assert main(run_args(photos, tmp_path / "run", "--memory-budget", "0.0001", "--epochs", "1",
                         "--knn-every", "0")) == 0
    out = capsys.readouterr().out
    assert "streamed from disk" in out and "the memory budget is 0.00" in out
    assert "kNN top-1" in out  # the monitor on val/: centre crops of the originals
    assert main(run_args(photos, tmp_path / "mem", "--epochs", "1")) == 0
    assert "decoded into memory once" in capsys.readouterr().out
    assert main(run_args(photos, tmp_path / "x", "--loader", "memory", "--memory-budget", "0.0001")) == 2
    assert "raise --memory-budget" in capsys.readouterr().err


CHILD = "import sys; from moco.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_a_killed_streamed_run_resumes_exactly(photos, tmp_path, source):
    if source == "shards":
        from moco.data.shards import write_shards

        index = write_shards(photos, tmp_path / "shards", echo=lambda s: None)
        args = lambda out, *extra: [*run_args(index, out, *extra), "--dataset", "shards"]  # noqa: E731
    else:
        args = lambda out, *extra: run_args(photos, out, "--loader", "stream", *extra)  # noqa: E731
    straight = tmp_path / "straight"
    assert main(args(straight)) == 0
    expected = load_checkpoint(straight / "checkpoint.pt")
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").is_file():  # the first epoch's
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # after the first epoch's checkpoint, inside the second epoch
    p.wait()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1
    assert main(args(out, "--resume", "auto")) == 0
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["step"] == expected["step"] == 3 * 7
    for name, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_the_papers_recipe_runs_on_a_folder_with_bounded_memory(photos, tmp_path, capsys):
    """MoCo v2 as the paper trains it (ResNet-50, crops of 224 px from the originals): a few steps on this CPU."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["pretrain", "--preset", "v2", "--dataset", "folder", "--data-root", str(photos), "--loader", "stream",
                 "--train-subset", "16", "--batch-size", "8", "--epochs", "1", "--workers", "1", "--threads", "1",
                 "--knn-every", "0", "--knn-bank", "16", "--no-progress", "--no-baselines", "--no-tensorboard",
                 "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "crops of 224 px" in out and "kNN top-1" in out
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 2 and state["data"]["size"] == 224
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # GiB
    assert grown < 6, grown  # two ResNet-50s with a 65,536-key queue, not the data set
