"""Scenes on disk in the formats of COCO and VOC, and COCO's detection metrics.

`write_scenes(scenes, root, split)` writes one split in both layouts at once, the images shared:

    root/JPEGImages/<split>_000000.png            the images (PNG: lossless; VOC readers accept .jpg or .png)
    root/SegmentationClass/<split>_000000.png     VOC semantic masks: palette PNG, 0 background, 255 ignore
    root/ImageSets/Segmentation/<split>.txt       VOC image list
    root/annotations/instances_<split>.json       COCO instances: boxes, RLE masks, categories
    root/classes.txt                              class names, label 1 first (VOC has no such file of its own)

`read_coco` and `read_voc` read such folders back, and users' own data in the same formats. COCO crowd
annotations (iscrowd=1) are left out: they are neither trained on nor, here, evaluated against.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..extras import require
from ..files import write_text
from .scenes import Scenes, semantic_from_instances

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pycocotools():
    require("pycocotools", "COCO files and detection AP")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval, mask_utils


def encode_mask(mask: torch.Tensor) -> dict:
    """COCO's compressed RLE of an (H, W) bool mask, its counts as text so that it fits in JSON."""
    _, _, mask_utils = _pycocotools()
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def coco_dataset(scenes: Scenes, file_names: list[str] | None = None) -> dict:
    """The COCO instances dict of `scenes` (image ids 1..N, annotation ids 1..)."""
    images, annotations = [], []
    for i, (image, boxes, labels, masks) in enumerate(zip(scenes.images, scenes.boxes, scenes.labels, scenes.masks)):
        entry = {"id": i + 1, "height": image.shape[1], "width": image.shape[2]}
        if file_names is not None:
            entry["file_name"] = file_names[i]
        images.append(entry)
        for box, label, mask in zip(boxes.tolist(), labels.tolist(), masks):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": encode_mask(mask)})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(scenes.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_ground_truth(scenes: Scenes):
    """A pycocotools COCO object holding `scenes` as ground truth (image id = index + 1)."""
    COCO, _, _ = _pycocotools()
    gt = COCO()
    gt.dataset = coco_dataset(scenes)
    with redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_evaluate(gt, results: list[dict], iou_type: str) -> dict[str, float]:
    """COCO AP (IoU .5:.95), AP50 and AP75 in percent of `results` against `gt`; iou_type bbox or segm."""
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    _, COCOeval, _ = _pycocotools()
    with redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (100 * max(0.0, float(s)) for s in evaluation.stats[:3])  # -1: no ground truth at all
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 values): the colours VOC's SegmentationClass PNGs show."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def write_scenes(scenes: Scenes, root: str | Path, split: str) -> Path:
    """Write `scenes` as split `split` of `root` in COCO and VOC layouts; returns the COCO JSON path."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"{split}_{i:06d}" for i in range(len(scenes))]
    palette = voc_palette()
    for name, image, semantic in zip(names, scenes.images, scenes.semantic):
        _to_pil(image).save(root / "JPEGImages" / f"{name}.png")
        mask = Image.fromarray(semantic.numpy())
        mask.putpalette(palette)  # makes the grey image a palette ("P") image with the same indices
        mask.save(root / "SegmentationClass" / f"{name}.png")
    write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{n}\n" for n in names))
    write_text(root / "classes.txt", "".join(f"{c}\n" for c in scenes.classes))
    path = root / "annotations" / f"instances_{split}.json"
    write_text(path, json.dumps(coco_dataset(scenes, [f"{n}.png" for n in names])))
    return path


def _read_image(path: Path) -> torch.Tensor:
    """(C, H, W) uint8: grey images keep 1 channel, everything else becomes RGB."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            array = np.asarray(img)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1).contiguous()


def _image_dir(json_path: Path, first_file: str) -> Path:
    """Where the images of a COCO file are: root/JPEGImages (our layout), root/<split> (COCO's:
    annotations/instances_val2017.json -> val2017/), or the JSON's own folder."""
    split = json_path.stem.removeprefix("instances_")
    candidates = [json_path.parent.parent / "JPEGImages", json_path.parent.parent / split, json_path.parent]
    for folder in candidates:
        if (folder / first_file).is_file():
            return folder
    raise DataError(f"cannot find the images of {json_path} (e.g. {first_file}) in any of "
                    f"{', '.join(str(c) for c in candidates)}; pass image_dir")


