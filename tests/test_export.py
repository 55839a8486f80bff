"""`moco export`: every format round-trips into its target, Detectron2 names follow the official converter."""

import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from moco import config as C
from moco.checkpoints import load_encoder, read_safetensors
from moco.cli import main
from moco.errors import ConfigError, MissingExtra
from moco.model.backbones import resnet
from moco.pipeline import pretrain
from moco.transfer import FORMATS, ExportCheckError, export_encoder
from moco.transfer import export as export_module
from moco.transfer.export import RESNET_STRUCTURE, detectron2_name, detectron2_names, torchvision_name

MLP_HEAD = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.zeros(512), "fc.2.weight": torch.randn(128, 512),
            "fc.2.bias": torch.zeros(128)}
# Names the official converter gives (moco/detection/convert-pretrain-to-detectron2.py), as Detectron2 spells them.
DETECTRON2_TABLE = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.running_var": "stem.conv1.norm.running_var",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.0.bn1.running_mean": "res2.0.conv1.norm.running_mean",
    "layer1.1.bn2.num_batches_tracked": "res2.1.conv2.norm.num_batches_tracked",
    "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
    "layer2.0.downsample.1.bias": "res3.0.shortcut.norm.bias",
    "layer4.1.conv2.weight": "res5.1.conv2.weight",
}


