"""MoCo v3 checkpoints in evaluation and export: the official release's ViT layout and this project's v3 runs."""

import timm
import torch
from safetensors.torch import load_file

from moco import config as C
from moco.checkpoints import load_encoder, read_safetensors
from moco.cli import main
from moco.pipeline import pretrain

ARGS_32 = dict(img_size=32)  # small enough to evaluate in a test


def official_vit(tmp_path, **timm_args):
    """A checkpoint as the release writes it: timm's ViT-S under module.base_encoder, its 3-layer projector as the
    ViT's head, the momentum encoder and the predictor beside it."""
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12, **timm_args).eval()  # 12 heads
    sd = {f"module.base_encoder.{k}": v for k, v in net.state_dict().items()}
    projector = {"head.0.weight": torch.randn(4096, 384), "head.1.weight": torch.ones(4096),
                 "head.1.bias": torch.zeros(4096), "head.3.weight": torch.randn(256, 4096)}
    sd.update({f"module.base_encoder.{k}": v for k, v in projector.items()})
    sd.update({f"module.momentum_encoder.{k}": v.clone() for k, v in net.state_dict().items()})
    sd["module.predictor.0.weight"] = torch.randn(4096, 256)
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
               path)
    return path, net


def test_the_release_vit_small_loads_as_it_is(tmp_path):
    path, net = official_vit(tmp_path)  # 224 px, 16 px patches
    enc = load_encoder(path)
    assert (enc.layout, enc.arch, enc.channels, enc.size) == ("moco-v3", "vit_small", 3, 224)
    assert enc.backbone.blocks[0].attn.num_heads == 12
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(enc.backbone(x), net(x), atol=1e-5)


def test_the_release_vit_small_exports_to_timm_and_loads_strictly(tmp_path, capsys):
    path, net = official_vit(tmp_path)
    out = tmp_path / "vit_small.pt"
    assert main(["export", str(path), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_small_patch16_224', num_classes=0, num_heads=12)" in printed
    model = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)


def test_the_release_vit_small_in_knn_and_lincls(tmp_path, capsys):
    path, _ = official_vit(tmp_path, **ARGS_32)
    assert load_encoder(path).size == 32
    common = ["--dataset", "digits", "--gray-to-rgb", "--no-baselines"]
    assert main(["knn", str(path), *common]) == 0
    assert "images at 32 px" in capsys.readouterr().out
    assert main(["lincls", str(path), *common, "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "protocol v3: 2 epochs, cosine schedule, lr 3, batch 1024" in printed  # MoCo v3's protocol for a v3 checkpoint
    assert main(["lincls", str(path), *common, "--epochs", "1", "--protocol", "v1", "--no-progress"]) == 0
    assert "protocol v1: 1 epochs, step schedule, lr 30, batch 256" in capsys.readouterr().out


def test_a_vit_is_evaluated_at_its_own_size_only(tmp_path, capsys):
    path, _ = official_vit(tmp_path, **ARGS_32)
    assert main(["knn", str(path), "--dataset", "digits", "--gray-to-rgb", "--image-size", "64"]) == 2
    assert "built for 32 px images" in capsys.readouterr().err


def test_a_v3_run_evaluates_exports_and_reloads(tmp_path, capsys):
    cfg = C.apply_overrides(C.preset("v3-cpu"), {"hidden_dim": 32, "dim": 16, "train_subset": 256, "batch_size": 64,
                                                   "epochs": 1, "warmup_epochs": 0, "out_dir": str(tmp_path / "run"),
                                                   "progress": False, "knn_every": -1, "tensorboard": False})
    result = pretrain(cfg, baselines=False, echo=lambda _: None)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    enc = load_encoder(checkpoint)
    assert (enc.arch, enc.size, enc.config.model.method) == ("vit_tiny", 28, "mocov3") and result is not None
    assert main(["knn", str(checkpoint), "--dataset", "digits", "--no-baselines"]) == 0
    assert main(["lincls", str(checkpoint), "--dataset", "digits", "--epochs", "1", "--no-baselines",
                 "--no-progress"]) == 0
    assert "protocol v3: 1 epochs, cosine schedule, lr 3," in capsys.readouterr().out
    features = tmp_path / "digits.safetensors"
    assert main(["embed", str(checkpoint), "digits", "--out", str(features)]) == 0
    assert load_file(features)["features"].shape == (1438, 96)  # class-token features of the digits train split
    out = tmp_path / "vit.safetensors"
    assert main(["export", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    again = read_safetensors(out)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.backbone(x), enc.backbone(x))
    timm_out = tmp_path / "vit.pt"
    assert main(["export", str(checkpoint), "--format", "timm", "--out", str(timm_out)]) == 0
    assert ("timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=28, patch_size=7, in_chans=1, "
            "embed_dim=96, depth=4)") in capsys.readouterr().out
    assert main(["export", str(checkpoint), "--format", "torchvision", "--out", str(tmp_path / "x.pt")]) == 2
    assert "export it with --format timm or --format safetensors" in capsys.readouterr().err
