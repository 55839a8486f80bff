"""Read a pretrained encoder from any checkpoint layout we support, without running code from it.

Layouts:
    moco-pretrain   this project's checkpoints (`format: moco-pretrain`): the query encoder's backbone
    moco-v1/v2      the official releases: state_dict `module.encoder_q.<torchvision resnet keys>`, `arch`
    moco-v3         the official v3 ResNet releases: state_dict `module.base_encoder.<resnet keys>`
    supervised      `moco supervised` checkpoints (the transfer baseline)
    torchvision     a plain torchvision ResNet state_dict (e.g. `moco export`), `arch` given by the caller
In every layout the projection head (`fc.*`) is dropped: evaluation and transfer use the backbone.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import PretrainConfig, from_dict
from ..errors import CheckpointError
from ..model.backbones import build_backbone, resnet
from ..train.checkpoint import FORMAT, SUPERVISED, load_checkpoint

# Torchvision/ImageNet normalisation: what the official releases were trained with.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class LoadedEncoder:
    backbone: nn.Module  # images (B, C, S, S) -> features (B, D), in eval mode
    layout: str  # moco-pretrain | moco-v1/v2 | moco-v3 | torchvision
    arch: str
    channels: int
    size: int | None  # crop size it was trained at (None: unknown, use the data's own size)
    mean: list[float]
    std: list[float]
    config: PretrainConfig | None = None  # the pretraining config, for this project's checkpoints


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects that a safe load refuses (it may run code): {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, renamed without it, the projection head (fc.*) left out."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith("fc.")}


def _load_strict(backbone: nn.Module, weights: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    expected = set(backbone.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} ({layout}) does not fit the backbone: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; check --arch"
        )
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path} ({layout}): shapes do not fit the backbone: {e}; check --arch") from None


def _in_channels(weights: dict[str, torch.Tensor]) -> int:
    first_conv = next((v for v in weights.values() if v.dim() == 4), None)
    if first_conv is None:
        raise CheckpointError("no convolution weights found in the checkpoint's backbone")
    return first_conv.shape[1]


def _small_stem(weights: dict[str, torch.Tensor]) -> bool:
    conv1 = weights.get("conv1.weight")
    return conv1 is not None and conv1.shape[-1] == 3


def load_encoder(path: str | Path, arch: str | None = None) -> LoadedEncoder:
    """The pretrained backbone stored in `path`, whatever its layout, in eval mode on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":  # `moco export --format safetensors`
        from ..transfer.export import read_safetensors

        return read_safetensors(path)
    state = _read(path)
    if state.get("format") == FORMAT:
        state = load_checkpoint(path)  # validates the version
        cfg = from_dict(state["config"])
        weights = _strip(state["model"], "encoder_q.backbone.")
        data = state.get("data")
        if data is None:
            raise CheckpointError(f"{path} lacks the input normalisation (written by a pre-release version); "
                                  "pretrain again")
        backbone = build_backbone(cfg.model.arch, data["channels"], cfg.model.width, cfg.model.small_stem)
        _load_strict(backbone, weights, path, "moco-pretrain")
        return LoadedEncoder(backbone.eval(), "moco-pretrain", cfg.model.arch, data["channels"], data["size"],
                             data["mean"], data["std"], cfg)
    if state.get("format") == SUPERVISED:
        state = load_checkpoint(path, kind=SUPERVISED)
        cfg, data = from_dict(state["config"]), state["data"]
        weights = {k[2:]: v for k, v in state["model"].items() if k.startswith("0.")}  # Sequential(backbone, fc)
        backbone = build_backbone(cfg.model.arch, data["channels"], cfg.model.width, cfg.model.small_stem)
        _load_strict(backbone, weights, path, "supervised")
        return LoadedEncoder(backbone.eval(), "supervised", cfg.model.arch, data["channels"], data["size"],
                             data["mean"], data["std"], cfg)
    if state.get("format") is not None:
        raise CheckpointError(f"{path} is a {state['format']!r} file, not a pretrained encoder")
    sd = state.get("state_dict", state)
    if any(k.startswith("module.encoder_q.") for k in sd):
        layout, weights = "moco-v1/v2", _strip(sd, "module.encoder_q.")
    elif any(k.startswith("module.base_encoder.") for k in sd):
        layout, weights = "moco-v3", _strip(sd, "module.base_encoder.")
        if any(k.startswith(("blocks.", "patch_embed.")) for k in weights):
            raise CheckpointError(f"{path} is a moco-v3 ViT checkpoint; only ResNet backbones are supported")
    elif "conv1.weight" in sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
        layout, weights = "torchvision", _strip(sd, "")
    else:
        keys = list(sd)[:6]
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (first keys {keys}); expected this project's checkpoints, the "
            "official MoCo v1/v2 (module.encoder_q.*) or v3 (module.base_encoder.*) releases, or a torchvision "
            "ResNet state_dict"
        )
    arch = arch or state.get("arch")
    if arch is None:
        raise CheckpointError(f"{path} ({layout}) does not name its architecture; pass --arch resnet50 (or 18/34)")
    channels = _in_channels(weights)
    backbone = resnet(arch, channels, small_stem=_small_stem(weights))
    _load_strict(backbone, weights, path, layout)
    return LoadedEncoder(backbone.eval(), layout, arch, channels, None, IMAGENET_MEAN[:channels] if channels == 3
                         else [0.5] * channels, IMAGENET_STD if channels == 3 else [0.25] * channels)