def official_converter_name(key: str) -> str:
    """The official converter's renaming, spelled as it does it: plain string replacements in this order."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def randomised(net: nn.Module) -> nn.Module:
    """`net` with random BN statistics and affine parameters, so that swapped BN tensors change the output."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def save_official(path: Path, net: nn.Module, arch: str = "resnet18") -> Path:
    """A checkpoint in the official MoCo v2 layout, with `net` as the query encoder and an MLP head."""
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"module.encoder_q.{k}": v for k, v in MLP_HEAD.items()})
    sd.update({f"module.encoder_k.{k}": v for k, v in net.state_dict().items()})
    torch.save({"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, nn.Module]:
    """An official MoCo v2 checkpoint of a random torchvision resnet18, and that resnet18 with fc = Identity."""
    torch.manual_seed(0)
    net = randomised(torchvision.models.resnet18(weights=None))
    path = save_official(tmp_path_factory.mktemp("official") / "checkpoint_0199.pth.tar", net)
    net.fc = nn.Identity()
    return path, net


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A real checkpoint of this project: the smoke preset's small_cnn on Fashion-MNIST, a few steps."""
    out = tmp_path_factory.mktemp("run")
    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "dim": 8, "queue_size": 256, "train_subset": 256,
                                                  "out_dir": str(out), "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(cfg, baselines=False, echo=lambda s: None)
    return out / "checkpoint.pt"


def out_name(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("encoder.pkl" if fmt == "detectron2" else f"encoder.{fmt}")


def features(model: nn.Module, channels: int = 3, size: int = 64) -> torch.Tensor:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_writes_only_the_backbone_and_leaves_no_temporary_file(tmp_path, official, fmt):
    if fmt == "timm":
        pytest.importorskip("timm")
    result = export_encoder(official[0], fmt, out_name(tmp_path, fmt))
    assert result.path == out_name(tmp_path, fmt) and result.tensors == len(official[1].state_dict())
    assert [p.name for p in tmp_path.iterdir()] == [result.path.name]


def test_torchvision_export_loads_strictly_into_torchvision_resnet(tmp_path, official):
    path, net = official
    out = export_encoder(path, "torchvision", tmp_path / "r18.pth").path
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    assert torch.allclose(features(model), features(net), atol=1e-5)
    # load_encoder reads the export back as a plain torchvision state_dict
    again = load_encoder(out, arch="resnet18")
    assert again.layout == "torchvision" and torch.allclose(features(again.backbone), features(net), atol=1e-5)


def test_timm_export_loads_strictly_into_timm_resnet(tmp_path, official):
    timm = pytest.importorskip("timm")
    path, net = official
    out = export_encoder(path, "timm", tmp_path / "r18.pth").path
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.allclose(features(model), features(net), atol=1e-5)


def test_detectron2_export_is_what_the_official_converter_writes_without_the_head(tmp_path, official):
    path, net = official
    out = export_encoder(path, "detectron2", tmp_path / "r18.pkl").path
    with out.open("rb") as f:
        payload = pickle.load(f)  # our own file, written a moment ago
    assert payload["__author__"] == "MOCO" and payload["matching_heuristics"] is True
    model = payload["model"]
    source = net.state_dict()
    assert model.keys() == {official_converter_name(k) for k in source}
    for key, value in source.items():
        assert isinstance(model[official_converter_name(key)], np.ndarray)
        assert np.array_equal(model[official_converter_name(key)], value.numpy())
    assert set(DETECTRON2_TABLE.values()) <= model.keys()
    assert not any("fc" in name.split(".") or ".fc." in name for name in model)
    assert payload["moco_config"] == {
        "MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NORM": "SyncBN",
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
        "INPUT.FORMAT": "RGB", "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    }


@pytest.mark.parametrize("arch", list(RESNET_STRUCTURE))
def test_detectron2_names_are_the_official_renaming_of_every_depth(arch):
    keys = [k for k in getattr(torchvision.models, arch)(weights=None).state_dict() if not k.startswith("fc.")]
    assert {detectron2_name(k) for k in keys} == detectron2_names(arch) == {official_converter_name(k) for k in keys}
    assert len(detectron2_names(arch)) == len(keys)
    assert all(torchvision_name(detectron2_name(k)) == k for k in keys)
    for key, name in DETECTRON2_TABLE.items():
        assert detectron2_name(key) == name and torchvision_name(name) == key


def test_safetensors_export_of_an_official_checkpoint_rebuilds_the_resnet(tmp_path, official):
    path, net = official
    out = export_encoder(path, "safetensors", tmp_path / "r18.safetensors").path
    assert load_file(out).keys() == net.state_dict().keys()
    enc = read_safetensors(out)
    assert (enc.arch, enc.channels, enc.size, enc.config) == ("resnet18", 3, None, None)
    assert torch.allclose(features(enc.backbone), features(net), atol=1e-5)


def test_safetensors_export_of_this_projects_checkpoint_keeps_config_and_normalisation(tmp_path, smoke_run):
    source = load_encoder(smoke_run)
    out = export_encoder(smoke_run, "safetensors", tmp_path / "enc.safetensors").path
    state = torch.load(smoke_run, weights_only=True)["model"]
    tensors = load_file(out)
    assert tensors.keys() == source.backbone.state_dict().keys()
    for name, value in tensors.items():
        assert torch.equal(value, state[f"encoder_q.backbone.{name}"])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "moco-encoder" and meta["format_version"] == "1" and meta["layout"] == "moco-pretrain"
    assert json.loads(meta["backbone"]) == {"name": "small_cnn", "in_channels": 1, "width": 4, "small_stem": True,
                                            "last_width": 32, "depths": [1, 1, 1, 1]}
    assert C.from_dict(json.loads(meta["config"])) == source.config
    enc = read_safetensors(out)
    assert (enc.arch, enc.channels, enc.size, enc.mean, enc.std, enc.config) == (
        "small_cnn", 1, 28, source.mean, source.std, source.config)
    assert torch.equal(features(enc.backbone, 1, 28), features(source.backbone, 1, 28))


def test_a_wider_last_stage_and_deeper_stages_survive_checkpoint_and_safetensors(tmp_path):
    out = tmp_path / "run"
    cfg = C.apply_overrides(C.preset("smoke"), {"width": 4, "last_width": 24, "depths": [1, 1, 2, 1], "dim": 8,
                                                "queue_size": 256, "train_subset": 256, "out_dir": str(out),
                                                "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(cfg, baselines=False, echo=lambda s: None)
    source = load_encoder(out / "checkpoint.pt")  # rebuilt from the stored config, loaded strictly
    convs = [m.out_channels for m in source.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [4, 8, 16, 16, 24] and features(source.backbone, 1, 28).shape == (2, 24)
    enc = read_safetensors(export_encoder(out / "checkpoint.pt", "safetensors", tmp_path / "e.safetensors").path)
    assert enc.backbone.depths == [1, 1, 2, 1]
    assert torch.equal(features(enc.backbone, 1, 28), features(source.backbone, 1, 28))


@pytest.mark.parametrize("fmt", ["torchvision", "timm", "detectron2"])
def test_small_cnn_exports_only_as_safetensors(tmp_path, smoke_run, fmt):
    with pytest.raises(ConfigError, match="--format safetensors"):
        export_encoder(smoke_run, fmt, out_name(tmp_path, fmt))
    assert not any(tmp_path.iterdir())


def test_small_stem_resnet_exports_to_torchvision_with_its_stem_and_not_to_detectron2(tmp_path):
    net = randomised(resnet("resnet18", in_channels=1, small_stem=True))
    path = save_official(tmp_path / "small.pth.tar", net)
    result = export_encoder(path, "torchvision", tmp_path / "small.pth")
    assert any("small-image stem" in line for line in result.notes)
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(result.path, weights_only=True), strict=True)
    assert torch.allclose(features(model, 1, 28), features(net, 1, 28), atol=1e-5)
    with pytest.raises(ConfigError, match="small-image stem"):
        export_encoder(path, "detectron2", tmp_path / "small.pkl")


def test_bad_requests_are_config_errors(tmp_path, official, monkeypatch):
    with pytest.raises(ConfigError, match="unknown export format 'onnx'"):
        export_encoder(official[0], "onnx", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match=r"\.pkl"):
        export_encoder(official[0], "detectron2", tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="checkpoint itself"):
        export_encoder(official[0], "torchvision", official[0])
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'momentum-contrast\[timm\]'"):
        export_encoder(official[0], "timm", tmp_path / "x.pth")
    assert not any(tmp_path.iterdir())


def test_a_failed_check_writes_nothing_and_keeps_the_previous_file(tmp_path, official, monkeypatch):
    def swapped(key: str) -> str:  # a plausible bug: the same names, but bn1 and bn2 trade places
        name = detectron2_name(key)
        if not name.startswith("res"):
            return name
        return name.replace("conv1.norm", "@").replace("conv2.norm", "conv1.norm").replace("@", "conv2.norm")

    out = tmp_path / "r18.pkl"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export_module, "detectron2_name", swapped)
    with pytest.raises(ExportCheckError, match="failed its check.*tensors differ"):
        export_encoder(official[0], "detectron2", out)
    assert out.read_bytes() == b"previous export" and [p.name for p in tmp_path.iterdir()] == ["r18.pkl"]


def test_command_line(tmp_path, official, capsys):
    out = tmp_path / "r18.pkl"
    assert main(["export", str(official[0]), "--format", "detectron2", "--out", str(out)]) == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "MODEL.RESNETS.STRIDE_IN_1X1 False" in printed
    with pytest.raises(SystemExit):
        main(["export", str(official[0]), "--format", "onnx", "--out", str(out)])
