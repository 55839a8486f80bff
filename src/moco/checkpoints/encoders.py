"""A pretrained encoder from any checkpoint layout we support, read once and without running code from it.

Layouts:
    moco-pretrain   this project's pretraining checkpoints: the query encoder's backbone
    supervised      `moco supervised` checkpoints (the transfer baseline): Sequential(backbone, fc)
    moco-v1/v2      the official releases: state_dict `module.encoder_q.<torchvision resnet keys>`, `arch`
    moco-v3         the official v3 releases: state_dict `module.base_encoder.<torchvision ResNet or timm ViT keys>`
    torchvision     a plain torchvision ResNet state_dict (e.g. `moco export --format torchvision`)
    safetensors     `moco export --format safetensors`: tensors, with the backbone's recipe in the metadata
In every layout the projection head (`fc.*` of ResNets, `head.*` of ViTs) is dropped: evaluation and transfer use
the backbone. A ViT's recipe (size, patch, image size) is read from its tensors' shapes.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import PretrainConfig, from_dict
from ..errors import CheckpointError, ConfigError
from ..model.backbones import build_backbone, resnet, vit_recipe
from .reading import is_safetensors, read_state
from .runs import ENCODER_VERSIONS, PRETRAIN, SUPERVISED, check_checkpoint

# Torchvision/ImageNet normalisation: what the official releases were trained with.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SAFETENSORS_FORMAT, SAFETENSORS_VERSION = "moco-encoder", 1


@dataclass
class LoadedEncoder:
    backbone: nn.Module  # images (B, C, S, S) -> features (B, D), in eval mode
    layout: str  # moco-pretrain | supervised | moco-v1/v2 | moco-v3 | torchvision | safetensors
    arch: str
    channels: int
    size: int | None  # crop size it was trained at (None: not recorded, e.g. the official releases)
    mean: list[float]
    std: list[float]
    config: PretrainConfig | None = None  # the pretraining config, for this project's checkpoints


def load_encoder(path: str | Path, arch: str | None = None) -> LoadedEncoder:
    """The pretrained backbone stored in `path`, whatever its layout, in eval mode on the CPU."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        return read_safetensors(path)
    state = read_state(path)
    if state.get("format") in (PRETRAIN, SUPERVISED):
        return _ours(state, path)
    if state.get("format") is not None:
        raise CheckpointError(f"{path} is a {state['format']!r} file, not a pretrained encoder")
    return _foreign(state, path, arch)


def _ours(state: dict[str, Any], path: Path) -> LoadedEncoder:
    kind = state["format"]
    check_checkpoint(state, path, kind, ENCODER_VERSIONS)
    cfg, data = from_dict(state["config"]), state.get("data")
    if data is None:
        raise CheckpointError(f"{path} lacks the input normalisation (written by a pre-release version); "
                              "pretrain again")
    # Pretraining checkpoints say where the method keeps its backbone; supervised ones are Sequential(backbone, fc).
    prefix = state.get("backbone", "encoder_q.backbone") + "." if kind == PRETRAIN else "0."
    backbone = build_backbone(cfg.model.arch, data["channels"], cfg.model.width, cfg.model.small_stem, data["size"],
                              cfg.model.patch_size, last_width=cfg.model.last_width,
                              depths=cfg.model.depths)
    layout = "moco-pretrain" if kind == PRETRAIN else "supervised"
    _load_strict(backbone, _strip(state["model"], prefix), path, layout)
    return LoadedEncoder(backbone.eval(), layout, cfg.model.arch, data["channels"], data["size"], data["mean"],
                         data["std"], cfg)


