"""``ssfer-shard`` — build | verify | inspect | split (argparse lives here only).

Every subcommand hands plain values to the module that does the work. ``UserError`` -> one line on
stderr and exit code 2; ``verify`` exits 1 when it finds problems.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ssfer_dist.errors import UserError, run_command

__all__ = ["main", "build_parser"]


_BUILD_DEFAULTS = dict(split="train", image_size=112, samples_per_shard=1000, max_shard_bytes=1 << 30, workers=None,
                      seed=0, detector="none", num_classes=7, jpeg_quality=95, box_scale=1.25,
                      max_pixels=64 * 1024 * 1024)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _add_build(sub) -> None:
    from sharding.sources import FORMATS

    d = _BUILD_DEFAULTS
    p = sub.add_parser("build", help="turn a dataset into WebDataset shards + manifest.parquet + report.json")
    p.add_argument("--spec", default=None, help="YAML file with the same fields (flags given here override it)")
    p.add_argument("--format", choices=FORMATS, help="(required here or in --spec)")
    p.add_argument("--input", help="dataset folder (or .rec / fer2013.csv file)")
    p.add_argument("--output", help="output folder or s3://bucket/prefix")
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help=f"train | test | all (val: FER2013 PublicTest); ignored by image-folder and insightface-rec "
                        f"(default {d['split']})")
    p.add_argument("--image-size", type=int, help=f"stored square image side (default {d['image_size']})")
    p.add_argument("--samples-per-shard", type=int, help=f"default {d['samples_per_shard']}")
    p.add_argument("--max-shard-bytes", type=int,
                   help="cut shards before this many bytes (estimated from source sizes; default 1 GiB)")
    p.add_argument("--workers", type=int,
                   help="worker processes on this machine (default: every CPU this process may use)")
    p.add_argument("--seed", type=int, help="sample order seed; same seed -> identical shards (default 0)")
    p.add_argument("--name", default=None, help="shard/key prefix (default: the dataset's name)")
    p.add_argument("--detector", choices=["none", "haar", "mtcnn"],
                   help="face detector for images without boxes (default none: images are aligned face crops)")
    p.add_argument("--num-classes", type=int, choices=[7, 8], help="AffectNet protocol (default 7)")
    p.add_argument("--boxes", default=None, help="VGGFace2 loose_bb_*.csv for image-folder (auto-detected)")
    p.add_argument("--jpeg-quality", type=int, help=f"default {d['jpeg_quality']}")
    p.add_argument("--box-scale", type=float,
                   help=f"crop side = box-scale x the face box's longer side (default {d['box_scale']})")
    p.add_argument("--max-pixels", type=int, help="skip images larger than this (decompression-bomb guard; default 64 Mi)")
    p.add_argument("--ray", action="store_true", default=None,
                   help="run shard tasks on Ray (also when RAY_ADDRESS is set)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_cmd_build)


_SPEC_FIELDS = ("format", "input", "output", "split", "image_size", "samples_per_shard", "max_shard_bytes", "workers",
                "seed", "name", "detector", "num_classes", "boxes", "jpeg_quality", "box_scale", "max_pixels", "ray")


_SPEC_TYPES = {"image_size": int, "samples_per_shard": int, "max_shard_bytes": int, "workers": int, "seed": int,
               "num_classes": int, "jpeg_quality": int, "box_scale": float, "max_pixels": int, "ray": bool}


def _load_spec(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read spec ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of build fields")
    out = {}
    for k, v in spec.items():
        key = str(k).replace("-", "_")
        if key not in _SPEC_FIELDS:
            raise UserError(f"{path}: unknown field {k!r} (expected one of {', '.join(_SPEC_FIELDS)})")
        want = _SPEC_TYPES.get(key, str)
        if v is not None and not (isinstance(v, want) and not (want is int and isinstance(v, bool))):
            if want is float and isinstance(v, int):
                v = float(v)
            else:
                raise UserError(f"{path}: field {k!r} must be {want.__name__}, got {v!r}")
        out[key] = v
    return out


def _cmd_build(a) -> int:
    from sharding.build import BuildConfig, run_build

    merged = dict(_BUILD_DEFAULTS)
    if a.spec:
        merged.update(_load_spec(a.spec))
    merged.update({k: getattr(a, k) for k in _SPEC_FIELDS if getattr(a, k, None) is not None})
    missing = [f"--{k}" for k in ("format", "input", "output") if not merged.get(k)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (give them as flags or in --spec)")
    if merged.get("workers") is None:
        merged["workers"] = usable_cpus()
    elif merged["workers"] < 1:
        raise UserError(f"--workers {merged['workers']}: must be at least 1")
    use_ray = bool(merged.pop("ray", False))
    try:
        cfg = BuildConfig(use_ray=use_ray, progress=not a.no_progress, **merged)
    except TypeError as e:
        raise UserError(f"build spec: {e}") from None
    from sharding.sources import FORMATS

    if cfg.format not in FORMATS:
        raise UserError(f"format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    rep = run_build(cfg)
    print(f"{rep['num_samples']} samples in {rep['num_shards']} shards -> {cfg.output} "
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
    from sharding.inspection import inspect_shards

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
    parser = argparse.ArgumentParser(prog="ssfer-shard", description="ssfer-shard: build | verify | inspect | split WebDataset face shards")
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
