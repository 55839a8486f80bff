"""Export a pretrained encoder's backbone (the query encoder, without its projection head) for other libraries.

Formats:
    torchvision   torch.save of a plain state_dict for `torchvision.models.resnetN()` with `fc = Identity()`
    timm          the same tensors under timm's names (identical for resnet18/34/50 and for our ViTs, which are
                  timm's) for `timm.create_model("resnetN", num_classes=0)` or
                  `timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)` (MoCo v3's ViT-S has
                  12 heads where timm's has 6)
    detectron2    a pickle as the official MoCo converter writes it (`detection/convert-pretrain-to-detectron2.py`):
                  {"model": {detectron2 name: numpy array}, "__author__": "MOCO", "matching_heuristics": True}
    safetensors   the backbone's tensors, with what rebuilding and feeding it needs in the header's metadata

Every export is written to a temporary file beside the output, checked by loading it back into its
target and comparing against the source backbone, and only then renamed into place: a failed check
raises ExportCheckError and leaves the output path as it was.
"""

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..checkpoints import LoadedEncoder, load_encoder, read_safetensors, write_safetensors
from ..errors import ConfigError, MocoError
from ..extras import require
from ..files import atomic_write
from ..model.backbones import is_vit

FORMATS = ("torchvision", "timm", "detectron2", "safetensors")
# Blocks per stage (res2..res5) and convolutions per block (basic: 2, bottleneck: 3) of the ResNets we export.
RESNET_STRUCTURE = {"resnet18": ((2, 2, 2, 2), 2), "resnet34": ((3, 4, 6, 3), 2), "resnet50": ((3, 4, 6, 3), 3)}
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# timm's model of each of our ViTs, and what that model's defaults are (what the export's create_model overrides).
TIMM_VITS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
TIMM_VIT_DEFAULTS = {
    "vit_tiny_patch16_224": dict(img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12),
}


class ExportCheckError(MocoError):
    """An export that did not load back into its target as the source backbone; nothing was written. A defect of
    the conversion, not of the user's input: exit status 1."""

    exit_code = 1


@dataclass
class Export:
    path: Path
    format: str
    encoder: LoadedEncoder  # the source backbone
    tensors: int
    notes: list[str]  # how to load the file and feed the model, one line each


