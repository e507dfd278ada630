"""``ssfer-shard`` — build | verify | inspect | split (argparse lives here only).

Every subcommand hands plain values to the module that does the work. ``UserError`` -> one line on
stderr and exit code 2; ``verify`` exits 1 when it finds problems.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

import yaml

from sharding import build
from sharding.build import BuildConfig
from sharding.inspection import inspect_shards
from sharding.sources import FORMATS
from sharding.split import split_shards
from sharding.verify import verify
from ssfer_dist.errors import UserError, run_command
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from ssfer_dist.typed import ConfigError, convert_fields

__all__ = ["main", "build_parser"]


def _default(field: str):
    """A ``BuildConfig`` field's default (help texts only: unset flags stay None and BuildConfig applies it)."""
    return {f.name: f.default for f in dataclasses.fields(BuildConfig)}[field]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _add_build(sub) -> None:
    d = _default
    p = sub.add_parser("build", help="turn a dataset into WebDataset shards + manifest.parquet + report.json")
    p.add_argument("--spec", default=None, help="YAML file with the same fields (flags given here override it)")
    p.add_argument("--format", choices=FORMATS, help="(required here or in --spec)")
    p.add_argument("--input", help="dataset folder (or .rec / fer2013.csv file)")
    p.add_argument("--output", help="output folder or s3://bucket/prefix")
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help=f"train | test | all (val: FER2013 PublicTest); ignored by image-folder and insightface-rec "
                        f"(default {d('split')})")
    p.add_argument("--image-size", type=int, help=f"stored square image side (default {d('image_size')})")
    p.add_argument("--samples-per-shard", type=int, help=f"default {d('samples_per_shard')}")
    p.add_argument("--max-shard-bytes", type=int,
                   help=f"cut shards before this many bytes (estimated from source sizes; "
                        f"default {d('max_shard_bytes')})")
    p.add_argument("--workers", type=int,
                   help="worker processes on this machine (default: every CPU this process may use)")
    p.add_argument("--seed", type=int, help=f"sample order seed; same seed -> identical shards (default {d('seed')})")
    p.add_argument("--name", default=None, help="shard/key prefix (default: the dataset's name)")
    p.add_argument("--detector", choices=["none", "haar", "mtcnn"],
                   help=f"face detector for images without boxes; for aligned sets (rafdb, ferplus, "
                        f"insightface-rec) the detected box is recorded and the aligned frame kept, with a "
                        f"centred fallback box where no face is found (counted) "
                        f"(default {d('detector')}: images are aligned face crops, box = frame)")
    p.add_argument("--no-face", choices=["skip", "keep"],
                   help=f"with --detector, an image where it finds no face is skipped, or kept as a centred "
                        f"crop (a 'fallback' box, yellow on the inspect contact sheet) (default {d('no_face')})")
    p.add_argument("--num-classes", type=int, choices=[7, 8], help=f"AffectNet protocol (default {d('num_classes')})")
    p.add_argument("--boxes", default=None, help="VGGFace2 loose_bb_*.csv for image-folder (auto-detected); for "
                                                 "rafdb a name,x1,y1,x2,y2 CSV of face boxes in the aligned images")
    p.add_argument("--jpeg-quality", type=int, help=f"default {d('jpeg_quality')}")
    p.add_argument("--box-scale", type=float,
                   help=f"crop side = box-scale x the face box's longer side (default {d('box_scale')})")
    p.add_argument("--max-pixels", type=int,
                   help=f"skip images of more pixels (decompression-bomb guard; default {d('max_pixels')})")
    p.add_argument("--ray", action="store_true", default=None,
                   help="run shard tasks on Ray (also when RAY_ADDRESS is set)")
    p.add_argument("--allow-outside", action="store_true", default=None,
                   help="read files that label-file paths or links place outside --input (refused by default; "
                        "refused ones are counted in report.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_build)


def _load_spec(path: str) -> dict:
    """The ``--spec`` YAML: a mapping of ``BuildConfig`` fields (``image-size`` or ``image_size``; null = the
    default), type-checked by the same loader as the run config (``ssfer_dist.typed``)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read spec ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of build fields")
    try:
        return convert_fields(BuildConfig, {str(k).replace("-", "_"): v for k, v in spec.items() if v is not None})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _cmd_build(a) -> int:
    merged = _load_spec(a.spec) if a.spec else {}
    flags = {f.name for f in dataclasses.fields(BuildConfig)} - {"progress"}
    merged.update({k: getattr(a, k) for k in flags if getattr(a, k) is not None})
    if a.no_progress:
        merged["progress"] = False
    missing = [f"--{k}" for k in ("format", "input", "output") if not merged.get(k)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (give them as flags or in --spec)")
    if merged.get("workers") is None:
        merged["workers"] = usable_cpus()
    elif merged["workers"] < 1:
        raise UserError(f"--workers {merged['workers']}: must be at least 1")
    cfg = BuildConfig(**merged)

    if cfg.format not in FORMATS:
        raise UserError(f"format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    rep = build.run_build(cfg)
    fallback = f"; {rep['fallback_boxes']} kept without a detected face (fallback boxes)" \
        if cfg.detector != "none" else ""
    print(f"{rep['num_samples']} samples in {rep['num_shards']} shards -> {cfg.output} "
          f"({rep['num_skipped']} skipped: {rep['skipped_by_reason'] or 'none'}{fallback}; "
          f"{rep['images_per_s']} images/s)")
    return 0


def _add_member_cap(p) -> None:
    p.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                   help="tar members larger than this are refused, never loaded "
                        f"(default {DEFAULT_MAX_MEMBER_BYTES}; a stored face image is a few kB)")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-read every shard: sha256, counts, images, keys, json")
    p.add_argument("url", help="shard folder (or its manifest.parquet)")
    _add_member_cap(p)
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(a) -> int:
    problems, stats = verify(a.url, max_member_bytes=a.max_member_bytes)
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
    _add_member_cap(p)
    p.set_defaults(handler=_cmd_inspect)


def _cmd_inspect(a) -> int:
    print(inspect_shards(a.url, sheet=a.sheet, num=a.num, max_member_bytes=a.max_member_bytes))
    return 0


def _add_split(sub) -> None:
    p = sub.add_parser("split", help="labeled subset + unlabeled remainder (semi-supervised stage)")
    p.add_argument("--manifest", required=True, help="source shard folder (or its manifest.parquet)")
    p.add_argument("--fraction", type=float, required=True, help="labeled fraction, e.g. 0.05")
    p.add_argument("--per-class", action="store_true", help="draw the fraction within every class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="writes OUTPUT/labeled and OUTPUT/unlabeled")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    _add_member_cap(p)
    p.set_defaults(handler=_cmd_split)


def _cmd_split(a) -> int:
    res = split_shards(a.manifest, a.output, fraction=a.fraction, per_class=a.per_class, seed=a.seed,
                       samples_per_shard=a.samples_per_shard, max_member_bytes=a.max_member_bytes)
    print(f"labeled: {res['labeled']} samples, unlabeled: {res['unlabeled']} samples -> {a.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssfer-shard",
                                     description="ssfer-shard: build | verify | inspect | split WebDataset face shards")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_verify, _add_inspect, _add_split):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``ssfer-shard`` / ``python -m sharding``."""
    return run_command("ssfer-shard", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
