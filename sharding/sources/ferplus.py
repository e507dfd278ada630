"""FER2013 / FERPlus: ``fer2013.csv`` (``emotion,pixels,Usage``; 48x48 grayscale as 2304 numbers) and,
when present beside it, ``fer2013new.csv`` (FERPlus votes, rows aligned with fer2013.csv by order).

FERPlus majority protocol: zero every vote count <= 1; the label is the top class when its count is
more than half of the remaining total, else unknown; unknown and NF (not a face) are dropped, an empty
``Image name`` means FERPlus dropped the image -> 8 classes. Without fer2013new.csv the plain FER2013
labels (7 classes) are used. Usage: Training -> train, PublicTest -> val, PrivateTest -> test.
The 48x48 images are face crops: box = whole frame.
"""
from __future__ import annotations

import csv
import os
from typing import List, Optional, Sequence

from sharding.sources.base import FaceRecord, Listing, Skipped
from ssfer_dist.shards.schema import FER2013_TO_CANONICAL, make_key
from ssfer_dist.errors import UserError

__all__ = ["list_ferplus", "majority_label"]

_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
_NEW_COLUMNS = ("Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                "fear", "contempt", "unknown", "NF")


def majority_label(votes: Sequence[float]) -> int:
    """FERPlus majority vote over the 10 columns (neutral..contempt, unknown, NF): returns the column
    index 0-9, where 8 (unknown) also stands for "no majority"."""
    v = [0.0 if c <= 1 else float(c) for c in votes]
    total = sum(v)
    top = max(range(len(v)), key=lambda i: (v[i], -i))
    return top if total > 0 and v[top] > 0.5 * total else 8


def list_ferplus(path: str, *, split: str, name: Optional[str] = None) -> Listing:
    """List FER2013 rows of ``split`` (train | val | test | all); FERPlus labels when
    ``fer2013new.csv`` is beside ``fer2013.csv``."""
    if split not in ("train", "val", "test", "all"):
        raise UserError(f"--split {split}: FER2013 has train, val (PublicTest) and test (PrivateTest), or all")
    old = os.path.join(path, "fer2013.csv") if os.path.isdir(path) else path
    if not os.path.exists(old):
        raise UserError(f"{old}: fer2013.csv missing")
    new = os.path.join(os.path.dirname(old), "fer2013new.csv")
    plus = os.path.exists(new)
    dataset = name or ("ferplus" if plus else "fer2013")
    new_rows: List[List[str]] = []
    if plus:
        with open(new, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in (next(reader, None) or [])]
            if tuple(header[:12]) != _NEW_COLUMNS:
                raise UserError(f"{new}:1: expected header {','.join(_NEW_COLUMNS)}, got {','.join(header)!r}")
            new_rows = [r for r in reader]
    records: List[FaceRecord] = []
    skipped: List[Skipped] = []
    with open(old, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in (next(reader, None) or [])]
        if header[:3] != ["emotion", "pixels", "Usage"]:
            raise UserError(f"{old}:1: expected header emotion,pixels,Usage, got {','.join(header)!r}")
        row_i = -1
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            row_i += 1
            where = f"{old}:{lineno}"
            if len(row) < 3:
                raise UserError(f"{where}: expected 3 fields emotion,pixels,Usage, got {len(row)}")
            usage = row[2].strip()
            if usage not in _USAGE:
                raise UserError(f"{where}: Usage must be Training, PublicTest or PrivateTest, got {usage!r}")
            try:
                emotion = int(row[0])
            except ValueError:
                raise UserError(f"{where}: emotion must be an integer 0-6, got {row[0]!r}") from None
            if split != "all" and _USAGE[usage] != split:
                continue
            source_id = f"{row_i:05d}"
            if plus:
                if row_i >= len(new_rows):
                    raise UserError(f"{new}: has {len(new_rows)} rows but {old} has more (rows must align)")
                nr = new_rows[row_i]
                nwhere = f"{new}:{row_i + 2}"
                if len(nr) < 12:
                    raise UserError(f"{nwhere}: expected 12 fields, got {len(nr)}")
                if not nr[1].strip():
                    skipped.append(Skipped("dropped_by_ferplus", nwhere, "empty Image name"))
                    continue
                try:
                    votes = [float(v) for v in nr[2:12]]
                except ValueError:
                    raise UserError(f"{nwhere}: vote counts must be numbers, got {nr[2:12]}") from None
                lab = majority_label(votes)
                if lab >= 8:
                    skipped.append(Skipped("no_majority" if lab == 8 else "not_a_face", nwhere, str(nr[2:12])))
                    continue
                cls, label_orig = lab, [int(v) for v in votes]
                source_id = os.path.splitext(nr[1].strip())[0]
            else:
                if not 0 <= emotion < len(FER2013_TO_CANONICAL):
                    skipped.append(Skipped("unknown_class", where, f"emotion {emotion} not in 0-6"))
                    continue
                cls, label_orig = FER2013_TO_CANONICAL[emotion], emotion
            records.append(FaceRecord(
                key=make_key(dataset, source_id), source=dataset, source_id=source_id,
                load=("pixels", row[1], 48, 48), cls=cls, label_orig=label_orig, box_source="frame",
                size_hint=2000))
        if plus and row_i + 1 != len(new_rows):
            raise UserError(f"{new}: has {len(new_rows)} rows but {old} has {row_i + 1} (rows must align)")
    return Listing(records, skipped, 8 if plus else 7, dataset)