def read_coco(json_path: str | Path, image_dir: str | Path | None = None) -> Scenes:
    """The images and instance annotations of a COCO JSON file; categories become labels 1..K in id order."""
    COCO, _, _ = _pycocotools()
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"COCO annotation file {json_path} does not exist")
    try:
        with redirect_stdout(io.StringIO()):
            coco = COCO(str(json_path))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{json_path} is not a COCO instances file: {e}") from None
    image_ids = sorted(coco.getImgIds())
    if not image_ids:
        raise DataError(f"{json_path} lists no images")
    category_ids = sorted(coco.getCatIds())
    label_of = {cat: k + 1 for k, cat in enumerate(category_ids)}
    folder = Path(image_dir) if image_dir else _image_dir(json_path, coco.imgs[image_ids[0]]["file_name"])
    images, boxes, labels, masks, semantic = [], [], [], [], []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        image = _read_image(folder / info["file_name"])
        h, w = image.shape[1:]
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        item_masks = []
        for ann in anns:
            if ann.get("segmentation"):
                with warnings.catch_warnings():  # pycocotools' decoder trips numpy 2's __array__(copy=) notice
                    warnings.simplefilter("ignore", DeprecationWarning)
                    item_masks.append(torch.from_numpy(coco.annToMask(ann)).bool())
            else:  # a box-only annotation: its box is its mask
                x, y, bw, bh = ann["bbox"]
                mask = torch.zeros(h, w, dtype=torch.bool)
                mask[round(y):round(y + bh), round(x):round(x + bw)] = True
                item_masks.append(mask)
        item_boxes = [torch.tensor([x, y, x + bw, y + bh], dtype=torch.float32)
                      for x, y, bw, bh in (a["bbox"] for a in anns)]
        images.append(image)
        masks.append(torch.stack(item_masks) if item_masks else torch.zeros(0, h, w, dtype=torch.bool))
        boxes.append(torch.stack(item_boxes) if item_boxes else torch.zeros(0, 4))
        labels.append(torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64))
        semantic.append(semantic_from_instances(masks[-1], labels[-1], h, w))
    classes = [coco.cats[c].get("name", str(c)) for c in category_ids]
    return Scenes(images, boxes, labels, masks, semantic, classes, str(json_path))


def read_voc(root: str | Path, split: str) -> Scenes:
    """A VOC-style segmentation split: JPEGImages/ + SegmentationClass/ PNGs listed in ImageSets/Segmentation/.

    VOC folders hold no instances: boxes, labels and masks come back empty. Class names are read from
    root/classes.txt when present, else the classes are numbered up to the largest id in the masks.
    """
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{root} is not a VOC-style folder with a {split!r} split: {listing} does not exist")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{listing} lists no images")
    images, semantic = [], []
    for name in names:
        image_path = next((root / "JPEGImages" / f"{name}{s}" for s in _IMAGE_SUFFIXES
                           if (root / "JPEGImages" / f"{name}{s}").is_file()), None)
        if image_path is None:
            raise DataError(f"{root / 'JPEGImages'} has no image {name}.png or {name}.jpg")
        mask_path = root / "SegmentationClass" / f"{name}.png"
        try:
            with Image.open(mask_path) as m:  # palette PNGs read as their indices, the class ids
                target = torch.from_numpy(np.array(m if m.mode in ("P", "L") else m.convert("L")))
        except OSError as e:
            raise DataError(f"cannot read mask {mask_path}: {e}") from None
        image = _read_image(image_path)
        if tuple(target.shape) != tuple(image.shape[1:]):
            raise DataError(f"{mask_path} is {tuple(target.shape)} but its image is {tuple(image.shape[1:])}")
        images.append(image)
        semantic.append(target.to(torch.uint8))
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        top = max(int(s[s != 255].max()) if (s != 255).any() else 0 for s in semantic)
        classes = [f"class {k}" for k in range(1, top + 1)]
    n = len(images)
    empty = [torch.zeros(0, dtype=torch.int64) for _ in range(n)]
    return Scenes(images, [torch.zeros(0, 4) for _ in range(n)], empty,
                  [torch.zeros(0, *img.shape[1:], dtype=torch.bool) for img in images], semantic, classes,
                  f"{root}:{split}")


def read_scenes(path: str | Path, split: str, instances: bool) -> Scenes:
    """A split of user data: a COCO JSON file, or a folder (COCO annotations/instances_<split>.json if it has
    one, else VOC). `instances`: the task needs boxes and instance masks, which only COCO files give."""
    path = Path(path)
    if path.suffix == ".json":
        return read_coco(path)
    if not path.is_dir():
        raise DataError(f"{path} is neither a COCO JSON file nor a folder")
    coco = path / "annotations" / f"instances_{split}.json"
    if coco.is_file():
        return read_coco(coco)
    if instances:
        raise DataError(f"{path} has no {coco.relative_to(path)}: detection needs COCO instance annotations")
    return read_voc(path, split)

