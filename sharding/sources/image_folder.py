"""Image folders: one sub-folder per identity (CASIA-WebFace ``ROOT/0000045/001.jpg``, VGGFace2
``ROOT/train/n000002/0001_01.jpg``), optionally with VGGFace2 ``loose_bb_*.csv`` face boxes.

Identity = the first path component under ``--input`` (none for files directly in it). Without a box
the image goes to the build's detector (``--detector none``: the image is taken as an aligned crop).
"""
from __future__ import annotations

import csv
import glob
import os
import re
from typing import Dict, List, Optional, Tuple

from sharding.sources.base import FaceRecord, Listing, Skipped
from ssfer_dist.data.schema import make_key
from ssfer_dist.errors import UserError

__all__ = ["list_image_folder", "read_loose_bb", "IMAGE_EXTS"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_BB_HEADER = ["NAME_ID", "X", "Y", "W", "H"]


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.abspath(path).rstrip("/")) or "images"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)


def read_loose_bb(path: str) -> Dict[str, Tuple[float, float, float, float]]:
    """Read a VGGFace2 ``loose_bb_*.csv`` (header ``NAME_ID,X,Y,W,H``) into
    ``{"n000002/0001_01": (x1, y1, x2, y2)}``. Structural problems raise ``UserError`` with file:line."""
    out: Dict[str, Tuple[float, float, float, float]] = {}
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read box file ({e.strerror or e})") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().strip('"') for h in header[:5]] != _BB_HEADER:
            raise UserError(f"{path}:1: expected header {','.join(_BB_HEADER)}, got {','.join(header or [])!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 5:
                raise UserError(f"{path}:{lineno}: expected 5 fields NAME_ID,X,Y,W,H, got {len(row)}")
            try:
                x, y, w, h = (float(v) for v in row[1:5])
            except ValueError:
                raise UserError(f"{path}:{lineno}: X,Y,W,H must be numbers, got {row[1:5]}") from None
            out[row[0].strip().strip('"')] = (x, y, x + w, y + h)
    return out


def _find_boxes(root: str) -> Optional[str]:
    root = os.path.abspath(root)
    cands = sorted(glob.glob(os.path.join(root, "bb_landmark", "loose_bb_*.csv")))
    if len(cands) == 1:
        return cands[0]
    sibling = os.path.join(os.path.dirname(root), "bb_landmark", f"loose_bb_{os.path.basename(root)}.csv")
    return sibling if os.path.exists(sibling) else None


def list_image_folder(root: str, *, name: Optional[str] = None, boxes: Optional[str] = None) -> Listing:
    """List every image under ``root`` (recursively, sorted). Files with non-image extensions are
    skipped and counted (``not_an_image_file``)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: --format image-folder wants a folder (one sub-folder per identity)")
    dataset = name or _default_name(root)
    box_file = boxes or _find_boxes(root)
    box_map = read_loose_bb(box_file) if box_file else {}
    records: List[FaceRecord] = []
    skipped: List[Skipped] = []
    root_prefix = os.path.join(root, "")
    cut = len(root_prefix)
    stack = [root]
    while stack:  # depth-first, sorted: a stable listing order without os.walk's per-file overhead
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"{d}: cannot list folder ({e.strerror or e})") from None
        subdirs = []
        for ent in entries:
            fn = ent.name
            if fn.startswith("."):
                continue
            if ent.is_dir():
                if not (d == root and fn == "bb_landmark"):
                    subdirs.append(ent.path)
                continue
            path = ent.path
            rel = path[cut:].replace(os.sep, "/")
            dot = fn.rfind(".")
            ext = fn[dot:].lower() if dot > 0 else ""
            if ext not in IMAGE_EXTS:
                skipped.append(Skipped("not_an_image_file", path, f"extension {ext or '(none)'!r}"))
                continue
            slash = rel.find("/")
            identity = rel[:slash] if slash > 0 else None
            box = box_map.get(rel[: len(rel) - len(ext)]) if box_map else None
            try:
                size = ent.stat().st_size
            except OSError:
                size = 0
            records.append(FaceRecord(
                key=make_key(dataset, rel), source=dataset, source_id=rel, load=("file", path),
                identity=identity, box=box, box_source="annotation" if box else "detect", size_hint=size))
        stack.extend(reversed(subdirs))
    if not records and not skipped:
        raise UserError(f"{root}: no images found (expected ROOT/<identity>/<image>.jpg)")
    info = {"boxes": box_file} if box_file else {}
    return Listing(records, skipped, 0, dataset, info)
