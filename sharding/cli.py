"""``ssfer-shard`` — build | verify | inspect | split (argparse lives here only).

Every subcommand hands plain values to the module that does the work. ``UserError`` -> one line on
stderr and exit code 2; ``verify`` exits 1 when it finds problems.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ssfer_dist.errors import UserError

__all__ = ["main", "build_parser"]


def _add_build(sub) -> None:
    from sharding.sources import FORMATS

    p = sub.add_parser("build", help="turn a dataset into WebDataset shards + manifest.parquet + report.json")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="dataset folder (or .rec / fer2013.csv file)")
    p.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="train | test | all (val: FER2013 PublicTest); ignored by image-folder and insightface-rec")
    p.add_argument("--image-size", type=int, default=112, help="stored square image side (default 112)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30,
                   help="cut shards before this many bytes (estimated from source sizes)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--seed", type=int, default=0, help="sample order seed (same seed -> identical shards)")
    p.add_argument("--name", default=None, help="shard/key prefix (default: the dataset's name)")
    p.add_argument("--detector", default="none", choices=["none", "haar", "mtcnn"],
                   help="face detector for images without boxes (none: images are aligned face crops)")
    p.add_argument("--num-classes", type=int, default=7, choices=[7, 8], help="AffectNet protocol (7 or 8 classes)")
    p.add_argument("--boxes", default=None, help="VGGFace2 loose_bb_*.csv for image-folder (auto-detected)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--box-scale", type=float, default=1.25, help="crop side = box-scale x the face box's longer side")
    p.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024,
                   help="skip images larger than this (decompression-bomb guard)")
    p.add_argument("--ray", action="store_true", help="run shard tasks on Ray (also when RAY_ADDRESS is set)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(a) -> int:
    from sharding.build import BuildConfig, run_build

    cfg = BuildConfig(format=a.format, input=a.input, output=a.output, split=a.split, image_size=a.image_size,
                      samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes, workers=a.workers,
                      seed=a.seed, name=a.name, detector=a.detector, num_classes=a.num_classes, boxes=a.boxes,
                      jpeg_quality=a.jpeg_quality, box_scale=a.box_scale, max_pixels=a.max_pixels,
                      use_ray=a.ray, progress=not a.no_progress)
    rep = run_build(cfg)
    print(f"{rep['num_samples']} samples in {rep['num_shards']} shards -> {a.output} "
          f"({rep['num_skipped']} skipped: {rep['skipped_by_reason'] or 'none'}; "
          f"{rep['images_per_s']} images/s)")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-read every shard: sha256, counts, images, keys, json")
    p.add_argument("url", help="shard folder (or its manifest.parquet)")
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(a) -> int:
    from sharding.verify import verify

    problems, stats = verify(a.url)
    for pr in problems:
        print(pr)
    status = "FAILED" if problems else "OK"
    print(f"verify {status}: {stats['num_shards']} shards, {stats['num_samples']} samples, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summary + a contact sheet PNG of samples with their boxes")
    p.add_argument("url", help="shard folder (or its manifest.parquet)")
    p.add_argument("--sheet", default="contact_sheet.png", help="contact sheet PNG to write")
    p.add_argument("--num", type=int, default=64, help="samples on the sheet")
    p.set_defaults(handler=_cmd_inspect)


def _cmd_inspect(a) -> int:
    from sharding.inspect import inspect_shards

    print(inspect_shards(a.url, sheet=a.sheet, num=a.num))
    return 0


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="labeled subset + unlabeled remainder (semi-supervised stage)")
    p.add_argument("--manifest", required=True, help="source shard folder (or its manifest.parquet)")
    p.add_argument("--fraction", type=float, required=True, help="labeled fraction, e.g. 0.05")
    p.add_argument("--per-class", action="store_true", help="draw the fraction within every class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="writes OUTPUT/labeled and OUTPUT/unlabeled")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.set_defaults(handler=_cmd_split)


def _cmd_split(a) -> int:
    from sharding.split import split_shards

    res = split_shards(a.manifest, a.output, fraction=a.fraction, per_class=a.per_class, seed=a.seed,
                       samples_per_shard=a.samples_per_shard)
    print(f"labeled: {res['labeled']} samples, unlabeled: {res['unlabeled']} samples -> {a.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssfer-shard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_verify, _add_inspect, _add_split):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``ssfer-shard`` / ``python -m sharding``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"ssfer-shard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
