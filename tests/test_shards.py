"""WebDataset shards: written from a folder, streamed back with the same preprocessing."""

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_distributed import torchrun

from moco import config as C
from moco.cli import main
from moco.data.shards import ShardConfig, ShardStream, write_shards
from moco.data.sources import load_images
from moco.errors import DataError
from moco.pipeline import pretrain


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """1,024 real Fashion-MNIST items as a class-folder tree of PNGs, plus one unreadable file."""
    source = load_images("fashion-mnist", "train")
    root = tmp_path_factory.mktemp("folder")
    for i in range(1024):
        d = root / f"class{int(source.labels[i])}"
        d.mkdir(exist_ok=True)
        Image.fromarray(source.images[i, 0].numpy()).save(d / f"{i:04d}.png")
    (root / "class0" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        write_shards(folder, out, ShardConfig(image_size=28, shard_size=300), echo=lambda s: None)
    return out / "shards.json"


def test_shards_hold_exactly_the_folder_images_and_labels(folder, shards):
    index = json.loads(shards.read_text())
    assert index["count"] == 1024 and index["channels"] == 1 and len(index["shards"]) == 4
    in_memory = load_images("folder", "train", folder, 28)
    assert index["classes"] == in_memory.classes
    assert index["mean"] == pytest.approx(in_memory.mean_std()[0], abs=1e-4)
    with tarfile.open(shards.parent / index["shards"][0]) as tar:
        names = tar.getnames()
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".cls") for n in names)
    stream = ShardStream.open(shards, workers=0)
    batches = stream.batches(epoch=0, batch_size=256)
    streamed = torch.cat([next(batches) for _ in range(4)])  # one pass over the 1,024 images
    assert streamed.shape == (1024, 1, 28, 28) and streamed.dtype == torch.uint8
    # The same images (as a multiset: shuffled), decoded identically.
    key = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert key(streamed) == key(in_memory.images)


def test_a_new_epoch_reshuffles(shards):
    stream = ShardStream.open(shards, workers=0)
    first = next(stream.batches(epoch=0, batch_size=64))
    assert not torch.equal(first, next(stream.batches(epoch=1, batch_size=64)))
    assert torch.equal(first, next(stream.batches(epoch=0, batch_size=64)))


def test_pretraining_from_shards_follows_the_folder_loss_curve(folder, shards, tmp_path):
    def run(dataset, root):
        cfg = C.apply_overrides(C.preset("smoke"), {
            "model": dict(width=8, dim=32, queue_size=256, bn_splits=4),
            "data": dict(dataset=dataset, data_root=str(root), image_size=28, train_subset=None, batch_size=64),
            "optim": dict(epochs=4, lr=0.12), "run": dict(out_dir=str(tmp_path / dataset), progress=False)})
        pretrain(cfg, baselines=False, echo=lambda s: None)
        lines = (tmp_path / dataset / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"epoch"' in x]

    folder_curve, shard_curve = run("folder", folder), run("shards", shards)
    assert len(folder_curve) == len(shard_curve) == 4
    for a, b in zip(folder_curve, shard_curve):
        assert abs(a - b) < 0.1 * a, (folder_curve, shard_curve)
    assert max(folder_curve[-1], shard_curve[-1]) < 0.95 * math.log(257)  # both learn: below chance


def test_two_processes_split_the_shards(shards, tmp_path):
    r = torchrun("-m", "moco", "pretrain", "--preset", "smoke", "--dataset", "shards", "--data-root", str(shards),
                 "--train-subset", "none", "--width", "4", "--queue-size", "256", "--bn-splits", "2",
                 "--batch-size", "64", "--epochs", "1", "--workers", "1", "--no-progress", "--no-baselines",
                 "--no-tensorboard", "--out-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout


def test_shard_errors(tmp_path):
    with pytest.raises(DataError, match="no shard index"):
        ShardStream.open(tmp_path)
    (tmp_path / "shards.json").write_text("{")
    with pytest.raises(DataError, match="invalid JSON"):
        ShardStream.open(tmp_path)
    assert main(["shard", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
