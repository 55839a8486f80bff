"""`moco shard`: pack an image folder into WebDataset shards."""

import argparse

from .flags import add_fields, build


def cmd_shard(args: argparse.Namespace) -> int:
    from ..data.shards import ShardConfig, write_shards

    index = write_shards(args.folder, args.out, build(args, ShardConfig))
    print(f"pretrain from them with: moco pretrain --dataset shards --data-root {index}")
    return 0


def register(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    from ..data.shards import ShardConfig

    p = sub.add_parser("shard", help="pack an image folder into WebDataset tar shards",
                       description="Pack the image files of FOLDER's train split, shuffled, into OUT/shard-NNNNNN.tar "
                       "files (+ class labels) and OUT/shards.json: each file's bytes as they are, or with --max-side "
                       "downscaled once in its own format. Pretrain with --dataset shards --data-root OUT/shards.json "
                       "(two crops of each original are decoded while training, as for a streamed folder). The index "
                       "may list URLs instead of files. Needs the shards extra (webdataset).")
    p.add_argument("folder", help="an image folder (class sub-folders or flat)")
    p.add_argument("out", help="output folder")
    add_fields(p, ShardConfig)
    p.set_defaults(func=cmd_shard)
