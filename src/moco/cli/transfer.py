"""`moco export` and `moco finetune detect|segment|scenes`: the encoder outside of moco."""

import argparse

from .evaluate import CHECKPOINT_HELP
from .flags import add_fields, build


def cmd_export(args: argparse.Namespace) -> int:
    from ..transfer.export import export_encoder

    result = export_encoder(args.checkpoint, args.format, args.out, args.arch)
    enc = result.encoder
    print(f"wrote {result.path}: the {enc.arch} backbone of {args.checkpoint} ({enc.layout}; {result.tensors} "
          f"tensors, no projection head) for {result.format}, checked by loading it back")
    print("\n".join(result.notes))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """`moco finetune detect|segment`: the task's config checked before anything is loaded, then fine-tuned."""
    from ..transfer.detection import DetectionConfig, check_detection_config, finetune_detection
    from ..transfer.finetune import SceneSource, initialisation, load_scenes
    from ..transfer.segmentation import SegmentationConfig, check_segmentation_config, finetune_segmentation

    detect = args.task == "detect"
    cfg = build(args, DetectionConfig if detect else SegmentationConfig)
    (check_detection_config if detect else check_segmentation_config)(cfg)
    encoder, arch = initialisation(args.checkpoint, args.arch)
    train, test = load_scenes(build(args, SceneSource), instances=detect)
    metrics = (finetune_detection if detect else finetune_segmentation)(encoder, arch, train, test, cfg)
    print(f"{'detection' if detect else 'segmentation'} on {test.name} ({len(test)} images): "
          + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from ..transfer.coco import write_scenes
    from ..transfer.finetune import SceneSource, load_scenes

    source = build(args, SceneSource)
    for split, scenes in zip(("train", "test"), load_scenes(source, instances=True)):
        print(f"wrote {write_scenes(scenes, args.out, split)} ({len(scenes)} scenes)")
    return 0


def register(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    from ..transfer.detection import DetectionConfig
    from ..transfer.export import FORMATS
    from ..transfer.finetune import SceneSource
    from ..transfer.segmentation import SegmentationConfig

    p = sub.add_parser("export", help="write the pretrained backbone for torchvision, timm, Detectron2 or as "
                       "safetensors",
                       description="Write the query encoder's backbone, without the projection head, for another "
                       "library. Each file is checked on the way out by loading it back into its target (torchvision "
                       "or timm model; Detectron2: names and tensors against the official MoCo converter's renaming; "
                       "safetensors: the rebuilt backbone) and comparing features with the source; a failed check "
                       "writes nothing.")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchvision/timm: state_dict (.pth); detectron2: .pkl for MODEL.WEIGHTS; safetensors: "
                   "tensors + metadata (the only one for small_cnn); timm needs the timm extra")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--arch", help="architecture of a checkpoint that does not name it (resnet18, resnet34, resnet50)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="transfer an encoder to detection or segmentation (MoCo paper, Sec. 4.2)",
                       description="Fine-tune a pretrained, supervised or random backbone on a dense task with the "
                       "same model and schedule for every initialisation, and report COCO AP or mIoU (detection "
                       "needs the transfer extra: pycocotools).")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=type(p))
    for name, cls, help_ in (
            ("detect", DetectionConfig, "Faster/Mask R-CNN with FPN; COCO box (and mask) AP"),
            ("segment", SegmentationConfig, "DeepLabV3/FCN head on the last stage; mIoU, pixel accuracy")):
        t = tasks.add_parser(name, help=help_, description=help_)
        t.add_argument("checkpoint", help=CHECKPOINT_HELP + ", or 'random'")
        t.add_argument("--arch", help="architecture: needed for 'random' (default resnet18) and for checkpoints that "
                       "do not name it")
        add_fields(t, cls)
        add_fields(t.add_argument_group("data"), SceneSource)
        t.set_defaults(func=cmd_finetune)
    t = tasks.add_parser("scenes", help="write the built-in scenes in COCO and VOC layouts",
                         description="Write the built-in scenes (train and test splits) to OUT: COCO "
                         "annotations/instances_<split>.json, VOC JPEGImages/ + SegmentationClass/ + ImageSets/.")
    t.add_argument("out", help="output folder")
    add_fields(t, SceneSource, skip=("data", "test_data", "train_split", "test_split"))
    t.set_defaults(func=cmd_scenes)