def export_encoder(checkpoint: str | Path, fmt: str, out: str | Path, arch: str | None = None) -> Export:
    """Write the backbone of `checkpoint` (any layout `load_encoder` reads) to `out` in format `fmt`, checked."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "detectron2" and out.suffix != ".pkl":
        raise ConfigError(f"Detectron2 reads this format only from files ending in .pkl; name the output "
                          f"{out.with_suffix('.pkl')}")
    if out.resolve() == Path(checkpoint).resolve():
        raise ConfigError(f"--out {out} is the checkpoint itself; choose another output file")
    timm = require("timm", "--format timm") if fmt == "timm" else None
    encoder = load_encoder(checkpoint, arch)
    _check_exportable(encoder, fmt)
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    if fmt == "torchvision":
        notes = _export_torchvision(encoder, weights, out)
    elif fmt == "timm":
        notes = _export_timm(timm, encoder, weights, out)
    elif fmt == "detectron2":
        notes = _export_detectron2(encoder, weights, out)
    else:
        notes = _export_safetensors(encoder, weights, out)
    size = f"{encoder.size} px" if encoder.size else "training size not recorded"
    notes.append(f"inputs: {encoder.channels}-channel images ({size}) scaled to [0, 1], then normalised with "
                 f"mean {_rounded(encoder.mean)} and std {_rounded(encoder.std)}")
    return Export(out, fmt, encoder, len(weights), notes)


def _check_exportable(encoder: LoadedEncoder, fmt: str) -> None:
    vit = encoder.arch in TIMM_VITS
    if vit and fmt not in ("timm", "safetensors"):
        raise ConfigError(f"the {encoder.arch} backbone is a timm Vision Transformer: export it with --format timm "
                          "or --format safetensors")
    if not vit and fmt != "safetensors" and encoder.arch not in RESNET_STRUCTURE:
        raise ConfigError(
            f"the {encoder.arch} backbone is not a torchvision ResNet, so torchvision, timm and detectron2 cannot "
            "build it; export it with --format safetensors (moco.checkpoints.read_safetensors rebuilds it)"
        )
    if fmt == "detectron2" and _small_stem(encoder):
        raise ConfigError(
            "this encoder has the small-image stem (3x3 stride-1 conv1, no max-pool) but Detectron2's ResNet stem "
            "is a 7x7 stride-2 conv with max-pool, so conv1 would not load; export it as torchvision, timm or "
            "safetensors instead"
        )
    if fmt == "detectron2" and encoder.channels not in (1, 3):
        raise ConfigError(f"Detectron2 reads RGB or grayscale (INPUT.FORMAT L) images; this encoder takes "
                          f"{encoder.channels} channels")


def _small_stem(encoder: LoadedEncoder) -> bool:
    conv1 = getattr(encoder.backbone, "conv1", None)
    return conv1 is not None and conv1.kernel_size == (3, 3)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


# --- torchvision and timm ---------------------------------------------------------------------------


def _export_torchvision(encoder: LoadedEncoder, weights: dict[str, torch.Tensor], out: Path) -> list[str]:
    import torchvision

    def target() -> nn.Module:
        model = getattr(torchvision.models, encoder.arch)(weights=None)
        model.fc = nn.Identity()
        if encoder.channels != 3 and not _small_stem(encoder):
            model.conv1 = nn.Conv2d(encoder.channels, 64, 7, stride=2, padding=3, bias=False)
        return _with_small_stem(model, encoder)

    _write_state_dict(out, weights, encoder, target)
    lines = ["load it with:", f"  model = torchvision.models.{encoder.arch}()"]
    if encoder.channels != 3 and not _small_stem(encoder):
        lines.append(f"  model.conv1 = torch.nn.Conv2d({encoder.channels}, 64, 7, stride=2, padding=3, bias=False)"
                     f"  # {encoder.channels}-channel input")
    lines += _small_stem_lines(encoder)
    lines += ["  model.fc = torch.nn.Identity()  # no classifier is exported: put your own head here",
              f"  model.load_state_dict(torch.load({str(out)!r}, weights_only=True))"]
    return lines


def timm_vit_arguments(encoder: LoadedEncoder) -> tuple[str, dict[str, int]]:
    """timm's model name for the encoder's ViT and the create_model arguments that make it this ViT: those that
    differ from that model's defaults."""
    name = TIMM_VITS[encoder.arch]
    vit = encoder.backbone
    actual = dict(img_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                  in_chans=encoder.channels, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                  num_heads=vit.blocks[0].attn.num_heads)
    return name, {k: v for k, v in actual.items() if TIMM_VIT_DEFAULTS[name][k] != v}


def _export_timm(timm: ModuleType, encoder: LoadedEncoder, weights: dict[str, torch.Tensor], out: Path) -> list[str]:
    if encoder.arch in TIMM_VITS:
        return _export_timm_vit(timm, encoder, weights, out)

    def target() -> nn.Module:
        model = timm.create_model(encoder.arch, pretrained=False, num_classes=0, in_chans=encoder.channels)
        return _with_small_stem(model, encoder)

    _write_state_dict(out, weights, encoder, target)
    return ["load it with:",
            f"  model = timm.create_model({encoder.arch!r}, num_classes=0, in_chans={encoder.channels})",
            *_small_stem_lines(encoder),
            f"  model.load_state_dict(torch.load({str(out)!r}, weights_only=True))",
            "  (num_classes=0: no classifier is exported; timm.create_model(..., num_classes=N) adds a new one, "
            "load with strict=False then)"]


def _export_timm_vit(timm: ModuleType, encoder: LoadedEncoder, weights: dict[str, torch.Tensor],
                     out: Path) -> list[str]:
    name, kwargs = timm_vit_arguments(encoder)

    def target() -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)

    _write_state_dict(out, weights, encoder, target)
    args = "".join(f", {k}={v}" for k, v in kwargs.items())
    return ["load it with:",
            f"  model = timm.create_model({name!r}, num_classes=0{args})",
            f"  model.load_state_dict(torch.load({str(out)!r}, weights_only=True))",
            "  (the output is the class token's feature; the position embeddings are MoCo v3's fixed sin-cos ones "
            "and the patch projection the random one it never trained: freeze both when fine-tuning as the paper "
            "does, with model.pos_embed.requires_grad_(False) and model.patch_embed.requires_grad_(False))"]


def _write_state_dict(out: Path, weights: dict[str, torch.Tensor], encoder: LoadedEncoder,
                      target: Callable[[], nn.Module]) -> None:
    """`weights` saved as a plain state_dict, checked by loading it strictly into a fresh `target()`."""

    def check(tmp: Path) -> None:
        _check_loads(target(), torch.load(tmp, map_location="cpu", weights_only=True), encoder, weights)

    _write_checked(out, lambda tmp: torch.save(weights, tmp), check)


