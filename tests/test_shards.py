"""WebDataset shards: the folder's original files packed as they are (or downscaled once), streamed back the way
a folder is streamed: two crops of each original, resumable exactly."""

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_distributed import torchrun

from benchmarks.photos import write_photo_folder
from moco import config as C
from moco.cli import main
from moco.data.shards import ShardConfig, ShardStream, write_shards
from moco.data.sources import load_images
from moco.errors import DataError, MocoWarning
from moco.pipeline import pretrain


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """96 JPEGs of real photographs in class folders, 32 PNGs of Fashion-MNIST items, and one unreadable file."""
    root = write_photo_folder(tmp_path_factory.mktemp("folder"), 96, seed=0)
    items = load_images("fashion-mnist", "test")
    (root / "train" / "items").mkdir()
    for i in range(32):
        Image.fromarray(items.images[i, 0].numpy()).save(root / "train" / "items" / f"{i:03d}.png")
    (root / "train" / "items" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    with pytest.warns(MocoWarning, match="skipped 1 unreadable"):
        write_shards(folder, out, ShardConfig(shard_size=40), echo=lambda s: None)
    return out / "shards.json"


def samples(index: Path) -> dict[str, bytes]:
    """{member name: bytes} of every shard of an index."""
    out = {}
    for name in json.loads(index.read_text())["shards"]:
        with tarfile.open(index.parent / name) as tar:
            out |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def test_shards_hold_the_original_files_and_their_labels(folder, shards):
    index = json.loads(shards.read_text())
    assert index["version"] == 2 and index["count"] == 128 and index["channels"] == 3 and len(index["shards"]) == 4
    stored = samples(shards)
    images = {k: v for k, v in stored.items() if k.endswith((".jpg", ".png"))}
    originals = [p for p in (folder / "train").rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.png"]
    assert sorted(hashlib.sha1(v).hexdigest() for v in images.values()) == sorted(
        hashlib.sha1(p.read_bytes()).hexdigest() for p in originals)  # byte for byte: a JPEG stays that JPEG
    classes = index["classes"]
    by_hash = {hashlib.sha1(p.read_bytes()).hexdigest(): p.parent.name for p in originals}
    for name, data in images.items():
        label = int(stored[name.rsplit(".", 1)[0] + ".cls"])
        assert classes[label] == by_hash[hashlib.sha1(data).hexdigest()]


def test_max_side_downscales_once_keeping_the_aspect_and_the_format(folder, tmp_path):
    index = write_shards(folder, tmp_path, ShardConfig(max_side=128, shard_size=1000), echo=lambda s: None)
    for name, data in samples(index).items():
        if name.endswith((".jpg", ".png")):
            with Image.open(io.BytesIO(data)) as image:
                assert max(image.size) <= 128 and image.format == ("JPEG" if name.endswith(".jpg") else "PNG")
                if name.endswith(".jpg"):  # the photos were larger: downscaled, aspect 3/4-4/3 kept
                    assert max(image.size) == 128 and 0.74 < image.width / image.height < 1.34


def test_a_stream_pass_reshuffles_each_epoch_and_resumes_exactly(shards):
    stream = ShardStream.open(shards, 32, (0.2, 1.0), workers=0)
    batches = stream.batches(0, 0, 32, seed=1)
    epoch0 = [next(batches) for _ in range(4)]
    views, index = epoch0[0]
    assert views.shape == (32, 2, 3, 32, 32) and views.dtype == torch.uint8 and index is None
    again = stream.batches(0, 0, 32, seed=1)
    assert all(torch.equal(next(again)[0], v) for v, _ in epoch0)  # the same epoch: the same batches
    nxt = next(again)[0]  # epoch 1 begins after 128 // 32 = 4 steps
    assert not torch.equal(nxt, epoch0[0][0])
    for workers in (0, 2):
        stream = ShardStream.open(shards, 32, (0.2, 1.0), workers=workers)
        batches = stream.batches(0, 0, 32, seed=1)
        whole = [next(batches) for _ in range(6)]
        resumed = stream.batches(0, 3, 32, seed=1)  # a run stopped after step 3 of epoch 0
        for views, _ in whole[3:]:
            assert torch.equal(next(resumed)[0], views), workers


def test_pretraining_from_shards_learns(shards, tmp_path):
    cfg = C.apply_overrides(C.preset("smoke"), {
        "model": dict(width=8, dim=32, queue_size=128, bn_splits=4),
        "data": dict(dataset="shards", data_root=str(shards), image_size=32, train_subset=None, batch_size=32),
        "optim": dict(epochs=4, lr=0.12), "run": dict(out_dir=str(tmp_path), progress=False)})
    pretrain(cfg, baselines=False, echo=lambda s: None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    curve = [json.loads(x)["loss"] for x in lines if '"epoch"' in x]
    assert len(curve) == 4 and curve[-1] < curve[1] and curve[-1] < 0.95 * math.log(129)  # (epoch 1: a random queue)


def test_two_processes_split_the_shards(shards, tmp_path):
    r = torchrun("-m", "moco", "pretrain", "--preset", "smoke", "--dataset", "shards", "--data-root", str(shards),
                 "--train-subset", "none", "--image-size", "32", "--width", "4", "--queue-size", "128", "--bn-splits",
                 "2", "--batch-size", "32", "--epochs", "1", "--workers", "1", "--no-progress", "--no-baselines",
                 "--no-tensorboard", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout


def test_shard_errors(tmp_path):
    with pytest.raises(DataError, match="no shard index"):
        ShardStream.open(tmp_path, 32, (0.2, 1.0))
    (tmp_path / "shards.json").write_text("{")
    with pytest.raises(DataError, match="invalid JSON"):
        ShardStream.open(tmp_path, 32, (0.2, 1.0))
    (tmp_path / "shards.json").write_text(json.dumps({"format": "moco-shards", "version": 1, "shards": []}))
    with pytest.raises(DataError, match=r"version 1 shard index .* write the shards again .*moco shard FOLDER OUT"):
        ShardStream.open(tmp_path, 32, (0.2, 1.0))
    assert main(["shard", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
