"""load_encoder: this project's checkpoints and the official releases' layouts, loaded safely."""

import pytest
import torch
import torchvision

from moco import config as C
from moco.checkpoints import load_encoder
from moco.errors import CheckpointError
from moco.pipeline import pretrain


def official(tmp_path, prefix: str, head: dict, arch: str = "resnet18", **extra):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    sd = {f"{prefix}{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"{prefix}{k}": v for k, v in head.items()})
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                **extra}, path)
    return path, net


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "module.base_encoder."])
def test_official_layouts_load_without_conversion(tmp_path, prefix):
    mlp = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.zeros(512), "fc.2.weight": torch.randn(128, 512),
           "fc.2.bias": torch.zeros(128)}
    path, net = official(tmp_path, prefix, mlp)
    enc = load_encoder(path)
    assert enc.layout == ("moco-v1/v2" if "encoder_q" in prefix else "moco-v3") and enc.arch == "resnet18"
    net.fc = torch.nn.Identity()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(enc.backbone(x), net(x), atol=1e-5)
    assert enc.mean == [0.485, 0.456, 0.406]


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    path, _ = official(tmp_path, "module.encoder_q.", {"fc.weight": torch.randn(128, 512)}, arch="resnet50")
    with pytest.raises(CheckpointError, match=r"missing keys \['layer1.0.bn3"):
        load_encoder(path)
    path, _ = official(tmp_path, "module.encoder_q.", {}, arch=None)
    with pytest.raises(CheckpointError, match="--arch"):
        load_encoder(path, arch=None)
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_encoder(tmp_path / "x.pt")


def test_this_projects_checkpoint_loads_with_its_normalisation(tmp_path):
    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "dim": 8, "queue_size": 256, "train_subset": 256,
                                                  "out_dir": str(tmp_path), "progress": False})
    pretrain(cfg, baselines=False, echo=lambda s: None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    enc = load_encoder(tmp_path / "checkpoint.pt")
    assert enc.layout == "moco-pretrain" and enc.channels == 1 and enc.size == 28 and enc.config == cfg
    assert enc.mean == pytest.approx([0.286], abs=0.01)
    for name, value in enc.backbone.state_dict().items():
        assert torch.equal(value, state["model"][f"encoder_q.backbone.{name}"])
    assert not enc.backbone.training


def test_supervised_baseline_trains_and_loads_like_an_encoder(tmp_path):
    from moco.train.supervised import supervised

    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "train_subset": 1024, "batch_size": 128, "epochs": 3,
                                                  "lr": 0.4, "out_dir": str(tmp_path), "progress": False})
    lines = []
    path = supervised(cfg, echo=lines.append)
    losses = [float(x.split("loss ")[1].split(",")[0]) for x in lines if x.startswith("epoch")]
    assert losses[-1] < losses[0] < 2.4  # learning from the labels (chance: log 10 = 2.30)
    enc = load_encoder(path)
    state = torch.load(path, weights_only=True)
    assert enc.layout == "supervised" and enc.channels == 1
    for name, value in enc.backbone.state_dict().items():
        assert torch.equal(value, state["model"][f"0.{name}"])
    with pytest.raises(CheckpointError, match="not a momentum-contrast moco-pretrain checkpoint"):
        from moco.checkpoints import load_checkpoint

        load_checkpoint(path)