def _with_small_stem(model: nn.Module, encoder: LoadedEncoder) -> nn.Module:
    """`model` with the 3x3 stride-1 conv1 and no max-pool of moco's small-image stem, if the encoder has it."""
    if _small_stem(encoder):
        model.conv1 = nn.Conv2d(encoder.channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _small_stem_lines(encoder: LoadedEncoder) -> list[str]:
    if not _small_stem(encoder):
        return []
    return [f"  model.conv1 = torch.nn.Conv2d({encoder.channels}, 64, 3, stride=1, padding=1, bias=False)"
            "  # this encoder's small-image stem",
            "  model.maxpool = torch.nn.Identity()"]


def _check_loads(model: nn.Module, state: Any, encoder: LoadedEncoder, weights: dict[str, torch.Tensor]) -> None:
    """`state` loads strictly into `model`, holds exactly `weights`, and `model` computes what the source does."""
    if not isinstance(state, dict):
        raise ExportCheckError(f"the file holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportCheckError(f"it does not load into {type(model).__name__} with strict=True: {e}") from None
    _check_same_tensors(weights, model.state_dict())
    _check_same_function(encoder, model)


def _check_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    if set(expected) != set(actual):
        raise ExportCheckError(f"names differ: missing {sorted(set(expected) - set(actual))[:8]}, unexpected "
                               f"{sorted(set(actual) - set(expected))[:8]}")
    changed = [k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])]
    if changed:
        raise ExportCheckError(f"tensors differ from the source backbone's: {changed[:8]}")


