"""AffectNet: ``Manually_Annotated_file_lists/{training,validation}.csv`` (validation = our test set),
images under ``Manually_Annotated_Images/``. The face box comes from face_x/face_y/face_width/face_height.
Expressions 8-10 (None, Uncertain, Non-Face) are dropped; the 7-class protocol also drops 7 (Contempt)."""
from __future__ import annotations

import csv
import os
from typing import List, Optional

from sharding.sources.base import FaceRecord, Listing, Skipped
from sharding.sources.confine import InputRoot
from ssfer_dist.shards.schema import AFFECTNET_TO_CANONICAL, make_key
from ssfer_dist.errors import UserError

__all__ = ["list_affectnet", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
_FILES = {"train": "training.csv", "test": "validation.csv"}


def list_affectnet(root: str, *, split: str, name: Optional[str] = None, num_classes: int = 7,
                   allow_outside: bool = False) -> Listing:
    """List AffectNet samples (``split`` train | test | all) under the 7- or 8-class protocol."""
    if num_classes not in (7, 8):
        raise UserError(f"--num-classes {num_classes}: AffectNet protocols are 7 or 8 classes")
    if split not in ("train", "test", "all"):
        raise UserError(f"--split {split}: AffectNet has train (training.csv) and test (validation.csv), or all")
    dataset = name or "affectnet"
    lists = os.path.join(root, "Manually_Annotated_file_lists")
    img_root = os.path.join(root, "Manually_Annotated_Images")
    splits = ["train", "test"] if split == "all" else [split]
    confine = InputRoot(root, allow_outside)
    records: List[FaceRecord] = []
    skipped: List[Skipped] = []
    for sp in splits:
        path = os.path.join(lists, _FILES[sp])
        if not os.path.exists(path):
            raise UserError(f"{path}: AffectNet list missing (expected Manually_Annotated_file_lists/{_FILES[sp]})")
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in (next(reader, None) or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise UserError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} "
                                f"(expected {','.join(REQUIRED_COLUMNS)},...)")
            col = {c: header.index(c) for c in REQUIRED_COLUMNS}
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                where = f"{path}:{lineno}"
                if len(row) < len(header):
                    raise UserError(f"{where}: expected {len(header)} fields, got {len(row)}")
                rel = row[col["subDirectory_filePath"]].strip()
                try:
                    x, y, w, h = (float(row[col[c]]) for c in ("face_x", "face_y", "face_width", "face_height"))
                    expr = int(row[col["expression"]])
                except ValueError:
                    raise UserError(f"{where}: face_x/face_y/face_width/face_height/expression "
                                    "must be numbers") from None
                if expr in (8, 9, 10) or (num_classes == 7 and expr == 7):
                    skipped.append(Skipped("dropped_class", where, f"expression {expr}"))
                    continue
                if not 0 <= expr < num_classes:
                    skipped.append(Skipped("unknown_class", where, f"expression {expr} not in 0-10"))
                    continue
                img = os.path.join(img_root, rel)
                refused = confine.check_named(rel, img) if rel else None
                if refused:
                    skipped.append(Skipped(refused[0], where, refused[1]))
                    continue
                if not rel or not os.path.exists(img):
                    skipped.append(Skipped("missing_image", where, img))
                    continue
                box = (x, y, x + w, y + h) if w > 0 and h > 0 else None
                records.append(FaceRecord(
                    key=make_key(dataset, rel), source=dataset, source_id=rel, load=("file", img),
                    cls=AFFECTNET_TO_CANONICAL[expr], label_orig=expr, box=box,
                    box_source="annotation" if box else "detect", size_hint=os.path.getsize(img)))
    return Listing(records, skipped, num_classes, dataset)
