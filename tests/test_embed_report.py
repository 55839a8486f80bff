"""`moco.evaluate.embed` and `moco.evaluate.report` on real tiny runs of the library itself."""

import base64
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from moco import config as C
from moco.checkpoints import load_encoder
from moco.data.augment import EvalTransform
from moco.data.sources import load_images
from moco.errors import ConfigError, DataError
from moco.evaluate import embed as embed_module
from moco.evaluate.data import EvalConfig
from moco.evaluate.embed import EmbedConfig, embed
from moco.evaluate.features import extract_features
from moco.evaluate.report import ReportConfig, read_metrics, report
from moco.pipeline import pretrain

TINY_MODEL = dict(width=4, dim=16, queue_size=256, bn_splits=4)
PNGS = ["a/img_1.png", "a/img_10.png", "a/sub/deep.png", "b/img_0.png", "b/img_2.png"]  # the loader's order
PLOTS = ["loss_accuracy.png", "learning_rate.png", "knn.png", "tsne.png", "neighbours.png"]


def _pretrain(out_dir: Path, data: dict, run: dict) -> Path:
    cfg = C.apply_overrides(
        C.preset("smoke"),
        {"model": TINY_MODEL, "data": data, "optim": dict(epochs=2),
         "run": dict(out_dir=str(out_dir), tensorboard=False, progress=False, **run)},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny data sets make the queue-size warning fire
        pretrain(cfg, baselines=False, echo=lambda s: None)
    return out_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real 2-epoch Fashion-MNIST run with the kNN monitor after each epoch."""
    out = tmp_path_factory.mktemp("run")
    return _pretrain(out, dict(batch_size=64, train_subset=512), dict(knn_every=1))


@pytest.fixture(scope="module")
def made_report(run) -> tuple[Path, list[str]]:
    lines: list[str] = []
    return report(run, ReportConfig(tsne_points=300, queries=4, neighbours=5), echo=lines.append), lines


def embed_images(checkpoint, dataset, root, split, out, echo=print, **options) -> Path:
    """`embed` of `dataset` (its `root`) split `split` into `out`; `options` are EmbedConfig fields."""
    return embed(checkpoint, out, EvalConfig(dataset=dataset, data_root=root), EmbedConfig(split=split, **options),
                 echo)


def _write_pngs(root: Path, names: list[str], rgb: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Distinct random 28x28 images (gray, or coloured RGB) saved under `root`; returns their pixels."""
    rng = np.random.default_rng(seed)
    pixels = []
    for name in names:
        array = rng.integers(0, 256, (28, 28, 3) if rgb else (28, 28), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / name)
        pixels.append(array)
    return pixels


def _reference_features(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    encoder = load_encoder(checkpoint)
    transform = EvalTransform(encoder.size, encoder.mean, encoder.std)
    return extract_features(encoder.backbone, images, transform).numpy()


# ---------------------------------------------------------------------------------------------
# embed


def test_embed_folder_rows_follow_the_file_list_and_match_extract_features(run, tmp_path):
    root = tmp_path / "pictures"
    pixels = _write_pngs(root, list(reversed(PNGS)))[::-1]  # written in another order than listed
    (root / "a" / "broken.png").write_bytes(b"not a png")
    checkpoint = run / "checkpoint.pt"

    with pytest.warns(UserWarning, match="unreadable"):
        out = embed_images(checkpoint, "folder", str(root), "train", tmp_path / "out" / "feats.npy", echo=lambda s: None)

    assert out == tmp_path / "out" / "feats.npy"
    assert (tmp_path / "out" / "feats.files.txt").read_text().splitlines() == PNGS
    features = np.load(out)
    assert features.dtype == np.float32 and features.shape[0] == len(PNGS)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "feats.labels.npy"), [0, 0, 0, 1, 1])
    # Row i is the image in file i: the features of the listed files, decoded here in that order.
    images = torch.from_numpy(np.stack(pixels)).unsqueeze(1)  # (N, 1, 28, 28)
    np.testing.assert_allclose(features, _reference_features(checkpoint, images), atol=1e-5)
    assert not list((tmp_path / "out").glob("*.tmp"))

    with pytest.warns(UserWarning, match="unreadable"):
        st = embed_images(checkpoint, "folder", root, "train", tmp_path / "feats.safetensors", echo=lambda s: None)
    tensors = load_file(st)
    np.testing.assert_array_equal(tensors["features"], features)
    np.testing.assert_array_equal(tensors["labels"], [0, 0, 0, 1, 1])
    with safe_open(st, "np") as f:
        meta = f.metadata()
    assert json.loads(meta["files"]) == PNGS
    assert json.loads(meta["classes"]) == ["a", "b"]
    assert meta["layout"] == "moco-pretrain" and meta["arch"] == "small_cnn"
    assert Path(meta["checkpoint"]) == checkpoint.resolve()
    assert json.loads(meta["l2_normalized"]) is True and json.loads(meta["image_size"]) == 28


