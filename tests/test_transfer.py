"""Dense-task transfer: built-in scenes, COCO/VOC files, Faster/Mask R-CNN and segmentation fine-tuning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from moco.checkpoints import load_encoder
from moco.cli import main
from moco.data.sources import load_images
from moco.errors import ConfigError
from moco.model.backbones import resnet
from moco.transfer import scenes as scenes_module
from moco.transfer.coco import read_coco, read_scenes, read_voc, write_scenes
from moco.transfer.detection import DetectionConfig, build_detector, detection_inputs, finetune_detection
from moco.transfer.finetune import FinetuneConfig, calibration_batches, finetune_loop
from moco.transfer.scenes import FOREGROUND_THRESHOLD, IGNORE, Scenes, make_scenes, scene_pools
from moco.transfer.segmentation import (
    SegmentationConfig,
    build_segmenter,
    confusion_matrix,
    finetune_segmentation,
    segmentation_batch,
    segmentation_metrics,
)

QUIET = dict(warmup_iters=1, lr_steps=[], log_every=1000, device="cpu")


@pytest.fixture(scope="module")
def items():
    return load_images("fashion-mnist", "test")


@pytest.fixture(scope="module")
def tiny(items):
    return make_scenes(6, 4, size=48, seed=1, source=items)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An official MoCo v2 layout checkpoint of a 1-channel small-stem ResNet-18, with BN statistics set."""
    torch.manual_seed(1)
    net = resnet("resnet18", 1, small_stem=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    sd |= {"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.2.weight": torch.randn(128, 512)}
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Scenes


def test_scenes_are_deterministic_and_annotations_consistent(items):
    train, test = make_scenes(30, 10, size=64, seed=3, source=items)
    again, _ = make_scenes(30, 10, size=64, seed=3, source=items)
    other, _ = make_scenes(30, 10, size=64, seed=4, source=items)
    assert all(torch.equal(a, b) for a, b in zip(train.images, again.images))
    assert all(torch.equal(a, b) for a, b in zip(train.boxes, again.boxes))
    assert not all(torch.equal(a, b) for a, b in zip(train.images, other.images))
    for s in (train, test):
        assert len(s.images) == len(s.masks) and s.channels == 1 and s.canvas == 64 and s.num_classes == 10
        for image, boxes, labels, masks, semantic, src in zip(s.images, s.boxes, s.labels, s.masks, s.semantic,
                                                              s.sources):
            assert image.shape == (1, 64, 64) and image.dtype == torch.uint8
            assert 1 <= len(labels) <= 5 and labels.min() >= 1 and labels.max() <= 10
            assert torch.equal(labels, items.labels[src] + 1)  # each item keeps its Fashion-MNIST class
            assert masks.sum(0).max() <= 1  # no overlap
            assert torch.equal(masks.any(0), image[0] > FOREGROUND_THRESHOLD)
            for box, label, mask in zip(boxes, labels, masks):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                x1, y1, x2, y2 = box.tolist()
                assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)  # tight box
                assert (semantic[mask] == label).all()
            ignored = semantic == IGNORE
            assert ((image[0][ignored] > 0) & (image[0][ignored] <= FOREGROUND_THRESHOLD)).all()
            assert (semantic[~masks.any(0) & ~ignored] == 0).all()


def test_scene_pools_are_disjoint_and_drawn_from_the_test_split(monkeypatch, items):
    train_pool, test_pool = scene_pools(len(items))
    assert len(np.intersect1d(train_pool, test_pool)) == 0 and len(train_pool) + len(test_pool) == 10_000
    asked = []
    monkeypatch.setattr(scenes_module, "load_images", lambda name, split: asked.append((name, split)) or items)
    train, test = make_scenes(40, 40, size=48, seed=0)
    assert asked == [("fashion-mnist", "test")]
    used_train, used_test = torch.cat(train.sources).numpy(), torch.cat(test.sources).numpy()
    assert np.isin(used_train, train_pool).all() and np.isin(used_test, test_pool).all()
    assert not np.intersect1d(used_train, used_test).size


