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
                       description="Decode the images of FOLDER once (shorter side to --image-size, centre crop, as "
                       "the in-memory folder loader does), shuffle them and write OUT/shard-NNNNNN.tar files of PNGs "
                       "(+ class labels) and OUT/shards.json; pretrain with --dataset shards --data-root "
                       "OUT/shards.json. The index may list URLs instead of files. Needs the shards extra "
                       "(webdataset).")
    p.add_argument("folder", help="an image folder (class sub-folders or flat)")
    p.add_argument("out", help="output folder")
    add_fields(p, ShardConfig)
    p.set_defaults(func=cmd_shard)