def test_folder_image_set_lists_files_relative_to_the_root(tmp_path):
    _write_pngs(tmp_path, ["train/x/1.png", "train/x/2.png", "test/x/3.png"])
    (tmp_path / "train" / "x" / "0_bad.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = load_images("folder", "train", tmp_path)
    assert train.files == ["train/x/1.png", "train/x/2.png"] and len(train) == 2
    assert load_images("folder", "val", tmp_path).files == ["test/x/3.png"]
    assert load_images("digits", "test").files is None


def test_embed_unnormalised_features_are_the_raw_backbone_outputs(run, tmp_path):
    _write_pngs(tmp_path / "pics", ["1.png", "2.png", "3.png"])
    kwargs = dict(checkpoint=run / "checkpoint.pt", dataset="folder", root=str(tmp_path / "pics"), split="train",
                  echo=lambda s: None)
    unit = np.load(embed_images(out=tmp_path / "unit.npy", **kwargs))
    raw = np.load(embed_images(out=tmp_path / "raw.npy", normalize=False, batch_size=2, **kwargs))
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0)
    np.testing.assert_allclose(raw / norms, unit, atol=1e-5)
    assert not (tmp_path / "unit.labels.npy").exists()  # a flat folder has no labels


def test_embed_named_split_saves_labels_and_indexed_names(run, tmp_path):
    messages: list[str] = []
    out = embed_images(run / "checkpoint.pt", "fashion-mnist", None, "val", tmp_path / "test.npy", echo=messages.append)
    test = load_images("fashion-mnist", "test")
    features = np.load(out)
    assert features.shape[0] == len(test) == 10_000
    np.testing.assert_array_equal(np.load(tmp_path / "test.labels.npy"), test.labels.numpy())
    names = (tmp_path / "test.files.txt").read_text().splitlines()
    assert names[0] == "fashion-mnist/test/0" and names[-1] == "fashion-mnist/test/9999" and len(names) == 10_000
    picked = torch.tensor([0, 4321, 9999])
    np.testing.assert_allclose(features[picked], _reference_features(run / "checkpoint.pt", test.images[picked]),
                               atol=1e-5)
    assert "10000" in messages[0] and str(out) in messages[0]