def test_coco_and_voc_round_trip(tmp_path, tiny):
    train, _ = tiny
    path = write_scenes(train, tmp_path, "train")
    assert path == tmp_path / "annotations" / "instances_train.json"
    assert Image.open(tmp_path / "SegmentationClass" / "train_000000.png").mode == "P"
    coco = read_coco(path)
    voc = read_voc(tmp_path, "train")
    assert coco.classes == voc.classes == train.classes
    for k in range(len(train)):
        assert torch.equal(coco.images[k], train.images[k]) and torch.equal(voc.images[k], train.images[k])
        assert torch.equal(coco.boxes[k], train.boxes[k]) and torch.equal(coco.labels[k], train.labels[k])
        assert torch.equal(coco.masks[k], train.masks[k])
        assert torch.equal(voc.semantic[k], train.semantic[k])  # ignore (255) kept
        known = train.semantic[k] != IGNORE  # COCO has no ignore label: those pixels read back as background
        assert torch.equal(coco.semantic[k][known], train.semantic[k][known])
    assert len(read_scenes(tmp_path, "train", instances=True)) == len(train)


# ---------------------------------------------------------------------------------------------------------
# Detection


def _check_ap(metrics, keys):
    assert set(metrics) == set(keys) and all(0 <= v <= 100 for v in metrics.values())


def test_detection_runs_end_to_end_from_random_and_from_a_moco_checkpoint(tiny, checkpoint):
    train, test = tiny
    cfg = DetectionConfig(iterations=2, batch_size=2, **QUIET)
    _check_ap(finetune_detection(None, "resnet18", train, test, cfg, echo=lambda s: None), ["AP", "AP50", "AP75"])
    encoder = load_encoder(checkpoint)
    assert encoder.channels == 1 and encoder.backbone.conv1.weight.shape == (64, 1, 3, 3)
    lines = []
    metrics = finetune_detection(encoder, "resnet18", train, test,
                                 DetectionConfig(iterations=2, batch_size=2, model="mask", **QUIET), echo=lines.append)
    _check_ap(metrics, ["AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"])
    assert "moco-v1/v2" in lines[0]


@pytest.mark.parametrize("norm", ["bn", "frozen", "recalibrated"])
def test_pretrained_weights_arrive_in_the_detector_and_the_encoder_stays_untouched(checkpoint, tiny, norm):
    encoder = load_encoder(checkpoint)
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    body = build_detector(encoder, "resnet18", tiny[0], DetectionConfig(norm=norm, trainable_layers=3)).backbone.body
    mine = body.state_dict()
    for name, value in before.items():
        if not name.endswith("num_batches_tracked") and not (norm == "recalibrated" and "running" in name):
            assert torch.equal(mine[name], value), name
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not body.layer1[0].conv1.weight.requires_grad  # below 3
    assert isinstance(body.layer4[0].bn1, nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d)
    assert body.layer2[0].conv1.weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in encoder.backbone.state_dict().items())
    assert isinstance(encoder.backbone.bn1, nn.BatchNorm2d)


@pytest.mark.parametrize("norm", ["frozen", "recalibrated", "bn"])
def test_frozen_norm_keeps_the_statistics_bn_updates_them(checkpoint, tiny, norm):
    train, _ = tiny
    encoder = load_encoder(checkpoint)
    cfg = DetectionConfig(iterations=2, batch_size=2, norm=norm, **QUIET)
    model = build_detector(encoder, "resnet18", train, cfg)
    body = model.backbone.body
    stats = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    conv = body.layer3[0].conv1.weight.clone()

    def step(indices, flips):
        return sum(model(*detection_inputs(train, indices, 1, torch.device("cpu"), flips)).values())

    finetune_loop(model, cfg, step, len(train), echo=lambda s: None)
    changed = [k for k, v in body.state_dict().items() if "running" in k and not torch.equal(v, stats[k])]
    assert not torch.equal(body.layer3[0].conv1.weight, conv)  # the weights train either way
    if norm == "bn":
        assert len(changed) == len(stats)
    else:
        assert not changed and not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())


