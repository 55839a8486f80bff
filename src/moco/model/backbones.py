"""Backbones: torchvision ResNets (with a small-image stem), a small fast CNN, Vision Transformers (timm), or
any user module.

A backbone maps images (B, C, H, W) to features (B, D) and exposes `out_dim = D`.
"""

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from ..extras import require

RESNETS = ("resnet18", "resnet34", "resnet50")
# ViT-S/16 and ViT-B/16 as MoCo v3 trains them (ViT-S with 12 heads, not DeiT's 6), and a tiny one for CPUs.
VITS = {"vit_tiny": dict(embed_dim=96, depth=4, num_heads=3), "vit_small": dict(embed_dim=384, depth=12, num_heads=12),
        "vit_base": dict(embed_dim=768, depth=12, num_heads=12)}
BACKBONES = ("small_cnn", *RESNETS, *VITS)


class SmallCNN(nn.Module):
    """Four stages of 3x3 conv-BN-ReLU layers (width, 2w, 4w, 8w channels), stride 2 from the second, global pool.

    With width 16, a MoCo step on 28x28 inputs runs at about 3,500 (fp32) to 4,300 (bf16) images/s on 2
    Zen 4 cores (README, Speed): the default for CPU runs. `last_width` widens the last stage alone, which is
    also the feature width: it runs on a 4x4 map at 28 px, so 256 instead of 128 channels doubles what a linear
    classifier sees for about 1.3-1.5x the time of a step (width 32, which doubles every stage: about 2x).
    `depths` gives each stage's number of layers (one each by default); the first layer of a stage changes the
    width and the resolution, the others keep both. The layers stay one flat `features` sequence, so the
    default's parameter names are those of checkpoints written before stages could be deeper.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, last_width: int | None = None,
                 depths: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        if len(depths) != 4 or min(depths) < 1:
            raise ConfigError(f"small_cnn has 4 stages of at least one layer each; got depths {list(depths)}")
        widths = [width, 2 * width, 4 * width, last_width or 8 * width]
        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index in `features` of each stage's last module (its last ReLU)
        c_in = in_channels
        for i, (c_out, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                layers += [
                    nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
            self.stage_ends.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.widths, self.depths = widths, list(depths)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)  # (B, 8w)


def resnet(name: str, in_channels: int = 3, small_stem: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier (fc = Identity), randomly initialised.

    `small_stem` replaces the 7x7 stride-2 conv and the max-pool by a 3x3 stride-1 conv, the usual
    change for 28-64 px images (the official MoCo CIFAR demo does the same). The parameter names stay
    torchvision's, so exports load into torchvision models. `zero_init_residual` starts the last BN of every
    residual block at zero, so that each block starts as the identity (MoCo v3 builds its ResNets so).
    """
    import torchvision

    if name not in RESNETS:
        raise ConfigError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
    model = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
    if small_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.out_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def default_patch(image_size: int) -> int:
    """ViTs' patch side when none is given: 16 from 112 px up (the paper's 224 / 16), else 4 (28 px: 7 x 7)."""
    return 16 if image_size >= 112 else 4


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (1, 1 + grid^2, dim): a zero for the class token, then for each
    patch (row-major, as timm orders them) the sin and cos of its row, then of its column, at dim/4 frequencies
    each (the MoCo v3 release's layout)."""
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos position embedding needs the ViT width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")  # (grid, grid) each
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    row = rows.flatten()[:, None] * omega[None]  # (grid^2, dim/4)
    col = cols.flatten()[:, None] * omega[None]  # (grid^2, dim/4)
    patches = torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], dim=1)  # (grid^2, dim)
    return torch.cat([torch.zeros(1, dim), patches])[None]  # (1, 1 + grid^2, dim)


def vit(name: str, in_channels: int, image_size: int, patch_size: int | None = None) -> nn.Module:
    """A timm Vision Transformer with MoCo v3's stability measures: fixed 2-D sin-cos position embeddings and a
    random patch projection that is never trained; the class token's output is the feature (no classifier).

    Initialisation as the release's: xavier-uniform linear layers (q, k and v each as its own matrix), zero biases,
    the patch projection uniform over +-sqrt(6 / (fan in + width)), the class token N(0, 1e-6).
    """
    timm = require("timm", f"the {name} backbone")
    if name not in VITS:
        raise ConfigError(f"unknown ViT {name!r}; choose one of {', '.join(VITS)}")
    patch = patch_size or default_patch(image_size)
    if image_size % patch:
        raise ConfigError(f"a ViT needs the image size ({image_size}) to be a multiple of its patch size ({patch}); "
                          "set --image-size or --patch-size")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, patch_size=patch, in_chans=in_channels, num_classes=0, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **VITS[name])
    dim = model.embed_dim
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                if "qkv" in module_name:  # three matrices in one: each gets its own fan
                    bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                    module.weight.uniform_(-bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        model.cls_token.normal_(std=1e-6)
        model.pos_embed.copy_(sincos_position_embedding(image_size // patch, dim))
        bound = math.sqrt(6.0 / (in_channels * patch * patch + dim))
        model.patch_embed.proj.weight.uniform_(-bound, bound)
        model.patch_embed.proj.bias.zero_()
    model.pos_embed.requires_grad_(False)
    model.patch_embed.proj.requires_grad_(False)  # the random patch projection: frozen (MoCo v3, Sec. 5.3)
    model.out_dim = dim
    return model


def is_vit(backbone: nn.Module) -> bool:
    """Whether `backbone` is a Vision Transformer (timm's, ours or a user's): it cuts images into patches."""
    return hasattr(backbone, "patch_embed")


def vit_recipe(weights: dict[str, torch.Tensor]) -> dict[str, object]:
    """`build_backbone`'s arguments for a ViT's state dict (ours, timm's, the MoCo v3 release's): the size from the
    width and depth, the patch side from the patch projection, the image size from the position embeddings."""
    width, depth = weights["cls_token"].shape[-1], len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
    name = next((n for n, v in VITS.items() if (v["embed_dim"], v["depth"]) == (width, depth)), None)
    if name is None:
        raise ConfigError(f"a ViT {width} wide and {depth} blocks deep is none of ours ({', '.join(VITS)})")
    proj = weights["patch_embed.proj.weight"]  # (width, C, P, P)
    grid = math.isqrt(weights["pos_embed"].shape[1] - 1)
    return {"name": name, "in_channels": proj.shape[1], "image_size": grid * proj.shape[-1],
            "patch_size": proj.shape[-1]}


def build_backbone(name: str, in_channels: int, width: int = 32, small_stem: bool = True,
                   image_size: int | None = None, patch_size: int | None = None,
                   zero_init_residual: bool = False, last_width: int | None = None,
                   depths: Sequence[int] = (1, 1, 1, 1)) -> nn.Module:
    """The backbone called `name` (one of BACKBONES); ViTs are built for `image_size`."""
    if name == "small_cnn":
        return SmallCNN(in_channels, width, last_width, depths)
    if name in RESNETS:
        return resnet(name, in_channels, small_stem, zero_init_residual)
    if name in VITS:
        if image_size is None:
            raise ConfigError(f"the {name} backbone is built for one image size; give it (--image-size)")
        return vit(name, in_channels, image_size, patch_size)
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