def test_embed_rejects_unknown_formats_and_mismatched_channels(run, tmp_path):
    with pytest.raises(ConfigError, match=r"\.npy.*\.safetensors"):
        embed_images(run / "checkpoint.pt", "fashion-mnist", None, "test", tmp_path / "feats.pt", echo=lambda s: None)
    _write_pngs(tmp_path / "colour", ["1.png", "2.png"], rgb=True)
    with pytest.raises(DataError, match="3-channel images but the encoder .* takes 1"):
        embed_images(run / "checkpoint.pt", "folder", str(tmp_path / "colour"), "train", tmp_path / "f.npy",
              echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour"]


def test_embed_failing_write_keeps_the_previous_file(run, tmp_path, monkeypatch):
    _write_pngs(tmp_path / "pics", ["1.png", "2.png"])
    args = (run / "checkpoint.pt", "folder", str(tmp_path / "pics"), "train", tmp_path / "f.safetensors")
    before = embed_images(*args, echo=lambda s: None).read_bytes()

    def broken_save(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(embed_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        embed_images(*args, echo=lambda s: None)
    assert (tmp_path / "f.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors", "pics"]


# ---------------------------------------------------------------------------------------------
# report


def test_report_writes_markdown_html_and_plots(run, made_report):
    html_path, messages = made_report
    folder = run / "report"
    assert html_path == folder / "report.html"
    md, page = (folder / "report.md").read_text(), html_path.read_text()
    for name in PLOTS:
        png = (folder / name).read_bytes()
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
        assert f"]({name})" in md
        assert base64.b64encode(png).decode() in page  # the HTML embeds exactly the PNG next to it
    assert page.count('src="data:image/png;base64,') == len(PLOTS) and "base64" not in md
    assert not re.search(r'src="(?!data:)', page)  # nothing outside the one file
    assert "queue_size: 256" in md and "queue_size: 256" in page
    assert any("report written" in m for m in messages)


def test_report_epoch_table_holds_the_logged_metrics(run, made_report):
    html_path, _ = made_report
    page, md = html_path.read_text(), (run / "report" / "report.md").read_text()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in epochs if row["tag"] == "epoch"]
    assert [row["epoch"] for row in epochs] == [1, 2]
    for row in epochs:
        cells = [str(row["epoch"]), str(row["step"]), f"{row['loss']:.4f}", f"{row['acc']:.2f}",
                 f"{row['knn_top1']:.2f}", f"{row['knn_top5']:.2f}"]
        assert all(f"<td>{cell}</td>" in page for cell in cells)
        assert f"| {row['epoch']} | {row['step']} | {row['loss']:.4f} |" in md
    assert "<th>kNN top-1 (%)</th>" in page


def test_report_retrieval_counts_queries_times_neighbours(run):
    md = (run / "report" / "report.md").read_text()
    match = re.search(r"(\d+) of (\d+) shown neighbours share the query's class", md)
    assert match and int(match[2]) == 4 * 5 and 0 <= int(match[1]) <= 20
    assert "nearest of 10000 training images" in md
    assert "300 test images" in md


def test_report_of_a_run_without_labelled_test_split_notes_why(tmp_path):
    _write_pngs(tmp_path / "pics", [f"{i:03d}.png" for i in range(64)])
    run = _pretrain(tmp_path / "run", dict(dataset="folder", data_root=str(tmp_path / "pics"), image_size=16,
                                           batch_size=32, train_subset=None), dict(knn_every=-1))
    page = report(run, echo=lambda s: None).read_text()
    assert "No t-SNE map or nearest-neighbour retrievals" in page and "no test split" in page
    names = sorted(p.name for p in (run / "report").iterdir())
    assert names == ["learning_rate.png", "loss_accuracy.png", "report.html", "report.md"]
    assert "kNN top-1" not in page  # no kNN monitor without labels: no kNN plot or column

    (run / "checkpoint.pt").unlink()
    md_path = report(run, ReportConfig(out=str(tmp_path / "elsewhere")), echo=lambda s: None).with_name("report.md")
    assert md_path.parent == tmp_path / "elsewhere" and "no checkpoint.pt" in md_path.read_text()


def test_report_errors_name_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        report(tmp_path / "nowhere", echo=lambda s: None)
    with pytest.raises(ConfigError, match="config.yaml"):
        report(tmp_path, echo=lambda s: None)
    (tmp_path / "config.yaml").write_text(C.to_yaml(C.preset("smoke")))
    with pytest.raises(DataError, match="metrics.jsonl does not exist"):
        report(tmp_path, echo=lambda s: None)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no training metrics"):
        report(tmp_path, echo=lambda s: None)
    with pytest.raises(ConfigError, match="neighbours"):
        report(tmp_path, ReportConfig(neighbours=0), echo=lambda s: None)
    assert not (tmp_path / "report").exists()


def test_read_metrics_keeps_the_last_row_of_a_repeated_step_and_skips_cut_lines(tmp_path):
    rows = [
        {"step": 20, "tag": "train", "loss": 9.0, "acc": 1.0, "lr": 0.1},
        {"step": 40, "tag": "epoch", "epoch": 1, "loss": 8.0, "acc": 2.0},
        {"step": 20, "tag": "train", "loss": 7.0, "acc": 3.0, "lr": 0.1},  # a resumed run's repeat
        {"step": 10, "tag": "train", "loss": 6.0, "acc": 4.0, "lr": 0.1},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 30, "tag": "tra'
    (tmp_path / "metrics.jsonl").write_text(text)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(10, 6.0), (20, 7.0)]
    assert [r["epoch"] for r in metrics.epochs] == [1] and metrics.skipped == 1