def test_recalibrated_norm_holds_the_fine_tuning_images_statistics(checkpoint, tiny):
    """AdaBN by hand: the first BN's frozen statistics are the mean and unbiased variance, per channel, of the first
    conv's output over the training scenes (normalised as the encoder's inputs; 6 scenes, one calibration batch)."""
    train, _ = tiny
    encoder = load_encoder(checkpoint)
    body = build_detector(encoder, "resnet18", train, DetectionConfig(norm="recalibrated")).backbone.body
    x = torch.stack([img.float() / 255 for img in train.images])  # (6, 1, 48, 48)
    x = (x - torch.tensor(encoder.mean).view(1, -1, 1, 1)) / torch.tensor(encoder.std).view(1, -1, 1, 1)
    with torch.no_grad():
        y = encoder.backbone.conv1(x).transpose(0, 1).flatten(1)  # (C, 6 * H * W)
    assert torch.allclose(body.bn1.running_mean, y.mean(1), atol=1e-5)
    assert torch.allclose(body.bn1.running_var, y.var(1), rtol=1e-4)
    assert not torch.allclose(body.bn1.running_mean, encoder.backbone.bn1.running_mean, atol=1e-3)
    assert torch.equal(body.bn1.weight, encoder.backbone.bn1.weight)  # the affine stays the pretrained one


def test_calibration_batches_hold_images_of_one_size():
    sizes = [(8, 8), (8, 10), (8, 8), (8, 8), (8, 10)]
    images = [torch.full((1, *hw), 51 * i, dtype=torch.uint8) for i, hw in enumerate(sizes)]
    empty = [torch.zeros(0)] * len(images)
    scenes = Scenes(images, empty, empty, empty, empty, ["a"], "mixed")
    batches = list(calibration_batches(scenes, 3, batch_size=2, limit=4))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 10)]
    assert [round(float(b[j, 0, 0, 0]) * 5) for b in batches for j in range(len(b))] == [0, 2, 3, 1]  # 5th left out


@pytest.mark.parametrize("bad", [dict(norm="group"), dict(lr_steps=[400]), dict(trainable_layers=6),
                                 dict(model="c4"), dict(batch_size=0), dict(clip_grad=0.0)])
