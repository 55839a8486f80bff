"""Linear evaluation on a frozen backbone (the MoCo paper's protocol)."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from moco.checkpoints import LoadedEncoder
from moco.data.augment import EvalTransform
from moco.data.sources import ImageSet
from moco.errors import ConfigError, DataError
from moco.evaluate.features import extract_features
from moco.evaluate.linear import (
    BackboneChanged,
    LinearConfig,
    check_frozen,
    holdout_split,
    linear_lr,
    linear_probe,
    new_classifier,
    snapshot,
)
from moco.model import SmallCNN


def textures(n: int, seed: int, channels: int = 1) -> ImageSet:
    """8x8 images of 4 classes: horizontal stripes, vertical stripes, checkerboard, flat; plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4  # (n,)
    r = torch.arange(8)
    rows = (r[:, None] % 2).expand(8, 8)  # (8, 8)
    patterns = torch.stack([rows, rows.T, (r[:, None] + r[None]) % 2, torch.zeros(8, 8, dtype=torch.long)])
    pixels = patterns[labels].float() * 160 + torch.rand(n, 8, 8, generator=g) * 60 + 20  # (n, 8, 8)
    images = pixels.round().to(torch.uint8)[:, None].expand(n, channels, 8, 8).contiguous()  # (n, C, 8, 8)
    return ImageSet(images, labels, None, f"textures-{seed}")


def encoder(backbone: nn.Module | None = None) -> LoadedEncoder:
    return LoadedEncoder(backbone or SmallCNN(1, 4), "test", "small_cnn", 1, 8, [0.5], [0.25])


def quiet(**overrides) -> dict:
    return {"echo": lambda line: None, "progress": False, **overrides}


def test_paper_protocol_separates_textures_on_a_random_backbone():
    lines: list[str] = []
    result = linear_probe(encoder(), textures(256, 0), textures(128, 1), LinearConfig(batch_size=64),
                          echo=lines.append, progress=False)
    assert result.final_top1 >= 95.0
    assert result.best_top1 >= result.final_top1 and result.final_top5 is None  # 4 classes: no top-5
    best = result.history[result.best_epoch - 1]
    assert (best["test_top1"], best["test_top5"]) == (result.best_top1, result.best_top5)
    assert [h["epoch"] for h in result.history] == list(range(1, 101))
    # lr 30 for batch 256 -> 7.5 for batch 64, x0.1 at epochs 60 and 80.
    lrs = {h["epoch"]: h["lr"] for h in result.history}
    assert (lrs[60], lrs[61], lrs[81]) == pytest.approx((7.5, 0.75, 0.075))
    assert len(lines) == 102 and "best top-1" in lines[-1] and "epoch 100/100" in lines[-2]
    assert "top-5" not in "".join(lines)


def test_same_seed_same_result():
    cfg = LinearConfig(epochs=3, batch_size=32, seed=7)
    loaded = encoder()
    runs = [linear_probe(loaded, textures(64, 0), textures(32, 1), cfg, **quiet()) for _ in "ab"]
    assert runs[0].history == runs[1].history


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_backbone_stays_frozen_in_eval_mode(augment):
    backbone = SmallCNN(1, 4).train()  # linear_probe must switch BN to eval itself
    modes = []
    backbone.register_forward_pre_hook(lambda module, args: modes.append(module.features[1].training))
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k or "batches" in k}
    linear_probe(encoder(backbone), textures(64, 0), textures(32, 1),
                 LinearConfig(epochs=2, batch_size=32, augment=augment), **quiet())
    assert modes and not any(modes)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in stats.items())
    # The caller's settings come back.
    assert backbone.training and all(p.requires_grad and p.grad is None for p in backbone.parameters())


def test_features_are_the_raw_backbone_output():
    backbone, data = SmallCNN(1, 4).eval(), textures(10, 0)
    transform = EvalTransform(8, [0.5], [0.25])
    features = extract_features(backbone, data.images, transform, "cpu", batch_size=4, normalize=False)  # (10, 32)
    with torch.no_grad():
        assert torch.equal(features, backbone(transform(data.images)))
    assert not torch.allclose(features.norm(dim=1), torch.ones(10))


def test_new_classifier_init():
    fc = new_classifier(512, 1000, torch.Generator().manual_seed(0))
    assert (fc.in_features, fc.out_features) == (512, 1000)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(fc.weight.mean().item()) < 1e-4 and not fc.bias.any()


def test_schedules_scale_with_the_batch_and_run_per_iteration():
    step = LinearConfig(epochs=100, lr=30.0, batch_size=512, lr_steps=[60, 80])
    assert linear_lr(step, 0, 10) == pytest.approx(60.0)
    assert linear_lr(step, 599, 10) == pytest.approx(60.0) and linear_lr(step, 600, 10) == pytest.approx(6.0)
    assert linear_lr(step, 999, 10) == pytest.approx(0.6)
    cosine = LinearConfig(epochs=10, lr=0.4, batch_size=128, schedule="cosine")
    assert linear_lr(cosine, 0, 4) == pytest.approx(0.2) and linear_lr(cosine, 20, 4) == pytest.approx(0.1)
    assert linear_lr(cosine, 21, 4) == pytest.approx(0.1 * (1 + math.cos(math.pi * 5.25 / 10)))