@torch.no_grad()
def _check_same_function(encoder: LoadedEncoder, model: nn.Module) -> None:
    """Equal tensors under equal names can still mean other things in another architecture: compare outputs."""
    # The weights' meaning does not depend on the resolution: keep it cheap, except for a ViT, built for one size.
    size = encoder.size if is_vit(encoder.backbone) else min(encoder.size or 64, 64)
    x = torch.randn(2, encoder.channels, size, size, generator=torch.Generator().manual_seed(0))
    want, got = encoder.backbone.eval()(x), model.eval()(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        detail = (f"shape {tuple(got.shape)} instead of {tuple(want.shape)}" if want.shape != got.shape
                  else f"max difference {(want - got).abs().max().item():.3g}")
        raise ExportCheckError(f"the loaded model's features differ from the source backbone's ({detail})")


# --- Detectron2 -------------------------------------------------------------------------------------


def detectron2_name(key: str) -> str:
    """The Detectron2 name of a torchvision ResNet parameter, by the official MoCo converter's rules.

    `layerN.` -> `resN+1.`, anything outside the stages gets the prefix `stem.`, `bnK` -> `convK.norm`,
    `downsample.0/1` -> `shortcut`/`shortcut.norm`; the BN entries keep their PyTorch names (weight, bias,
    running_mean, running_var, num_batches_tracked), which are also those of Detectron2's norm layers.
    The `stem.`/`resN.` prefixes keep every name a unique suffix of a Detectron2 model key, which is
    what its matching heuristics (c2_model_loading.align_and_update_state_dicts) pair names by.
    """
    stage = re.match(r"layer(\d)\.", key)
    name = f"res{int(stage[1]) + 1}.{key[stage.end():]}" if stage else f"stem.{key}"
    name = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def torchvision_name(name: str) -> str:
    """The inverse of `detectron2_name`."""
    stage = re.match(r"res(\d)\.", name)
    key = f"layer{int(stage[1]) - 1}.{name[stage.end():]}" if stage else name.removeprefix("stem.")
    key = key.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return re.sub(r"(^|\.)conv(\d)\.norm\.", r"\1bn\2.", key)


def detectron2_names(arch: str) -> set[str]:
    """Every name Detectron2's ResNet-18/34/50 backbone loads, generated from the ResNet structure alone."""
    blocks, convs = RESNET_STRUCTURE[arch]
    expansion = 4 if convs == 3 else 1

    def conv(prefix: str) -> list[str]:
        return [f"{prefix}.weight", *(f"{prefix}.norm.{entry}" for entry in BN_ENTRIES)]

    names = conv("stem.conv1")
    channels = 64
    for stage, n in enumerate(blocks):
        out = 64 * 2**stage * expansion
        for block in range(n):
            prefix = f"res{stage + 2}.{block}"
            for k in range(1, convs + 1):
                names += conv(f"{prefix}.conv{k}")
            if block == 0 and (stage > 0 or channels != out):  # the first block changes stride or width
                names += conv(f"{prefix}.shortcut")
        channels = out
    return set(names)


def detectron2_config(encoder: LoadedEncoder) -> dict[str, Any]:
    """The Detectron2 config values this backbone needs (torchvision-style ResNet, its own normalisation)."""
    depth = int(encoder.arch.removeprefix("resnet"))
    cfg: dict[str, Any] = {
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision strides in the 3x3 conv; Detectron2's default is 1x1
        "MODEL.RESNETS.NORM": "SyncBN",  # fine-tune BN, as the paper does, rather than freeze it
        "MODEL.PIXEL_MEAN": [round(255 * m, 3) for m in encoder.mean],  # Detectron2 feeds 0-255 pixels
        "MODEL.PIXEL_STD": [round(255 * s, 3) for s in encoder.std],
        "INPUT.FORMAT": "RGB" if encoder.channels == 3 else "L",
    }
    if depth in (18, 34):
        cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64  # Detectron2 requires it for basic blocks
    return cfg


def _export_detectron2(encoder: LoadedEncoder, weights: dict[str, torch.Tensor], out: Path) -> list[str]:
    config = detectron2_config(encoder)
    # Detectron2's checkpointer returns keys besides "model" to the caller untouched: the config travels along.
    payload = {"model": {detectron2_name(k): v.numpy() for k, v in weights.items()}, "__author__": "MOCO",
               "matching_heuristics": True, "moco_config": config}
    data = pickle.dumps(payload)

    def check(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise ExportCheckError("the file on disk differs from what was written")
        # Detectron2 is not a dependency: check what it will match against instead of loading it. These are
        # bytes pickled a moment ago in this process, never a file from elsewhere.
        _check_detectron2(pickle.loads(data), encoder, weights)

    _write_checked(out, lambda tmp: tmp.write_bytes(data), check)
    overrides = " ".join(f"{k} {_cli_value(v)}" for k, v in config.items())
    return ["fine-tune with Detectron2 (also stored in the pickle under 'moco_config'):",
            f"  train_net.py --config-file CONFIG MODEL.WEIGHTS {out} {overrides}",
            "  keep MODEL.BACKBONE.FREEZE_AT 0 to fine-tune every layer, as the paper does"]


def _cli_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, list) else str(value)


def _check_detectron2(payload: dict[str, Any], encoder: LoadedEncoder, weights: dict[str, torch.Tensor]) -> None:
    model = payload["model"]
    if payload["__author__"] != "MOCO" or payload["matching_heuristics"] is not True:
        raise ExportCheckError("the pickle lacks __author__ MOCO or matching_heuristics True")
    expected = detectron2_names(encoder.arch)
    if len(model) != len(weights) or set(model) != expected:
        raise ExportCheckError(
            f"the renaming is not a bijection onto Detectron2's {encoder.arch} names: missing "
            f"{sorted(expected - set(model))[:8]}, unexpected {sorted(set(model) - expected)[:8]}, "
            f"{len(weights)} source tensors for {len(model)} names"
        )
    _check_same_tensors(weights, {torchvision_name(k): torch.from_numpy(v) for k, v in model.items()})


# --- safetensors ------------------------------------------------------------------------------------


def _export_safetensors(encoder: LoadedEncoder, weights: dict[str, torch.Tensor], out: Path) -> list[str]:
    def check(tmp: Path) -> None:
        rebuilt = read_safetensors(tmp)
        _check_same_tensors(weights, rebuilt.backbone.state_dict())
        if (rebuilt.arch, rebuilt.channels, rebuilt.size, rebuilt.mean, rebuilt.std, rebuilt.config) != (
                encoder.arch, encoder.channels, encoder.size, encoder.mean, encoder.std, encoder.config):
            raise ExportCheckError("the metadata read back differs from the source encoder's")
        _check_same_function(encoder, rebuilt.backbone)

    _write_checked(out, lambda tmp: write_safetensors(encoder, tmp), check)
    return ["load it with:",
            f"  moco.checkpoints.read_safetensors({str(out)!r})  # the backbone rebuilt, with its preprocessing",
            f"  or safetensors.torch.load_file({str(out)!r}) and the header's metadata (arch, backbone, mean, std)"]


# --- writing ----------------------------------------------------------------------------------------


def _write_checked(path: Path, write: Callable[[Path], object], check: Callable[[Path], None]) -> None:
    """Write `path` atomically (`atomic_write`), renaming it into place only once it passes `check`."""
    try:
        atomic_write(path, write, check)
    except ExportCheckError as e:
        raise ExportCheckError(f"the export failed its check, so {path} was not written: {e}") from None