def _foreign(state: dict[str, Any], path: Path, arch: str | None) -> LoadedEncoder:
    sd = state.get("state_dict", state)
    if any(k.startswith("module.encoder_q.") for k in sd):
        layout, weights = "moco-v1/v2", _strip(sd, "module.encoder_q.")
    elif any(k.startswith("module.base_encoder.") for k in sd):
        layout, weights = "moco-v3", _strip(sd, "module.base_encoder.")
        if "cls_token" in weights:
            return _vit(weights, path, layout)
    elif "conv1.weight" in sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
        layout, weights = "torchvision", _strip(sd, "")
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint layout (first keys {list(sd)[:6]}); expected this project's checkpoints, "
            "the official MoCo v1/v2 (module.encoder_q.*) or v3 (module.base_encoder.*) releases, or a torchvision "
            "ResNet state_dict"
        )
    arch = arch or state.get("arch")
    if arch is None:
        raise CheckpointError(f"{path} ({layout}) does not name its architecture; pass --arch resnet50 (or 18/34)")
    channels = _in_channels(weights)
    conv1 = weights.get("conv1.weight")
    backbone = resnet(arch, channels, small_stem=conv1 is not None and conv1.shape[-1] == 3)
    _load_strict(backbone, weights, path, layout)
    rgb = channels == 3
    return LoadedEncoder(backbone.eval(), layout, arch, channels, None,
                         IMAGENET_MEAN if rgb else [0.5] * channels, IMAGENET_STD if rgb else [0.25] * channels)


def _vit(weights: dict[str, torch.Tensor], path: Path, layout: str) -> LoadedEncoder:
    """A ViT of the official v3 release: its recipe read from the tensors' shapes, ImageNet's normalisation."""
    try:
        recipe = vit_recipe(weights)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path} ({layout}): not a ViT this project builds ({e})") from None
    backbone = build_backbone(**recipe)
    _load_strict(backbone, weights, path, layout)
    return LoadedEncoder(backbone.eval(), layout, recipe["name"], recipe["in_channels"], recipe["image_size"],
                         IMAGENET_MEAN, IMAGENET_STD)


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, renamed without it, the projection head (ResNets' fc.*, ViTs' head.*) left out."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(("fc.", "head."))}


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
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path} ({layout}): shapes do not fit the backbone ({first}); check --arch") from None


def _in_channels(weights: dict[str, torch.Tensor]) -> int:
    first_conv = next((v for v in weights.values() if v.dim() == 4), None)
    if first_conv is None:
        raise CheckpointError("no convolution weights found in the checkpoint's backbone")
    return first_conv.shape[1]


# --- safetensors: our own encoder format ------------------------------------------------------------


def write_safetensors(encoder: LoadedEncoder, path: str | Path) -> None:
    """The backbone's tensors in `path`, with what rebuilding and feeding it needs in the header's metadata.

    Writes `path` directly: callers that replace a file go through `files.atomic_write`.
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    if "cls_token" in weights:
        backbone = vit_recipe(weights)  # build_backbone's arguments
    else:
        convs = [v for v in weights.values() if v.dim() == 4]
        backbone = {"name": encoder.arch, "in_channels": convs[0].shape[1], "width": convs[0].shape[0],
                    "small_stem": convs[0].shape[-1] == 3}
        if encoder.arch == "small_cnn":
            backbone["last_width"] = convs[-1].shape[0]
            backbone["depths"] = list(encoder.backbone.depths)
    metadata = {
        "format": SAFETENSORS_FORMAT, "format_version": str(SAFETENSORS_VERSION), "arch": encoder.arch,
        "layout": encoder.layout, "channels": json.dumps(encoder.channels), "image_size": json.dumps(encoder.size),
        "mean": json.dumps(encoder.mean), "std": json.dumps(encoder.std), "backbone": json.dumps(backbone),
    }
    if encoder.config is not None:
        metadata["config"] = json.dumps(asdict(encoder.config))
    save_file(weights, path, metadata)


def read_safetensors(path: str | Path) -> LoadedEncoder:
    """The backbone of a safetensors export, rebuilt from its metadata, in eval mode on the CPU."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path} is not a moco encoder export (metadata format {meta.get('format')!r})")
    if meta.get("format_version") != str(SAFETENSORS_VERSION):
        raise CheckpointError(f"{path} is encoder export version {meta.get('format_version')}; this moco reads "
                              f"version {SAFETENSORS_VERSION}")
    backbone = build_backbone(**json.loads(meta["backbone"]))
    _load_strict(backbone, tensors, path, "safetensors")
    config = from_dict(json.loads(meta["config"])) if "config" in meta else None
    return LoadedEncoder(backbone.eval(), "safetensors", meta["arch"], json.loads(meta["channels"]),
                         json.loads(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"]), config)
