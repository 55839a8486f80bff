"""Tests of moco.data.sources: every source decodes to the documented tensors, and bad data
gives a DataError (or a warning) that names the problem."""

from __future__ import annotations

import gzip
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moco.data import sources
from moco.data.sources import DATASETS, ImageSet, default_root, has_split, load_images
from moco.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write `array` (uint8) as an idx file, the format of the MNIST family."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fashion(
    directory: Path, n_train: int = 4, n_test: int = 3, gz: bool = False, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_real_files(monkeypatch, tmp_path):
    monkeypatch.delenv("MOCO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root("fashion-mnist") == FASHION_DIR

    train = load_images("fashion-mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.name == "fashion-mnist/train" and train.channels == 1 and train.image_size == 28
    full = train.images.double() / 255
    assert full.mean().item() == pytest.approx(0.2860, abs=0.001)
    assert full.std().item() == pytest.approx(0.3530, abs=0.001)
    mean, std = train.mean_std()  # from a subsample
    assert mean[0] == pytest.approx(0.286, abs=0.005) and std[0] == pytest.approx(0.353, abs=0.005)

    test = load_images("fashion-mnist", "test", root=FASHION_DIR)
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_fashion_idx_round_trip(tmp_path, gz, torchvision_layout):
    folder = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    arrays = write_fashion(folder, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        assert has_split("fashion-mnist", split, tmp_path)
        loaded = load_images("fashion-mnist", split, root=tmp_path)
        images, labels = arrays[prefix]
        assert torch.equal(loaded.images, torch.from_numpy(images).unsqueeze(1))
        assert loaded.labels.tolist() == labels.tolist()


def test_fashion_root_search_order(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_SYSTEM_DATA_DIR", tmp_path / "no-system-data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOCO_DATA", raising=False)
    assert default_root("fashion-mnist") is None
    with pytest.raises(DataError) as missing:
        load_images("fashion-mnist")
    message = str(missing.value)
    assert "apt-get install dataset-fashion-mnist" in message and "scripts/setup" in message
    assert str(tmp_path / "data" / "fashion-mnist") in message and "train-images-idx3-ubyte" in message

    cwd_arrays = write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", seed=1)
    assert default_root("fashion-mnist") == tmp_path / "data" / "FashionMNIST" / "raw"
    env_arrays = write_fashion(tmp_path / "env" / "fashion-mnist", seed=2)
    monkeypatch.setenv("MOCO_DATA", str(tmp_path / "env"))
    assert default_root("fashion-mnist") == tmp_path / "env" / "fashion-mnist"  # MOCO_DATA first
    loaded = load_images("fashion-mnist")
    assert loaded.labels.tolist() == env_arrays["train"][1].tolist() != cwd_arrays["train"][1].tolist()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gz=st.booleans(), file_index=st.integers(0, 1), cut=st.floats(0, 1, exclude_max=True))
def test_fashion_truncated_idx_is_a_data_error(tmp_path_factory, gz, file_index, cut):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion(folder, gz=gz)
    name = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"][file_index] + (".gz" if gz else "")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: int(cut * len(data))])
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_images("fashion-mnist", root=folder)


def test_fashion_bad_headers(tmp_path):
    write_fashion(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:2] + b"\x0d" + good[3:])  # float data type, not unsigned byte
    with pytest.raises(DataError, match="magic number 0x00000d03, expected 0x00000803"):
        load_images("fashion-mnist", root=tmp_path)
    images.write_bytes(good + b"\x00")
    with pytest.raises(DataError, match="longer than its header says"):
        load_images("fashion-mnist", root=tmp_path)
    write_idx(images, np.zeros((3, 28, 28), np.uint8), gz=False)  # 4 labels, 3 images
    with pytest.raises(DataError, match=r"3 images but .* 4 labels"):
        load_images("fashion-mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_split_is_a_deterministic_stratified_partition():
    from sklearn.datasets import load_digits

    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert train.images.shape[1:] == test.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and len(test) == pytest.approx(0.2 * 1797, abs=10)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert train.classes == [str(d) for d in range(10)]
    for label in range(10):  # stratified: every class split 80/20
        n_test, n_all = (
            int((test.labels == label).sum()),
            int((train.labels == label).sum() + (test.labels == label).sum()),
        )
        assert abs(n_test - 0.2 * n_all) <= 1

    # Disjoint and complete: the two splits together are exactly scikit-learn's samples.
    digits = load_digits()
    expected = np.rint(digits.data * 255 / 16).astype(np.uint8)

    def samples(images: np.ndarray, labels: list[int]) -> Counter:
        return Counter(zip(map(bytes, images.reshape(len(images), -1)), labels, strict=True))

    loaded = samples(train.images.numpy(), train.labels.tolist()) + samples(
        test.images.numpy(), test.labels.tolist()
    )
    assert loaded == samples(expected, digits.target.tolist())

    again = load_images("digits", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert has_split("digits", "test") and default_root("digits") is None


def test_image_size_resizes_tensor_sources():
    resized = load_images("digits", "test", image_size=16)
    assert resized.images.shape == (len(resized), 1, 16, 16) and resized.images.dtype == torch.uint8
    native = load_images("digits", "test")
    # Bilinear upsampling keeps the overall brightness.
    assert resized.images.double().mean().item() == pytest.approx(
        native.images.double().mean().item(), rel=0.05
    )
    assert torch.equal(
        load_images("digits", "test", image_size=8).images, native.images
    )  # native size: unchanged


# ---------------------------------------------------------------------------------------------
# CIFAR


def short_string(value: bytes) -> bytes:
    return (
        b"U" + bytes([len(value)]) + value
        if len(value) < 256
        else b"T" + len(value).to_bytes(4, "little") + value
    )


def small_int(value: int) -> bytes:
    return b"J" + value.to_bytes(4, "little", signed=True)


def py2_pickle(batch: dict[str, np.ndarray | list[int] | list[str]]) -> bytes:
    """Protocol-2 pickle of a dict as Python 2 and numpy 1 wrote the CIFAR files: byte strings,
    arrays rebuilt by numpy.core.multiarray._reconstruct from a byte-string state."""

    def value(item) -> bytes:
        if isinstance(item, np.ndarray):
            shape = b"".join(small_int(d) for d in item.shape)
            dtype = (
                b"cnumpy\ndtype\n" + short_string(b"u1") + small_int(0) + small_int(1) + b"\x87R"
                + b"(" + small_int(3) + short_string(b"|") + b"NNN"
                + small_int(-1) + small_int(-1) + small_int(0) + b"tb"
            )  # fmt: skip
            return (
                b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + small_int(0) + b"\x85"
                + short_string(b"b") + b"\x87R"
                + b"(" + small_int(1) + shape + b"\x86" + dtype
                + b"\x89" + short_string(item.tobytes()) + b"tb"
            )  # fmt: skip
        return (
            b"]("
            + b"".join(small_int(i) if isinstance(i, int) else short_string(i.encode()) for i in item)
            + b"e"
        )

    items = b"".join(short_string(key.encode()) + value(item) for key, item in batch.items())
    return b"\x80\x02}(" + items + b"u."


def write_cifar(
    root: Path, dataset: str, per_file: int = 3, protocol: int | str = 4, bytes_keys: bool = False
) -> dict:
    """A tiny CIFAR folder in the official layout; returns the expected images/labels per split."""
    rng = np.random.default_rng(1)
    if dataset == "cifar10":
        folder, n_classes = root / "cifar-10-batches-py", 10
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        folder, n_classes = root / "cifar-100-python", 100
        files = {"train": ["train"], "test": ["test"]}
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    folder.mkdir(parents=True)

    def dump(path: Path, batch: dict) -> None:
        if protocol == "py2":
            path.write_bytes(py2_pickle(batch))
            return
        if bytes_keys:
            batch = {key.encode(): item for key, item in batch.items()}
        path.write_bytes(pickle.dumps(batch, protocol=protocol))

    names = [f"class-{i}" for i in range(n_classes)]
    dump(folder / meta_file, {names_key: names})
    expected = {}
    for split, split_files in files.items():
        datas, labels = [], []
        for file_name in split_files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            batch_labels = [int(v) for v in rng.integers(0, n_classes, per_file)]
            dump(folder / file_name, {labels_key: batch_labels, "data": data})
            datas.append(data)
            labels += batch_labels
        expected[split] = (np.concatenate(datas).reshape(-1, 3, 32, 32), labels, names)
    return expected


@pytest.mark.parametrize(
    ("dataset", "protocol", "bytes_keys"),
    [
        ("cifar10", 4, False),
        ("cifar100", 4, False),
        ("cifar10", 5, True),
        ("cifar100", "py2", False),
        ("cifar10", "py2", False),
    ],
)
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_round_trip(tmp_path, dataset, protocol, bytes_keys, point_at_folder):
    expected = write_cifar(tmp_path, dataset, protocol=protocol, bytes_keys=bytes_keys)
    root = next(tmp_path.iterdir()) if point_at_folder else tmp_path
    for split in ("train", "test"):
        assert has_split(dataset, split, root)
        loaded = load_images(dataset, split, root=root)
        images, labels, names = expected[split]
        assert loaded.images.shape == (len(labels), 3, 32, 32) and loaded.images.is_contiguous()
        assert torch.equal(loaded.images, torch.from_numpy(images))
        assert loaded.labels.tolist() == labels
        assert loaded.classes == names and loaded.name == f"{dataset}/{split}"


def test_cifar_resize_and_missing(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    small = load_images("cifar10", "test", root=tmp_path, image_size=16)
    assert small.images.shape == (3, 3, 16, 16) and small.images.dtype == torch.uint8

    monkeypatch.setattr(sources, "_SYSTEM_DATA_DIR", tmp_path / "none")
    monkeypatch.delenv("MOCO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not has_split("cifar100", "train") and default_root("cifar100") is None
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz") as missing:
        load_images("cifar100")
    assert str(tmp_path / "data" / "cifar-100-python") in str(missing.value)


def test_cifar_corrupt_file(tmp_path):
    write_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch"):
        load_images("cifar10", "test", root=tmp_path)


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class SystemPayload(ExecPayload):
    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [ExecPayload, SystemPayload])
def test_cifar_malicious_pickle_is_refused_unrun(tmp_path, payload):
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"labels": [0], "data": payload(marker)}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(DataError, match=r"refused to load .*data_batch_3.*(exec|system)"):
        load_images("cifar10", "train", root=tmp_path)
    assert not marker.exists()
    if payload is ExecPayload:  # the payload is live: a plain unpickler runs it
        pickle.loads(evil)
        assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Image folders


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    return Image.new(mode, size, color)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (12, 12), 1)
    image.putpalette([0, 0, 0, 30, 60, 90] + [0, 0, 0] * 254)
    if transparent:  # per-entry alpha, which PIL keeps as bytes
        image.info["transparency"] = bytes([0, 128])
    return image


def sixteen_bit() -> Image.Image:
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[4:] = 257 * 100
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


def build_mixed_tree(root: Path) -> None:
    """Class "animals" of color images and two bad files, class "plants" of grayscale ones."""
    rng = np.random.default_rng(0)
    animals, plants = root / "animals", root / "plants"
    save(animals / "a_rgb.jpg", solid("RGB", (400, 300), (200, 40, 90)), quality=95)
    save(animals / "b_cmyk.jpg", solid("CMYK", (20, 20), (0, 255, 255, 0)), quality=95)
    save(animals / "c_palette.png", palette_image(transparent=False))
    save(animals / "d_palette_transparent.png", palette_image(transparent=True))
    save(animals / "e_rgba.png", solid("RGBA", (10, 10), (10, 200, 30, 0)))
    save(animals / "f_tiny.png", solid("RGB", (5, 7), (1, 2, 3)))
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100, 0], wide[:, 100:200, 1], wide[:, 200:, 2] = 255, 255, 255  # red | green | blue
    save(animals / "g_wide.png", Image.fromarray(wide))
    save(animals / "h_palette.gif", palette_image(transparent=False))
    noise = save(
        animals / "x_truncated.jpg", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    )
    noise.write_bytes(noise.read_bytes()[: noise.stat().st_size // 2])
    (animals / "w_garbage.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (animals / "notes.txt").write_text("not an image")
    save(animals / ".hidden.png", solid("RGB", (8, 8), (0, 0, 0)))
    (animals / ".DS_Store").write_bytes(b"\x00\x01")
    save(plants / "a_gray.png", solid("L", (9, 9), 77))
    save(plants / "b_sixteen.png", sixteen_bit())
    save(plants / "c_bilevel.png", solid("1", (8, 8), 1))
    save(plants / "d_gray_alpha.png", solid("LA", (8, 8), (150, 0)))
    (root / "empty_class").mkdir()


ANIMALS = ["a_rgb", "b_cmyk", "c_palette", "d_palette_transparent", "e_rgba", "f_tiny", "g_wide", "h_palette"]


def test_folder_mixed_modes_sizes_and_bad_files(tmp_path):
    build_mixed_tree(tmp_path)
    with pytest.warns(UserWarning) as caught:
        loaded = load_images("folder", root=tmp_path, image_size=16)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # no warnings from PIL about palettes or anything else
    skipped = next(m for m in messages if "unreadable" in m)
    assert "skipped 2 unreadable" in skipped and "w_garbage.png" in skipped and "x_truncated.jpg" in skipped
    assert any("empty_class" in m for m in messages)

    assert loaded.images.shape == (len(ANIMALS) + 4, 3, 16, 16) and loaded.images.dtype == torch.uint8
    assert loaded.classes == ["animals", "plants"] and loaded.name == "folder/train"
    assert loaded.labels.tolist() == [0] * len(ANIMALS) + [1] * 4
    pixel = {name: loaded.images[i, :, 8, 8].tolist() for i, name in enumerate(ANIMALS)}
    assert np.allclose(pixel["a_rgb"], [200, 40, 90], atol=4)
    assert np.allclose(pixel["b_cmyk"], [255, 0, 0], atol=4)
    assert pixel["c_palette"] == pixel["d_palette_transparent"] == pixel["h_palette"] == [30, 60, 90]
    assert pixel["e_rgba"] == [10, 200, 30]  # alpha dropped
    assert loaded.images[ANIMALS.index("f_tiny")].reshape(3, -1).unique(dim=1).tolist() == [
        [1],
        [2],
        [3],
    ]  # upscaled
    wide = loaded.images[ANIMALS.index("g_wide")]
    assert wide[:, :, 3:-3].reshape(3, -1).unique(dim=1).tolist() == [[0], [255], [0]]  # center crop
    gray = loaded.images[len(ANIMALS) :]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])
    assert gray[0, 0, 8, 8] == 77 and gray[2, 0, 8, 8] == 255 and gray[3, 0, 8, 8] == 150


def test_folder_strict_names_the_first_bad_file(tmp_path):
    build_mixed_tree(tmp_path)
    with pytest.warns(UserWarning, match="empty_class"), pytest.raises(DataError, match=r"w_garbage\.png"):
        load_images("folder", root=tmp_path, image_size=16, strict=True)


def test_folder_grayscale_gives_one_channel_and_16_bit_is_scaled(tmp_path):
    save(tmp_path / "a_gray.png", solid("L", (8, 8), 77))
    save(tmp_path / "b_sixteen.png", sixteen_bit())
    save(tmp_path / "c_bilevel.png", solid("1", (8, 8), 1))
    save(tmp_path / "d_gray_alpha.png", solid("LA", (8, 8), (150, 0)))
    loaded = load_images("folder", root=tmp_path, image_size=8)
    assert loaded.images.shape == (4, 1, 8, 8) and loaded.images.is_contiguous()
    assert loaded.labels is None and loaded.classes is None  # flat folder
    sixteen = loaded.images[1, 0]
    assert (sixteen[:4] == 255).all() and (sixteen[4:] == 100).all()  # scaled, not clipped
    assert (loaded.images[0] == 77).all() and (loaded.images[2] == 255).all()
    assert has_split("folder", "train", tmp_path) and not has_split("folder", "test", tmp_path)
    with pytest.raises(DataError, match="no test split"):
        load_images("folder", "test", root=tmp_path)


def test_folder_default_size_and_mean_std(tmp_path):
    save(tmp_path / "black.png", solid("RGB", (30, 20), (0, 0, 0)))
    save(tmp_path / "white.png", solid("RGB", (20, 30), (255, 255, 255)))
    loaded = load_images("folder", root=tmp_path)
    assert loaded.images.shape == (2, 3, sources.FOLDER_IMAGE_SIZE, sources.FOLDER_IMAGE_SIZE)
    mean, std = loaded.mean_std()
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_folder_train_test_layout(tmp_path, test_name):
    for split, classes in (("train", ["cat", "dog"]), (test_name, ["dog"])):
        for name in classes:
            for i in range(2):
                save(tmp_path / split / name / f"{i}.png", solid("RGB", (8, 8), (i, 0, 0)))
    train = load_images("folder", "train", root=tmp_path, image_size=8)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 0, 1, 1]
    for split in ("test", "val"):
        assert has_split("folder", split, tmp_path)
        test = load_images("folder", split, root=tmp_path, image_size=8)
        assert test.classes == ["cat", "dog"] and test.labels.tolist() == [1, 1]  # same indices as train
        assert test.name == "folder/test"


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing"))):
        load_images("folder", root=tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    save(tmp_path / ".hidden.png", solid("RGB", (8, 8), (0, 0, 0)))
    with pytest.raises(DataError, match=re.escape(f"no images found under {tmp_path}; expected") + ".*png"):
        load_images("folder", root=tmp_path)
    assert not has_split("folder", "train", tmp_path)
    with pytest.raises(ConfigError, match="needs root"):
        load_images("folder")


# ---------------------------------------------------------------------------------------------
# Names and ImageSet


def test_unknown_dataset_and_split_are_config_errors():
    with pytest.raises(ConfigError) as unknown:
        load_images("imagenet")
    assert all(name in str(unknown.value) for name in DATASETS)
    assert isinstance(unknown.value, ValueError)
    with pytest.raises(ConfigError, match="train, test"):
        has_split("digits", "validation")
    with pytest.raises(ConfigError, match="image_size"):
        load_images("digits", image_size=0)


def test_image_set_checks_its_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images=torch.zeros(2, 3, 4, 4), labels=None, classes=None, name="x")
    with pytest.raises(ValueError, match="labels"):
        ImageSet(
            images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            labels=torch.zeros(3, dtype=torch.int64),
            classes=None,
            name="x",
        )