def test_a_config_that_cannot_work_is_named(tiny, bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_detector(None, "resnet18", tiny[0], DetectionConfig(**bad))


@pytest.mark.parametrize("clip", [None, 1.0, 20.0])
def test_clipping_scales_the_global_gradient_norm_down_to_the_limit(clip):
    """Two parameters with gradients (3, 4) and (12,): global norm 13. Clipped to 1, the first SGD step (no
    momentum yet, lr 0.5, no decay) moves them by lr * g / 13; a limit above 13 and no limit leave the step alone."""
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    cfg = FinetuneConfig(iterations=1, lr=0.5, weight_decay=0.0, warmup_iters=0, lr_steps=[], log_every=1,
                         clip_grad=clip)

    def step(indices, flips):
        return model.a @ torch.tensor([3.0, 4.0]) + 12 * model.b.sum()

    finetune_loop(model, cfg, step, 2, echo=lambda s: None)
    scale = 1 / 13 if clip == 1.0 else 1.0
    assert torch.allclose(model.a, -0.5 * scale * torch.tensor([3.0, 4.0]))
    assert torch.allclose(model.b, -0.5 * scale * torch.tensor([12.0]))


def test_detector_overfits_a_fixed_batch(tiny):
    train, _ = tiny
    two = Scenes(train.images[:2], train.boxes[:2], train.labels[:2], train.masks[:2], train.semantic[:2],
                      train.classes, "two")
    cfg = DetectionConfig(iterations=20, batch_size=2, lr=0.01, flip=False, width=8, fpn_channels=32, **QUIET)
    model = build_detector(None, "small_cnn", two, cfg)

    def step(indices, flips):
        return sum(model(*detection_inputs(two, indices, 1, torch.device("cpu"), flips)).values())

    losses = finetune_loop(model, cfg, step, 2, echo=lambda s: None)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


# ---------------------------------------------------------------------------------------------------------
# Segmentation


def test_miou_matches_a_hand_computed_confusion_matrix():
    target = torch.tensor([0, 0, 1, 1, 2, IGNORE])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/1; class 3 absent everywhere: not averaged
    metrics = segmentation_metrics(cm)
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert metrics["pixel_acc"] == pytest.approx(60.0)


@pytest.mark.parametrize("head", ["deeplab", "fcn"])
def test_segmentation_runs_end_to_end(tiny, checkpoint, head):
    train, test = tiny
    cfg = SegmentationConfig(iterations=2, batch_size=2, head=head, **QUIET)
    for encoder in (None, load_encoder(checkpoint)):
        metrics = finetune_segmentation(encoder, "resnet18", train, test, cfg, echo=lambda s: None)
        assert set(metrics) == {"mIoU", "pixel_acc"} and all(0 <= v <= 100 for v in metrics.values())


def test_segmenter_gets_the_weights_and_overfits_a_fixed_batch(checkpoint, tiny):
    train, _ = tiny
    encoder = load_encoder(checkpoint)
    model = build_segmenter(encoder, "resnet18", train, SegmentationConfig(norm="frozen"))
    assert torch.equal(model.body.layer4[1].conv2.weight, encoder.backbone.layer4[1].conv2.weight)
    assert torch.equal(model.body.layer4[1].bn2.running_var, encoder.backbone.layer4[1].bn2.running_var)
    assert model.mean.flatten().tolist() == encoder.mean
    cfg = SegmentationConfig(iterations=20, batch_size=2, lr=0.05, flip=False, width=8, **QUIET)
    model = build_segmenter(None, "small_cnn", train, cfg)
    images, targets = segmentation_batch(train, [0, 1], 1, torch.device("cpu"))
    losses = finetune_loop(model, cfg, lambda i, f: nn.functional.cross_entropy(model(images), targets,
                                                                             ignore_index=IGNORE),
                        2, echo=lambda s: None)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


# ---------------------------------------------------------------------------------------------------------
# Command line


def test_finetune_commands(tmp_path, capsys, monkeypatch, items):
    monkeypatch.setattr(scenes_module, "load_images", lambda *a, **k: items)
    small = ["--train-scenes", "4", "--test-scenes", "2", "--size", "48"]
    assert main(["finetune", "scenes", str(tmp_path), *small]) == 0
    assert main(["finetune", "segment", "random", "--arch", "small_cnn", "--data", str(tmp_path), "--iterations", "2",
                 "--batch-size", "2", "--warmup-iters", "1", "--lr-steps", "1", "--device", "cpu", "--head", "fcn"]) == 0
    assert main(["finetune", "detect", "random", "--arch", "small_cnn", *small, "--iterations", "1",
                 "--batch-size", "2", "--warmup-iters", "0", "--lr-steps", "--norm", "frozen", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "instances_test.json" in out and "mIoU" in out and "AP50" in out


def test_the_transfer_study_command_writes_its_table(tmp_path):
    """`python -m benchmarks transfer` end to end at a tiny budget: MoCo, supervised and random inits on both tasks."""
    from benchmarks.__main__ import main as benchmarks
    from moco import config as C
    from moco.pipeline import pretrain
    from moco.train.supervised import supervised

    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "train_subset": 256, "queue_size": 256, "bn_splits": 4,
                                                  "out_dir": str(tmp_path / "moco"), "progress": False})
    pretrain(cfg, baselines=False, echo=lambda s: None)
    sup = supervised(C.apply_overrides(cfg, {"out_dir": str(tmp_path / "sup")}), echo=lambda s: None)
    out = tmp_path / "study"
    assert benchmarks(["transfer", "--moco", str(tmp_path / "moco" / "checkpoint.pt"), "--supervised", str(sup),
                 "--scenes-train", "8", "--scenes-test", "4", "--iterations", "2", "--batch-size", "2",
                 "--threads", "1", "--out", str(out), "--seeds", "0", "1"]) == 0
    table = (out / "results.md").read_text()
    for init in ("moco", "supervised", "random"):
        assert f"| {init} |" in table
    assert "| detect: MoCo >= supervised >> random (AP) |" in table and "| segment: MoCo" in table
    assert (out / "detect.png").is_file() and (out / "segment.png").is_file()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 * 2  # tasks x initialisations x seeds
    # a rerun keeps every finished row; another schedule is measured anew, beside them
    assert benchmarks(["transfer", "--moco", str(tmp_path / "moco" / "checkpoint.pt"), "--supervised", str(sup),
                       "--scenes-train", "8", "--scenes-test", "4", "--iterations", "2", "--batch-size", "2",
                       "--threads", "1", "--out", str(out), "--seeds", "0", "1", "--tasks", "segment"]) == 0
    assert (out / "results.csv").read_text().splitlines() == rows
    # rows written before FinetuneConfig had `depths` (then at its default) still count as finished
    from benchmarks.provenance import read_rows, write_rows
    older = read_rows(out / "results.csv")
    for r in older:
        setting = json.loads(r["setting"])
        del setting["depths"]
        r["setting"] = json.dumps(setting, sort_keys=True)
    write_rows(out / "results.csv", older)
    assert benchmarks(["transfer", "--moco", str(tmp_path / "moco" / "checkpoint.pt"), "--supervised", str(sup),
                       "--scenes-train", "8", "--scenes-test", "4", "--iterations", "2", "--batch-size", "2",
                       "--threads", "1", "--out", str(out), "--seeds", "0", "1", "--tasks", "segment"]) == 0
    assert len(read_rows(out / "results.csv")) == len(older)
    assert benchmarks(["transfer", "--moco", str(tmp_path / "moco" / "checkpoint.pt"), "--supervised", str(sup),
                       "--scenes-train", "8", "--scenes-test", "4", "--iterations", "2", "--batch-size", "2",
                       "--threads", "1", "--out", str(out), "--seeds", "0", "--tasks", "segment",
                       "--norm", "frozen"]) == 0
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 3
    # a new checkpoint written at the same path is another setting: its rows are measured anew
    pretrain(C.apply_overrides(cfg, {"seed": 1}), baselines=False, echo=lambda s: None)
    assert benchmarks(["transfer", "--moco", str(tmp_path / "moco" / "checkpoint.pt"), "--supervised", str(sup),
                       "--scenes-train", "8", "--scenes-test", "4", "--iterations", "2", "--batch-size", "2",
                       "--threads", "1", "--out", str(out), "--seeds", "0", "--tasks", "segment",
                       "--norm", "frozen"]) == 0
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 6


def test_the_transfer_claim_needs_both_gaps_beyond_the_seeds() -> None:
    from benchmarks.transfer_study import judge, spread

    moco, sup, rand = spread([30.0, 31.0]), spread([31.5, 32.0]), spread([20.0, 22.0])
    # MoCo is 1.25 below supervised, but their larger seed range is 1.0: below beyond the seeds
    assert judge(moco, sup, rand) == "not shown: MoCo below supervised"
    assert judge(spread([31.0, 32.0]), sup, rand) == "**shown**"  # 0.25 below: within the seeds, "on par"
    # supervised 10 above random with ranges of 2: shown; 1.5 above: not
    assert judge(moco, spread([21.5, 23.5]), rand) == "not shown: supervised not above random"
    assert judge(moco, sup, spread([20.0])) == "not yet (one seed)"


def test_a_deeper_small_cnn_is_cut_at_its_stage_ends():
    from moco.model import SmallCNN
    from moco.transfer.finetune import backbone_stages

    stages = backbone_stages(SmallCNN(1, 4, last_width=24, depths=[1, 2, 1, 1]))
    assert stages.outputs == ["2", "8", "11", "14"]  # the ReLU closing each stage
    assert stages.channels == [4, 8, 16, 24]
    assert stages.units == [["0", "1"], ["3", "4", "6", "7"], ["9", "10"], ["12", "13"]]  # convs and BNs
