"""Backbones: torchvision ResNets (with a small-image stem), a small fast CNN, or any user module.

A backbone maps images (B, C, H, W) to features (B, D) and exposes `out_dim = D`.
"""

import torch
from torch import nn

from ..errors import ConfigError

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU stages (width, 2w, 4w, 8w), stride 2 from the second, global pool.

    With width 16, a MoCo step on 28x28 inputs runs at about 3,500 (fp32) to 4,300 (bf16) images/s on 2
    Zen 4 cores (README, Speed): the default for CPU runs.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)  # (B, 8w)


def resnet(name: str, in_channels: int = 3, small_stem: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier (fc = Identity), randomly initialised.

    `small_stem` replaces the 7x7 stride-2 conv and the max-pool by a 3x3 stride-1 conv, the usual
    change for 28-64 px images (the official MoCo CIFAR demo does the same). The parameter names stay
    torchvision's, so exports load into torchvision models.
    """
    import torchvision

    if name not in ("resnet18", "resnet34", "resnet50"):
        raise ConfigError(f"unknown ResNet {name!r}; choose one of resnet18, resnet34, resnet50")
    model = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.out_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def build_backbone(name: str, in_channels: int, width: int = 32, small_stem: bool = True) -> nn.Module:
    """The backbone called `name` (one of BACKBONES)."""
    if name == "small_cnn":
        return SmallCNN(in_channels, width)
    if name in BACKBONES:
        return resnet(name, in_channels, small_stem)
    raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def feature_dim(backbone: nn.Module, in_channels: int, image_size: int) -> int:
    """The backbone's output width: its `out_dim` attribute, else measured with one dummy forward."""
    if hasattr(backbone, "out_dim"):
        return int(backbone.out_dim)
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, in_channels, image_size, image_size, device=param.device))
    backbone.train(was_training)
    if out.dim() != 2:
        raise ConfigError(
            f"a backbone must return (batch, features); yours returned shape {tuple(out.shape)}: "
            "end it with a global pool and flatten"
        )
    return out.shape[1]