def test_check_frozen_names_the_changed_tensor():
    backbone = SmallCNN(1, 4)
    before = snapshot(backbone)
    check_frozen(before, backbone)
    with torch.no_grad():
        backbone.features[3].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(BackboneChanged, match=r"backbone weight features\.3\.weight changed .* frozen backbone"):
        check_frozen(before, backbone)
    backbone.features[3].weight.data.copy_(before["features.3.weight"])
    backbone.features[1].running_var[0] = 2.0  # buffers count too
    with pytest.raises(BackboneChanged, match=r"features\.1\.running_var"):
        check_frozen(before, backbone)


class Drifting(nn.Module):
    """A backbone that writes to its own weight on every forward: the sanity check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.proj.weight.mul_(1.001)
        return self.proj(x.flatten(1))  # (B, 8)


def test_linear_probe_refuses_a_backbone_that_changed():
    with pytest.raises(BackboneChanged, match=r"proj\.weight changed during linear evaluation"):
        linear_probe(encoder(Drifting()), textures(32, 0), textures(16, 1), LinearConfig(epochs=1), **quiet())


def test_bad_data_is_a_data_error():
    train = textures(16, 0)
    unlabelled = ImageSet(train.images, None, None, "unlabelled")
    with pytest.raises(DataError, match="unlabelled has no labels"):
        linear_probe(encoder(), train, unlabelled, LinearConfig(epochs=1), **quiet())
    with pytest.raises(DataError, match="3-channel images but the encoder .* takes 1"):
        linear_probe(encoder(), train, textures(16, 1, channels=3), LinearConfig(epochs=1), **quiet())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be an integer >= 1"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("schedule", "linear", "schedule must be one of step, cosine"),
    ("augment", "v2", "augment must be one of none, crop"),
    ("lr_steps", [60, 0], "lr_steps must be a list, each an integer >= 1"),
    ("lr_search", [10.0, -1.0], "lr_search must be a list, each a finite number > 0"),
])
def test_bad_config_names_the_field(field, value, message):
    cfg = LinearConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        linear_probe(encoder(), textures(16, 0), textures(16, 1), cfg, **quiet())


def test_holdout_split_is_a_seeded_disjoint_tenth():
    kept, held = holdout_split(50, seed=3)
    assert (len(kept), len(held)) == (45, 5)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(50))  # disjoint, and together all of them
    again = holdout_split(50, seed=3)
    assert torch.equal(again[1], held) and not torch.equal(holdout_split(50, seed=4)[1], held)
    assert [len(part) for part in holdout_split(2, seed=0)] == [1, 1]  # one held out, one left to train on
    with pytest.raises(DataError, match="at least 2 training images"):
        holdout_split(1, seed=0)


def subset(images: ImageSet, idx: torch.Tensor, name: str) -> ImageSet:
    return ImageSet(images.images[idx], images.labels[idx], None, name)


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_lr_search_scores_each_lr_on_held_out_training_images_then_retrains_the_best(augment):
    loaded, train, test = encoder(), textures(80, 0), textures(32, 1)
    cfg = LinearConfig(epochs=12, batch_size=16, lr_steps=[10], seed=5, augment=augment)
    result = linear_probe(loaded, train, test, replace(cfg, lr_search=[1e-5, 30.0]), **quiet())
    # Each candidate's score is exactly what a plain run scores when trained on the kept images and tested on the
    # held-out ones: the search never sees the test set.
    kept, held = holdout_split(80, seed=5)
    for lr in (1e-5, 30.0):
        alone = linear_probe(loaded, subset(train, kept, "kept"), subset(train, held, "held"), replace(cfg, lr=lr),
                             **quiet())
        assert result.search[lr] == alone.final_top1
    assert result.search[30.0] > result.search[1e-5] + 20 and result.lr == 30.0
    # The winner then trains on every training image, as a plain run with that lr does.
    plain = linear_probe(loaded, train, test, replace(cfg, lr=30.0), **quiet())
    assert result.history == plain.history and not plain.search
    assert [h["lr"] for h in result.history] == pytest.approx([30.0 * 16 / 256] * 10 + [3.0 * 16 / 256] * 2)


def test_lr_search_keeps_the_first_of_equal_scores():
    result = linear_probe(encoder(), textures(40, 0), textures(16, 1),
                          LinearConfig(epochs=1, batch_size=8, lr_search=[1e-9, 2e-9]), **quiet())
    assert result.search[1e-9] == result.search[2e-9] and result.lr == 1e-9  # too small to change a prediction
